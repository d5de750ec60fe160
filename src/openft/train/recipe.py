"""The fine-tuning recipe: setup -> train -> save, one function per stage.

`finetune(spec)` is the whole workflow; the CLI (and later the job worker) is thin
glue over it. Everything a run writes goes into its run folder:

  run_dir/
    config.json          the job spec with every `auto` resolved
    lineage.json         base model + weight hash, dataset hash, split seed
    metrics.jsonl        one row per optimizer step (+ validation rows)
    checkpoints/step-N/  atomic, resumable
    adapter/             LoRA adapter (PEFT format) + tokenizer + chat template
    model/               full fine-tuning: the whole model (safetensors)
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import torch

from openft import home
from openft.config import JobSpec
from openft.data.load import LoadResult, load_dataset, parse_columns
from openft.data.split import split_examples
from openft.data.types import Example
from openft.faults import fault_point
from openft.fileio import atomic_dir, atomic_write, sha256_files
from openft.heap import allocator_in_use, keep_freed_memory
from openft.models.load import LoadedModel, hash_weights, load_model
from openft.train import checkpoint
from openft.train.batching import micro_batches, plan_steps
from openft.train.hparams import auto_max_seq_length, lr_at, resolve_lora, resolve_train
from openft.train.lora import LoraParams, apply_lora, default_targets, save_adapter
from openft.train.loss import causal_lm_loss
from openft.train.precision import Precision, weights_on_disk
from openft.train.progress import ProgressBar
from openft.train.tokenize import Encoded, encode_all

EventFn = Callable[[str, dict], None]
ControlFn = Callable[[], "str | None"]  # polled after each step: None, "pause" or "cancel"


class Interrupted(Exception):
    """Training stopped on request ("pause" or "cancel"); for a pause the last
    checkpoint holds everything needed to resume."""

    def __init__(self, reason: str, step: int):
        super().__init__(f"training {reason} at step {step}")
        self.reason, self.step = reason, step


VALID_SAMPLE = 64  # validation examples scored at each interval


class DataError(Exception):
    """The dataset has errors; `.result` holds the full report."""

    def __init__(self, result: LoadResult, what: str = "training data"):
        self.result = result
        lines = [str(p) for p in result.errors[:20]]
        more = f"\n... and {len(result.errors) - 20} more" if len(result.errors) > 20 else ""
        super().__init__(f"{what} has {len(result.errors)} error(s):\n" + "\n".join(lines) + more)


@dataclass
class Prepared:
    train: list[Example]
    valid: list[Example]
    train_enc: list[Encoded]
    valid_enc: list[Encoded]
    max_len: int
    truncated: int
    fully_masked: int  # training examples with no trained token left (dropped)
    data_hash: str


@dataclass
class TrainResult:
    run_dir: Path
    output_dir: Path  # adapter/ or model/
    history: list[dict]
    trained_tokens: int
    signals: dict
    tokens_per_s: float
    elapsed_s: float
    stopped_early: bool = False
    config: dict = field(default_factory=dict)


def file_hash(path: str | Path) -> str:
    """sha256 of a dataset file, or of a folder's files with their names (lineage)."""
    p = Path(path)
    return sha256_files(sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p], names=True)


def load_checked(path: str, spec: JobSpec) -> LoadResult:
    d = spec.data
    result = load_dataset(
        path, layout=d.layout, columns=parse_columns(d.columns) if d.columns else None, record_element=d.record_element
    )
    if not result.ok:
        raise DataError(result, what=path)
    return result


