"""Atomic checkpoints: trainable weights, optimizer, RNG and position; no pickle.

A checkpoint is written into a hidden temporary folder and renamed into place
(`checkpoints/step-000040`) only when every file is on disk, so a crash mid-save
never leaves a folder that looks complete; `latest()` only ever sees finished
ones. Tensors go to safetensors, the rest to JSON: loading a checkpoint never
unpickles anything.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from openft.faults import fault_point
from openft.fileio import atomic_dir, atomic_write
from openft.tensorfile import write_safetensors

STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int  # optimizer steps completed
    epoch: float
    best_valid_loss: float | None
    evals_without_improvement: int
    history: list[dict]  # metrics rows so far
    trained_tokens: int
    elapsed_s: float


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"{pid}.{k}"] = t.detach().reshape(-1) if t.dim() == 0 else t.detach()
    return tensors, {
        "param_groups": sd["param_groups"],
        "scalar_keys": sorted(k for k, v in tensors.items() if v.numel() == 1 and k.endswith(".step")),
    }


def save(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    extra: Callable[[Path], None] | None = None,
    rngs: list[torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint `state.step`; `extra(tmp_dir)` may add files (the servable
    adapter) before the folder is renamed into place. A failed write (a full disk)
    removes its partial folder, so it neither fills the disk further nor looks like
    a checkpoint, and raises CheckpointWriteError naming the step and the cause.
    `rngs`: every rank's RNG state where several ranks train (rank 0 writes)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{state.step:06d}"
    try:
        # Written as .tmp-step-N, renamed into place; the same step saved again
        # replaces the old copy with never a moment with neither on disk.
        with atomic_dir(final) as tmp:
            _write(tmp, model, optimizer, state, extra, rngs)
    except Exception as e:
        code = os_errno(e)
        if code is None:
            raise
        raise CheckpointWriteError(
            code, f"could not write the checkpoint at step {state.step} ({final}): {os.strerror(code)}"
        ) from e
    fault_point("checkpoint.commit")
    return final


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (errno kept: ENOSPC for a full disk)."""


def os_errno(e: BaseException) -> int | None:
    """The OS error behind `e`: safetensors reports a failed write as a
    SafetensorError whose text ends in "(os error N)", not as an OSError."""
    if isinstance(e, OSError):
        return e.errno
    m = re.search(r"\(os error (\d+)\)", str(e))
    return int(m.group(1)) if m else None


def _write(
    tmp: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    extra: Callable[[Path], None] | None,
    rngs: list[torch.Tensor] | None,
) -> None:
    write_safetensors(trainable_state(model), tmp / "trainable.safetensors")
    fault_point("checkpoint.write")
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    write_safetensors(opt_tensors, tmp / "optimizer.safetensors")
    write_rng(tmp, rngs or [torch.get_rng_state()])
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    if extra:
        extra(tmp)
    # Written last: its presence inside a renamed folder means "complete".
    (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1))


def write_rng(tmp: Path, rngs: list[torch.Tensor]) -> None:
    """torch's RNG state of every rank (`torch` is rank 0's, `torch.rank<R>` the
    others'), CUDA's, and Python's."""
    rng = {"torch": rngs[0], **{f"torch.rank{r}": t for r, t in enumerate(rngs) if r}}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    write_safetensors(rng, tmp / "rng.safetensors")
    py_state = random.getstate()
    (tmp / "python_rng.json").write_text(json.dumps([py_state[0], list(py_state[1]), py_state[2]]))


def prune(run_dir: Path, keep: int, keep_steps: set | None = None) -> list[int]:
    """Delete all but the `keep` latest complete checkpoints and those of
    `keep_steps` (the best-scoring one), and leftover temp folders; returns the steps deleted. Each is renamed out of the `step-*`
    namespace before its files go, so a crash mid-delete never leaves a
    half-deleted folder that looks like a checkpoint."""
    root = Path(run_dir) / "checkpoints"
    done = complete(run_dir)
    deleted = []
    for old in done[: max(0, len(done) - keep)]:
        if step_of(old) in (keep_steps or ()):
            continue
        gone = root / f".del-{old.name}"
        shutil.rmtree(gone, ignore_errors=True)
        os.replace(old, gone)
        deleted.append(step_of(old))
        fault_point("checkpoint.prune")
        shutil.rmtree(gone, ignore_errors=True)
    clean_leftovers(run_dir)
    return deleted


def clean_leftovers(run_dir: Path) -> None:
    """Remove what an interrupted save or prune left behind."""
    root = Path(run_dir) / "checkpoints"
    for leftover in [*root.glob(".tmp-step-*"), *root.glob(".del-step-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def step_of(path: Path) -> int:
    return int(Path(path).name.split("-")[1])


def complete(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).exists())


def trim_metrics(path: Path, state: TrainerState) -> None:
    """On resume, make metrics.jsonl hold exactly the rows up to the checkpoint
    (`state.history`): rows an interrupted attempt wrote past it are trained again."""
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in state.history))


def latest(run_dir: Path) -> Path | None:
    done = complete(run_dir)
    return done[-1] if done else None


def load(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0) -> TrainerState:
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    for name, value in weights.items():
        params[name].data.copy_(value)
    optimizer.load_state_dict(_read_optimizer(ckpt))
    read_rng(ckpt, rank)
    return read_state(ckpt)


def _read_optimizer(ckpt: Path) -> dict:
    meta = json.loads((ckpt / "optimizer.json").read_text())
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t.reshape(()) if key in meta["scalar_keys"] else t
    return {"state": state, "param_groups": meta["param_groups"]}


def read_full(ckpt: Path, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """A one-rank checkpoint as full state dicts keyed by parameter name (what a
    sharded model loads): the optimizer's parameter ids are positions in the list
    of trainable parameters, in `named_parameters` order."""
    weights = load_file(str(ckpt / "trainable.safetensors"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sd = _read_optimizer(ckpt)
    state = {names[pid]: v for pid, v in sd["state"].items()}
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in sd["param_groups"]]
    return weights, {"state": state, "param_groups": groups}


def read_rng(ckpt: Path, rank: int = 0) -> None:
    """Restore this rank's RNG states; a rank the writing run did not have keeps
    the seed it started with."""
    rng = load_file(str(ckpt / "rng.safetensors"))
    key = "torch" if rank == 0 else f"torch.rank{rank}"
    if key in rng:
        torch.set_rng_state(rng[key])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    v, internal, gauss = json.loads((ckpt / "python_rng.json").read_text())
    random.setstate((v, tuple(internal), gauss))


def read_state(ckpt: Path) -> TrainerState:
    return TrainerState(**json.loads((ckpt / STATE_FILE).read_text()))
