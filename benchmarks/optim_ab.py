"""AdamW step over a model-sized set of fp32 parameters on this CPU: the fused
kernel openft trains with (`openft.train.recipe.make_optimizer`) against
torch's for-loop default and its foreach variant, one process, side by side.

  .venv/bin/python benchmarks/optim_ab.py            # 134.5M parameters (the built-in, full fine-tuning)
  .venv/bin/python benchmarks/optim_ab.py --millions 4.9   # LoRA r=16 on every linear layer
  .venv/bin/python benchmarks/optim_ab.py --millions 1 --rounds 1 --json   # a quick check, one JSON object

Rounds alternate between the variants; each prints the median seconds per step
and its ratio to the fused step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import Report, add_json_flag  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--millions", type=float, default=134.5, help="parameters, in millions")
    ap.add_argument("--rounds", type=int, default=5)
    add_json_flag(ap)
    a = ap.parse_args()
    report = Report(a.json, benchmark="optim_ab", rounds=a.rounds)
    from openft.train.recipe import make_optimizer

    torch.manual_seed(0)
    per = 1536 * 576  # one MLP projection of the built-in
    params = [torch.nn.Parameter(torch.randn(1536, 576)) for _ in range(max(1, round(a.millions * 1e6 / per)))]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    variants = {
        "fused (openft)": make_optimizer(params, 1e-5, 0.01),
        "for-loop (torch default on CPU)": torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, foreach=False),
        "foreach": torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, foreach=True),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for opt in variants.values():
        opt.step()  # state allocated outside the timing
    for _ in range(a.rounds):
        for name, opt in variants.items():
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    n = sum(p.numel() for p in params)
    report.figures.update(parameters=n, threads=torch.get_num_threads())
    report.line(f"{n / 1e6:.1f}M fp32 parameters, {torch.get_num_threads()} threads")
    fused = statistics.median(times["fused (openft)"])
    rows = report.add("variants", {})
    for name, ts in times.items():
        m = statistics.median(ts)
        rows[name] = {"s_per_step": m, "vs_fused": m / fused}
        report.line(f"  {name:34s} {m:7.3f} s/step   {m / fused:5.2f}x the fused step")
    report.emit()


if __name__ == "__main__":
    main()
