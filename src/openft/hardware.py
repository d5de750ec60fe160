"""What this machine runs fast: bf16 or fp32, and how to keep bf16 matmul shapes few.

Shared by training (`openft.train.precision`) and serving (`openft.serve.engine`).

On a CPU with AMX (Sapphire Rapids class) a bf16 matmul runs ~3-4x faster than
fp32 (oneDNN: 665-930 vs 230-310 GFLOP/s for a 2048^3 mm on the 2-core
machine this was written on), and on recent GPUs bf16 is the native type. So
`auto` picks bf16 there and fp32 elsewhere (a CPU without AMX emulates bf16
slowly: 10-50x slower than fp32).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def cpu_has_amx() -> bool:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return False
    return "amx_bf16" in flags.split()


def fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_amx() and torch.backends.mkldnn.is_available()


def resolve_precision(requested: str, device: torch.device) -> str:
    """ "auto" / "fp32" / "bf16" -> "fp32" or "bf16" (auto: bf16 where it is fast)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return requested


def onednn_shapes(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether matmuls in `dtype` on `device` go to oneDNN, which compiles a
    kernel for every new matrix shape (bf16 on a CPU): then padding rows to
    `shape_bucket` widths pays for itself."""
    return device.type == "cpu" and dtype == torch.bfloat16


def shape_bucket(n: int) -> int:
    """`n` rounded up to one of 8 widths per power of two (at most 12.5% more).

    oneDNN, which runs bf16 matmuls on the CPU, compiles a kernel for every new
    matrix shape: ~5 ms for each of the ~60 matmuls a LoRA step runs per new
    micro-batch shape, a quarter of the step when every shape is new. Widths from
    a small set make later batches reuse the kernels of earlier ones."""
    if n <= 16:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


@contextlib.contextmanager
def without_onednn() -> Iterator[None]:
    """Matmuls inside run on torch's own kernels instead of oneDNN's.

    For one-row bf16 products (a decode step of a single sequence) oneDNN's
    kernels are slower than torch's native bf16 gemv: a 1-row decode step of
    the built-in model took 42.9 ms with oneDNN, 36.3 ms without, 37.9 ms in
    fp32 (benchmarks/prefill_ab.py --precision). With 2 or more rows oneDNN
    wins (a 1536x576 product at 2 rows: 99 vs 156 us). The switch
    is process-wide: only for a process whose one thread runs all the models
    (the serving engine's scheduler)."""
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)
