"""Training attention A/B: torch's SDPA vs openft's matmul attention vs transformers' eager.

  OPENFT_HOME=.openft-home .venv/bin/python benchmarks/attention_ab.py            # bf16 (as on an AMX CPU)
  OPENFT_HOME=.openft-home .venv/bin/python benchmarks/attention_ab.py --fp32
  OPENFT_HOME=.openft-home .venv/bin/python benchmarks/attention_ab.py --json   # one JSON object

The built-in model with LoRA (r=16, every linear layer) prepared as training
prepares it (`Precision.prepare`: frozen base in bf16 for bf16), the first 96
rows of ../shared/datasets/alpaca_en_demo.json cut into openft's micro-batches
(512 padded tokens, shape-bucketed widths in bf16). For each of 20 micro-batches,
three rounds, every implementation runs forward + backward in turn (interleaved,
so drifts in machine speed hit all alike); tokens/s is real tokens over the
summed time. `saved MB`: bytes autograd keeps for backward in one forward of the
widest micro-batch (saved-tensor hooks, each storage counted once).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from figures import Report, add_json_flag  # noqa: E402

DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "alpaca_en_demo.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp32", action="store_true")
    add_json_flag(ap)
    a = ap.parse_args()
    report = Report(a.json, benchmark="attention_ab")
    from openft.data.load import load_dataset
    from openft.models.load import load_model, setup_torch
    from openft.train import attention
    from openft.train.batching import micro_batches
    from openft.train.lora import LoraParams, apply_lora, default_targets
    from openft.train.loss import causal_lm_loss
    from openft.train.precision import Precision
    from openft.train.tokenize import encode_all

    setup_torch()
    loaded = load_model("smollm2-135m-instruct")
    model, tok = loaded.model, loaded.tokenizer
    apply_lora(model, LoraParams(16, 32.0, 0.0, tuple(default_targets(model))))
    precision = Precision("fp32" if a.fp32 else "bf16", "cpu")
    precision.prepare(model)
    items = encode_all(tok, list(load_dataset(DATASET).examples)[:96], 512)
    mbs = micro_batches(items, tok.pad_token_id or 0, 512, precision.widths())
    attention.use(model)  # registers openft's implementation with transformers
    impls = ["sdpa", attention.NAME, "eager"]
    model.train()

    def step(mb) -> None:
        with precision.autocast():
            out = causal_lm_loss(model, mb.input_ids, mb.attention_mask, mb.labels)
        out.loss_sum.backward()

    def saved_mb(mb) -> float:
        seen: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), precision.autocast():
            causal_lm_loss(model, mb.input_ids, mb.attention_mask, mb.labels)
        return sum(seen.values()) / 2**20

    widest = max(mbs, key=lambda m: m.input_ids.shape[1])
    saved, elapsed, tokens = {}, {i: 0.0 for i in impls}, 0
    for impl in impls:
        model.config._attn_implementation = impl
        for mb in mbs[:4]:  # warm-up: kernels, buffers
            step(mb)
        saved[impl] = saved_mb(widest)
    for _ in range(3):
        for mb in mbs[4:24]:
            tokens += mb.n_tokens
            for impl in impls:
                model.config._attn_implementation = impl
                t = time.perf_counter()
                step(mb)
                elapsed[impl] += time.perf_counter() - t
            model.zero_grad(set_to_none=True)
    base = tokens / elapsed["sdpa"]
    report.figures.update(precision=precision.name, micro_batches=len(mbs[4:24]), rounds=3)
    report.add("widest", list(widest.input_ids.shape))
    report.line(f"{precision.name}, {len(mbs[4:24])} micro-batches x 3 rounds, widest {tuple(widest.input_ids.shape)}")
    rows = report.add("implementations", {})
    for impl in impls:
        rate = tokens / elapsed[impl]
        rows[impl] = {"tokens_per_s": rate, "vs_sdpa": rate / base, "saved_for_backward_mb": saved[impl]}
        report.line(
            f"  {impl:14s} {rate:7.1f} tok/s  {rate / base:5.2f}x of sdpa   saved for backward {saved[impl]:7.1f} MB"
        )
    report.emit()


if __name__ == "__main__":
    main()
