"""Linear layers for bf16 autocast over fp32 weights, without a bf16 copy kept.

Under autocast each fp32 weight is cast to bf16 for its matmul and the bf16
copy is saved for the backward pass, so between a layer's forward and its
backward a second, half-size copy of every trained weight is alive: 270 MB for
the 135M built-in during full fine-tuning, at the moment memory peaks (the
start of backward, every activation still held). `CastLinear` saves the fp32
weight itself (no memory) and casts it again in backward: the same products in
the same precision, one more cast per layer per micro-batch.

Used for full fine-tuning in bf16 (`Precision.use_kernels`); LoRA's frozen base
is stored in bf16 already and its adapters are small.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from openft.train.fused import patch_forward


class CastLinear(torch.autograd.Function):
    """x W^T + b with W (and b) cast to `dtype` for the product; x is cast too and
    kept in `dtype` for W's gradient, as autocast keeps it. Gradients come back in
    each input's own dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        xc = x.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xc, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(xc, weight)
        ctx.meta = (x.dtype, bias is not None, dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        xc, weight = ctx.saved_tensors
        x_dtype, has_bias, dtype = ctx.meta
        g = grad.to(dtype)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.matmul(g, weight.to(dtype)).to(x_dtype)
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[1]:
            gw = torch.matmul(g2.t(), xc.reshape(-1, xc.shape[-1])).to(weight.dtype)
        if has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0, dtype=torch.float32).to(weight.dtype)
        return gx, gw, gb, None


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled(x.device.type):
        return CastLinear.apply(x, self.weight, self.bias, torch.get_autocast_dtype(x.device.type))
    return F.linear(x, self.weight, self.bias)


def use(model: nn.Module) -> Callable[[], None]:
    """Route every nn.Linear whose weight trains in fp32 through `CastLinear`
    while autocast is on; returns the undo."""
    patched = [
        m
        for m in model.modules()
        if type(m) is nn.Linear and m.weight.requires_grad and m.weight.dtype == torch.float32
    ]
    return patch_forward(patched, _forward)
