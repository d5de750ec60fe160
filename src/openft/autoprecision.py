"""`auto` precision: bf16 or fp32, whichever this machine measurably runs faster.

A CPU flag does not say it: bf16 matmuls ran 4.2x fp32 on an AMD Zen 4 with
AVX512-BF16 and no AMX (issue 16), where the old AMX-keyed rule picked fp32,
while on a CPU with neither, bf16 runs 10-100x slower than fp32 (here, an AVX2
EPYC: 2.5 vs 27 GFLOP/s). So both are timed once per machine on a
training-like product, a (512 x 1024) activation times a (1024 x 1024) weight
(`F.linear`, as every projection runs): fp32, and bf16 as mixed precision runs
it (autocast over an fp32 activation and a bf16 weight, LoRA's stored base).
bf16 is picked only when it is at least `BF16_MARGIN` times fp32, since it
costs accuracy. The whole measurement takes a fraction of a second; the
decision and its figures are cached in OPENFT_HOME/precision.json per machine
(CPU model or GPU name, torch version, device type, thread count).

Used by training (`openft.train.hparams.resolve_train`), serving
(`openft.serve.engine.Engine`) and the training-time estimate. A forced choice
skips the measurement: `--precision fp32|bf16` (per run or server), else
`OPENFT_PRECISION=fp32|bf16` (process-wide; `auto` or unset: measure).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from openft import home
from openft.fileio import atomic_write, read_json_object
from openft.hardware import device_name

PRECISIONS = ("auto", "fp32", "bf16")
ENV = "OPENFT_PRECISION"
CACHE_NAME = "precision.json"
BF16_MARGIN = 1.2  # bf16 only when >= 1.2x fp32's rate: below that its accuracy cost is not worth it
ROWS, WIDTH = 512, 1024  # the product timed on a CPU: (ROWS x WIDTH) @ (WIDTH x WIDTH)
GPU_ROWS, GPU_WIDTH = 4096, 4096  # a GPU needs bigger products to run at its kernels' speed
# bf16 is timed on growing row counts; it stops early when a smaller product already runs
# at under 1/FAR_BEHIND of fp32's rate (a CPU without bf16 hardware: one full-size product
# there took 0.4-3 s, the whole budget), as larger products never make up that much.
CPU_BF16_STEPS = (32, 128, ROWS)
FAR_BEHIND = 4.0
TIMED_SECONDS = 0.08  # timed repetitions per precision stop after this long (one at least, after a warm-up)
# What this process measured, by machine key: a process that switches OPENFT_HOME (the
# server's tests, one home each) copies it into the new home instead of measuring again.
_MEASURED: dict[str, dict] = {}


@dataclass(frozen=True)
class MachineKey:
    """What the decision depends on; a cached one is reused only for the same key."""

    device: str  # CPU model or GPU name
    device_type: str  # "cpu" or "cuda"
    torch: str
    threads: int

    def text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Decision:
    precision: str  # "fp32" or "bf16"
    source: str  # "measured" (just now), "cached", "forced" (flag or OPENFT_PRECISION), "default"
    fp32_flops: float | None = None  # the measured rates (FLOP/s); None when not measured
    bf16_flops: float | None = None
    bf16_rows: int | None = None  # rows of the largest bf16 product timed (fewer: stopped early)
    forced_by: str | None = None  # "--precision" or "OPENFT_PRECISION" when forced

    def describe(self) -> str:
        """One line for logs and job events, e.g. 'precision fp32 (measured: bf16 2.5 vs fp32 27.0 GFLOP/s)'."""
        if self.source == "forced":
            return f"precision {self.precision} (forced by {self.forced_by})"
        if self.fp32_flops is None or self.bf16_flops is None:
            return f"precision {self.precision} ({self.source}: no fast bf16 path on this device)"
        ratio = self.bf16_flops / self.fp32_flops
        return (
            f"precision {self.precision} ({self.source}: bf16 {self.bf16_flops / 1e9:.1f} vs fp32 "
            f"{self.fp32_flops / 1e9:.1f} GFLOP/s, {ratio:.2f}x; bf16 needs {BF16_MARGIN}x)"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def machine_key(device: torch.device) -> MachineKey:
    return MachineKey(device_name(device), device.type, torch.__version__, torch.get_num_threads())


def cache_path() -> Path:
    return home.home() / CACHE_NAME


def check(requested: str, what: str = "precision") -> str:
    if requested not in PRECISIONS:
        raise ValueError(f"{what} must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    return requested


def decide(requested: str, device: torch.device) -> Decision:
    """The precision for `requested` ("auto", "fp32", "bf16") on `device`, and why."""
    if check(requested) != "auto":
        return Decision(requested, "forced", forced_by="--precision")
    env = os.environ.get(ENV, "").strip().lower() or "auto"
    if check(env, ENV) != "auto":
        return Decision(env, "forced", forced_by=ENV)
    if device.type not in ("cpu", "cuda"):
        return Decision("fp32", "default")
    return measured_decision(device)


def resolve_precision(requested: str, device: torch.device) -> str:
    """ "auto" / "fp32" / "bf16" -> "fp32" or "bf16" (auto: whichever measured faster here)."""
    return decide(requested, device).precision


def measured_decision(device: torch.device) -> Decision:
    """The cached decision for this machine, else measured now and cached."""
    key = machine_key(device).text()
    entries = read_json_object(cache_path())
    cached = _valid_entry(entries.get(key))
    if cached is not None:
        return Decision(source="cached", **cached)
    entry = _MEASURED.get(key)
    source = "cached"
    if entry is None:
        entry, source = _MEASURED.setdefault(key, measured_entry(device)), "measured"
    entries[key] = entry
    atomic_write(cache_path(), json.dumps(entries, indent=1, sort_keys=True))
    return Decision(source=source, **entry)


def measured_entry(device: torch.device) -> dict:
    """Both precisions timed now, and the pick: bf16 only if timed at full size and >= BF16_MARGIN x fp32."""
    fp32, bf16, rows = measure(device)
    full = ROWS if device.type == "cpu" else GPU_ROWS
    precision = "bf16" if rows == full and bf16 >= BF16_MARGIN * fp32 else "fp32"
    return {"precision": precision, "fp32_flops": fp32, "bf16_flops": bf16, "bf16_rows": rows}


def _valid_entry(entry) -> dict | None:
    """A cached entry with every field well formed, else None (then it is measured again)."""
    if not isinstance(entry, dict) or entry.get("precision") not in ("fp32", "bf16"):
        return None
    fp32, bf16, rows = entry.get("fp32_flops"), entry.get("bf16_flops"), entry.get("bf16_rows")
    if not (_finite(fp32) and fp32 > 0 and _finite(bf16) and bf16 >= 0):  # bf16 0: no bf16 kernel
        return None
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        return None
    return {k: entry[k] for k in ("precision", "fp32_flops", "bf16_flops", "bf16_rows")}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def measure(device: torch.device) -> tuple[float, float, int]:
    """(fp32 FLOP/s, bf16 FLOP/s, rows of the largest bf16 product timed) on `device`."""
    cuda = device.type == "cuda"
    rows, width = (GPU_ROWS, GPU_WIDTH) if cuda else (ROWS, WIDTH)
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG alone
    x = torch.randn(rows, width, device=device, generator=gen)
    w = torch.randn(width, width, device=device, generator=gen)
    w16 = w.to(torch.bfloat16)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fp32 = best_rate(lambda: F.linear(x, w), 2 * rows * width * width, sync)
    bf16, timed = 0.0, 0
    for r in (rows,) if cuda else CPU_BF16_STEPS:
        xr = x[:r]

        def bf16_product(xr=xr) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                F.linear(xr, w16)

        try:
            bf16, timed = best_rate(bf16_product, 2 * r * width * width, sync), r
        except RuntimeError:  # no bf16 kernel at all (an older GPU): fp32, measured at nothing
            return fp32, 0.0, 0
        if bf16 * FAR_BEHIND < fp32:
            break
    return fp32, bf16, timed


def best_rate(product: Callable[[], object], flops: int, sync: Callable[[], None]) -> float:
    """Best FLOP/s of `product` after one warm-up call (kernel selection, oneDNN's
    per-shape compile, first touch); the best repetition, as other work on the
    machine only ever slows one down."""
    with torch.no_grad():
        product()
        sync()
        best, deadline = 0.0, time.perf_counter() + TIMED_SECONDS
        while True:
            t = time.perf_counter()
            product()
            sync()
            best = max(best, flops / max(1e-9, time.perf_counter() - t))
            if time.perf_counter() >= deadline:
                return best
