"""The rules behind every `auto` hyperparameter.

Each rule is a small function of the data and the model, so the resolved values
are explainable ("3 epochs because ...") and recorded in the run's config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from openft.config import AUTO, LoraConfig, TrainConfig
from openft.train.lora import LoraParams

if TYPE_CHECKING:
    import torch


def auto_epochs(n_examples: int) -> int:
    """As hosted services do: 3 epochs, raised so tiny sets see >= 100 examples in
    total (at most 25 epochs), lowered so huge ones see <= 25,000."""
    if n_examples <= 0:
        return 1
    if n_examples * 3 < 100:
        return min(25, math.ceil(100 / n_examples))
    if n_examples * 3 > 25_000:
        return max(1, 25_000 // n_examples)
    return 3


def auto_batch_size(n_examples: int) -> int:
    """8 examples per step, but at least ~10 steps per epoch for small sets."""
    return max(1, min(8, n_examples // 10 or 1))


def auto_learning_rate(method: str, objective: str = "sft") -> float:
    # LoRA updates a low-rank delta starting at zero and tolerates (needs) a much
    # larger step than full fine-tuning, which moves the pretrained weights directly.
    # DPO starts from a model that already answers and only reweighs its answers: a
    # tenth of SFT's step (TRL's DPO default, 1e-6 for full, sits below ours).
    rate = 5e-4 if method == "lora" else 2e-5
    return rate / 10 if objective == "dpo" else rate


# Activation memory one micro-batch may keep for backward (no gradient
# checkpointing). On a CPU, past a few hundred rows more tokens per pass buy no
# matmul efficiency, only memory: the Qwen 0.5B built-in in fp32 kept 640 MB
# fewer at 256 tokens than at 512 at the same speed (peak RSS 3309 vs 3949 MB,
# 0.99x the tokens/s, machine D capped to AVX2).
ACTIVATION_BUDGET_BYTES = 768 * 2**20
CPU_TOKENS = (128, 512)  # the CPU budget's range, in tokens


def activation_bytes_per_token(config: dict, precision: str) -> int:
    """Bytes a decoder keeps for backward per token, estimated from its config:
    per layer ten values per attention-width channel (norm inputs and outputs, q,
    k, v, the attention output, o_proj's input) and four per MLP channel (gate,
    its activation, up, their product), in the compute dtype. Counted with
    autograd's saved-tensor hooks in a LoRA forward at the Qwen 0.5B built-in's
    sizes (fp32, SDPA): 25.3k values per token and layer kept, 28.4k estimated
    (the 135M's: 10.2k and 11.9k); its peak RSS moved 2.5 MB per token between
    micro-batches of 512 and 256. 0 where the config lacks the sizes."""
    cfg = config.get("text_config") or config  # a multimodal config's decoder
    layers, hidden = cfg.get("num_hidden_layers"), cfg.get("hidden_size")
    if not layers or not hidden:
        return 0
    heads = int(cfg.get("num_attention_heads") or 1)
    head_dim = int(cfg.get("head_dim") or hidden // heads)  # Gemma's heads are wider than hidden / heads
    width = max(int(hidden), heads * head_dim)
    inner = int(cfg.get("intermediate_size") or 4 * hidden)
    return int(layers) * (10 * width + 4 * inner) * (2 if precision == "bf16" else 4)


def auto_micro_batch_tokens(cuda: bool | None = None, bytes_per_token: int = 0) -> int:
    """Padded tokens per forward pass. Without gradient checkpointing the budget
    bounds peak memory: on a CPU as many tokens as keep the activations within
    ACTIVATION_BUDGET_BYTES (bytes_per_token from activation_bytes_per_token), a
    multiple of 64 within CPU_TOKENS (512 where unknown: the 135M built-in keeps
    ~1.2 MB per token in fp32); a GPU wants bigger batches."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        return 4096
    low, high = CPU_TOKENS
    if bytes_per_token <= 0:
        return high
    return int(min(high, max(low, ACTIVATION_BUDGET_BYTES // bytes_per_token // 64 * 64)))


def auto_max_seq_length(lengths: list[int], model_context: int) -> int:
    """Longest example rounded up to 64, capped at 2048 and the model's context."""
    longest = max(lengths) if lengths else 64
    return int(min(model_context, 2048, max(64, math.ceil(longest / 64) * 64)))


@dataclass(frozen=True)
class Resolved:
    train: TrainConfig  # every field concrete
    lora: LoraParams | None
    total_steps: int


def resolve_train(
    cfg: TrainConfig,
    n_examples: int,
    max_len: int,
    device: torch.device | None = None,
    model_config: dict | None = None,
) -> TrainConfig:
    """Every `auto` made concrete; `device` is where the model trains (default:
    the GPU if there is one); `model_config` (the model's config.json as a dict)
    sizes the micro-batch to the model's activations."""
    import torch

    from openft.autoprecision import resolve_precision

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def pick(value, default):
        return default if value == AUTO else value

    epochs = int(pick(cfg.epochs, auto_epochs(n_examples)))
    batch = int(pick(cfg.batch_size, auto_batch_size(n_examples)))
    steps = epochs * math.ceil(n_examples / batch) if n_examples else 0
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    eval_every = int(pick(cfg.eval_every, max(1, math.ceil(steps / 8))))
    precision = resolve_precision(cfg.precision, device)
    per_token = activation_bytes_per_token(model_config or {}, precision)
    return replace(
        cfg,
        epochs=epochs,
        batch_size=batch,
        learning_rate=float(pick(cfg.learning_rate, auto_learning_rate(cfg.method, cfg.objective))),
        beta=float(pick(cfg.beta, 0.1)),
        micro_batch_tokens=int(pick(cfg.micro_batch_tokens, auto_micro_batch_tokens(device.type == "cuda", per_token))),
        max_seq_length=int(max_len),
        warmup_ratio=float(pick(cfg.warmup_ratio, 0.05)),
        scheduler=pick(cfg.scheduler, "cosine"),
        weight_decay=float(pick(cfg.weight_decay, 0.0 if cfg.method == "lora" else 0.01)),
        eval_every=eval_every,
        save_every=int(pick(cfg.save_every, eval_every)),
        precision=precision,
    )


def resolve_lora(cfg: LoraConfig, default_targets: list[str]) -> LoraParams:
    if cfg.rank < 1:
        raise ValueError("LoRA rank must be >= 1")
    alpha = 2.0 * cfg.rank if cfg.alpha == AUTO else float(cfg.alpha)
    # No dropout by default (as Unsloth): measured here, LoRA dropout 0.05 costs 35%
    # of the step time on CPU (a copy of every layer input) for little gain on the
    # small datasets people fine-tune on.
    dropout = 0.0 if cfg.dropout == AUTO else float(cfg.dropout)
    targets = default_targets if cfg.target_modules == AUTO else list(cfg.target_modules)
    return LoraParams(rank=cfg.rank, alpha=alpha, dropout=dropout, target_modules=tuple(targets))


def lr_at(step: int, total: int, peak: float, warmup_ratio: float, scheduler: str) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`: the schedules
    of transformers' get_{cosine,linear,constant}_schedule_with_warmup, so a
    warmup_ratio means what it means in TRL and the Trainer. Warm-up starts at 0:
    a first full-size Adam step (its update is ~lr in every coordinate whatever the
    gradient's scale) costs a short run measurable validation loss. One
    difference: warm-up never takes every step (transformers would train a
    one-step run at lr 0, changing nothing)."""
    warm = min(math.ceil(total * warmup_ratio), max(0, total - 1))
    if step < warm:
        return peak * step / warm
    if scheduler == "constant":
        return peak
    if scheduler == "linear":
        return peak * max(0.0, (total - step) / max(1, total - warm))
    progress = (step - warm) / max(1, total - warm)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def estimate_seconds(
    n_params: int, tokens_per_epoch: int, epochs: int, method: str, flops: float | None = None
) -> float:
    """Training-time estimate: LoRA costs ~4N FLOPs per token (no weight gradients
    for the frozen base), full fine-tuning ~6N; `flops` is the rate a training
    step reaches, by default this machine's (`openft.train.throughput`)."""
    if flops is None:
        from openft.train.throughput import effective_flops

        flops = effective_flops()
    per_token = (4 if method == "lora" else 6) * n_params
    return tokens_per_epoch * epochs * per_token / flops
