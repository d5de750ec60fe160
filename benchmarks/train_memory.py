"""Where a training run's memory goes: peak RSS and peak live heap, per phase.

Runs openft's `finetune` on the same rows as `train_bench.py` (the openft
configuration, one subprocess-free run) while a thread samples, every 2 ms, the
process's resident memory and glibc's live heap (`mallinfo2`: bytes in use in
every arena + mmapped chunks). Each sample is charged to the phase the run is
in: forward, backward, gradient clipping, optimizer step, checkpoint, final
save, weight-delta read-back (and `after_X` for what runs after X until the next
phase). At the end it prints the heap's extent and free bytes: RSS far above the
live heap with a large free total is fragmentation, memory held by the heap but
in pieces too small or too scattered to reuse.

    OPENFT_HOME=.openft-home .venv/bin/python benchmarks/train_memory.py --method full --precision auto
    OPENFT_HOME=.openft-home .venv/bin/python benchmarks/train_memory.py --method lora --rows 8 --json   # quick

Linux with glibc only (it reads /proc and calls mallinfo2). It patches the
recipe's functions to mark phases, so figures are for diagnosis, not a
benchmark: compare runs of this script with each other.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("OPENFT_HOME", str(REPO / ".openft-home"))
from figures import Report, add_json_flag  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo2
MB = 2**20


def live_mb() -> float:
    m = _LIBC.mallinfo2()
    return (m.uordblks + m.hblkhd) / MB


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


class Phases:
    """The current phase, and the peak RSS / live heap seen in each."""

    def __init__(self) -> None:
        self.now = "setup"
        self.rss: dict[str, float] = {}
        self.live: dict[str, float] = {}
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            p, r, v = self.now, rss_mb(), live_mb()
            self.rss[p] = max(self.rss.get(p, 0.0), r)
            self.live[p] = max(self.live.get(p, 0.0), v)
            time.sleep(0.002)

    def wrap(self, owner, name: str, label: str) -> None:
        f = getattr(owner, name)

        def marked(*a, **k):
            self.now = label
            try:
                return f(*a, **k)
            finally:
                self.now = "after_" + label

        setattr(owner, name, marked)


def instrument(phases: Phases, shapes: list[tuple[int, ...]]) -> None:
    import torch

    from openft.train import recipe

    for name, label in [
        ("causal_lm_loss", "forward"),
        ("evaluate", "eval"),
        ("_save_final", "save_final"),
        ("snapshot_weights", "snapshot"),
        ("weight_delta_norm", "delta"),
    ]:
        phases.wrap(recipe, name, label)
    phases.wrap(recipe.checkpoint, "save", "checkpoint")
    phases.wrap(torch.Tensor, "backward", "backward")
    phases.wrap(torch.nn.utils, "clip_grad_norm_", "clip")
    make = recipe.make_optimizer

    def make_marked(*a, **k):
        opt = make(*a, **k)
        phases.wrap(opt, "step", "optimizer")
        return opt

    recipe.make_optimizer = make_marked
    batches = recipe.micro_batches

    def counted(*a, **k):
        for mb in batches(*a, **k):
            shapes.append(tuple(mb.input_ids.shape))
            yield mb

    recipe.micro_batches = counted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=["lora", "full"], default="full")
    ap.add_argument("--precision", choices=["auto", "fp32"], default="auto")
    ap.add_argument("--rows", type=int, default=160, help="training rows, as train_bench selects them")
    add_json_flag(ap)
    a = ap.parse_args()
    report = Report(a.json, benchmark="train_memory", method=a.method, rows=a.rows)
    phases, shapes = Phases(), []
    instrument(phases, shapes)
    import train_bench as tb

    from openft.models.load import load_builtin_tokenizer

    tok = load_builtin_tokenizer()
    train, _ = tb.select_rows(tok, False, a.rows, 32)
    mean_len = sum(len(tb.render_ids(tok, r)[0]) for r in train) / len(train)
    with tempfile.TemporaryDirectory(prefix="train-memory-") as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in train))
        spec = {
            "device": "cpu",
            "train_path": str(path),
            "method": a.method,
            "tmp": tmp,
            "hp": {
                "epochs": 1,
                "lr": 5e-4 if a.method == "lora" else 2e-5,
                "seed": 0,
                "max_length": 1024,
                "batch_size": max(1, round(2048 / mean_len)),
            },
        }
        tb.T_START = time.time()
        out = tb.child_openft(spec, "openft_fp32" if a.precision == "fp32" else "openft")
    time.sleep(0.05)  # one more sample of the phase the run ended in
    print_figures(report, out, phases, shapes)
    report.emit()


def print_figures(report: Report, out: dict, phases: Phases, shapes: list[tuple[int, ...]]) -> None:
    report.figures.update({k: out[k] for k in ("precision", "steps", "train_s", "peak_rss_mb")})
    report.line(
        f"{report.figures['method']} {out['precision']}: {out['steps']} steps, train {out['train_s']:.1f} s, "
        f"peak RSS {out['peak_rss_mb']:.0f} MB"
    )
    report.line(f"{'phase':<18}{'peak RSS MB':>12}{'peak live heap MB':>19}")
    per_phase = report.add("phases", {})
    for p, r in list(phases.rss.items()):
        per_phase[p] = {"peak_rss_mb": r, "peak_live_heap_mb": phases.live[p]}
        report.line(f"{p:<18}{r:>12.0f}{phases.live[p]:>19.0f}")
    m = _LIBC.mallinfo2()
    report.add(
        "heap_now_mb",
        {"extent": m.arena / MB, "in_use": m.uordblks / MB, "free": m.fordblks / MB, "mmapped": m.hblkhd / MB},
    )
    report.line(
        f"heap now: extent {m.arena / MB:.0f} MB, in use {m.uordblks / MB:.0f}, free {m.fordblks / MB:.0f} "
        f"in {m.ordblks} pieces, mmapped {m.hblkhd / MB:.0f}; RSS {rss_mb():.0f}"
    )
    widest = sorted(Counter(shapes).items(), key=lambda kv: -kv[0][0] * kv[0][1])[:8]
    report.add("widest_micro_batches", [[list(s), n] for s, n in widest])
    report.line("widest micro-batches (rows, width) x count: " + ", ".join(f"{s} x{n}" for s, n in widest))


if __name__ == "__main__":
    main()
