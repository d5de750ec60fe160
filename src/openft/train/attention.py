"""Attention for bf16 training on a CPU: plain matmuls, with a hand-written backward.

Why. PyTorch's CPU flash-attention kernel is fine in fp32, but its bf16
backward is slow: in a LoRA step of the built-in model on a 2-core AMX CPU it
took 20% of the step, nine times its own forward (torch.profiler, scratch).
Attention as two batched matmuls around a softmax runs on the same AMX units as
the projections: LoRA forward + backward 1.10x faster than with SDPA, micro-
batches interleaved (`benchmarks/attention_ab.py`: 355.7 vs 324.4 tok/s). In
fp32 it gains nothing (0.98x), so it is used for bf16 on a CPU only
(`Precision.use_kernels`).

Memory. transformers' own "eager" attention is a little faster (1.14x) but
keeps the fp32 softmax and its bf16 copy for backward (6 bytes per score); this
keeps the bf16 probabilities alone (2 bytes) and derives the softmax gradient
from them. Saved for backward on a 512-token row: 676 MB, SDPA 579, eager 969.
Keeping only each row's log-sum-exp and recomputing the probabilities in
backward (as flash attention does) saved 2 B per score but made it 0.81x of
SDPA instead of 1.15x (the extra q k^T and exp on a CPU; attention_ab at ca1aad9, 2026-11-29).

The softmax and its backward are compiled kernels for rows of 256 positions or
more (`openft.train.fused`): eagerly they are a dozen fp32 passes over the
scores per layer (compiled, the decoder stack ran 1.20x as fast at 512 tokens).

Grouped-query heads read their shared K/V head through a broadcast, never a copy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from openft.train import fused

NAME = "openft_matmul"  # the name it is registered under with transformers


class MatmulAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v. q: (B, H, T, D); k, v: (B, KV, S, D) with
    H = KV * g (query head h reads KV head h // g); bias: additive, broadcastable
    to (B, 1, T, S), or None. Scores and softmax in fp32, the products in the
    inputs' dtype."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float):
        b, h, t, d = q.shape
        kv = k.shape[1]
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        q5 = q.to(dtype).reshape(b, kv, h // kv, t, d)  # the g heads of one KV head together
        k5, v5 = k.to(dtype)[:, :, None], v.to(dtype)[:, :, None]  # (B, KV, 1, S, D)
        with torch.autocast("cpu", enabled=False):
            scores = torch.matmul(q5, k5.transpose(-1, -2))  # (B, KV, g, T, S)
            keys = scores.shape[-1]
            if bias is None:
                p = fused.for_width(fused.softmax, keys)(scores, scale)
            else:
                p = fused.for_width(fused.softmax_bias, keys)(scores, bias.float()[:, :, None], scale)
            del scores
            out = torch.matmul(p, v5).reshape(b, h, t, d)
        ctx.save_for_backward(q5, k5, v5, p)
        ctx.scale = scale
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        q5, k5, v5, p = ctx.saved_tensors
        b, kv, g, t, d = q5.shape
        do = dout.to(p.dtype).reshape(b, kv, g, t, d)
        dv = torch.matmul(p.transpose(-1, -2), do).sum(2)  # (B, KV, S, D): summed over the group's heads
        dp = torch.matmul(do, v5.transpose(-1, -2))  # (B, KV, g, T, S)
        ds = fused.for_width(fused.softmax_backward, p.shape[-1])(p, dp, ctx.scale)
        dq = torch.matmul(ds, k5).reshape(b, kv * g, t, d)
        dk = torch.matmul(ds.transpose(-1, -2), q5).sum(2)
        qd, kd, vd = ctx.dtypes
        return dq.to(qd), dk.to(kd), dv.to(vd), None, None


def causal_bias(t: int, s: int, device) -> torch.Tensor:
    """(1, 1, t, s): query i (the last t of s positions) sees keys up to its own."""
    cols = torch.arange(s, device=device)
    rows = torch.arange(s - t, s, device=device)[:, None]
    return torch.zeros((t, s), device=device).masked_fill_(cols > rows, float("-inf"))[None, None]


def matmul_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The transformers attention-interface entry (same signature as its eager one)."""
    if dropout > 0 and module.training:  # attention dropout: leave it to transformers' own kernel
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if attention_mask is not None:
        bias = attention_mask[:, :, :, : key.shape[-2]]
    else:  # transformers passes a mask whenever one is needed; stay causal regardless
        bias = causal_bias(query.shape[-2], key.shape[-2], query.device) if query.shape[-2] > 1 else None
    out = MatmulAttention.apply(query, key, value, bias, scale)
    return out.transpose(1, 2).contiguous(), None


def use(model: nn.Module) -> Callable[[], None]:
    """Run `model`'s attention through `matmul_attention` (a transformers model);
    returns the undo. A model transformers cannot switch is left as it is."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before is None:
        return lambda: None
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, matmul_attention)
    AttentionMaskInterface.register(NAME, eager_mask)  # an additive float mask, as eager attention takes
    config._attn_implementation = NAME

    def undo() -> None:
        config._attn_implementation = before

    return undo
