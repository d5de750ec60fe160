"""One decoder forward for serving every common family, without importing transformers.

Why. `from transformers import AutoModelForCausalLM` costs 3-5 s of imports on
this machine (it pulls in torch.distributed.tensor, dynamo, sympy ...), more than
everything else a server does before its first answer. Serving needs only the
forward pass, and the families people fine-tune (Llama 2/3.x and SmolLM, Qwen2/2.5
and the DeepSeek-R1 distills of Qwen, Qwen3, Gemma 3, Mistral) are one decoder
with a handful of switches: attention biases, per-head q/k norms, Gemma's norm
form and embedding scale, four norms per layer, the MLP activation, RoPE scaling,
sliding-window layers, logit soft-capping. `arch_of` reads those switches from
config.json into one frozen `Arch`; the modules below read only the `Arch`.

Module and parameter names are transformers' own (so safetensors and PEFT adapter
keys map one to one), and so are the numbers: tests/models/test_decoder.py
compares logits with transformers' model for a tiny random configuration of each
family, padded batches, the cache and decoding past a sliding window included.

Anything this does not cover (other architectures, other RoPE types, partial
rotary, bidirectional attention, a weight layout that does not match the config)
returns None from `load`, and the caller falls back to transformers. Inference
only: no dropout, no gradients, no training paths.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gemma3")
ACTIVATIONS = {
    "silu": lambda x: F.silu(x, inplace=True),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


@dataclass(frozen=True)
class Rope:
    """One rotary embedding: `kind` "default", "linear" (frequencies / factor) or
    "llama3" (Llama 3.1's wavelength-banded scaling)."""

    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """(head_dim / 2,) fp32 frequencies, computed as transformers' rope init functions do."""
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv = 1.0 / (self.theta**exponent)
        if self.kind == "linear":
            return inv / self.factor
        if self.kind != "llama3":
            return inv
        old = self.original_max_positions
        low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
        smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class Arch:
    """Everything the forward needs to know about a model, families' differences as data."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    activation: str = "silu"  # a key of ACTIVATIONS
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2, Llama's attention_bias)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3, Gemma 3)
    gemma_norm: bool = False  # RMSNorm as x * (1 + w), all in fp32 (Gemma)
    sandwich_norm: bool = False  # norms after attention and MLP too: four per layer (Gemma 3)
    embed_scale: float | None = None  # embeddings times this, cast to the dtype (Gemma: sqrt(hidden))
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim)
    final_softcap: float | None = None  # tanh soft-capping of the logits
    windows: tuple[int | None, ...] = ()  # per layer: sliding window in keys, None = full attention
    ropes: tuple[Rope, ...] = ()  # per layer


def arch_of(config: dict) -> Arch | None:
    """The `Arch` of a supported config, or None if this module cannot run it exactly."""
    family = config.get("model_type")
    if family not in FAMILIES or config.get("pretraining_tp", 1) != 1:
        return None
    try:
        if family.startswith("gemma3"):
            return _gemma3(config)
        return _llama_like(config, family)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def _common(config: dict, family: str, head_dim_default: int | None, tie_default: bool) -> dict:
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    return dict(
        family=family,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or head_dim_default or hidden // heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", tie_default)),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
    )


def _llama_like(config: dict, family: str) -> Arch | None:
    """Llama, Qwen2, Qwen3, Mistral: the same block; biases, q/k norms and windows differ."""
    act = config.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        return None
    # Qwen3's config has head_dim 128 by default (not hidden / heads).
    base = _common(config, family, 128 if family == "qwen3" else None, tie_default=False)
    n = base["num_layers"]
    rope = _rope(config, config.get("rope_parameters") or config.get("rope_scaling"), 10000.0)
    if rope is None:
        return None
    bias = bool(config.get("attention_bias"))
    return Arch(
        **base,
        activation=act,
        qkv_bias=True if family == "qwen2" else bias and family != "mistral",
        o_bias=bias and family in ("llama", "qwen3"),
        mlp_bias=bool(config.get("mlp_bias")) and family == "llama",
        qk_norm=family == "qwen3",
        windows=_windows(config, family, n),
        ropes=(rope,) * n,
    )


def _windows(config: dict, family: str, n: int) -> tuple[int | None, ...]:
    """Per-layer sliding windows, as each family's transformers config decides them."""
    window = config.get("sliding_window")
    if family == "mistral":  # one window for every layer, when set
        return (int(window) if window else None,) * n
    if family == "llama":
        return (None,) * n
    # Qwen2/Qwen3: only with use_sliding_window, and then on layers >= max_window_layers.
    if not config.get("use_sliding_window") or not window:
        return (None,) * n
    types = config.get("layer_types") or [
        "sliding_attention" if i >= int(config.get("max_window_layers", 28)) else "full_attention" for i in range(n)
    ]
    return tuple(int(window) if t == "sliding_attention" else None for t in _checked_types(types, n))


def _checked_types(types: list, n: int) -> list:
    if len(types) != n or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise ValueError(f"layer_types {types!r}")
    return types


def _gemma3(config: dict) -> Arch | None:
    """Gemma 3 text: Gemma's norms, embedding scale and GELU; local (sliding) layers
    with their own RoPE base, global layers with the (possibly scaled) global one."""
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS or config.get("use_bidirectional_attention"):
        return None
    base = _common(config, "gemma3_text", 256, tie_default=True)
    n = base["num_layers"]
    pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6)
    types = _checked_types(
        config.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)],
        n,
    )
    params = config.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:  # nested per layer type (transformers 5)
        full_params, local_params = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    else:  # older configs: rope_scaling for the global layers, rope_local_base_freq for the local ones
        full_params = params or config.get("rope_scaling") or {}
        local_params = {"rope_type": "default"}
    ropes = {
        "full_attention": _rope(config, full_params, 1_000_000.0),
        "sliding_attention": _rope(
            {**config, "rope_theta": config.get("rope_local_base_freq", 10_000.0)}, local_params, 10_000.0
        ),
    }
    if None in ropes.values():
        return None
    window = config.get("sliding_window")
    return Arch(
        **base,
        activation=act,
        qkv_bias=bool(config.get("attention_bias")),
        o_bias=bool(config.get("attention_bias")),
        qk_norm=True,
        gemma_norm=True,
        sandwich_norm=True,
        embed_scale=base["hidden_size"] ** 0.5,
        attn_scale=float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
        # attn_logit_softcapping is read by transformers' Gemma 3 config but applied
        # nowhere (q/k norms replaced it): ignored here too, for the same numbers.
        final_softcap=_float_or_none(config.get("final_logit_softcapping")),
        windows=tuple(int(window) if window and t == "sliding_attention" else None for t in types),
        ropes=tuple(ropes[t] for t in types),
    )