def prepare_data(spec: JobSpec, tokenizer, model_context: int) -> Prepared:
    train_res = load_checked(spec.data.path, spec)
    if spec.data.validation_path:
        train, valid = train_res.examples, load_checked(spec.data.validation_path, spec).examples
    else:
        train, valid = split_examples(train_res.examples, spec.data.validation_split, spec.train.seed)
    cap = min(model_context, 2048) if spec.train.max_seq_length == "auto" else int(spec.train.max_seq_length)
    train_enc = encode_all(tokenizer, train, cap, spec.data.train_on_prompt)
    max_len = (
        auto_max_seq_length([len(e) for e in train_enc], model_context) if spec.train.max_seq_length == "auto" else cap
    )
    valid_enc = encode_all(tokenizer, valid, max_len, spec.data.train_on_prompt)
    truncated = sum(e.truncated for e in train_enc)
    kept = [(x, e) for x, e in zip(train, train_enc) if e.n_trained > 0]
    return Prepared(
        train=[x for x, _ in kept],
        valid=[x for x, e in zip(valid, valid_enc) if e.n_trained > 0],
        train_enc=[e for _, e in kept],
        valid_enc=[e for e in valid_enc if e.n_trained > 0],
        max_len=max_len,
        truncated=truncated,
        fully_masked=len(train_enc) - len(kept),
        data_hash=file_hash(spec.data.path),
    )


def default_run_dir(spec: JobSpec) -> Path:
    name = spec.suffix or Path(spec.model).name.replace(".gguf", "")
    return home.runs_dir() / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module, encoded: list[Encoded], pad_id: int, token_budget: int, precision: Precision
) -> tuple[float, float]:
    """Mean loss and token accuracy over trained tokens of `encoded`."""
    was_training = model.training
    model.eval()
    loss_sum, n, correct = 0.0, 0, 0
    for mb in micro_batches(encoded, pad_id, token_budget, precision.widths()):
        fault_point("eval")
        with precision.autocast():
            out = causal_lm_loss(model, mb.input_ids, mb.attention_mask, mb.labels)
        loss_sum += float(out.loss_sum)
        n += out.n_tokens
        correct += out.n_correct
    model.train(was_training)
    return (loss_sum / n, correct / n) if n else (float("nan"), float("nan"))


def snapshot_weights(params: list[torch.nn.Parameter], run_dir: Path, *, spill: bool) -> list[torch.Tensor] | IO[bytes]:
    """The trainable weights before training, for the final weight-delta signal.

    LoRA's few million stay in memory. Full fine-tuning trains the whole model
    (540 MB for the 135M built-in, as much again as its gradients), so its copy
    goes to an unnamed file on the run folder's disk: each weight's raw bytes in
    parameter order, written from the tensor itself (no second copy in memory)
    and read back a chunk at a time at the end. Unnamed, so it is gone with the
    process however the run ends (cancel, crash, SIGKILL); a resumed run takes a
    new copy before loading its checkpoint, i.e. of the same base weights."""
    if not spill:
        return [p.detach().clone() for p in params]
    f = tempfile.TemporaryFile(dir=run_dir)
    for p in params:
        f.write(checkpoint.raw_bytes(p.detach().cpu().contiguous()))
    f.flush()
    return f


SPILL_CHUNK = 1 << 22  # elements read back at a time (16 MB of fp32)


def weight_delta_norm(params: list[torch.nn.Parameter], initial: list[torch.Tensor] | IO[bytes]) -> float:
    """||trained - initial||_2 over every trained weight; closes (frees) a spilled copy.

    The spilled copy is read into one reused buffer rather than memory-mapped:
    mapped pages count in the process's resident memory, and at the end of a run
    they stacked 540 MB on top of the trained model."""
    if isinstance(initial, list):
        return _distance(params, initial)
    total = 0.0
    with initial:
        initial.seek(0)
        for p in params:
            flat = p.detach().cpu().reshape(-1)
            buf = torch.empty(min(SPILL_CHUNK, flat.numel()), dtype=flat.dtype)
            for s in range(0, flat.numel(), SPILL_CHUNK):
                part = buf[: min(SPILL_CHUNK, flat.numel() - s)]
                view = checkpoint.raw_bytes(part)
                if initial.readinto(view) != len(view):
                    raise OSError("the spilled copy of the initial weights is shorter than the weights")
                total += float((flat[s : s + len(part)].float() - part.float()).pow(2).sum())
    return math.sqrt(total)


