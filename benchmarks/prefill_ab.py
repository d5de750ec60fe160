"""Prefill A/B on openft's serving forward (openft.models.decoder), one process, side by side.

  OPENFT_HOME=.openft-home .venv/bin/python benchmarks/prefill_ab.py            # prompt grouping
  OPENFT_HOME=.openft-home .venv/bin/python benchmarks/prefill_ab.py --lora     # LoRA add: addmm vs matmul + add
  OPENFT_HOME=.openft-home .venv/bin/python benchmarks/prefill_ab.py --attention  # grouped-query attention
  OPENFT_HOME=.openft-home .venv/bin/python benchmarks/prefill_ab.py --precision  # serving in fp32 vs bf16

Each takes --json: one JSON object of the figures on stdout (the table on stderr).

Grouping: 16 prompts of 380-440 tokens prefilled in one forward, or in groups of
4, 2, 1 (what Engine.prefill_tokens trades). --lora: the same 16 prompts in one
forward with one random r=16 adapter on every linear layer, the low-rank product
accumulated into the base output with one addmm (openft) or computed apart and
added (the former path: two full-width temporaries per layer). Best of 2 rounds.
--attention: the same 16 prompts prefilled in groups of 4 (as the engine does),
then decode steps of all 16 rows on their ~450-token cache, and one prompt
prefilled alone, with openft's attention (query heads grouped per KV head,
additive mask built once per forward) or the former one (SDPA's enable_gqa, a bool mask converted in every
layer); rounds alternate between the two, medians of 6.
--precision: the built-in model loaded in fp32 and in bf16 (what `openft serve
--precision auto` picks on a CPU with AMX), the same workloads as --attention
(one prompt alone, 16 prompts in groups of 4, a 16-row decode step on their
cache) plus a one-row decode step on a 400-token cache; bf16 as the engine runs
it (prompts padded to shape_bucket widths, a one-row step off oneDNN) and, for
the one-row step, on oneDNN too. Rounds alternate, medians of 6.
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
from figures import Report, add_json_flag  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--attention", action="store_true")
    ap.add_argument("--precision", action="store_true")
    add_json_flag(ap)
    a = ap.parse_args()
    mode = "attention" if a.attention else "precision" if a.precision else "lora" if a.lora else "grouping"
    report = Report(a.json, benchmark="prefill_ab", mode=mode)
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
            model(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=new_cache(model), logits_to_keep=1
            )
        return time.perf_counter() - t

    variants: dict[str, callable] = {}
    if a.attention:
        attention_ab(model, seqs, report)
        return report.emit()
    if a.precision:
        precision_ab(str(base), seqs, report)
        return report.emit()
    if a.lora:
        import serve_bench

        home = Path(tempfile.mkdtemp())
        os.symlink(base.parent, home / "models")
        os.environ["OPENFT_HOME"] = str(home)
        serve_bench.make_adapters(home, 1)
        routing = engine_lora.LoraRouting()
        engine_lora.install_adapter(
            model, routing, "a", engine_lora.read_adapter(home / "runs" / "bench-0" / "adapter", model)
        )
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
    report.add("best_s", best)
    for k, v in best.items():
        report.line(f"{k:24s} {v:6.2f} s   {v / first:.2f}x of the first")
    report.emit()


def prefill_timers(model, seqs: list[list[int]], pad) -> tuple:
    """Two timed workloads: one prompt alone (a lone client's time to first
    token), and all prompts prefilled in groups of 4 (as the engine cuts them).
    `pad(group)` -> (input_ids, attention_mask, position_ids)."""

    def run(group: list[list[int]]) -> None:
        i, m, p = pad(group)
        model(input_ids=i, attention_mask=m, position_ids=p, past_key_values=model.new_cache(), logits_to_keep=1)

    def single() -> float:
        t = time.perf_counter()
        run(seqs[:1])
        return time.perf_counter() - t

    def prefill() -> float:
        t = time.perf_counter()
        for g in range(0, len(seqs), 4):
            run(seqs[g : g + 4])
        return time.perf_counter() - t

    return single, prefill


@torch.inference_mode()
def attention_ab(model, seqs: list[list[int]], report: Report) -> None:
    import statistics

    from openft.models import decoder
    from openft.models.padding import left_pad

    ours = (decoder.grouped_attention, decoder.attention_bias)

    def former_bias(attention_mask, n, groups, dtype, window=None):  # the former attention_mask_4d: bool, no groups
        b, total = attention_mask.shape
        keys = attention_mask.bool()[:, None, None, :]
        if n == 1:
            return decoder.LayerMask(0, keys if not bool(keys.all()) else None)
        cols = torch.arange(total)
        rows = cols[total - n :, None]
        return decoder.LayerMask(0, (keys & (cols <= rows)) | (cols == rows))

    def former_attention(q, k, v, mask, scale=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])

    variants = {"openft": ours, "former": (former_attention, former_bias)}
    ids, mask, pos = left_pad(seqs, 0)
    cache = model.new_cache()
    model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, logits_to_keep=1)
    saved = [(layer.keys, layer.values) for layer in cache.layers]
    step_mask = torch.cat([mask, mask.new_ones((len(seqs), 1))], 1)
    step_ids, step_pos = ids[:, -1:], pos[:, -1:] + 1

    single, prefill = prefill_timers(model, seqs, lambda group: left_pad(group, 0))

    def decode(steps: int = 5) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            for layer, (k, v) in zip(cache.layers, saved):  # the same cache length every step
                layer.keys, layer.values = k, v
            model(
                input_ids=step_ids,
                attention_mask=step_mask,
                position_ids=step_pos,
                past_key_values=cache,
                logits_to_keep=1,
            )
        return (time.perf_counter() - t) / steps

    times = {(v, what): [] for v in variants for what in ("single", "prefill", "decode")}
    for _ in range(6):
        for name, (attn, bias) in variants.items():
            decoder.grouped_attention, decoder.attention_bias = attn, bias
            times[name, "single"].append(single())
            times[name, "prefill"].append(prefill())
            times[name, "decode"].append(decode())
    decoder.grouped_attention, decoder.attention_bias = ours
    labels = {"single": "1 prompt", "prefill": "16 prompts, groups of 4", "decode": "one step, 16 rows"}
    rows = report.add("median_s", {})  # workload -> variant -> seconds
    for what, unit, scale in (("single", "ms", 1000.0), ("prefill", "s", 1.0), ("decode", "ms", 1000.0)):
        o, f = (statistics.median(times[v, what]) for v in ("openft", "former"))
        rows[what] = {"openft": o, "former": f, "ratio": o / f}
        label = labels[what]
        report.line(
            f"{what} ({label}): openft {o * scale:.2f} {unit}, former {f * scale:.2f} {unit}, ratio {o / f:.3f}"
        )


@torch.inference_mode()
def precision_ab(path: str, seqs: list[list[int]], report: Report) -> None:
    import statistics

    from openft.hardware import shape_bucket, without_onednn
    from openft.models.load import load_for_serving
    from openft.models.padding import left_pad

    def workloads(model, bucket: bool) -> dict:
        widths = shape_bucket if bucket else (lambda n: n)

        def pad(group):
            return left_pad(group, 0, width=widths(max(map(len, group))))

        single, prefill = prefill_timers(model, seqs, pad)

        def decoder(rows: int):
            ids, mask, pos = pad(seqs[:rows])
            cache = model.new_cache()
            model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, logits_to_keep=1)
            saved = [(layer.keys, layer.values) for layer in cache.layers]
            step_mask = torch.cat([mask, mask.new_ones((rows, 1))], 1)

            def step() -> float:
                for layer, (k, v) in zip(cache.layers, saved):  # the same cache length every step
                    layer.keys, layer.values = k, v
                t = time.perf_counter()
                model(
                    input_ids=ids[:, -1:],
                    attention_mask=step_mask,
                    position_ids=pos[:, -1:] + 1,
                    past_key_values=cache,
                    logits_to_keep=1,
                )
                return time.perf_counter() - t

            return step

        return {"single": single, "prefill": prefill, "decode16": decoder(16), "decode1": decoder(1)}

    fp32 = workloads(load_for_serving(path).model, bucket=False)
    bf16 = workloads(load_for_serving(path, dtype=torch.bfloat16).model, bucket=True)

    def off(step):
        def go() -> float:
            with without_onednn():
                return step()

        return go

    variants = {"fp32": fp32, "bf16": {**bf16, "decode1": off(bf16["decode1"]), "decode1_onednn": bf16["decode1"]}}
    times: dict = {(v, w): [] for v, ws in variants.items() for w in ws}
    for _ in range(7):  # the first round warms up (kernels, buffers) and is dropped
        for v, ws in variants.items():
            for w, fn in ws.items():
                times[v, w].append(fn())
    labels = {
        "single": "1 prompt",
        "prefill": "16 prompts, groups of 4",
        "decode16": "decode step, 16 rows",
        "decode1": "decode step, 1 row",
        "decode1_onednn": "decode step, 1 row, bf16 on oneDNN",
    }
    rows = report.add("median_s", {})  # workload -> precision -> seconds
    for w, label in labels.items():
        f = statistics.median(times["fp32", "decode1" if w == "decode1_onednn" else w][1:])
        b = statistics.median(times["bf16", w][1:])
        rows[w] = {"fp32": f, "bf16": b, "bf16_over_fp32": b / f}
        report.line(f"{label:36s} fp32 {f * 1000:8.1f} ms   bf16 {b * 1000:8.1f} ms   bf16/fp32 {b / f:.2f}")


if __name__ == "__main__":
    main()