def _float_or_none(value) -> float | None:
    return None if value is None else float(value)


def _rope(config: dict, params: dict | None, default_theta: float) -> Rope | None:
    """A RoPE dict (`rope_parameters` or legacy `rope_scaling`) -> Rope; None for types not covered."""
    params = params or {}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta") or config.get("rope_theta") or default_theta)
    if float(params.get("partial_rotary_factor", config.get("partial_rotary_factor") or 1.0)) != 1.0:
        return None
    if kind == "default":
        return Rope(theta)
    if kind == "linear":
        return Rope(theta, "linear", factor=float(params["factor"]))
    if kind == "llama3":
        # transformers gives a top-level original_max_position_embeddings priority.
        original = config.get("original_max_position_embeddings") or params.get(
            "original_max_position_embeddings", config.get("max_position_embeddings", 2048)
        )
        return Rope(
            theta,
            "llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_positions=int(original),
        )
    return None


# --------------------------------------------------------------------------- cache


class KVLayer:
    """One layer's keys and values, (batch, kv_heads, L, head_dim), appended into
    spare columns of a buffer rather than concatenated anew each step. The engine
    may assign `keys`/`values` (merging, row removal); the next append then starts
    a fresh buffer. Same contract as engine_batch's transformers `SlackLayer`.
    Sliding-window layers keep the whole history too (the window is applied in the
    mask), so every layer stays plain: mergeable, paddable and row-selectable."""

    SLACK = 64
    openft_plain = True  # engine_batch: may be padded, concatenated and row-selected

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self._kbuf = self._vbuf = None

    @property
    def is_initialized(self) -> bool:
        return self.keys is not None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self._kbuf = append_columns(self.keys, self._kbuf, k, self.SLACK)
        self.values, self._vbuf = append_columns(self.values, self._vbuf, v, self.SLACK)
        return self.keys, self.values


