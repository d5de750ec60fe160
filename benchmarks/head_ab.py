"""A/B of the LM head's loss: openft.train.loss as it is (tiles of every row at
once against vocabulary slices) vs the same module at a baseline commit (default
2bc9b6a: chunks of chunk_rows(V) rows against the whole vocabulary, fp32 softmax),
loaded from git into this process; alternated.

    python benchmarks/head_ab.py [--rows 400] [--rounds 6] [--baseline REV] [--json]

Each case times one forward + backward of `chunked_head_loss` under bf16 autocast at a
built-in's head shape (random weights: the time depends on the shapes only):
LoRA (the base head frozen, stored in bf16; gradient for the rows) and full
fine-tuning (an fp32 head that trains; gradients for the rows and the weight).
Prints the medians, their ratio, the rate of the head's nominal products
(2 N H V FLOPs each: forward and d rows, plus d weight in full fine-tuning), and
how far apart the two losses and row gradients are.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADS = {"qwen2.5-coder-0.5b-instruct": (151936, 896), "gemma-3-270m": (262144, 640), "smollm2-135m": (49152, 576)}


def baseline_module(rev: str):
    """openft.train.loss as it was at `rev`, imported under another name."""
    import importlib.util
    import subprocess
    import tempfile

    src = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:src/openft/train/loss.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "openft_loss_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("openft_loss_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def case(vocab: int, hidden: int, n: int, full: bool, rounds: int, base) -> dict:
    import torch

    import openft.train.loss as loss_mod

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    torch.nn.init.normal_(head.weight, std=0.02)
    if not full:
        head.weight.data = head.weight.data.bfloat16()
        head.weight.requires_grad_(False)
    rows0, y = torch.randn(n, hidden), torch.randint(0, vocab, (n,))

    def step(mod) -> tuple[float, float, torch.Tensor]:
        rows = rows0.clone().requires_grad_(True)
        head.weight.grad = None
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = mod.chunked_head_loss(head, rows, y)
        loss.backward()
        return time.perf_counter() - t, float(loss.detach()), rows.grad

    mods = {"tiles": loss_mod, "row_chunks": base}
    for mod in mods.values():
        step(mod)  # warm-up: thread pools, first-touch of buffers
    times: dict[str, list[float]] = {k: [] for k in mods}
    for r in range(rounds):
        for name in list(mods) if r % 2 == 0 else list(mods)[::-1]:
            times[name].append(step(mods[name])[0])
    (_, la, ga), (_, lb, gb) = step(loss_mod), step(base)
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = (3 if full else 2) * 2 * n * hidden * vocab
    return {
        "vocab": vocab,
        "hidden": hidden,
        "rows": n,
        "method": "full" if full else "lora",
        "tile": list(loss_mod.tile_shape(n, vocab, keep=full)),
        "row_chunk": base.chunk_rows(vocab),
        "tiles_ms": med["tiles"] * 1e3,
        "row_chunks_ms": med["row_chunks"] * 1e3,
        "speedup": med["row_chunks"] / med["tiles"],
        "tiles_tflops": flops / med["tiles"] / 1e12,
        "row_chunks_tflops": flops / med["row_chunks"] / 1e12,
        "loss_rel_diff": abs(la - lb) / abs(lb),
        "grad_rows_rel_diff": float((ga - gb).norm() / gb.norm()),
        "times_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400, help="trained rows in the call (a micro-batch's labels)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--models", default=",".join(HEADS))
    ap.add_argument("--baseline", default="2bc9b6a", help="the commit whose openft.train.loss is the baseline")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    import torch

    base = baseline_module(a.baseline)
    cases = [
        case(*HEADS[m], a.rows, full, a.rounds, base) | {"model": m}
        for m in a.models.split(",")
        for full in (False, True)
    ]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    report = {
        "baseline": a.baseline,
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "rows": a.rows,
        "rounds": a.rounds,
        "cases": cases,
    }
    if a.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{a.rows} rows, {a.rounds} rounds on {cpu} ({report['threads']} threads), bf16 autocast")
    for c in cases:
        print(
            f"  {c['model']:<28} {c['method']:<5} tiles {c['tile']}: {c['tiles_ms']:.0f} ms "
            f"({c['tiles_tflops']:.2f} TFLOP/s), {a.baseline}'s row chunks of {c['row_chunk']}: {c['row_chunks_ms']:.0f} ms "
            f"({c['row_chunks_tflops']:.2f}); {c['speedup']:.2f}x; loss apart {c['loss_rel_diff']:.1e}, "
            f"d rows {c['grad_rows_rel_diff']:.1e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
