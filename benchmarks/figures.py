"""The `--json` flag the benchmarks share: without it a benchmark prints its
table; with it the table goes to stderr and stdout gets one JSON object of the
same figures (as serve_bench.py and train_bench.py do), for a script to keep.
The object names the machine it ran on (CPU model, cores), so a figure kept in
benchmarks/RESULTS.md can say where it was measured."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any


def machine() -> dict[str, Any]:
    """The CPU model (as lscpu names it), the cores this process may use, and the
    instruction-set cap it runs under (`--cpu-isa`; "" for none)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model, "cores": cores, "isa_cap": os.environ.get("OPENFT_BENCH_ISA", "native")}


def add_isa_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--cpu-isa",
        default="native",
        help="run as a CPU with fewer instructions: native, avx512_bf16 (no AMX) or avx2 (neither AMX nor "
        "AVX512); the benchmark re-runs itself with oneDNN, MKL and ATen capped (openft.hardware.isa_env)",
    )


def cap_isa(isa: str) -> None:
    """Re-run this benchmark under the `isa` cap unless it already runs under it: the
    kernel libraries read the cap when they load, so it cannot be set in-process."""
    from openft.hardware import isa_env

    if os.environ.get("OPENFT_BENCH_ISA", "native") == isa:
        return
    env = isa_env(isa, os.environ) | {"OPENFT_BENCH_ISA": isa}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def add_json_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--json", action="store_true", help="print one JSON object of the figures (the table goes to stderr)"
    )


class Report:
    """A benchmark's table lines and figures; `emit` prints the JSON object."""

    def __init__(self, as_json: bool, **context: Any):
        self.as_json = as_json
        self.figures: dict[str, Any] = {**context, "machine": machine()}

    @property
    def out(self):
        """Where table lines (and a child's output) go: stderr under --json."""
        return sys.stderr if self.as_json else sys.stdout

    def line(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def add(self, key: str, value: Any) -> Any:
        self.figures[key] = value
        return value

    def emit(self) -> None:
        if self.as_json:
            print(json.dumps(self.figures, ensure_ascii=False), flush=True)