class KVCache:
    def __init__(self, num_layers: int):
        self.layers = [KVLayer() for _ in range(num_layers)]


def append_columns(cur: torch.Tensor | None, buf: torch.Tensor | None, new: torch.Tensor, slack: int):
    """Append `new` (B, H, n, D) after `cur` (B, H, L, D); return (cur', buf). `cur`
    is a view of `buf`'s first L columns when nothing replaced it: then the append
    is one copy of `new` only."""
    length = cur.shape[-2] if cur is not None and cur.dim() == 4 else 0
    n = new.shape[-2]
    reuse = (
        buf is not None
        and length > 0
        and cur.data_ptr() == buf.data_ptr()
        and cur.dtype == buf.dtype
        and cur.shape[:2] == buf.shape[:2] == new.shape[:2]
        and buf.shape[-2] >= length + n
        and cur.stride() == buf.stride()
    )
    if not reuse:
        buf = new.new_empty((*new.shape[:2], length + n + slack, new.shape[-1]))
        if length:
            buf[:, :, :length] = cur
    buf[:, :, length : length + n] = new
    return buf[:, :, : length + n], buf


# --------------------------------------------------------------------------- modules

# Modules are built on the meta device and then take the loaded tensors as they
# are (load_state_dict(assign=True)). Their usual random init would be wasted
# work, and on meta tensors it imports torch._dynamo (~2 s) besides.


class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


META = torch.device("meta")


def linear(n_in: int, n_out: int, bias: bool) -> Linear:
    return Linear(n_in, n_out, bias=bias, device=META)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, gemma: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, device=META))
        self.eps, self.gemma = eps, gemma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As transformers: the variance in fp32. Llama casts back before the weight;
        # Gemma multiplies by (1 + w) in fp32 and casts after.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (h * (1.0 + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class LayerMask:
    """Keys from column `start` on (earlier ones are outside every query's window)
    and the additive mask over them, (B, 1, groups * n | 1, total - start) or None."""

    start: int
    bias: torch.Tensor | None


