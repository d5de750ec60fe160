"""Load a finished run's model, and export it merged or as the adapter alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from openft.fileio import atomic_dir
from openft.models.load import LoadedModel, load_model
from openft.models.registry import ModelNotFound, ModelSource
from openft.train.lora import load_adapter, merge_lora

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def run_and_adapter(path: str | Path) -> tuple[Path, Path | None]:
    """The run folder behind `path` and the adapter to take from it: `path` is a run
    (its final adapter; None for a full fine-tune) or one of its checkpoints,
    `<run>/checkpoints/step-N`, whose servable adapter sits beside its optimizer state."""
    p = Path(path)
    if p.parent.name == "checkpoints" and (p / ADAPTER_FILES[0]).is_file():
        return p.parent.parent, p
    return p, (p / "adapter") if (p / "adapter").is_dir() else None


def default_name(path: str | Path) -> str:
    """What an export is called unless named: the run's folder name, with the step for a checkpoint."""
    run, adapter = run_and_adapter(path)
    return run.name if adapter is None or adapter.name == "adapter" else f"{run.name}-{adapter.name}"


def is_run_dir(path: str | Path) -> bool:
    """A finished run, or a checkpoint of one."""
    run, adapter = run_and_adapter(path)
    return (run / "lineage.json").exists() and (adapter is not None or (run / "model").is_dir())


def load_run(run_dir: str | Path, *, merged: bool = False) -> LoadedModel:
    """The fine-tuned model of a run or checkpoint: base + adapter (optionally merged), or the full model."""
    source = run_dir
    run_dir, adapter = run_and_adapter(source)
    if adapter is None:
        return load_model(str(run_dir / "model"))
    lineage = json.loads((run_dir / "lineage.json").read_text())
    # The weights the run trained on, as resolved then (serving loads the same):
    # `base_model` is the name or path the user typed, maybe relative to another cwd.
    loaded = load_model(lineage["base_model_path"], chat_template=custom_template(run_dir))
    load_adapter(loaded.model, adapter)
    if merged:
        merge_lora(loaded.model)
    loaded.model.eval()
    loaded.source = ModelSource(name=default_name(source), kind="hf_dir", path=run_dir)
    return loaded


def custom_template(run_dir: Path) -> Path | None:
    """The template file a run trained with when it was given one (`--chat-template`):
    the copy saved beside its adapter, else the file it named if it is still there.
    None when the run used the base's own, which load_model resolves the same again."""
    config = run_dir / "config.json"
    named = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    if not named:
        return None
    saved = run_dir / "adapter" / "chat_template.jinja"
    if saved.is_file():
        return saved
    if Path(named).is_file():
        return Path(named)
    raise ModelNotFound(f"the chat template this run trained with ({named}) is gone, and no copy was saved")


def load_any(arg: str, *, merged: bool = True) -> LoadedModel:
    """A base model argument or a run folder."""
    return load_run(arg, merged=merged) if is_run_dir(arg) else load_model(arg)


def export(run_dir: str | Path, out: str | Path, *, adapter_only: bool = False) -> Path:
    """Write a merged model (safetensors + tokenizer) or just the adapter to `out`."""
    source, out = Path(run_dir), Path(out)
    check_source(source)
    run_dir, adapter = run_and_adapter(source)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    if adapter_only and adapter is None:
        raise ValueError("this run is a full fine-tune: it has no adapter; export the model instead")
    with atomic_dir(out) as tmp:
        if adapter_only and adapter.name == "adapter":
            shutil.copytree(adapter, tmp, dirs_exist_ok=True)
        elif adapter_only:  # a checkpoint: its adapter, not its optimizer state
            for name in ADAPTER_FILES:
                shutil.copy(adapter / name, tmp / name)
        else:
            loaded = load_run(source, merged=True)
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
            shutil.copy(run_dir / "lineage.json", tmp / "openft_lineage.json")
    return out


def check_source(path: Path) -> None:
    if not is_run_dir(path):
        raise FileNotFoundError(
            f"{path} is not a finished openft run or checkpoint (no lineage.json with adapter/ or model/)"
        )
