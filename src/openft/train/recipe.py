"""The fine-tuning recipe: setup -> train -> save, one method per stage (`Recipe`).

`finetune(spec)` is the whole workflow; the CLI and the job worker
(`openft.jobs.worker`) are thin glue over it. Everything a run writes goes into its run folder:

  run_dir/
    config.json          the job spec with every `auto` resolved
    lineage.json         base model + weight hash, dataset hash, split seed
    metrics.jsonl        one row per optimizer step (+ validation rows)
    checkpoints/step-N/  atomic, resumable
    adapter/             LoRA adapter (PEFT format) + tokenizer + chat template
    model/               full fine-tuning: the whole model (safetensors)
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO

import torch

from openft import __version__ as openft_version
from openft import home
from openft.autoprecision import Decision, decide
from openft.config import AUTO, JobSpec, TrainConfig
from openft.faults import fault_point
from openft.fileio import atomic_dir, atomic_write
from openft.heap import allocator_in_use, keep_freed_memory
from openft.models.load import LoadedModel, hash_weights, load_model
from openft.models.templates import resolve_template
from openft.tensorfile import raw_bytes
from openft.train import checkpoint, distributed, dpo, sharded
from openft.train.batching import MicroBatch, Step, collate, micro_batches, plan_steps
from openft.train.distributed import World, check_objective
from openft.train.hparams import lr_at, resolve_lora, resolve_train
from openft.train.lora import HEAD, LoraParams, apply_lora, default_targets, needs_head, save_adapter
from openft.train.loss import causal_lm_loss
from openft.train.precision import Precision, weights_on_disk
from openft.train.prepare import Prepared, prepare_data
from openft.train.progress import ProgressBar
from openft.train.tokenize import Encoded

EventFn = Callable[[str, dict], None]
ControlFn = Callable[[], "str | None"]  # polled after each step: None, "pause" or "cancel"


class Interrupted(Exception):
    """Training stopped on request ("pause" or "cancel"); for a pause the last
    checkpoint holds everything needed to resume."""

    def __init__(self, reason: str, step: int):
        super().__init__(f"training {reason} at step {step}")
        self.reason, self.step = reason, step


VALID_SAMPLE = 64  # validation examples scored at each interval


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


def default_run_dir(spec: JobSpec) -> Path:
    name = spec.suffix or Path(spec.model).name.replace(".gguf", "")
    return home.runs_dir() / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


class LossModule(torch.nn.Module):
    """The model with its loss, as one module: what the recipe calls for every
    forward, so that DDP's and FSDP2's hooks (set on the module they wrap) run."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, int, int]:
        out = causal_lm_loss(self.model, input_ids, attention_mask, labels)
        return out.loss_sum, out.n_tokens, out.n_correct


def rank_share(items: list[Encoded], world: World) -> list[Encoded]:
    """This rank's examples of one step: longest first, each to the rank with the
    fewest tokens so far (ties to the lower rank), so ranks finish together. Every
    rank computes the same split from the same step, with no communication."""
    if not world.distributed:
        return items
    order = sorted(range(len(items)), key=lambda i: (-len(items[i]), i))
    load = [0] * world.size
    mine = []
    for i in order:
        r = min(range(world.size), key=lambda k: (load[k], k))
        load[r] += len(items[i])
        if r == world.rank:
            mine.append(items[i])
    return mine


def lockstep(mbs: list[MicroBatch], spare: Encoded | None, pad_id: int, world: World) -> list[tuple[MicroBatch, bool]]:
    """The micro-batches to run, each with whether it counts: every rank runs as
    many as the busiest one (FSDP2 gathers weights inside each forward, and DDP's
    reduction needs a backward on every rank), topping up with `spare` at weight 0."""
    runs = [(mb, True) for mb in mbs]
    if not world.distributed:
        return runs
    count = world_max(len(runs))
    filler = mbs[0] if mbs else collate([spare], pad_id)
    return runs + [(filler, False)] * (count - len(runs))


def world_max(n: int) -> int:
    t = torch.tensor([n], dtype=torch.long)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)


