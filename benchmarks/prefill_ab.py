"""Prefill A/B on openft's serving forward (fastllama), one process, side by side.

  OPENFT_HOME=.openft-home .venv/bin/python benchmarks/prefill_ab.py            # prompt grouping
  OPENFT_HOME=.openft-home .venv/bin/python benchmarks/prefill_ab.py --lora     # LoRA add: addmm vs matmul + add

Grouping: 16 prompts of 380-440 tokens prefilled in one forward, or in groups of
4, 2, 1 (what Engine.prefill_tokens trades). --lora: the same 16 prompts in one
forward with one random r=16 adapter on every linear layer, the low-rank product
accumulated into the base output with one addmm (openft) or computed apart and
added (the former path: two full-width temporaries per layer). Best of 2 rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora", action="store_true")
    a = ap.parse_args()
    from openft.models.load import load_for_serving, setup_torch
    from openft.models.padding import left_pad
    from openft.serve import engine_lora
    from openft.serve.engine_batch import new_cache

    setup_torch()
    base = Path(os.environ["OPENFT_HOME"]) / "models" / "smollm2-135m-instruct"
    model = load_for_serving(str(base)).model
    seqs = [[5 + (i * 7 + j) % 1000 for j in range(380 + (i * 13) % 60)] for i in range(16)]

    def run(group: int) -> float:
        t = time.perf_counter()
        for g in range(0, len(seqs), group):
            ids, mask, pos = left_pad(seqs[g : g + group], 0)
            model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=new_cache(model),
                  logits_to_keep=1)
        return time.perf_counter() - t

    variants: dict[str, callable] = {}
    if a.lora:
        import serve_bench

        home = Path(tempfile.mkdtemp())
        os.symlink(base.parent, home / "models")
        os.environ["OPENFT_HOME"] = str(home)
        serve_bench.make_adapters(home, 1)
        routing = engine_lora.LoraRouting()
        engine_lora.install_adapter(model, routing, "a",
                                    engine_lora.read_adapter(home / "runs" / "bench-0" / "adapter", model))
        routing.set_rows(["a"] * 16, torch.device("cpu"))
        fused = engine_lora.add_low_rank

        def apart(out, h, b):
            return out + F.linear(h, b)

        def with_add(fn):
            def go():
                engine_lora.add_low_rank = fn
                return run(16)
            return go

        variants = {"addmm (openft)": with_add(fused), "matmul + add (former)": with_add(apart)}
    else:
        variants = {f"groups of {g}": (lambda g=g: run(g)) for g in (16, 4, 2, 1)}
    with torch.inference_mode():
        run(16)  # warm-up
        best = {k: min(f() for _ in range(2)) for k, f in variants.items()}
    first = next(iter(best.values()))
    for k, v in best.items():
        print(f"{k:24s} {v:6.2f} s   {v / first:.2f}x of the first")


if __name__ == "__main__":
    main()
