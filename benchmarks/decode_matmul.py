"""Why a 16-row decode step is bandwidth-poor on this CPU: one 1536 x 576 fp32
projection (the built-in's MLP shape) applied to M rows, through torch's plain
`F.linear` (MKL sgemm), MKL's packed-weight sgemm (`torch.ops.mkl._mkl_linear`,
packed for that M) and oneDNN's prepacked linear (`torch.ops.mkldnn`), over 60
distinct weights (past the caches), alternating rounds, medians.

  .venv/bin/python benchmarks/decode_matmul.py
  .venv/bin/python benchmarks/decode_matmul.py --json   # one JSON object

Prints microseconds per projection and the weight bytes streamed per second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import Report, add_json_flag  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_flag(ap)
    report = Report(ap.parse_args().json, benchmark="decode_matmul", threads=torch.get_num_threads())
    torch.manual_seed(0)
    weights = [torch.randn(1536, 576) for _ in range(60)]
    nbytes = weights[0].numel() * 4
    dnnl = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
    report.line(f"{torch.get_num_threads()} threads; us per 1536x576 projection (GB/s of weights)")
    rows = report.add("us_per_projection", {})  # rows M -> variant -> microseconds
    for m in (1, 4, 16, 64):
        x = torch.randn(m, 576)
        mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in weights]
        variants = {
            "plain F.linear": lambda: [F.linear(x, w) for w in weights],
            "MKL packed": lambda: [torch.ops.mkl._mkl_linear(x, p, w, None, m) for p, w in zip(mkl, weights)],
            "oneDNN prepacked": lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in dnnl],
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(9):
            for name, fn in variants.items():
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) / len(weights))
        cells, rows[m] = [], {}
        for name, ts in times.items():
            us = statistics.median(ts) * 1e6
            rows[m][name] = us
            cells.append(f"{name} {us:6.0f} ({nbytes / us / 1e3:4.1f})")
        report.line(f"  M={m:<3d} " + "   ".join(cells))
    report.emit()


if __name__ == "__main__":
    main()