def world_sum(values: list[float], world: World) -> list[float]:
    """Sums over the ranks (in float64: token counts stay exact)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


@torch.inference_mode()
def evaluate(
    loss_fn: torch.nn.Module,
    encoded: list[Encoded],
    pad_id: int,
    token_budget: int,
    precision: Precision,
    world: World | None = None,
) -> tuple[float, float]:
    """Mean loss and token accuracy over trained tokens of `encoded`, through
    `loss_fn` (the recipe's `LossModule`, wrapped or not), each rank scoring its share."""
    world = world or World()
    was_training = loss_fn.training
    loss_fn.eval()
    loss_sum, n, correct = 0.0, 0, 0
    mine = rank_share(encoded, world)
    spare = encoded[0] if encoded else None
    runs = lockstep(micro_batches(mine, pad_id, token_budget, precision.widths()), spare, pad_id, world)
    for mb, counts in runs:
        fault_point("eval")
        with precision.autocast():
            ls, nt, nc = loss_fn(mb.input_ids, mb.attention_mask, mb.labels)
        if counts:
            loss_sum, n, correct = loss_sum + float(ls), n + nt, correct + nc
    loss_fn.train(was_training)
    loss_sum, n, correct = world_sum([loss_sum, n, correct], world)
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
        return [sharded.local(p).detach().clone() for p in params]
    f = tempfile.TemporaryFile(dir=run_dir)
    for p in params:  # a sharded run spills this rank's shard
        f.write(raw_bytes(sharded.local(p).detach().cpu().contiguous()))
    f.flush()
    return f


SPILL_CHUNK = 1 << 22  # elements read back at a time (16 MB of fp32)


def weight_delta_norm(
    params: list[torch.nn.Parameter], initial: list[torch.Tensor] | IO[bytes], world: World | None = None
) -> float:
    """||trained - initial||_2 over every trained weight; closes (frees) a spilled copy.
    With sharded weights each rank holds a part: the squares are summed over `world`."""
    sq = _delta_squared(params, initial)
    if world is not None and any(sharded.is_sharded_param(p) for p in params):
        sq = world_sum([sq], world)[0]
    return math.sqrt(sq)


def _delta_squared(params: list[torch.nn.Parameter], initial: list[torch.Tensor] | IO[bytes]) -> float:
    """The sum of squared changes of this process's (part of the) weights.

    The spilled copy is read into one reused buffer rather than memory-mapped:
    mapped pages count in the process's resident memory, and at the end of a run
    they stacked 540 MB on top of the trained model."""
    if isinstance(initial, list):
        return sum(float((sharded.local(p).detach().cpu() - q).pow(2).sum()) for p, q in zip(params, initial))
    total = 0.0
    with initial:
        initial.seek(0)
        for p in params:
            flat = sharded.local(p).detach().cpu().reshape(-1)
            buf = torch.empty(min(SPILL_CHUNK, flat.numel()), dtype=flat.dtype)
            for s in range(0, flat.numel(), SPILL_CHUNK):
                part = buf[: min(SPILL_CHUNK, flat.numel() - s)]
                view = raw_bytes(part)
                if initial.readinto(view) != len(view):
                    raise OSError("the spilled copy of the initial weights is shorter than the weights")
                total += float((flat[s : s + len(part)].float() - part.float()).pow(2).sum())
    return total


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
    score_checkpoint: Callable | None = None,
) -> TrainResult:
    keep_freed_memory()  # each micro-batch reuses the last one's buffers instead of faulting them in anew
    loaded = loaded or load_model(spec.model, chat_template=spec.chat_template)  # a run folder is merged first
    run = Recipe(
        spec,
        loaded,
        emit=on_event or (lambda kind, data: None),
        progress=progress,
        control=control,
        score_checkpoint=score_checkpoint,
    )
    try:
        return run.run(resume=resume)
    finally:  # however training ends, the caller's model is left as loaded (fp32 base)
        run.teardown()


@dataclass
class StepOutcome:
    """What one optimizer step's forward and backward passes saw."""

    loss_sum: float  # summed over the trained tokens
    n_correct: int
    n_tokens: int  # trained tokens: the loss's denominator
    real: int  # real tokens in the micro-batches
    padded: int  # positions run, padding included
    pairs: dpo.PairStats | None = None  # DPO: the step's pair metrics


