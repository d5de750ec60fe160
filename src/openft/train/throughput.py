"""How fast this machine trains, for the training-time estimate.

The estimate (`openft.train.hparams.estimate_seconds`) divides a run's FLOPs by
an effective rate. That rate is measured, not assumed: a short probe times the
three products a linear layer runs per training step (forward X·W, backward
dY·Wᵀ and Xᵀ·dY) on the device and at the precision training would pick here
(`openft.autoprecision.resolve_precision("auto", ...)`, itself measured), and a training step reaches
a fixed fraction of that matmul rate (`TRAINING_EFFICIENCY`). The probe takes a
fraction of a second; its figure is cached under OPENFT_HOME per machine (CPU
model or GPU name, torch version, thread count, precision), so later estimates
are instant. `OPENFT_ESTIMATE_FLOPS` overrides the effective rate (FLOP/s).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from openft import home
from openft.autoprecision import resolve_precision
from openft.fileio import atomic_write, read_json_object
from openft.hardware import device_name

ENV_FLOPS = "OPENFT_ESTIMATE_FLOPS"
CACHE_NAME = "throughput.json"

# Training FLOP/s (4N per token for LoRA, 6N for full fine-tuning) over the
# probe's matmul rate at the same precision. It is a property of openft's
# training step (the share of time outside large matmuls: attention, norms,
# the loss, the optimizer, Python between kernels), not of the machine, but it
# differs by precision: bf16 speeds the matmuls up ~4x on an AMX CPU and the
# rest barely. From benchmarks/train_bench.py's runs of the 135M built-in
# (benchmarks/RESULTS.md, "Training"): in fp32, 94-119 GFLOP/s against an fp32
# matmul peak of 251-311, i.e. 0.37-0.47; in bf16 (LoRA), 109-170 GFLOP/s
# against a bf16 peak of 593-2062, i.e. 0.09-0.18 (its `peak_fraction_bf16`;
# the 0.45-0.6 `peak_fraction` there is the same bf16 run over the *fp32*
# peak). No GPU run has been measured yet: the GPU takes the same figures.
TRAINING_EFFICIENCY = {"fp32": 0.4, "bf16": 0.15}

PROBE_SECONDS = 0.25  # timed repetitions stop after this long (one at least, after a warm-up)


@dataclass(frozen=True)
class MachineKey:
    """What the probe's figure depends on; a cached figure is reused only for the same key."""

    device: str  # CPU model or GPU name
    torch: str
    threads: int
    precision: str

    def text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def training_device() -> torch.device:
    """Where training runs by default (as `resolve_train`): the GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine_key(device: torch.device, precision: str) -> MachineKey:
    return MachineKey(device_name(device), torch.__version__, torch.get_num_threads(), precision)


def effective_flops() -> float:
    """FLOP/s a training step reaches here: `OPENFT_ESTIMATE_FLOPS`, else the
    (cached) probe at the default training precision times its efficiency."""
    override = os.environ.get(ENV_FLOPS)
    if override is not None:
        return _parse_override(override)
    device = training_device()
    precision = resolve_precision("auto", device)
    return matmul_flops(device, precision) * TRAINING_EFFICIENCY[precision]


def _parse_override(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{ENV_FLOPS} must be a positive number of FLOP/s (e.g. 2e11), not {text!r}")
    return value


def cache_path() -> Path:
    return home.home() / CACHE_NAME


def matmul_flops(device: torch.device, precision: str) -> float:
    """The probe's figure for this machine: from the cache, else measured and cached."""
    key = machine_key(device, precision)
    entries = read_json_object(cache_path())
    cached = entries.get(key.text())
    if isinstance(cached, (int, float)) and math.isfinite(cached) and cached > 0:
        return float(cached)
    flops = probe(device, precision)
    entries[key.text()] = flops
    atomic_write(cache_path(), json.dumps(entries, indent=1, sort_keys=True))
    return flops


def probe(device: torch.device, precision: str) -> float:
    """Best FLOP/s of one linear layer's training products (X·W, dY·Wᵀ, Xᵀ·dY).

    Square 1024-wide operands on a CPU (4096 on a GPU) are large enough to run
    at the matmul kernels' speed and small enough to time in a fraction of a
    second; the best repetition is taken, as other work on the machine only
    ever slows one down."""
    n = 4096 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG alone
    x, w, dy = (torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(3))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def products() -> None:
        torch.mm(x, w)  # forward
        torch.mm(dy, w.T)  # gradient of the input
        torch.mm(x.T, dy)  # gradient of the weight

    products()  # warm-up: kernel selection, first-touch of the buffers
    sync()
    best, deadline = 0.0, time.perf_counter() + PROBE_SECONDS
    while True:
        t = time.perf_counter()
        products()
        sync()
        best = max(best, 3 * 2 * n**3 / max(1e-9, time.perf_counter() - t))
        if time.perf_counter() >= deadline:
            return best
