"""Fused elementwise kernels for bf16 training on a CPU, compiled by torch.compile.

Why. Where bf16 matmuls run on AMX, the projections of a LoRA step are no longer
what takes its time: in the decoder stack of the Qwen 0.5B built-in (512 tokens,
forward + backward, 2-core AMX CPU, torch.profiler) matmuls took 45%, and the
rest was eager elementwise passes over memory, the largest the attention
softmax: its forward and backward read and write the (heads x T x T) scores
about a dozen times in fp32. Compiled (inductor's C++ backend), each is one or
two loops over the scores; RMSNorm forward + backward likewise (1.97 -> 0.70 ms
at 512 x 896). Measured in `benchmarks/fused_ab.py`.

Each kernel is a pure function, compiled once with dynamic shapes (inductor
caches the code on disk, under OPENFT_HOME/cache/inductor unless
TORCHINDUCTOR_CACHE_DIR says otherwise, so later processes load it: a machine's
first run compiles, ~20 s on a 2-core CPU). Where compiling fails (no
C++ compiler, an inductor error) the same function runs eagerly, with one
warning: the same math, one pass per op. `OPENFT_COMPILE=0` keeps every kernel
eager.

Only rows of COMPILE_MIN_POSITIONS positions or more take the compiled kernels.
The gain grows with the row: the scores are T x T per head. Decoder stack of the
Qwen 0.5B built-in, LoRA forward + backward with the loss, 2-core AMX CPU,
compiled vs eager alternated: 1 x 1024 tokens 1.57x, 1 x 512 1.20x, 2 x 256
1.11x, 1 x 256 1.05x, 4 x 128 1.02-1.09x. Compiling also loads torch's compiler
stack into the process, ~150 MB, which short rows would pay for little.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

COMPILE_ENV = "OPENFT_COMPILE"  # "0": eager kernels only
COMPILE_MIN_POSITIONS = 256  # a row's width (positions) from which the compiled kernels run


def compile_enabled() -> bool:
    return os.environ.get(COMPILE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class Kernel:
    """A pure tensor function, compiled on first use; eager from the first failure on
    (a pure function is safe to run again)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled: Callable | None = None
        self.eager = not compile_enabled()

    def __call__(self, *args):
        # The C++ backend's kernels: a GPU has its own (and would need Triton).
        if not self.eager and args[0].device.type == "cpu":
            try:
                if self.compiled is None:
                    use_home_cache()
                    self.compiled = torch.compile(self.fn, dynamic=True)
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, never fail the job
                self.eager = True
                log.warning("openft: compiling %s failed, running it eagerly: %s", self.fn.__name__, e)
        return self.fn(*args)


def use_home_cache() -> None:
    """Inductor's compiled code under OPENFT_HOME (kept with openft's other caches;
    its default, the temp folder, is often cleared at reboot). Set in the
    environment, so inductor's compile workers use it too."""
    from openft.home import home

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(home() / "cache" / "inductor"))


def for_width(kernel: Kernel, positions: int) -> Callable:
    """The kernel, compiled where rows of `positions` are long enough to gain from
    it, else its eager function."""
    return kernel if positions >= COMPILE_MIN_POSITIONS else kernel.fn


def _softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scores * scale) over the last dim, in fp32, returned in scores' dtype."""
    return torch.softmax(scores.float().mul_(scale), -1).to(scores.dtype)