def _distance(params: list[torch.nn.Parameter], before: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((p.detach().cpu() - q).pow(2).sum()) for p, q in zip(params, before)))


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for these tensors (CPU and
    CUDA, fp32/bf16): one pass over parameter, gradient and both moments instead
    of a dozen. On this CPU a step over the 135M built-in's parameters (full
    fine-tuning) takes 0.11 s instead of 0.43 s (the for-loop default) or 0.74 s
    (foreach, which also allocates temporaries the size of the model):
    benchmarks/optim_ab.py. Same update, to rounding (tests/train/test_optimizer.py)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def finetune(
    spec: JobSpec,
    *,
    resume: bool = False,
    on_event: EventFn | None = None,
    progress: bool = True,
    loaded: LoadedModel | None = None,
    control: ControlFn | None = None,
) -> TrainResult:
    keep_freed_memory()  # each micro-batch reuses the last one's buffers instead of faulting them in anew
    loaded = loaded or load_model(spec.model)  # a run folder is merged first (see jobs.worker)
    undo: list[Callable[[], None]] = []
    try:
        return _finetune(
            spec,
            loaded,
            undo,
            resume=resume,
            emit=on_event or (lambda kind, data: None),
            progress=progress,
            control=control,
        )
    finally:  # however training ends, the caller's model is left as loaded (fp32 base)
        for step in undo:
            step()