class Attention(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.scale = a.attn_scale
        self.q_proj = linear(a.hidden_size, a.num_heads * a.head_dim, a.qkv_bias)
        self.k_proj = linear(a.hidden_size, a.num_kv_heads * a.head_dim, a.qkv_bias)
        self.v_proj = linear(a.hidden_size, a.num_kv_heads * a.head_dim, a.qkv_bias)
        self.o_proj = linear(a.num_heads * a.head_dim, a.hidden_size, a.o_bias)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps, a.gemma_norm)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps, a.gemma_norm)
        self.qk_norm = a.qk_norm

    def forward(self, x, cos, sin, mask: LayerMask, layer: KVLayer | None):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if layer is not None:
            k, v = layer.update(k, v)
        if mask.start:  # a sliding window: keys no query of this step can see are not read at all
            k, v = k[:, :, mask.start :], v[:, :, mask.start :]
        out = grouped_attention(q, k, v, mask.bias, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """SDPA for grouped-query attention without repeating keys and values.

    q: (B, H, n, D); k, v: (B, KV, L, D) with H = KV * g (query head h reads KV
    head h // g, as transformers' repeat_kv); bias: None or the additive mask
    from `attention_bias(..., groups=g)`, (B, 1, g * n | 1, L). `enable_gqa` on
    the CPU copies K and V g times per call, and a decode step (n = 1) reads
    the whole cache. Here the g query heads that share a KV head are laid along
    the query axis instead, (B, KV, g * n, D), so each KV head is read once: a
    16-row decode step 0.955x the time of enable_gqa's, prefill unchanged
    (benchmarks/prefill_ab.py --attention). Same numbers as the expanded form
    (tests/models/test_decoder.py). scale: None for 1 / sqrt(D)."""
    b, h, n, d = q.shape
    kv = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(b, kv, (h // kv) * n, d), k, v, attn_mask=bias, scale=scale)
    return out.reshape(b, h, n, d)


class MLP(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.gate_proj = linear(a.hidden_size, a.intermediate_size, a.mlp_bias)
        self.up_proj = linear(a.hidden_size, a.intermediate_size, a.mlp_bias)
        self.down_proj = linear(a.intermediate_size, a.hidden_size, a.mlp_bias)
        self.act = ACTIVATIONS[a.activation]

    def forward(self, x):
        # In place where the activation allows: fewer (tokens x intermediate) temporaries,
        # which in a prefill cost as much time as a matmul (inference only: nothing saved for backward).
        return self.down_proj(self.act(self.gate_proj(x)).mul_(self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, a: Arch, index: int):
        super().__init__()
        self.self_attn = Attention(a)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, a.gemma_norm)
        # Llama: the norm before the MLP. Gemma 3: the norm after attention, before the residual.
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, a.gemma_norm)
        if a.sandwich_norm:
            self.pre_feedforward_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, a.gemma_norm)
            self.post_feedforward_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, a.gemma_norm)
        self.sandwich = a.sandwich_norm
        self.window, self.rope = a.windows[index], a.ropes[index]  # keys into the forward's masks and rotations

    def forward(self, h, cos, sin, mask: LayerMask, layer):
        a = self.self_attn(self.input_layernorm(h), cos, sin, mask, layer)
        if self.sandwich:
            h = h + self.post_attention_layernorm(a)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))