@dataclass
class Clock:
    """Elapsed time carries over a resume; throughput and ETA count this process's steps only."""

    t0: float  # when the run would have started, had it never stopped
    started: float  # when this process started training
    tokens_at_start: int
    first_step: int

    @classmethod
    def start(cls, state: checkpoint.TrainerState) -> Clock:
        now = time.monotonic()
        return cls(now - state.elapsed_s, now, state.trained_tokens, state.step)


@dataclass
class Recipe:
    """One fine-tuning run, laid out as torchtune's recipes: `setup_*` build the
    pieces (data, model, optimizer, step plan), `restore` resumes, `train` runs the
    steps, `save` and `summarise` finish. The training objective is
    `forward_backward` (and `validate` for its held-out score); what a step leaves
    behind (metrics row, checkpoint, events) is `log_step` and `save_checkpoint`."""

    spec: JobSpec
    loaded: LoadedModel
    emit: EventFn
    progress: bool = True
    control: ControlFn | None = None
    # Score the model as it is at each checkpoint (eval metrics to add to its row); rank 0 only.
    score_checkpoint: Callable[[torch.nn.Module, object, int], dict] | None = None
    undo: list[Callable[[], None]] = field(default_factory=list)  # run in order by `teardown`
    data: Prepared = field(init=False, repr=False)
    cfg: TrainConfig = field(init=False, repr=False)
    device: torch.device = field(init=False, repr=False)
    run_dir: Path = field(init=False, repr=False)
    lora: LoraParams | None = field(init=False, repr=False, default=None)
    precision: Precision = field(init=False, repr=False)
    precision_decision: Decision = field(init=False, repr=False)
    params: list[torch.nn.Parameter] = field(init=False, repr=False)
    initial: list[torch.Tensor] | IO[bytes] = field(init=False, repr=False)
    optimizer: torch.optim.Optimizer | None = field(init=False, repr=False, default=None)
    steps: list[Step] = field(init=False, repr=False)
    resolved: dict = field(init=False, repr=False)
    state: checkpoint.TrainerState = field(init=False, repr=False)
    clock: Clock = field(init=False, repr=False)
    bar: ProgressBar | None = field(init=False, repr=False, default=None)
    world: World = field(default_factory=distributed.current)  # this rank among the run's ranks
    loss_fn: torch.nn.Module = field(init=False, repr=False)  # LossModule, wrapped by DDP/FSDP2 on several ranks
    refs: dict[str, torch.Tensor] = field(init=False, repr=False, default_factory=dict)  # DPO: reference log-probs

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def pad_id(self) -> int:
        tok = self.loaded.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else 0

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def run(self, *, resume: bool) -> TrainResult:
        self.setup_data()
        self.setup_run_dir(resume)
        self.setup_model()
        self.setup_optimizer()
        self.setup_steps()
        self.write_run_files()
        self.setup_reference()
        self.restore(resume)
        self.emit(
            "started",
            {
                "total_steps": len(self.steps),
                "train_examples": len(self.data.train),
                "valid_examples": len(self.data.valid),
                "config": self.resolved,
                "precision": self.precision_decision.as_dict() | {"text": self.precision_decision.describe()},
            },
        )
        stopped_early = self.train()
        return self.summarise(self.save(), stopped_early)

    def teardown(self) -> None:
        for step in self.undo:
            step()

    # ---- setup -------------------------------------------------------------

    def setup_data(self) -> None:
        """Load, split and tokenize the data; resolve every `auto` hyperparameter from it."""
        context = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        tok = self.loaded.tokenizer
        template = self.loaded.template or resolve_template(tok, self.model.config.to_dict())
        self.data = prepare_data(self.spec, tok, context, template)
        if not self.data.train_enc:
            raise ValueError("no training example has a trained token left (all fully masked or truncated)")
        if self.world.distributed:
            check_objective(self.spec.train.objective)
        if self.world.distributed and torch.cuda.is_available():
            self.model.to(self.world.device())  # NCCL: each rank on its own GPU (untested without one)
        self.device = next(self.model.parameters()).device
        self.cfg = resolve_train(
            self.spec.train, len(self.data.train_enc), self.data.max_len, self.device, self.model.config.to_dict()
        )
        # Why this precision (measured figures or what forced it); cached, so no second measurement.
        # Rank 0 decides for all: ranks measuring side by side could disagree.
        self.precision_decision = self.world.from_main(lambda: decide(self.spec.train.precision, self.device))
        if self.progress and self.world.main:
            print(f"openft: training in {self.precision_decision.describe()}", file=sys.stderr, flush=True)

    def setup_run_dir(self, resume: bool) -> None:
        run_dir = Path(self.spec.output_dir) if self.spec.output_dir else default_run_dir(self.spec)
        # On several ranks the launcher made this check before starting them (openft.train.launch).
        if run_dir.exists() and any(run_dir.iterdir()) and not resume and not self.world.distributed:
            raise FileExistsError(
                f"{run_dir} already holds a run; pass --resume to continue it or choose another --output"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir

    def setup_model(self) -> None:
        """LoRA adapters or every weight trainable, then the precision's storage and kernels."""
        model, cfg = self.model, self.cfg
        # The one seed of everything torch draws (LoRA's A init, dropout); the split
        # and the data order have seeded generators of their own.
        torch.manual_seed(cfg.seed)
        if cfg.method == "lora":
            self.lora = self.lora_params()
            apply_lora(model, self.lora)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        precision = self.precision = Precision(cfg.precision, self.device.type)
        converted = precision.prepare(model)  # LoRA's frozen base in bf16
        if converted:
            self.undo.append(lambda: precision.restore(model, converted, weights_on_disk(self.loaded.path)))
        # bf16: matmul attention, no kept weight casts
        self.undo.append(precision.use_kernels(model, full=cfg.method == "full"))
        self.loss_fn = self.parallel(LossModule(model))

    def lora_params(self) -> LoraParams:
        """`auto` targets: the family's decoder linears, and the head's rows of the
        control tokens the data teaches that the base may not write (`needs_head`)."""
        params = resolve_lora(self.spec.lora, default_targets(self.model))
        if self.spec.lora.target_modules != AUTO:
            return params
        encoded = [x for e in self.data.train_enc for x in ((e.chosen, e.rejected) if hasattr(e, "chosen") else (e,))]
        tokens = tuple(needs_head(self.loaded.tokenizer, [x.labels for x in encoded]))
        if not tokens:
            return params
        if self.progress and self.world.main:
            names = ", ".join(self.loaded.tokenizer.convert_ids_to_tokens(list(tokens[:4])))
            print(f"openft: the head's rows train too for what the data writes: {names}", file=sys.stderr)
        return replace(params, target_modules=(*params.target_modules, HEAD), head_tokens=tokens)

    def parallel(self, loss_fn: LossModule) -> torch.nn.Module:
        """On several ranks, LoRA's trainable weights are replicated and DDP averages
        their gradients (the frozen base is neither all-reduced nor, with
        init_sync off, broadcast: every rank loads it and draws the same LoRA init
        from the same seed); full fine-tuning is sharded with FSDP2."""
        if not self.world.distributed:
            return loss_fn
        if self.cfg.method == "lora":
            return torch.nn.parallel.DistributedDataParallel(loss_fn, init_sync=False, broadcast_buffers=False)
        sharded.shard(self.model, loss_fn)
        return loss_fn

    def setup_optimizer(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.initial = snapshot_weights(self.params, self.run_dir, spill=self.cfg.method != "lora")
        self.optimizer = make_optimizer(self.params, self.cfg.learning_rate, self.cfg.weight_decay)

    def setup_steps(self) -> None:
        """Every optimizer step of the run, planned up front (a resume replays the same plan)."""
        steps = plan_steps([len(e) for e in self.data.train_enc], self.cfg.batch_size, self.cfg.epochs, self.cfg.seed)
        self.steps = steps[: self.cfg.max_steps] if self.cfg.max_steps else steps

    def setup_reference(self) -> None:
        """DPO: every pair's reference log-probs, before any step. LoRA computes them
        with its adapters off (so a resume computes the same); full fine-tuning keeps
        the first computation in the run folder, since a resumed model has moved."""
        if self.cfg.objective != "dpo":
            return
        path = self.run_dir / "reference_logps.pt"
        if self.cfg.method == "full" and path.exists():
            self.refs = torch.load(path, weights_only=True)
            return
        autocast, budget = self.precision.autocast, self.cfg.micro_batch_tokens
        lora = self.lora is not None
        self.refs = {
            name: dpo.reference_logps(self.model, pairs, self.pad_id, budget, autocast, lora)
            for name, pairs in (("train", self.data.train_enc), ("valid", self.data.valid_enc))
        }
        if self.cfg.method == "full":
            with tempfile.NamedTemporaryFile(dir=self.run_dir, suffix=".tmp", delete=False) as fh:
                torch.save(self.refs, fh)
            Path(fh.name).replace(path)

    def write_run_files(self) -> None:
        """config.json (the spec with every `auto` resolved) and lineage.json."""
        resolved = self.spec.to_dict()
        resolved["train"] = asdict(self.cfg)
        resolved["lora"] = asdict(self.lora) if self.lora else None
        resolved["output_dir"] = str(self.run_dir)
        self.resolved = resolved
        resolved["world_size"] = self.world.size
        self.resolved = resolved
        if self.world.main:
            atomic_write(self.run_dir / "config.json", json.dumps(resolved, indent=2))
            atomic_write(self.run_dir / "lineage.json", json.dumps(self.lineage(), indent=2))

    def lineage(self) -> dict:
        spec, loaded, data = self.spec, self.loaded, self.data
        return {
            "base_model": spec.model,
            "base_model_kind": loaded.source.kind,
            "base_model_path": str(loaded.path),
            "base_model_sha256": hash_weights(loaded.path),
            "dataset": str(spec.data.path),
            "dataset_sha256": data.data_hash,
            "validation": spec.data.validation_path or f"split {spec.data.validation_split}",
            "split_seed": self.cfg.seed,
            "train_examples": len(data.train),
            "valid_examples": len(data.valid),
            "method": self.cfg.method,
            "world_size": self.world.size,
            "openft_version": openft_version,
        }

    def restore(self, resume: bool) -> None:
        """The trainer state to start from: fresh, or the run's latest complete checkpoint."""
        self.state = checkpoint.TrainerState(
            step=0,
            epoch=0.0,
            best_valid_loss=None,
            evals_without_improvement=0,
            history=[],
            trained_tokens=0,
            elapsed_s=0.0,
        )
        main = self.world.main
        if not resume:
            if main:
                self.metrics_path.unlink(missing_ok=True)
            return
        last = checkpoint.latest(self.run_dir)
        if last is not None:
            self.state = self.load_checkpoint(last)
            self.emit("resumed", {"step": self.state.step, "checkpoint": str(last)})
            if main:
                deleted = checkpoint.prune(self.run_dir, max(1, self.cfg.keep_checkpoints))
                self.emit("checkpoints_deleted", {"steps": deleted})
        if main:
            checkpoint.trim_metrics(self.metrics_path, self.state)  # drop rows past the checkpoint
        self.world.barrier()  # no rank reads the checkpoints while rank 0 prunes them

    def load_checkpoint(self, ckpt: Path) -> checkpoint.TrainerState:
        """Any checkpoint of this run, whatever world size wrote it."""
        if (ckpt / sharded.DCP_DIR).is_dir() or sharded.is_sharded(self.model):
            return sharded.load(ckpt, self.model, self.optimizer, self.world)
        return checkpoint.load(ckpt, self.model, self.optimizer, self.world.rank)

    # ---- train -------------------------------------------------------------

    def train(self) -> bool:
        """Run the steps not yet done; True when early stopping ended the run."""
        self.bar = ProgressBar(len(self.steps)) if self.progress else None
        self.model.train()
        self.clock = Clock.start(self.state)
        stopped_early = False
        for plan in self.steps[self.state.step :]:
            if self.end_of_step(self.train_step(plan)):
                stopped_early = True
                break
        self.close_bar()
        return stopped_early

    def train_step(self, plan: Step) -> dict:
        """One optimizer step; returns its metrics row."""
        lr = lr_at(plan.index, len(self.steps), self.cfg.learning_rate, self.cfg.warmup_ratio, self.cfg.scheduler)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        out = self.forward_backward([self.data.train_enc[i] for i in plan.examples])
        self.optimizer_step()
        state = self.state
        state.step = plan.index + 1
        state.epoch = state.step / math.ceil(len(self.data.train_enc) / self.cfg.batch_size)
        state.trained_tokens += out.n_tokens
        return self.metrics_row(out, lr)

    def forward_backward(self, items: list[Encoded]) -> StepOutcome:
        """The causal-LM loss over one step's examples, gradients accumulated; on
        several ranks each takes its share and the outcome is summed over all."""
        if self.cfg.objective == "dpo":
            return self.dpo_forward_backward(items)
        n_step = sum(e.n_trained for e in items)  # the whole step's, on every rank
        world = self.world
        # Divide by the whole step's trained tokens: the gradient is the same however
        # the step is split into micro-batches and ranks (DDP and FSDP2 average over
        # the ranks, hence the world size).
        scale = world.size / n_step
        mbs = micro_batches(rank_share(items, world), self.pad_id, self.cfg.micro_batch_tokens, self.precision.widths())
        runs = lockstep(mbs, min(items, key=len), self.pad_id, world)
        loss_total, correct, real, padded = 0.0, 0, 0, 0
        for i, (mb, counts) in enumerate(runs):
            with self.gradient_sync(i == len(runs) - 1), self.precision.autocast():
                loss_sum, n_tokens, n_correct = self.loss_fn(mb.input_ids, mb.attention_mask, mb.labels)
            (loss_sum * (scale if counts else 0.0)).backward()
            if counts:
                real, padded = real + mb.n_tokens, padded + mb.input_ids.numel()
                loss_total += float(loss_sum.detach())
                correct += n_correct
        loss_total, correct, real, padded = world_sum([loss_total, correct, real, padded], world)
        return StepOutcome(
            loss_sum=loss_total, n_correct=int(correct), n_tokens=n_step, real=int(real), padded=int(padded)
        )

    def dpo_forward_backward(self, pairs: list[dpo.PairEncoded]) -> StepOutcome:
        """The DPO loss, averaged over the step's pairs, both answers of a group of
        pairs in one forward; gradients accumulate over the groups."""
        stats, cfg = dpo.PairStats(), self.cfg
        real = padded = 0
        for group in dpo.groups(pairs, cfg.micro_batch_tokens):
            with self.precision.autocast():
                losses, terms, s = dpo.pair_losses(
                    self.model, group, self.refs["train"], self.pad_id, cfg.beta, cfg.rpo_alpha
                )
            (losses.sum() / len(pairs)).backward()
            stats.add(terms, s, losses)
            width = max(max(len(p.chosen), len(p.rejected)) for p in group)
            real, padded = real + sum(len(p) for p in group), padded + 2 * len(group) * width
        return StepOutcome(
            loss_sum=stats.loss,
            n_correct=stats.chosen_correct,
            n_tokens=stats.answer_tokens,
            real=real,
            padded=padded,
            pairs=stats,
        )

    def gradient_sync(self, last: bool):
        """DDP (LoRA) exchanges gradients once per optimizer step, in its last
        backward. FSDP2 reduce-scatters after every micro-batch instead: skipping
        the exchange would keep each layer's whole, unsharded gradient until the
        step's last backward, the size of the model on every rank (2.5 GB for the
        0.5B built-in in fp32), which is what sharding is there to avoid."""
        fn = self.loss_fn
        if isinstance(fn, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext() if last else fn.no_sync()
        return contextlib.nullcontext()

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        fault_point("step")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def metrics_row(self, out: StepOutcome, lr: float) -> dict:
        row = self._metrics_row(out, lr)
        if out.pairs is not None:  # DPO: the loss is per pair, and the rewards say how the preference moves
            row.update(out.pairs.metrics("train"))
        return row

    def _metrics_row(self, out: StepOutcome, lr: float) -> dict:
        state, clock, total = self.state, self.clock, len(self.steps)
        return {
            "step": state.step,
            "epoch": round(state.epoch, 4),
            "train_loss": out.loss_sum / out.n_tokens,
            "train_mean_token_accuracy": out.n_correct / out.n_tokens,
            "learning_rate": lr,
            "trained_tokens": state.trained_tokens,
            "tokens_per_s": (state.trained_tokens - clock.tokens_at_start)
            / max(1e-9, time.monotonic() - clock.started),
            "elapsed_s": time.monotonic() - clock.t0,
            "tokens": out.real,
            "padded_tokens": out.padded,  # this step's real tokens / positions run
            "eta_s": (total - state.step) * (time.monotonic() - clock.started) / max(1, state.step - clock.first_step),
        }

    def end_of_step(self, row: dict) -> bool:
        """Validate, log and checkpoint as due; obey a pause/cancel request; True to stop early."""
        state, cfg = self.state, self.cfg
        is_last = state.step == len(self.steps)
        if self.data.valid_enc and (state.step % cfg.eval_every == 0 or is_last):
            self.validate(row)
        self.log_step(row)
        state.elapsed_s = row["elapsed_s"]
        patience = cfg.early_stopping_patience
        stop = bool(patience and state.evals_without_improvement >= patience)
        # Rank 0 polls; every rank acts on its answer at the same step.
        request = self.world.from_main(lambda: self.control() if self.control else None)
        if state.step % cfg.save_every == 0 or is_last or stop or request == "pause":
            self.save_checkpoint(row)
        if request in ("pause", "cancel") and not is_last:
            self.close_bar()
            raise Interrupted("paused" if request == "pause" else "cancelled", state.step)
        if stop:
            self.emit("early_stopped", {"step": state.step, "best_valid_loss": state.best_valid_loss})
        return stop

    def validate(self, row: dict) -> None:
        """Score the validation sample into `row` and track the best loss for early stopping."""
        # Interval checks use a fixed sample (as OpenAI's valid_loss does);
        # the whole validation set is scored once at the end (full_valid_loss).
        sample = self.data.valid_enc[:VALID_SAMPLE]
        if self.cfg.objective == "dpo":
            row.update(self.pair_metrics(sample))
        else:
            vl, va = evaluate(
                self.loss_fn, sample, self.pad_id, self.cfg.micro_batch_tokens, self.precision, self.world
            )
            row["valid_loss"], row["valid_mean_token_accuracy"] = vl, va
        vl = row["valid_loss"]
        state = self.state
        if state.best_valid_loss is None or vl < state.best_valid_loss - 1e-4:
            state.best_valid_loss, state.evals_without_improvement = vl, 0
        else:
            state.evals_without_improvement += 1

    def pair_metrics(self, pairs: list[dpo.PairEncoded]) -> dict:
        return dpo.evaluate_pairs(
            self.model,
            pairs,
            self.refs["valid"],
            self.pad_id,
            self.cfg.micro_batch_tokens,
            self.precision.autocast,
            self.cfg,
        )

    def log_step(self, row: dict) -> None:
        self.state.history.append(row)
        if not self.world.main:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.emit("metrics", row)
        if self.bar:
            self.bar.update(row)

    def best_scored_step(self) -> int | None:
        """The step of the best-scoring checkpoint so far (the latest among equals)."""
        scored = [(r["eval_score"], r["step"]) for r in self.state.history if r.get("eval_score") is not None]
        return max(scored)[1] if scored else None

    def save_checkpoint(self, row: dict) -> None:
        # Each LoRA checkpoint also holds a servable adapter (PEFT format), so it can
        # be called as a model of its own.
        lora, model, world = self.lora, self.model, self.world
        if self.score_checkpoint is not None and world.main and not sharded.is_sharded(model):
            # Before the save: the scores go into the checkpoint's history, so a resumed
            # run still knows them (and which checkpoint is best). Under the training's
            # autocast: bf16 training keeps frozen weights in bf16 beside fp32 ones.
            with self.precision.autocast():
                row.update(self.score_checkpoint(model, self.loaded.tokenizer, self.state.step))
        if sharded.is_sharded(model):
            path = sharded.save(self.run_dir, model, self.optimizer, self.state, world)
        else:  # one rank, or LoRA's replicated weights: rank 0 writes every rank's RNG with them
            rngs = sharded.gather_rng(world)
            extra = (lambda d: save_adapter(model, lora, d, self.spec.model)) if lora else None
            path = (
                checkpoint.save(self.run_dir, model, self.optimizer, self.state, extra=extra, rngs=rngs)
                if world.main
                else None
            )
        if world.main:
            self.emit("checkpoint", {"step": self.state.step, "path": str(path), "metrics": row})
            best = self.best_scored_step() if self.spec.eval.select == "best" else None
            deleted = checkpoint.prune(self.run_dir, max(1, self.cfg.keep_checkpoints), keep_steps={best})
            if deleted:
                self.emit("checkpoints_deleted", {"steps": deleted})
        world.barrier()

    def close_bar(self) -> None:
        if self.bar:
            self.bar.close()

    # ---- save --------------------------------------------------------------

    def save(self) -> Path:
        """The final adapter/ or model/ folder."""
        self.optimizer = None  # its state (2x the trained weights) is not needed past the last checkpoint
        self.model.eval()
        # A sharded model is gathered whole (every rank takes part), rank 0 writes.
        weights = sharded.full_state(self.model) if sharded.is_sharded(self.model) else None
        final = self.run_dir / ("adapter" if self.lora else "model")
        if self.world.main:
            _save_final(final, self.model, self.loaded.tokenizer, self.lora, self.spec.model, weights)
        self.world.barrier()
        return final

    def summarise(self, out_dir: Path, stopped_early: bool) -> TrainResult:
        """summary.json, the `finished` event and the result, with the signals the verdict reads."""
        signals = self.signals(weight_delta_norm(self.params, self.initial, self.world), self.final_valid_loss())
        state = self.state
        elapsed = time.monotonic() - self.clock.t0
        summary = {
            "trained_tokens": state.trained_tokens,
            "elapsed_s": elapsed,
            "full_valid_loss": signals["last_valid_loss"],
            "tokens_per_s": state.trained_tokens / max(1e-9, elapsed),
            "signals": signals,
            "stopped_early": stopped_early,
            "steps": state.step,
            "allocator": allocator_in_use(),
            "world_size": self.world.size,
        }  # tcmalloc or system: it moves speed and memory (openft.heap)
        if self.world.main:
            atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            self.emit("finished", summary)
        return TrainResult(
            run_dir=self.run_dir,
            output_dir=out_dir,
            history=state.history,
            trained_tokens=state.trained_tokens,
            signals=signals,
            tokens_per_s=summary["tokens_per_s"],
            elapsed_s=elapsed,
            stopped_early=stopped_early,
            config=self.resolved,
        )

    def final_valid_loss(self) -> float | None:
        """The whole validation set's loss, unless the last interval check already scored every example."""
        hist, valid = self.state.history, self.data.valid_enc
        if valid and len(valid) <= VALID_SAMPLE and hist and "valid_loss" in hist[-1]:
            return hist[-1]["valid_loss"]
        if valid and self.cfg.objective == "dpo":
            return self.pair_metrics(valid)["valid_loss"]
        if valid:
            return evaluate(self.loss_fn, valid, self.pad_id, self.cfg.micro_batch_tokens, self.precision, self.world)[
                0
            ]
        return None

    def signals(self, delta: float, full_valid: float | None) -> dict:
        hist, data = self.state.history, self.data
        valid_rows = [r for r in hist if "valid_loss" in r]
        return {
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


def _tail_mean(xs: list[float], k: int = 3) -> float:
    """Last losses are noisy per step; average the last few."""
    tail = xs[-k:]
    return sum(tail) / len(tail)


def _save_final(
    final: Path, model: torch.nn.Module, tok, lora: LoraParams | None, base: str, weights: dict | None
) -> None:
    with atomic_dir(final) as tmp:
        if lora:
            save_adapter(model, lora, tmp, base)
        else:
            model.save_pretrained(tmp, state_dict=weights)
        tok.save_pretrained(tmp)
