"""Load a finished run's model, and export it merged or as the adapter alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from openft.fileio import atomic_dir
from openft.models.load import LoadedModel, load_model
from openft.models.registry import ModelSource
from openft.train.lora import load_adapter, merge_lora


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "lineage.json").exists() and ((p / "adapter").is_dir() or (p / "model").is_dir())


def load_run(run_dir: str | Path, *, merged: bool = False) -> LoadedModel:
    """The fine-tuned model of a run: base + adapter (optionally merged), or the full model."""
    run_dir = Path(run_dir)
    if (run_dir / "model").is_dir():
        return load_model(str(run_dir / "model"))
    lineage = json.loads((run_dir / "lineage.json").read_text())
    # The weights the run trained on, as resolved then (serving loads the same):
    # `base_model` is the name or path the user typed, maybe relative to another cwd.
    loaded = load_model(lineage["base_model_path"])
    load_adapter(loaded.model, run_dir / "adapter")
    if merged:
        merge_lora(loaded.model)
    loaded.model.eval()
    loaded.source = ModelSource(name=run_dir.name, kind="hf_dir", path=run_dir)
    return loaded


def load_any(arg: str, *, merged: bool = True) -> LoadedModel:
    """A base model argument or a run folder."""
    return load_run(arg, merged=merged) if is_run_dir(arg) else load_model(arg)


def export(run_dir: str | Path, out: str | Path, *, adapter_only: bool = False) -> Path:
    """Write a merged model (safetensors + tokenizer) or just the adapter to `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if not is_run_dir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a finished openft run (no lineage.json with adapter/ or model/)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    if adapter_only and not (run_dir / "adapter").is_dir():
        raise ValueError("this run is a full fine-tune: it has no adapter; export the model instead")
    with atomic_dir(out) as tmp:
        if adapter_only:
            shutil.copytree(run_dir / "adapter", tmp, dirs_exist_ok=True)
        else:
            loaded = load_run(run_dir, merged=True)
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
            shutil.copy(run_dir / "lineage.json", tmp / "openft_lineage.json")
    return out
