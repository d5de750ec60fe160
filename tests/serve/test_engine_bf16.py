"""The engine in bf16 (its default where bf16 measured faster: a GPU, a CPU with AMX): adapters kept
in int8 per rank component, prompts padded to bucketed widths, one-row decode
steps off oneDNN. The fp32 engine's exactness tests are in test_engine.py."""

from __future__ import annotations

import asyncio

import torch

from openft.autoprecision import resolve_precision
from openft.hardware import shape_bucket
from openft.serve.engine import Delta, Engine, SamplingParams, Usage
from openft.serve.engine_lora import Int8PerRank, MultiLoraLinear

from .test_engine import GREEDY, adapters, base, make_adapter, prompt, run, talkative_dir, with_adapter  # noqa: F401


def test_default_precision_follows_the_measured_decision():
    eng = Engine(device="cpu")
    auto = resolve_precision("auto", torch.device("cpu"))
    assert eng.dtype == (torch.bfloat16 if auto == "bf16" else torch.float32) and eng.precision.precision == auto
    assert Engine(device="cpu", dtype=torch.float32).dtype == torch.float32


def test_int8_factors_round_each_entry_to_half_a_step():
    torch.manual_seed(0)
    a, b = torch.randn(16, 576) * 0.04, torch.randn(1536, 16) * 0.01
    a[3] = 0  # a rank component the training never moved
    qa, qb = Int8PerRank.of(a, axis=1), Int8PerRank.of(b, axis=0)
    assert qa.q.dtype == torch.int8 and qa.shape == a.shape and qa.scale.shape == (16, 1)
    assert qb.shape == b.shape and qb.scale.shape == (1, 16)
    for q, t in ((qa, a), (qb, b)):
        err = (q.to(torch.float32) - t).abs()
        assert bool((err <= q.scale / 2 + 1e-9).all())  # round to nearest, per component's step
        assert q.to(torch.bfloat16).dtype == torch.bfloat16
    assert bool((qa.to(torch.float32)[3] == 0).all())
    assert qa.nbytes + qb.nbytes < 0.52 * 2 * (a.numel() + b.numel())  # about half of bf16's bytes


def test_int8_adapters_add_little_to_bf16_rounding():
    """A layer's output with the adapter stored in int8 vs in bf16, both computed
    in bf16, against the exact fp32 output: int8 storage adds under 10% to the
    error bf16 arithmetic already makes (an adapter moving the output ~7%)."""
    torch.manual_seed(0)
    w, a, b = torch.randn(1536, 576) * 0.05, torch.randn(16, 576) / 24, torch.randn(1536, 16) * 0.01
    x, s, bf = torch.randn(64, 576), 2.0, torch.bfloat16
    exact = x @ w.T + s * (x @ a.T) @ b.T

    def bf16_layer(a16, b16):
        return (x.to(bf) @ w.to(bf).T).float() + s * ((x.to(bf) @ a16.T).float() @ b16.float().T)

    stored_bf16 = (bf16_layer(a.to(bf), b.to(bf)) - exact).norm()
    stored_int8 = (bf16_layer(Int8PerRank.of(a, 1).to(bf), Int8PerRank.of(b, 0).to(bf)) - exact).norm()
    assert stored_int8 < 1.1 * stored_bf16


def test_bf16_engine_serves_mixed_int8_adapters(base, adapters):
    """A bf16 engine keeps adapters in int8 (half the fp16 bytes), serves a batch
    mixing two adapters and the bare base to the end, pads prompts to bucketed
    widths and frees its working copies when the batch drains."""
    eng, ref = Engine(device="cpu", dtype=torch.bfloat16), Engine(device="cpu", dtype=torch.float32)
    handles = [with_adapter(base, adapters[0]), with_adapter(base, adapters[1]), base]
    try:
        assert eng._prefill_width(100) == shape_bucket(100) == 104
        prompts = [prompt(eng, h, q) for h, q in zip(handles, ["Tell me about the sea.", "Why?", "Hi"])]

        async def together(e, params):
            return await asyncio.gather(*[e.complete(h, p, params) for h, p in zip(handles, prompts)])

        params = SamplingParams(max_tokens=12, temperature=0)
        out = run(together(eng, params))
        for choices, usage in out:
            ((text, reason),) = choices
            assert reason in ("stop", "length") and usage.completion_tokens >= 1
            assert usage.prompt_tokens > 0 and isinstance(text, str)
        assert eng.stats.mixed_steps > 0
        run(together(ref, params))
        sizes = {e: sorted(x["bytes"] for x in e.loaded()["adapters"]) for e in (eng, ref)}
        assert len(sizes[eng]) == 2 and all(n8 < 0.55 * n16 for n8, n16 in zip(sizes[eng], sizes[ref]))
        (b,) = eng._bases.values()
        layers = [m for m in b.model.modules() if isinstance(m, MultiLoraLinear)]
        assert layers and all(isinstance(a, Int8PerRank) for m in layers for a, _, _ in m.adapters.values())
        assert all(m._stack is None and not m._hot for m in layers)  # the batch drained
        assert b.model.model.embed_tokens.weight.dtype == torch.bfloat16
    finally:
        eng.stop()
        ref.stop()


def test_bf16_engine_one_row_decode_streams(base):
    """A lone request decodes one row per step (the path that leaves oneDNN) and
    streams deltas, then one Usage; oneDNN is switched back on afterwards."""
    eng = Engine(device="cpu", dtype=torch.bfloat16)
    try:

        async def collect():
            return [item async for item in eng.stream(base, prompt(eng, base), GREEDY)]

        items = run(collect())
        assert isinstance(items[-1], Usage) and items[-1].completion_tokens >= 2
        assert all(isinstance(i, Delta) for i in items[:-1]) and items[-2].finish_reason in ("stop", "length")
        assert eng.stats.steps >= 1 and eng.stats.max_rows == 1
        assert torch._C._get_mkldnn_enabled()
    finally:
        eng.stop()
