"""Where openft writes: everything lives under OPENFT_HOME (default ~/.openft)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    path = Path(os.environ.get("OPENFT_HOME") or Path.home() / ".openft").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """Converted base models (GGUF -> safetensors cache)."""
    return _sub("models")


def runs_dir() -> Path:
    """One folder per fine-tuning run: checkpoints, adapter, metrics, lineage."""
    return _sub("runs")


def datasets_dir() -> Path:
    return _sub("datasets")


def _sub(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
