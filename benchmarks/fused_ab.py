"""A/B of openft.train.fused: the decoder stack's LoRA forward + backward in bf16 on
a CPU with the fused kernels compiled vs eager, alternated in one process.

    python benchmarks/fused_ab.py [--model NAME] [--tokens 512] [--rounds 6] [--json]

The model is loaded as training loads it (openft.models.load), wrapped in LoRA
(r=16, every decoder linear) and prepared as bf16 training prepares it
(Precision("bf16").prepare + use_kernels: bf16 base, matmul attention, fused
RMSNorm). Each round times one forward + backward of the decoder stack on one row
of `--tokens` random ids, once with every kernel compiled and once with every
kernel eager (Kernel.eager flipped), in alternating order. Prints the medians and
their ratio. The first compiled call's time (compiling or loading inductor's
cached code) is reported separately as `first_compiled_s`; with a fresh
TORCHINDUCTOR_CACHE_DIR it is the cold compile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kernels():
    from openft.train import fused

    return [fused.softmax, fused.softmax_bias, fused.softmax_backward] + [
        k for pair in fused.RMS_FORMS.values() for k in pair
    ]


def set_eager(flag: bool) -> None:
    for k in kernels():
        k.eager = flag


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("OPENFT_HOME", str(REPO / ".openft-home"))
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from openft.models.load import load_model
    from openft.train.lora import LoraParams, apply_lora, default_targets
    from openft.train.precision import Precision

    model = load_model(a.model, dtype=torch.float32).model
    apply_lora(model, LoraParams(16, 32.0, 0.0, tuple(default_targets(model))))
    precision = Precision("bf16", "cpu")
    precision.prepare(model)
    precision.use_kernels(model, full=False)
    model.train()
    ids = torch.randint(0, 1000, (1, a.tokens), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        t = time.perf_counter()
        with precision.autocast():
            h = model.model(input_ids=ids, use_cache=False).last_hidden_state
        h.float().pow(2).mean().backward()
        return time.perf_counter() - t

    set_eager(False)
    first = step()  # compiles (or loads the cached code)
    set_eager(True)
    step()  # eager warm-up
    times: dict[str, list[float]] = {"compiled": [], "eager": []}
    for r in range(a.rounds):
        for name in ("compiled", "eager") if r % 2 == 0 else ("eager", "compiled"):
            set_eager(name == "eager")
            times[name].append(step())
    compiled, eager = statistics.median(times["compiled"]), statistics.median(times["eager"])
    report = {
        "model": a.model,
        "tokens": a.tokens,
        "rounds": a.rounds,
        "first_compiled_s": first,
        "compiled_ms": compiled * 1e3,
        "eager_ms": eager * 1e3,
        "speedup": eager / compiled,
        "times_s": times,
        "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"),
        "threads": torch.get_num_threads(),
    }
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{a.model}, {a.tokens} tokens, {a.rounds} rounds on {report['cpu']} ({report['threads']} threads):\n"
            f"  decoder fwd+bwd: compiled {compiled * 1e3:.0f} ms, eager {eager * 1e3:.0f} ms, "
            f"speedup {eager / compiled:.2f}x; first compiled call {first:.1f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