def _finetune(
    spec: JobSpec,
    loaded: LoadedModel,
    undo: list[Callable[[], None]],
    *,
    resume: bool,
    emit: EventFn,
    progress: bool,
    control: ControlFn | None,
) -> TrainResult:
    torch.manual_seed(spec.train.seed)
    model, tok = loaded.model, loaded.tokenizer
    context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    data = prepare_data(spec, tok, context)
    if not data.train_enc:
        raise ValueError("no training example has a trained token left (all fully masked or truncated)")
    device = next(model.parameters()).device
    cfg = resolve_train(spec.train, len(data.train_enc), data.max_len, device)
    run_dir = Path(spec.output_dir) if spec.output_dir else default_run_dir(spec)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --output")
    run_dir.mkdir(parents=True, exist_ok=True)

    # ---- setup -------------------------------------------------------------
    lora: LoraParams | None = None
    torch.manual_seed(cfg.seed)  # LoRA A init
    if cfg.method == "lora":
        lora = resolve_lora(spec.lora, default_targets(model))
        apply_lora(model, lora)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    precision = Precision(cfg.precision, device.type)
    converted = precision.prepare(model)  # LoRA's frozen base in bf16
    if converted:
        undo.append(lambda: precision.restore(model, converted, weights_on_disk(loaded.path)))
    undo.append(precision.use_kernels(model, full=cfg.method == "full"))  # bf16: matmul attention, no kept weight casts
    widths = precision.widths()
    params = [p for p in model.parameters() if p.requires_grad]
    initial = snapshot_weights(params, run_dir, spill=cfg.method != "lora")
    optimizer = make_optimizer(params, cfg.learning_rate, cfg.weight_decay)
    steps = plan_steps([len(e) for e in data.train_enc], cfg.batch_size, cfg.epochs, cfg.seed)
    if cfg.max_steps:
        steps = steps[: cfg.max_steps]
    total = len(steps)
    resolved = spec.to_dict()
    resolved["train"] = asdict(cfg)
    resolved["lora"] = asdict(lora) if lora else None
    resolved["output_dir"] = str(run_dir)
    atomic_write(run_dir / "config.json", json.dumps(resolved, indent=2))
    lineage = {
        "base_model": spec.model,
        "base_model_kind": loaded.source.kind,
        "base_model_path": str(loaded.path),
        "base_model_sha256": hash_weights(loaded.path),
        "dataset": str(spec.data.path),
        "dataset_sha256": data.data_hash,
        "validation": spec.data.validation_path or f"split {spec.data.validation_split}",
        "split_seed": cfg.seed,
        "train_examples": len(data.train),
        "valid_examples": len(data.valid),
        "method": cfg.method,
        "openft_version": __import__("openft").__version__,
    }
    atomic_write(run_dir / "lineage.json", json.dumps(lineage, indent=2))

    state = checkpoint.TrainerState(
        step=0,
        epoch=0.0,
        best_valid_loss=None,
        evals_without_improvement=0,
        history=[],
        trained_tokens=0,
        elapsed_s=0.0,
    )
    if resume:
        last = checkpoint.latest(run_dir)
        if last is not None:
            state = checkpoint.load(last, model, optimizer)
            emit("resumed", {"step": state.step, "checkpoint": str(last)})
            emit("checkpoints_deleted", {"steps": checkpoint.prune(run_dir, max(1, cfg.keep_checkpoints))})
        checkpoint.trim_metrics(run_dir / "metrics.jsonl", state)  # drop rows past the checkpoint
    emit(
        "started",
        {
            "total_steps": total,
            "train_examples": len(data.train),
            "valid_examples": len(data.valid),
            "config": resolved,
        },
    )

    # ---- train -------------------------------------------------------------
    bar = ProgressBar(total) if progress else None
    model.train()
    t0 = time.monotonic() - state.elapsed_s
    tokens_at_start, time_at_start, first_step = state.trained_tokens, time.monotonic(), state.step
    steps_per_epoch = math.ceil(len(data.train_enc) / cfg.batch_size)
    stopped_early = False
    metrics_path = run_dir / "metrics.jsonl"
    if not resume and metrics_path.exists():
        metrics_path.unlink()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    for plan in steps[state.step :]:
        lr = lr_at(plan.index, total, cfg.learning_rate, cfg.warmup_ratio, cfg.scheduler)
        for g in optimizer.param_groups:
            g["lr"] = lr
        items = [data.train_enc[i] for i in plan.examples]
        n_step = sum(e.n_trained for e in items)
        loss_total, correct, real, padded = 0.0, 0, 0, 0
        for mb in micro_batches(items, pad_id, cfg.micro_batch_tokens, widths):
            real, padded = real + mb.n_tokens, padded + mb.input_ids.numel()
            with precision.autocast():
                out = causal_lm_loss(model, mb.input_ids, mb.attention_mask, mb.labels)
            # Divide by the whole step's trained tokens: the gradient is the same
            # however the step is split into micro-batches.
            (out.loss_sum / n_step).backward()
            loss_total += float(out.loss_sum.detach())
            correct += out.n_correct
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        fault_point("step")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step = plan.index + 1
        state.epoch = state.step / steps_per_epoch
        state.trained_tokens += n_step
        elapsed = time.monotonic() - t0
        rate = (state.trained_tokens - tokens_at_start) / max(1e-9, time.monotonic() - time_at_start)
        row = {
            "step": state.step,
            "epoch": round(state.epoch, 4),
            "train_loss": loss_total / n_step,
            "train_mean_token_accuracy": correct / n_step,
            "learning_rate": lr,
            "trained_tokens": state.trained_tokens,
            "tokens_per_s": rate,
            "elapsed_s": elapsed,
            "tokens": real,
            "padded_tokens": padded,  # this step's real tokens / positions run
            "eta_s": (total - state.step) * (time.monotonic() - time_at_start) / max(1, state.step - first_step),
        }
        is_last = state.step == total
        if data.valid_enc and (state.step % cfg.eval_every == 0 or is_last):
            # Interval checks use a fixed sample (as OpenAI's valid_loss does);
            # the whole validation set is scored once at the end (full_valid_loss).
            vl, va = evaluate(model, data.valid_enc[:VALID_SAMPLE], pad_id, cfg.micro_batch_tokens, precision)
            row["valid_loss"], row["valid_mean_token_accuracy"] = vl, va
            if state.best_valid_loss is None or vl < state.best_valid_loss - 1e-4:
                state.best_valid_loss, state.evals_without_improvement = vl, 0
            else:
                state.evals_without_improvement += 1
        state.history.append(row)
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        emit("metrics", row)
        if bar:
            bar.update(row)
        state.elapsed_s = elapsed
        patience = cfg.early_stopping_patience
        stop = bool(patience and state.evals_without_improvement >= patience)
        request = control() if control else None
        if state.step % cfg.save_every == 0 or is_last or stop or request == "pause":
            # Each checkpoint also holds a servable adapter (PEFT format), so it can
            # be called as a model of its own.
            extra = (lambda d: save_adapter(model, lora, d, spec.model)) if lora else None
            path = checkpoint.save(run_dir, model, optimizer, state, extra=extra)
            emit("checkpoint", {"step": state.step, "path": str(path), "metrics": row})
            deleted = checkpoint.prune(run_dir, max(1, cfg.keep_checkpoints))
            if deleted:
                emit("checkpoints_deleted", {"steps": deleted})
        if request in ("pause", "cancel") and not is_last:
            if bar:
                bar.close()
            raise Interrupted("paused" if request == "pause" else "cancelled", state.step)
        if stop:
            stopped_early = True
            emit("early_stopped", {"step": state.step, "best_valid_loss": state.best_valid_loss})
            break
    if bar:
        bar.close()

    # ---- save --------------------------------------------------------------
    del optimizer  # its state (2x the trained weights) is not needed past the last checkpoint
    model.eval()
    out_dir = _save_final(run_dir, model, tok, lora, spec.model)
    delta = weight_delta_norm(params, initial)
    hist = state.history
    valid_rows = [r for r in hist if "valid_loss" in r]
    full_valid = None
    if data.valid_enc and len(data.valid_enc) <= VALID_SAMPLE and hist and "valid_loss" in hist[-1]:
        full_valid = hist[-1]["valid_loss"]  # the last interval check already scored every example
    elif data.valid_enc:
        full_valid = evaluate(model, data.valid_enc, pad_id, cfg.micro_batch_tokens, precision)[0]
    signals = {
        "first_train_loss": hist[0]["train_loss"] if hist else None,
        "last_train_loss": _tail_mean([r["train_loss"] for r in hist]) if hist else None,
        "first_valid_loss": valid_rows[0]["valid_loss"] if valid_rows else None,
        "last_valid_loss": full_valid,
        "weights_changed": delta > 0,
        "weight_delta_norm": delta,
        "fully_masked_examples": data.fully_masked,
        "total_examples": len(data.train) + data.fully_masked,
        "truncated_examples": data.truncated,
    }
    elapsed = time.monotonic() - t0
    summary = {
        "trained_tokens": state.trained_tokens,
        "elapsed_s": elapsed,
        "full_valid_loss": full_valid,
        "tokens_per_s": state.trained_tokens / max(1e-9, elapsed),
        "signals": signals,
        "stopped_early": stopped_early,
        "steps": state.step,
        "allocator": allocator_in_use(),
    }  # tcmalloc or system: it moves speed and memory (openft.heap)
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    emit("finished", summary)
    return TrainResult(
        run_dir=run_dir,
        output_dir=out_dir,
        history=hist,
        trained_tokens=state.trained_tokens,
        signals=signals,
        tokens_per_s=summary["tokens_per_s"],
        elapsed_s=elapsed,
        stopped_early=stopped_early,
        config=resolved,
    )


def _tail_mean(xs: list[float], k: int = 3) -> float:
    """Last losses are noisy per step; average the last few."""
    tail = xs[-k:]
    return sum(tail) / len(tail)


def _save_final(run_dir: Path, model: torch.nn.Module, tok, lora: LoraParams | None, base: str) -> Path:
    name = "adapter" if lora else "model"
    final = run_dir / name
    with atomic_dir(final) as tmp:
        if lora:
            save_adapter(model, lora, tmp, base)
        else:
            model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return final
