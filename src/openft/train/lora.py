"""LoRA: low-rank adapters on linear layers, saved in PEFT's file format.

y = W x + (alpha / r) * B(A(dropout(x)))   with A: (r, in), B: (out, r), B = 0 at
start, so the adapted model starts exactly equal to the base model. Only A and B
train. The adapter is written as `adapter_model.safetensors` +
`adapter_config.json` with PEFT's key names, so PEFT and other tools load it too.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

# Every linear layer of the transformer blocks, per architecture family (transformers'
# module names, which the adapter's keys and the serving decoder share). Never the
# embedding or lm_head (the output head), and no norm: Qwen3's and Gemma 3's q_norm /
# k_norm and Gemma's four norms per layer are RMSNorms, which apply_lora never wraps.
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": PROJECTIONS,
    "mistral": PROJECTIONS,
    "qwen2": PROJECTIONS,
    "qwen3": PROJECTIONS,
    "gemma": PROJECTIONS,
    "gemma2": PROJECTIONS,
    "gemma3_text": PROJECTIONS,  # Gemma 3 text-only (what a Gemma 3 GGUF converts to)
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def add_low_rank(out: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out + h @ b.T as one addmm. out: (..., out_features) from a linear layer
    (contiguous), h: (..., r), b: (out_features, r). In place when nothing needs
    gradients (inference); out of place under autograd (addmm's backward is exact)."""
    out2 = out.view(-1, out.shape[-1])
    h2 = h.reshape(-1, h.shape[-1])
    if torch.is_grad_enabled() and (out.requires_grad or h.requires_grad or b.requires_grad):
        return torch.addmm(out2, h2, b.t()).view(out.shape)
    out2.addmm_(h2, b.t().to(h2.dtype))  # in-place ops skip autocast: an fp32 adapter on a bf16 base
    return out


@dataclass(frozen=True)
class LoraParams:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    # Token ids whose output-head rows train (`head_rows`): with "lm_head" among the
    # targets, the head's adapter is those rows, not a rank-`rank` LoRA.
    head_tokens: tuple[int, ...] = ()


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        like = {"dtype": base.weight.dtype, "device": base.weight.device}  # a model already on a GPU stays there
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **like)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **like)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT does
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # the base alone (DPO's reference), see adapters_disabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or self.disabled:
            return out
        # Scale the rank-r activation, not the (tokens x out) product, and let one
        # matmul accumulate into the base output: no full-width temporary and no
        # separate add pass (in prefill these cost as much as the low-rank matmuls).
        # The serving engine runs the same ops, so the two agree bit for bit.
        return add_low_rank(out, self.lora_A(self.dropout(x)) * self.scaling, self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)

    def merge(self) -> None:
        if not self.merged:
            with torch.no_grad():
                self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True


@contextlib.contextmanager
def adapters_disabled(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """The model without its (unmerged) LoRA adapters while inside: the frozen base,
    which is DPO's reference model, with no second copy in memory."""
    layers = list(lora_layers(model).values()) if enabled else []
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(model.config, "model_type", "")
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    # Unknown architecture: every linear layer but the output head.
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


HEAD = "lm_head"


def needs_head(tokenizer, labels: list[list[int]]) -> list[int]:
    """The control tokens (added to the vocabulary, like Qwen's `<tool_call>` or a
    distill's `<think>`) that the data trains the model to write, other than the
    ones that end a turn. A base may never have learned to write them: Qwen2.5-Coder
    0.5B's `<tool_call>` row sits at cosine 0.92 to `<|im_start|>`'s, and LoRA on the
    decoder moves the hidden state towards both at once, so the head's rows for
    them train too (`head_rows`). Turn ends are left out: every chat fine-tune
    trains them, and the bases write them already (the stop tokens: one rule)."""
    from openft.models.stop import stop_token_ids

    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ends = set(stop_token_ids(tokenizer)) | {tokenizer.pad_token_id, tokenizer.bos_token_id}
    return sorted({t for row in labels for t in row if t in added} - ends)


def head_rows(base: nn.Linear, ids: tuple[int, ...]) -> LoraLinear:
    """Training the head's rows of `ids`, written as a LoRA so that everything that
    reads, serves, merges or exports a LoRA takes it as it is: rank k = len(ids),
    scaling 1, B (V, k) a fixed one-hot that places row j at ids[j], A (k, H) the
    trained rows, from zero. Why rows and not a low-rank head: an Adam step moves a
    row's logit by about lr times the hidden state's L1 norm, while a rank-16 head
    LoRA (B from zero, A small) moved `<tool_call>`'s by under 0.5 logits in an epoch."""
    layer = LoraLinear(base, len(ids), float(len(ids)), 0.0)
    with torch.no_grad():
        layer.lora_A.weight.zero_()
        layer.lora_B.weight.zero_()
        layer.lora_B.weight[list(ids), torch.arange(len(ids))] = 1.0
    layer.lora_B.weight.requires_grad_(False)
    return layer


def apply_lora(model: nn.Module, params: LoraParams) -> list[str]:
    """Wrap target linear layers in place; freeze everything else. Returns wrapped paths."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: list[str] = []
    targets = set(params.target_modules)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                if child_name == HEAD and params.head_tokens:
                    layer = head_rows(child, params.head_tokens)
                else:
                    layer = LoraLinear(child, params.rank, params.alpha, params.dropout)
                setattr(module, child_name, layer)
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no linear layer matched LoRA target modules {sorted(targets)}")
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key names: base_model.model.<path>.lora_A.weight."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()
    return out


def save_adapter(model: nn.Module, params: LoraParams, out: Path, base_model: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in adapter_state(model).items()}, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": params.rank,
        "lora_alpha": params.alpha,
        "lora_dropout": params.dropout,
        "target_modules": list(params.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    if params.head_tokens:  # PEFT's per-module rank and alpha: the head's rows, at scaling 1
        k = len(params.head_tokens)
        config.update(rank_pattern={HEAD: k}, alpha_pattern={HEAD: k}, openft_head_tokens=list(params.head_tokens))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


def read_adapter_params(adapter_dir: Path) -> LoraParams:
    c = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return LoraParams(
        rank=c["r"],
        alpha=float(c["lora_alpha"]),
        dropout=float(c.get("lora_dropout", 0.0)),
        target_modules=tuple(c["target_modules"]),
        head_tokens=tuple(c.get("openft_head_tokens", ())),
    )


def load_adapter(model: nn.Module, adapter_dir: Path) -> LoraParams:
    """Wrap `model` with the adapter's layers and load its weights (safetensors only)."""
    params = read_adapter_params(adapter_dir)
    apply_lora(model, params)
    load_adapter_weights(model, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
    return params


def load_adapter_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    layers = lora_layers(model)
    seen = set()
    for key, value in state.items():
        path, which = key.removeprefix("base_model.model.").rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        if path not in layers:
            raise ValueError(f"adapter weight {key} has no matching layer in the model")
        getattr(layers[path], which).weight.data.copy_(value)
        seen.add(path)
    missing = set(layers) - seen
    if missing:
        raise ValueError(f"adapter lacks weights for {len(missing)} layers, e.g. {sorted(missing)[0]}")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and unwrap, leaving a plain model. A
    LoRA on a head tied to the embedding unties it first: the merged head differs
    from the embedding, which must stay as it was."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, layer in list(lora_layers(model).items()):
        if embedding is not None and layer.base.weight is embedding.weight:
            layer.base.weight = nn.Parameter(layer.base.weight.detach().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    return model