class Body(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.embed_tokens = Embedding(a.vocab_size, a.hidden_size, device=META)
        self.layers = nn.ModuleList(DecoderLayer(a, i) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, a.gemma_norm)


class DecoderLM(nn.Module):
    """`model(input_ids, attention_mask, position_ids, past_key_values, logits_to_keep)`,
    the subset of transformers' call the serving engine uses. attention_mask: (B,
    cached + new) with 1 for real tokens; position_ids: (B, new)."""

    def __init__(self, arch: Arch, config: dict, generation: dict):
        super().__init__()
        self.arch = arch
        self.config = SimpleNamespace(**config)
        self.generation_config = SimpleNamespace(
            eos_token_id=generation.get("eos_token_id", config.get("eos_token_id"))
        )
        self.model = Body(arch)
        self.lm_head = linear(arch.hidden_size, arch.vocab_size, False)
        self.ropes = list(dict.fromkeys(arch.ropes))  # the distinct rotations (Gemma 3: local and global)
        for i, rope in enumerate(self.ropes):  # (head_dim / 2,) rotary frequencies each
            self.register_buffer(f"inv_freq_{i}", rope.inv_freq(arch.head_dim), persistent=False)

    def new_cache(self) -> KVCache:
        return KVCache(self.arch.num_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
        **_,
    ):
        b, n = input_ids.shape
        cached = (
            past_key_values.layers[0].keys.shape[-2]
            if past_key_values and past_key_values.layers[0].keys is not None
            else 0
        )
        total = cached + n
        if attention_mask is None:
            attention_mask = torch.ones((b, total), dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(cached, total, device=input_ids.device).expand(b, n)
        h = self.model.embed_tokens(input_ids)
        if self.arch.embed_scale is not None:  # Gemma: the scale rounded to the dtype first, as transformers
            h = h * torch.tensor(self.arch.embed_scale, device=h.device).to(h.dtype)
        rotations = {rope: self._cos_sin(i, position_ids, h.dtype) for i, rope in enumerate(self.ropes)}
        groups = self.arch.num_heads // self.arch.num_kv_heads
        masks = {w: attention_bias(attention_mask, n, groups, h.dtype, w) for w in set(self.arch.windows)}
        layers = past_key_values.layers if past_key_values is not None else [None] * len(self.model.layers)
        for block, layer in zip(self.model.layers, layers):
            h = block(h, *rotations[block.rope], masks[block.window], layer)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(self.model.norm(h))
        if self.arch.final_softcap is not None:
            logits = torch.tanh(logits / self.arch.final_softcap) * self.arch.final_softcap
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)

    def _cos_sin(self, i: int, position_ids: torch.Tensor, dtype: torch.dtype):
        # RoPE in fp32 as transformers does, then cast to the activations' dtype.
        freqs = position_ids[..., None].float() * getattr(self, f"inv_freq_{i}")  # (B, n, d/2)
        emb = torch.cat((freqs, freqs), -1)[:, None]  # (B, 1, n, d)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def attention_bias(
    attention_mask: torch.Tensor, n: int, groups: int, dtype: torch.dtype, window: int | None = None
) -> LayerMask:
    """(B, total) 0/1 -> the additive mask for `grouped_attention`, built once per
    forward and window: (B, 1, groups * n, total - start), 0 where a query sees a
    key and -inf elsewhere (a bool mask would be converted by SDPA again in every
    layer). The last n columns are the queries. Query i sees real keys up to its
    own column, and always its own column: a left padding query with nothing to
    attend to would give NaN, which its cached K/V would carry into every later
    step (masked keys still multiply their values). With a sliding window it sees
    only keys less than `window` columns back (transformers' `kv > q - window`;
    rows' real tokens are contiguous, so columns back are positions back), and
    columns before the first query's window (`start`) are dropped from the mask
    and from the keys. bias None when nothing is masked (one new token per row,
    no padding, within the window)."""
    b, total = attention_mask.shape
    start = max(0, total - n - window + 1) if window else 0
    keys = attention_mask[:, start:].bool()[:, None, None, :]  # (B, 1, 1, total - start)
    if n == 1:  # the one query's window is exactly the columns kept
        if bool(keys.all()):
            return LayerMask(start, None)
        seen = keys
    else:
        cols = torch.arange(start, total, device=attention_mask.device)
        rows = torch.arange(total - n, total, device=attention_mask.device)[:, None]  # (n, 1) own columns
        near = cols <= rows
        if window:
            near = near & (cols > rows - window)
        seen = (keys & near) | (cols == rows)  # (B, 1, n, total - start)
        if groups > 1:  # the query axis holds `groups` heads one after another
            width = total - start
            seen = seen[:, :, None].expand(b, 1, groups, n, width).reshape(b, 1, groups * n, width)
    bias = torch.zeros(seen.shape, dtype=dtype, device=attention_mask.device)
    return LayerMask(start, bias.masked_fill_(~seen, float("-inf")))


# --------------------------------------------------------------------------- loading


def read_config(path: Path) -> dict | None:
    """config.json of `path`; a multimodal config's text part (its `text_config`)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def load(path: Path, dtype: torch.dtype = torch.float32) -> DecoderLM | None:
    """The model in `path` (config.json + *.safetensors), or None if not supported."""
    path = Path(path)
    config = read_config(path)
    arch = arch_of(config) if config is not None else None
    files = sorted(path.glob("*.safetensors"))
    if arch is None or not files:
        return None
    try:
        generation = json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        generation = {}
    from openft.models import weightcache

    state = weightcache.load(files, dtype)  # cast once and kept on disk in a non-fp32 dtype
    model = DecoderLM(arch, config, generation)
    tied = arch.tie_word_embeddings
    if tied:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (tied and k == "lm_head.weight")}
    # Another layout under a supported config (a multimodal checkpoint's
    # `model.language_model.*`, extra or missing tensors): let transformers try.
    if set(state) != expected:
        return None
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
