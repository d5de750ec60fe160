"""Facts about this machine (CPU model and flags, GPU name) and how to keep bf16 matmul shapes few.

Shared by training (`openft.train.precision`) and serving (`openft.serve.engine`).
Which precision `auto` picks is measured, not read from a flag: `openft.autoprecision`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(flags.partition(":")[2].split())


def cpu_bf16_features() -> list[str]:
    """Which bf16 matmul instructions the CPU lists (amx_bf16, avx512_bf16): a fact for
    reports; whether bf16 is faster is measured (`openft.autoprecision`), not read from these."""
    return sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})


# The instruction sets a CPU run can be capped to, to measure a kind of machine on one
# that has more (an AMX Xeon run as an AVX512-BF16 Zen 4, or as a plain AVX2 CPU). Each
# cap is the environment the three kernel libraries read when they load: oneDNN
# (bf16 matmuls), MKL (fp32 GEMM) and ATen's vectorised kernels. Only a process started
# with it is capped, so it applies to children (the benchmarks re-run themselves).
CPU_ISAS = ("native", "avx512_bf16", "avx2")
_ISA_ENV = {
    "native": {},
    "avx512_bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},  # no AMX
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}
ISA_VARS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def isa_env(isa: str, env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the CPU capped to `isa` (one of CPU_ISAS; "native" lifts any cap)."""
    if isa not in _ISA_ENV:
        raise ValueError(f"CPU instruction set must be one of {', '.join(CPU_ISAS)}, not {isa!r}")
    out = {k: v for k, v in env.items() if k not in ISA_VARS}
    return out | _ISA_ENV[isa]


def isa_cap(env: Mapping[str, str] = os.environ) -> str:
    """The cap this process runs under ("" when none), as the caches and reports name it."""
    return ",".join(f"{k}={env[k]}" for k in ISA_VARS if env.get(k))


def device_name(device: torch.device) -> str:
    """The CPU model (/proc/cpuinfo's model name, else platform's) with a fingerprint
    of its feature flags, or the GPU's name. The measured caches key on it, and a
    virtual machine's model name says little: "AMD EPYC" has been seen over CPUs
    with AVX2 only and over CPUs with AVX512-BF16, whose bf16 speed differs 40x.
    A process capped to fewer instructions (`isa_env`) is another machine to them."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = platform.processor() or platform.machine(), ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = " ".join(sorted(line.split(":", 1)[1].split()))
    name = f"{model} [flags {hashlib.sha256(flags.encode()).hexdigest()[:8]}]" if flags else model
    cap = isa_cap()
    return f"{name} [capped {cap}]" if cap else name


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
