"""LoRA training micro-batches on the built-in model with glibc's default heap
policy against `openft.heap.keep_freed_memory` (what `finetune` sets), each in
its own process, rounds alternating, side by side.

  .venv/bin/python benchmarks/heap_ab.py                  # 2 rows x 256 tokens (train_bench's mean row is ~200)
  .venv/bin/python benchmarks/heap_ab.py --rows 1 --tokens 512
  .venv/bin/python benchmarks/heap_ab.py --rounds 1 --steps 1 --json   # a quick check, one JSON object

Prints, per variant, the median seconds per forward+backward, system CPU
seconds and minor page faults per micro-batch, and peak RSS; then the ratios
(--json: those figures as one JSON object on stdout, the table on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from figures import Report, add_json_flag  # noqa: E402


def child(keep: bool, rows: int, tokens: int, steps: int) -> dict:
    import torch

    from openft.heap import keep_freed_memory
    from openft.models.load import load_model, setup_torch
    from openft.train.lora import LoraParams, apply_lora, default_targets
    from openft.train.loss import causal_lm_loss

    setup_torch()
    if keep:
        assert keep_freed_memory()
    torch.manual_seed(0)
    model = load_model("smollm2-135m-instruct", dtype=torch.float32).model
    apply_lora(model, LoraParams(16, 32.0, 0.0, tuple(default_targets(model))))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (rows, tokens))
    labels = ids.clone()
    labels[:, : tokens // 3] = -100  # a prompt third, as in instruction rows

    def step() -> None:
        out = causal_lm_loss(model, ids, torch.ones_like(ids), labels)
        (out.loss_sum / out.n_tokens).backward()

    for _ in range(2):  # first touch of every buffer (and the heap settling), outside the timing
        step()
    times = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "step_s": statistics.median(times),
        "sys_s": (r1.ru_stime - r0.ru_stime) / steps,
        "minflt": (r1.ru_minflt - r0.ru_minflt) / steps,
        "peak_rss_mb": r1.ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed micro-batches per process")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--_child", choices=["default", "keep"])
    add_json_flag(ap)
    a = ap.parse_args()
    if a._child:
        print(json.dumps(child(a._child == "keep", a.rows, a.tokens, a.steps)))
        return
    res: dict[str, list[dict]] = {"default": [], "keep": []}
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"}
    for _ in range(a.rounds):
        for name in res:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--_child",
                    name,
                    "--rows",
                    str(a.rows),
                    "--tokens",
                    str(a.tokens),
                    "--steps",
                    str(a.steps),
                ],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            res[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in res.items()}
    d, k = med["default"], med["keep"]
    report = Report(a.json, benchmark="heap_ab", rows=a.rows, tokens=a.tokens, rounds=a.rounds, steps=a.steps)
    report.figures.update(median=med, speedup=d["step_s"] / k["step_s"], rss_ratio=k["peak_rss_mb"] / d["peak_rss_mb"])
    report.line(f"{a.rows} rows x {a.tokens} tokens, LoRA r=16, {a.rounds} rounds x {a.steps} micro-batches")
    report.line(f"{'variant':<10}{'s/step':>9}{'sys s':>8}{'faults':>9}{'RSS MB':>9}")
    for n, m in med.items():
        report.line(f"{n:<10}{m['step_s']:>9.3f}{m['sys_s']:>8.3f}{m['minflt']:>9.0f}{m['peak_rss_mb']:>9.0f}")
    report.line(
        f"speed-up (default/keep step time): {d['step_s'] / k['step_s']:.3f}x; "
        f"peak RSS keep/default: {k['peak_rss_mb'] / d['peak_rss_mb']:.3f}"
    )
    report.emit()


if __name__ == "__main__":
    main()
