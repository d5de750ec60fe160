"""One rank against two on this machine, side by side in one run: wall time, peak
memory per rank, and how far apart the two runs end.

Full fine-tuning (FSDP2 on two ranks: parameters, gradients and AdamW state
sharded) and LoRA (DDP) of the built-in model on the bundled example rows, the
same steps, global batch and seed in each configuration:
- `1x2`: one rank with 2 threads (the plain in-process run);
- `2x1`: two ranks through torchrun, 1 thread each (gloo).
Peak RSS is the process's own `ru_maxrss`: of the openft process for one rank,
of each rank (`<run>/.dist/usage-rank<R>.json`) for two. Run it on a quiet
machine: the wall times of 2 threads in one rank suffer most from another load.

    OPENFT_HOME=~/.openft .venv/bin/python benchmarks/dist_bench.py --steps 6 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from figures import Report, add_json_flag

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "openft" / "examples" / "lumen_train.jsonl"


MEASURE = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)"
)


def run(method: str, ranks: int, out: Path, args) -> dict:
    argv = [sys.executable, "-m", "openft.cli", "finetune", "--model", args.model, "--data", str(DATA)]
    argv += ["--output", str(out), "--method", method, "--max-steps", str(args.steps), "--batch-size", "8"]
    argv += ["--save-every", str(args.steps), "--lora-dropout", "0", "--nproc-per-node", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    usage = out.parent / f"{out.name}.maxrss"
    t0 = time.monotonic()
    # A fresh middle process per run, so its children's peak is this run's alone.
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(usage), *argv], capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{method} on {ranks} rank(s) failed:\n{proc.stderr[-3000:]}")
    if ranks == 1:
        peaks = [int(usage.read_text()) * 1024]  # Linux reports KiB
    else:
        peaks = [json.loads((out / ".dist" / f"usage-rank{r}.json").read_text())["peak_rss_bytes"] for r in range(2)]
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "train_s": summary["elapsed_s"], "peak_rss_mb": [p and p / 2**20 for p in peaks]}


def apart(a: Path, b: Path) -> float:
    """max |w_a - w_b| over the saved weights, relative to the largest weight."""
    from safetensors.torch import load_file

    def weights(run: Path) -> dict:
        files = sorted((run / "adapter").glob("*.safetensors")) or sorted((run / "model").glob("*.safetensors"))
        return {k: v for f in files for k, v in load_file(str(f)).items()}

    wa, wb = weights(a), weights(b)
    scale = max(float(v.abs().max()) for v in wa.values())
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa) / scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--methods", default="full,lora")
    add_json_flag(ap)
    args = ap.parse_args()
    rep = Report(args.json, benchmark="dist_bench", model=args.model, steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            one = run(method, 1, Path(tmp) / f"{method}-1", args)
            two = run(method, 2, Path(tmp) / f"{method}-2", args)
            diff = apart(Path(tmp) / f"{method}-1", Path(tmp) / f"{method}-2")
            peak1, peak2 = one["peak_rss_mb"][0], max(two["peak_rss_mb"])
            rep.add(method, {"1x2": one, "2x1": two, "max_weight_diff_rel": diff})
            rep.add(f"{method}_rss_ratio", peak2 / peak1 if peak1 else None)
            rep.add(f"{method}_wall_ratio", two["train_s"] / one["train_s"])
            rep.line(
                f"{method}: 1 rank x 2 threads {one['train_s']:.1f} s training, peak {peak1 or 0:.0f} MB | "
                f"2 ranks x 1 thread {two['train_s']:.1f} s, peaks {', '.join(f'{p:.0f}' for p in two['peak_rss_mb'])} MB"
                f" | per-rank peak ratio {peak2 / peak1 if peak1 else float('nan'):.3f}, time ratio "
                f"{two['train_s'] / one['train_s']:.2f}, weights apart {diff:.2e} of the largest"
            )
    rep.emit()


if __name__ == "__main__":
    main()
