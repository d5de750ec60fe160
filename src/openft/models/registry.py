"""Which base models exist, and how a model name resolves to one: the one resolver
every caller uses (CLI, API, worker; the engine is handed what it resolves to).

A base model is one of:
  * a built-in name (`smollm2-135m-instruct`, `qwen2.5-coder-0.5b-instruct`, `gemma-3-270m`;
    see models/builtins.py), usable once `openft models pull NAME` installed its packages,
  * a name the operator registered with `openft models add PATH --name NAME`
    (a local Hugging Face directory or a .gguf file, checked when it is added and
    kept in OPENFT_HOME/registered_models.json),
and, from the CLI only (`resolve`), also
  * a local Hugging Face model directory (config.json + *.safetensors),
  * a local `.gguf` file,
  * a hub id (`org/name`), which works only where a hub is reachable.
Over HTTP (`resolve_name`) only the names count: a caller never names a path on
the server, and every unknown name gets the same answer whatever lies on disk.
Only safetensors or GGUF weights are ever loaded: a directory that holds pickle
weights (`pytorch_model.bin`) alone is refused, and the pickle is never opened.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from openft import home
from openft.fileio import atomic_write
from openft.models.builtins import (  # noqa: F401 - re-exported: callers import these from the registry
    BUILTINS,
    DEFAULT_MODEL,
    BuiltinModel,
    BuiltinNotInstalled,
    builtin_gguf_path,
    require_installed,
)

Kind = Literal["builtin", "hf_dir", "gguf", "hub"]


# Files that may hold pickled tensors (torch.save, pickle, Lightning checkpoints).
# Loading one can run arbitrary code, so openft never opens them as weights.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})

# A registered name: no "/" (so it is never a path or a hub id), no ":" (fine-tuned
# model names use it), and short enough to sit inside a fine-tuned model's name.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REGISTRY_FILE = "registered_models.json"


class ModelNotFound(Exception):
    pass


@dataclass(frozen=True)
class ModelSource:
    """A resolved base model: what it is called and where its weights are."""

    name: str  # short, stable name used in model ids and lineage
    kind: Kind
    path: Path | None  # a HF directory, or the .gguf file
    hub_id: str | None = None
    cache_name: str | None = None  # the folder under OPENFT_HOME/models a GGUF converts into (default: name)

    @property
    def cache_dir(self) -> Path:
        """Where a GGUF model, converted once to safetensors, is kept."""
        return home.models_dir() / (self.cache_name or self.name.replace("/", "--"))


@dataclass(frozen=True)
class RegisteredModel:
    """A base model the operator registered by name (`openft models add`)."""

    name: str
    path: str  # absolute: a HF directory or a .gguf file
    kind: Literal["hf_dir", "gguf"]
    added_at: int

    def source(self) -> ModelSource:
        # A folder of its own under models/: never the cache of a built-in, a merged run
        # (`merged-…`) or a .gguf the CLI was given by path.
        return ModelSource(name=self.name, kind=self.kind, path=Path(self.path), cache_name=f"registered--{self.name}")


# ---------------------------------------------------------------- pickle weights


def is_pickle(path: Path) -> bool:
    """A file whose name says it may be a pickle (and whose bytes are not a
    safetensors file under that name). Reads at most 9 bytes; never unpickles."""
    if path.suffix.lower() not in PICKLE_SUFFIXES or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return True
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    looks_safetensors = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30)
    return not looks_safetensors


def pickle_files(directory: Path) -> list[str]:
    """Names of the files in `directory` that may be pickles, sorted."""
    d = Path(directory)
    return sorted(p.name for p in d.iterdir() if is_pickle(p)) if d.is_dir() else []


def pickle_note(directory: Path) -> str:
    """' (found a.bin, b.pt: pickle weights are never loaded)', or '' when none."""
    found = pickle_files(directory)
    return f" (found {', '.join(found)}: pickle weights are never loaded)" if found else ""


# ---------------------------------------------------------------- local models


def local_model(arg: str) -> ModelSource | None:
    """A local HF directory or .gguf file, checked; None when `arg` names nothing on disk."""
    p = Path(arg).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        try:
            with open(p, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ModelNotFound(f"{p}: cannot be read ({e.strerror})") from None
        if magic != b"GGUF":
            raise ModelNotFound(f"{p}: not a GGUF file (it does not start with the GGUF magic bytes)")
        return ModelSource(name=p.stem.lower(), kind="gguf", path=p.resolve())
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotFound(f"{p}: not a Hugging Face model directory (no config.json)")
        if not any(p.glob("*.safetensors")):
            raise ModelNotFound(f"{p}: no *.safetensors weights{pickle_note(p)}")
        if (p / "adapter_config.json").exists() and not (p / "adapter_model.safetensors").exists():
            raise ModelNotFound(f"{p}: its adapter has no adapter_model.safetensors{pickle_note(p)}")
        return ModelSource(name=p.resolve().name.lower(), kind="hf_dir", path=p.resolve())
    if p.exists():
        raise ModelNotFound(f"{p}: expected a model directory or a .gguf file")
    return None


# ---------------------------------------------------------------- the registry file


def registry_path() -> Path:
    return home.home() / REGISTRY_FILE


def registered() -> dict[str, RegisteredModel]:
    """The operator's registered models, by name ({} when none are)."""
    f = registry_path()
    if not f.exists():
        return {}
    try:
        rows = json.loads(f.read_text())["models"]
        return {name: RegisteredModel(name=name, **row) for name, row in rows.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ModelNotFound(f"{f} is not a valid model registry ({e}); fix or remove it") from None


def _save(models: dict[str, RegisteredModel]) -> None:
    """Write the registry atomically: readers see the old file or the new one, never half."""
    f = registry_path()
    rows = {m.name: {k: v for k, v in asdict(m).items() if k != "name"} for m in models.values()}
    atomic_write(f, json.dumps({"models": rows}, indent=2, sort_keys=True))


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ValueError(
            f"model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if name in BUILTINS:
        raise ValueError(f"model name {name!r} is a built-in model's name; choose another")


def add(path: str | Path, name: str) -> RegisteredModel:
    """Register a local HF directory or .gguf file as base model `name`, after checking
    that it holds safetensors or GGUF weights. A name already registered is replaced
    only by `remove` first, so a typo never silently repoints a model jobs use."""
    check_name(name)
    source = local_model(str(path))
    if source is None:
        raise FileNotFoundError(f"{path}: no such file or directory")
    models = registered()
    if name in models:
        raise FileExistsError(f"model name {name!r} is already registered ({models[name].path}); remove it first")
    model = RegisteredModel(name=name, path=str(source.path), kind=source.kind, added_at=int(time.time()))
    _save({**models, name: model})
    return model


def remove(name: str) -> RegisteredModel:
    """Forget a registered name. Its files are the operator's and stay where they are;
    openft's own cast copy of them (openft.models.weightcache) goes."""
    from openft.models import weightcache

    models = registered()
    if name not in models:
        raise ModelNotFound(f"no registered model named {name!r}")
    gone = models.pop(name)
    _save(models)
    source = Path(gone.path)
    weightcache.drop_for(source if source.is_dir() else None)  # a GGUF's folder may hold others' files
    return gone


# ---------------------------------------------------------------- resolving


def _builtin(arg: str) -> ModelSource:
    """A built-in whose packages are installed. Its GGUF may not be assembled yet:
    `load.materialise` assembles and checks it before converting."""
    try:
        path = require_installed(BUILTINS[arg])
    except BuiltinNotInstalled as e:
        raise ModelNotFound(str(e)) from None
    return ModelSource(name=arg, kind="gguf", path=path)


def unknown_name(name: str) -> str:
    """The one message for a model name that names nothing the caller may use: the
    same for every such name, whatever exists on disk under it."""
    return f"The model '{name[:200]}' does not exist or you do not have access to it (GET /v1/models lists yours)"


def resolve_name(name: str) -> ModelSource:
    """A base model by name only: a built-in or a registered model. What callers over
    HTTP may name; no path or hub id is looked up, so nothing on disk changes the answer."""
    if name in BUILTINS:
        return _builtin(name)
    model = registered().get(name)
    if model is None:
        raise ModelNotFound(unknown_name(name))
    return model.source()


def resolve(arg: str) -> ModelSource:
    """A base model as the CLI and the worker take it: a name (built-in or registered),
    a local directory or .gguf file, or a hub id."""
    if arg in BUILTINS:
        return _builtin(arg)
    model = registered().get(arg)
    if model is not None:
        return model.source()
    local = local_model(arg)
    if local is not None:
        return local
    if "/" in arg and not arg.startswith((".", "/", "~")):
        return ModelSource(name=arg.split("/")[-1].lower(), kind="hub", path=None, hub_id=arg)
    known = ", ".join(BUILTINS)
    raise ModelNotFound(
        f"unknown model '{arg}': not a built-in ({known}), a registered model, a local directory, "
        "a .gguf file or a hub id"
    )