def _softmax_bias(scores: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """The same with an additive fp32 mask (broadcast over the scores)."""
    return torch.softmax(scores.float().mul_(scale).add_(bias), -1).to(scores.dtype)


def _softmax_backward(p: torch.Tensor, dp: torch.Tensor, scale: float) -> torch.Tensor:
    """Gradient of the pre-scale scores from the probabilities p and their gradient dp."""
    pf, d = p.float(), dp.float()
    return (pf * (d - (d * pf).sum(-1, keepdim=True))).mul_(scale).to(p.dtype)


softmax = Kernel(_softmax)
softmax_bias = Kernel(_softmax_bias)
softmax_backward = Kernel(_softmax_backward)


# RMSNorm, in the two forms transformers' families use:
#   llama (Llama, Qwen2/3, Mistral): w * (x32 * rstd).to(x.dtype)
#   gemma (Gemma 1-3):               ((x32 * rstd) * (1 + w32)).to(x.dtype)
def _rms_llama(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * (xf * rstd).to(x.dtype), rstd


def _rms_gemma(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * (1.0 + w.float())).to(x.dtype), rstd


def _rms_llama_backward(x, w, rstd, dy, with_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dx, and (where the weight trains) dw summed over every row, in fp32."""
    n = x.float() * rstd
    dyf = dy.float()
    dn = dyf * w.float()
    dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
    dw = (dyf * n.to(x.dtype).float()).reshape(-1, n.shape[-1]).sum(0) if with_dw else None
    return dx.to(x.dtype), dw


def _rms_gemma_backward(x, w, rstd, dy, with_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.float() * rstd
    dyf = dy.float()
    dn = dyf * (1.0 + w.float())
    dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
    dw = (dyf * n).reshape(-1, n.shape[-1]).sum(0) if with_dw else None
    return dx.to(x.dtype), dw


RMS_FORMS = {
    "llama": (Kernel(_rms_llama), Kernel(_rms_llama_backward)),
    "gemma": (Kernel(_rms_gemma), Kernel(_rms_gemma_backward)),
}
# transformers' RMSNorm classes by form, and the attribute holding their epsilon
RMS_CLASSES = {
    "LlamaRMSNorm": ("llama", "variance_epsilon"),
    "Qwen2RMSNorm": ("llama", "variance_epsilon"),
    "Qwen3RMSNorm": ("llama", "variance_epsilon"),
    "MistralRMSNorm": ("llama", "variance_epsilon"),
    "GemmaRMSNorm": ("gemma", "eps"),
    "Gemma2RMSNorm": ("gemma", "eps"),
    "Gemma3RMSNorm": ("gemma", "eps"),
}


class FusedRMSNorm(torch.autograd.Function):
    """Saves the input (already alive: the residual stream) and one fp32 rstd per
    row, where eager autograd keeps an fp32 copy of the input and more."""

    @staticmethod
    def forward(ctx, x, w, eps: float, form: str):
        # transformers' decoders norm (B, T, ...) inputs: T is the row's width
        ctx.width = x.shape[1] if x.dim() >= 3 else 1
        y, rstd = for_width(RMS_FORMS[form][0], ctx.width)(x, w, eps)
        ctx.save_for_backward(x, w, rstd)
        ctx.form = form
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, rstd = ctx.saved_tensors
        with_dw = ctx.needs_input_grad[1]
        dx, dw = for_width(RMS_FORMS[ctx.form][1], ctx.width)(x, w, rstd, dy, with_dw)
        return dx, dw.to(w.dtype) if with_dw else None, None, None


def _rms_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    form, eps_attr = RMS_CLASSES[type(self).__name__]
    return FusedRMSNorm.apply(x, self.weight, getattr(self, eps_attr), form)


def patch_forward(modules: list[nn.Module], forward: Callable) -> Callable[[], None]:
    """Give each of `modules` `forward` as its own forward; returns the undo (the
    class's forward again), which tolerates a layer something else re-set."""
    for m in modules:
        m.forward = types.MethodType(forward, m)

    def undo() -> None:
        for m in modules:
            m.__dict__.pop("forward", None)

    return undo


def use(model: nn.Module) -> Callable[[], None]:
    """Route `model`'s RMSNorm layers (of the classes above) through the fused
    kernels; returns the undo."""
    return patch_forward([m for m in model.modules() if type(m).__name__ in RMS_CLASSES], _rms_forward)
