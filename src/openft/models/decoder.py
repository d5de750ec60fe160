"""A Llama-architecture decoder for serving, without importing transformers.

Why. `from transformers import LlamaForCausalLM` costs 3-5 s of imports on this
machine (it pulls in torch.distributed.tensor, dynamo, sympy ...), more than
everything else a server does before its first answer. Serving needs only the
forward pass of the one architecture that most small chat models share (Llama,
SmolLM, TinyLlama ...), so `openft serve` builds that here in plain torch: a few
dozen lines, the same module names as transformers (so safetensors and PEFT
adapter keys map one to one), and the same numbers (tests/models/test_fastllama.py
compares logits with transformers' own model, padded batches and cache included).

Anything this does not cover (other architectures, rope scaling, attention
biases, sliding windows) returns None from `load`, and the caller falls back to
transformers. Inference only: no dropout, no gradients, no training paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int


def shape_of(config: dict) -> LlamaShape | None:
    """The shape of a supported config, or None if this module cannot run it exactly."""
    if config.get("model_type") != "llama" or config.get("hidden_act", "silu") != "silu":
        return None
    if config.get("attention_bias") or config.get("mlp_bias") or config.get("pretraining_tp", 1) != 1:
        return None
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return None
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return LlamaShape(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        )
    except (KeyError, TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- cache


class KVLayer:
    """One layer's keys and values, (batch, kv_heads, L, head_dim), appended into
    spare columns of a buffer rather than concatenated anew each step. The engine
    may assign `keys`/`values` (merging, row removal); the next append then starts
    a fresh buffer. Same contract as engine_batch's transformers `SlackLayer`."""

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


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, device=META))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As transformers: the variance in fp32, the product back in the input dtype.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        self.q_proj = Linear(s.hidden_size, s.num_heads * s.head_dim, bias=False, device=META)
        self.k_proj = Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=False, device=META)
        self.v_proj = Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=False, device=META)
        self.o_proj = Linear(s.num_heads * s.head_dim, s.hidden_size, bias=False, device=META)

    def forward(self, x, cos, sin, mask, layer: KVLayer | None):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if layer is not None:
            k, v = layer.update(k, v)
        return self.o_proj(grouped_attention(q, k, v, mask).transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SDPA for grouped-query attention without repeating keys and values.

    q: (B, H, n, D); k, v: (B, KV, L, D) with H = KV * g (query head h reads KV
    head h // g, as transformers' repeat_kv); bias: None or the additive mask
    from `attention_bias(..., groups=g)`, (B, 1, g * n | 1, L). `enable_gqa` on
    the CPU copies K and V g times per call, and a decode step (n = 1) reads
    the whole cache. Here the g query heads that share a KV head are laid along
    the query axis instead, (B, KV, g * n, D), so each KV head is read once: a
    16-row decode step 0.955x the time of enable_gqa's, prefill unchanged
    (benchmarks/prefill_ab.py --attention). Same numbers as the expanded form
    (tests/models/test_fastllama.py)."""
    b, h, n, d = q.shape
    kv = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(b, kv, (h // kv) * n, d), k, v, attn_mask=bias)
    return out.reshape(b, h, n, d)


class MLP(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.gate_proj = Linear(s.hidden_size, s.intermediate_size, bias=False, device=META)
        self.up_proj = Linear(s.hidden_size, s.intermediate_size, bias=False, device=META)
        self.down_proj = Linear(s.intermediate_size, s.hidden_size, bias=False, device=META)

    def forward(self, x):
        # In place: two fewer (tokens x intermediate) temporaries, which in a
        # prefill cost as much time as a matmul (inference only: nothing saved for backward).
        return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.self_attn = Attention(s)
        self.mlp = MLP(s)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)

    def forward(self, h, cos, sin, mask, layer):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class Body(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.embed_tokens = Embedding(s.vocab_size, s.hidden_size, device=META)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class LlamaLM(nn.Module):
    """`model(input_ids, attention_mask, position_ids, past_key_values, logits_to_keep)`,
    the subset of transformers' call the serving engine uses. attention_mask: (B,
    cached + new) with 1 for real tokens; position_ids: (B, new)."""

    def __init__(self, shape: LlamaShape, config: dict, generation: dict):
        super().__init__()
        self.shape = shape
        self.config = SimpleNamespace(**config)
        self.generation_config = SimpleNamespace(
            eos_token_id=generation.get("eos_token_id", config.get("eos_token_id"))
        )
        self.model = Body(shape)
        self.lm_head = Linear(shape.hidden_size, shape.vocab_size, bias=False, device=META)
        d = shape.head_dim
        self.register_buffer(
            "inv_freq", 1.0 / shape.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d), persistent=False
        )  # (head_dim / 2,) rotary frequencies

    def new_cache(self) -> KVCache:
        return KVCache(self.shape.num_layers)

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
        # RoPE in fp32 as transformers does, then cast to the activations' dtype.
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, n, d/2)
        emb = torch.cat((freqs, freqs), -1)[:, None]  # (B, 1, n, d)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        mask = attention_bias(attention_mask, n, self.shape.num_heads // self.shape.num_kv_heads, h.dtype)
        layers = past_key_values.layers if past_key_values is not None else [None] * len(self.model.layers)
        for block, layer in zip(self.model.layers, layers):
            h = block(h, cos, sin, mask, layer)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(self.model.norm(h))
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def attention_bias(attention_mask: torch.Tensor, n: int, groups: int, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, total) 0/1 -> the additive mask for `grouped_attention`, built once per
    forward: (B, 1, groups * n, total), 0 where a query sees a key and -inf
    elsewhere (a bool mask would be converted by SDPA again in every layer).
    The last n columns are the queries. Query i sees real keys up to its own
    column, and always its own column: a left padding query with nothing to
    attend to would give NaN, which its cached K/V would carry into every later
    step (masked keys still multiply their values). None when nothing is masked
    (one new token per row, no padding)."""
    b, total = attention_mask.shape
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, total)
    if n == 1:
        if bool(keys.all()):
            return None
        seen = keys
    else:
        cols = torch.arange(total, device=attention_mask.device)
        rows = cols[total - n :, None]  # (n, 1) each query's own column
        seen = (keys & (cols <= rows)) | (cols == rows)  # (B, 1, n, total)
        if groups > 1:  # the query axis holds `groups` heads one after another
            seen = seen[:, :, None].expand(b, 1, groups, n, total).reshape(b, 1, groups * n, total)
    bias = torch.zeros(seen.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill_(~seen, float("-inf"))


# --------------------------------------------------------------------------- loading


def load(path: Path, dtype: torch.dtype = torch.float32) -> LlamaLM | None:
    """The model in `path` (config.json + *.safetensors), or None if not supported."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config) if config.get("model_type") != "llama" else config
    shape = shape_of(config)
    files = sorted(path.glob("*.safetensors"))
    if shape is None or not files:
        return None
    try:
        generation = json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        generation = {}
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    model = LlamaLM(shape, config, generation)
    if shape.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (shape.tie_word_embeddings and k == "lm_head.weight")}
    if set(state) != expected:  # another layout under a llama config: let transformers try
        return None
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if shape.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
