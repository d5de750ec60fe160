"""The inference engine on the tiny model: exactness against HF generate, batching
(mixed adapters, requests joining mid-flight), shared base weights, streaming,
sampling, stop rules, limits and per-request errors."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from openft.models.tiny import redraw_weights
from openft.serve import engine as engine_mod
from openft.serve.engine import Delta, Engine, EngineError, ModelHandle, SamplingParams, Usage
from openft.serve.engine_lora import MultiLoraLinear
from openft.serve.engine_text import Detokenizer, StopMatcher


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def talkative_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with matrices re-drawn at std 0.3 (varied text, see
    tests/eval/conftest.py), saved as a servable directory."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("talkative")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    redraw_weights(model, std=0.3, seed=0)
    model.save_pretrained(out)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def make_adapter(model_dir: Path, out: Path, seed: int, targets=("q_proj", "v_proj", "down_proj")) -> Path:
    """A LoRA adapter with random (non-zero) B, saved in PEFT format by openft's trainer code."""
    from transformers import AutoModelForCausalLM

    from openft.train.lora import LoraParams, apply_lora, lora_layers, save_adapter

    torch.manual_seed(seed)  # lora_A's kaiming init
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    params = LoraParams(rank=4, alpha=8.0, dropout=0.0, target_modules=tuple(targets))
    apply_lora(model, params)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.5)
    save_adapter(model, params, out, base_model=str(model_dir))
    return out


@pytest.fixture(scope="module")
def adapters(talkative_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return (
        make_adapter(talkative_dir, root / "a", seed=1),
        make_adapter(talkative_dir, root / "b", seed=2, targets=("k_proj", "o_proj", "up_proj")),
    )


# The engines here run fp32 (the default on a CPU with AMX is bf16): these tests
# compare tokens with transformers' fp32 generate; test_bf16_* cover bf16.
@pytest.fixture(scope="module")
def engine():
    eng = Engine(max_batch_size=8, device="cpu", dtype=torch.float32)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def base(talkative_dir) -> ModelHandle:
    return ModelHandle(name="tiny", base_path=talkative_dir)


def with_adapter(base: ModelHandle, adapter: Path) -> ModelHandle:
    return ModelHandle(name=f"ft:tiny:test:{adapter.name}", base_path=base.base_path, adapter_path=adapter)


def prompt(engine: Engine, handle: ModelHandle, text: str = "Tell me about the sea.") -> list[int]:
    return engine.apply_chat_template(handle, [{"role": "user", "content": text}])


GREEDY = SamplingParams(max_tokens=24, temperature=0)


def hf_greedy(model_dir: Path, ids: list[int], max_new: int, adapter: Path | None = None) -> tuple[str, str, int]:
    """Reference: HF generate(do_sample=False) -> (text, finish_reason, completion tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openft.train.lora import load_adapter

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        load_adapter(model, adapter)
    model.eval()
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
    new = out[0, len(ids) :].tolist()
    end = next((i for i, t in enumerate(new) if t in eos), None)
    # The engine drops the U+FFFD that decode() writes for a byte sequence no
    # token completes (a random model emits some); so does the reference.
    text = tok.decode(new[:end], skip_special_tokens=True).replace("\ufffd", "")
    return (text, "length", len(new)) if end is None else (text, "stop", end + 1)


# --------------------------------------------------------------------------- exactness


def test_greedy_matches_hf_generate(engine, base, talkative_dir):
    ids = prompt(engine, base)
    (choice,), usage = run(engine.complete(base, ids, GREEDY))
    text, reason, count = hf_greedy(talkative_dir, ids, GREEDY.max_tokens)
    assert text.strip(), "the talkative model should say something"
    assert choice == (text, reason)
    assert usage == Usage(prompt_tokens=len(ids), completion_tokens=count, total_tokens=len(ids) + count)


def test_greedy_with_adapter_matches_hf_generate(engine, base, adapters, talkative_dir):
    handle = with_adapter(base, adapters[0])
    ids = prompt(engine, handle)
    (choice,), usage = run(engine.complete(handle, ids, GREEDY))
    assert choice == hf_greedy(talkative_dir, ids, GREEDY.max_tokens, adapter=adapters[0])[:2]
    (plain,), _ = run(engine.complete(base, ids, GREEDY))
    assert choice != plain, "the adapter should change the answer"


# --------------------------------------------------------------------------- batching


def test_mixed_adapters_in_one_batch_match_each_alone(engine, base, adapters):
    handles = [base, with_adapter(base, adapters[0]), with_adapter(base, adapters[1]), base]
    prompts = [prompt(engine, h, q) for h, q in zip(handles, ["Hi", "Tell me about the sea.", "Why?", "Count to 3"])]
    alone = [run(engine.complete(h, p, GREEDY))[0] for h, p in zip(handles, prompts)]
    assert len({a[0][0] for a in alone[:3]}) == 3

    async def together():
        return await asyncio.gather(*[engine.complete(h, p, GREEDY) for h, p in zip(handles, prompts)])

    mixed_before, rows_before = engine.stats.mixed_steps, engine.stats.max_rows
    engine.stats.max_rows = 0
    results = run(together())
    assert [r[0] for r in results] == alone
    assert engine.stats.max_rows >= 3 and engine.stats.mixed_steps > mixed_before
    engine.stats.max_rows = max(engine.stats.max_rows, rows_before)


def test_an_adapter_on_the_head_matches_hf_and_mixes_with_others(engine, base, adapters, talkative_dir, tmp_path):
    """A LoRA on the (tied) head, as openft trains where the data teaches control
    tokens: greedy as transformers generates it, and in one batch with a decoder-only
    adapter and the base, each row as it answers alone."""
    head = make_adapter(talkative_dir, tmp_path / "head", seed=3, targets=("q_proj", "lm_head"))
    handle = with_adapter(base, head)
    ids = prompt(engine, handle)
    (choice,), _ = run(engine.complete(handle, ids, GREEDY))
    assert choice == hf_greedy(talkative_dir, ids, GREEDY.max_tokens, adapter=head)[:2]
    handles = [handle, with_adapter(base, adapters[0]), base]
    prompts = [prompt(engine, h, q) for h, q in zip(handles, ["Why?", "Tell me about the sea.", "Hi"])]
    alone = [run(engine.complete(h, p, GREEDY))[0] for h, p in zip(handles, prompts)]

    async def together():
        return await asyncio.gather(*[engine.complete(h, p, GREEDY) for h, p in zip(handles, prompts)])

    assert [r[0] for r in run(together())] == alone


def test_request_joins_running_batch_mid_flight(engine, base, adapters):
    """Continuous batching: a request arriving while another decodes joins its
    batch at a step boundary, and both answers equal their solo answers."""
    long_params = SamplingParams(max_tokens=60, temperature=0)
    first, second = base, with_adapter(base, adapters[1])
    p1, p2 = prompt(engine, first, "Write a long story."), prompt(engine, second, "Hello")
    alone1 = run(engine.complete(first, p1, long_params))[0]
    alone2 = run(engine.complete(second, p2, GREEDY))[0]

    async def staggered():
        pieces: list[str] = []
        joined = None
        async for item in engine.stream(first, p1, long_params):
            if isinstance(item, Delta):
                pieces.append(item.text)
                if len(pieces) == 5:
                    joined = asyncio.create_task(engine.complete(second, p2, GREEDY))
        return "".join(pieces), await joined

    joins = engine.stats.joins
    text1, (choices2, _) = run(staggered())
    assert text1 == alone1[0][0]
    assert choices2 == alone2
    assert engine.stats.joins > joins


def test_adapters_share_one_copy_of_the_base(base, adapters):
    eng = Engine(device="cpu", dtype=torch.float32)
    eng.start()
    try:
        ids = prompt(eng, base)
        run(eng.complete(base, ids, GREEDY))
        (model_base,) = eng._bases.values()
        linear = model_base.model.model.layers[0].self_attn.q_proj
        ptr = linear.weight.data_ptr()
        for a in adapters:
            run(eng.complete(with_adapter(base, a), ids, GREEDY))
        loaded = eng.loaded()
        assert len(loaded["bases"]) == 1 and len(loaded["adapters"]) == 2
        assert {Path(a["path"]) for a in loaded["adapters"]} == set(adapters)
        layers = [m for m in model_base.model.modules() if isinstance(m, MultiLoraLinear)]
        # Wrapped once around the very same base layer, weights untouched (never
        # merged), both adapters held by wrappers of the one base.
        q = model_base.model.model.layers[0].self_attn.q_proj
        assert isinstance(q, MultiLoraLinear) and q.base is linear and q.base.weight.data_ptr() == ptr
        assert sum(len(m.adapters) for m in layers) == 12  # 2 adapters x 3 target kinds x 2 layers
        keys = {k for m in layers for k in m.adapters}
        assert len(keys) == 2
    finally:
        eng.stop()


def test_adapter_lru_and_rewritten_adapter_is_reloaded(base, talkative_dir, tmp_path):
    eng = Engine(max_loaded_adapters=1, device="cpu", dtype=torch.float32)
    eng.start()
    try:
        ids = prompt(eng, base)
        a = make_adapter(talkative_dir, tmp_path / "a", seed=1)
        b = make_adapter(talkative_dir, tmp_path / "b", seed=2)
        first_a = run(eng.complete(with_adapter(base, a), ids, GREEDY))[0]
        run(eng.complete(with_adapter(base, b), ids, GREEDY))
        assert [Path(x["path"]) for x in eng.loaded()["adapters"]] == [b]
        assert run(eng.complete(with_adapter(base, a), ids, GREEDY))[0] == first_a
        # A newly written adapter at the same path is served at once, without a restart.
        make_adapter(talkative_dir, a, seed=3)
        again = run(eng.complete(with_adapter(base, a), ids, GREEDY))[0]
        assert again != first_a
        assert (
            again
            == run(eng.complete(with_adapter(base, make_adapter(talkative_dir, tmp_path / "c", seed=3)), ids, GREEDY))[
                0
            ]
        )
    finally:
        eng.stop()


# --------------------------------------------------------------------------- streaming and text


def test_stream_pieces_concatenate_to_the_complete_text(engine, base):
    ids = prompt(engine, base)
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=7)

    async def collect():
        return [item async for item in engine.stream(base, ids, params)]

    items = run(collect())
    deltas, usage = items[:-1], items[-1]
    assert isinstance(usage, Usage) and all(isinstance(d, Delta) for d in deltas)
    assert all(d.finish_reason is None for d in deltas[:-1]) and deltas[-1].finish_reason == "length"
    assert len(deltas) > 10  # streamed token by token, not in one piece
    (choice,), usage2 = run(engine.complete(base, ids, params))
    assert "".join(d.text for d in deltas) == choice[0]
    assert usage == usage2 and usage.completion_tokens == 80


def test_detokenizer_never_splits_a_character(tiny_tokenizer):
    text = "你好，世界😀🎉 ok — ça va? 🇫🇷"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tiny_tokenizer.decode([i]) for i in ids), "the test needs characters split across tokens"
    detok = Detokenizer(tiny_tokenizer, [1, 2])
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_engine_stream_holds_back_split_characters(engine, base, tiny_tokenizer, monkeypatch):
    """Force the engine to produce emoji and CJK bytes split across tokens (by
    scripting the sampler): every streamed piece is whole characters."""
    text = "你好😀🎉世界"
    script = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    real_sample = engine_mod.sample
    step = {"i": 0}

    def scripted(logits, *rest):
        real_sample(logits, *rest)
        i, step["i"] = step["i"], step["i"] + 1
        return [script[i % len(script)]] * logits.shape[0]

    monkeypatch.setattr(engine_mod, "sample", scripted)

    async def collect():
        return [
            item async for item in engine.stream(base, prompt(engine, base), SamplingParams(max_tokens=len(script)))
        ]

    items = run(collect())
    deltas = [d for d in items if isinstance(d, Delta)]
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == text
    assert len(deltas) > 3


def test_sampled_text_never_has_replacement_characters(engine, base):
    ids = prompt(engine, base, "你好，世界😀")

    async def collect(seed):
        return [
            item async for item in engine.stream(base, ids, SamplingParams(max_tokens=120, temperature=1.5, seed=seed))
        ]

    async def many():
        return await asyncio.gather(*[collect(s) for s in range(6)])

    texts = [d.text for items in run(many()) for d in items if isinstance(d, Delta)]
    assert len(texts) > 300
    assert not any("\ufffd" in t for t in texts)


def test_stop_matcher_holds_back_a_possible_stop_string():
    m = StopMatcher(["END", "xyz"])
    assert m.push("abc E") == ("abc ", False)  # "E" may start "END"
    assert m.push("N") == ("", False)
    assert m.push("Dtail") == ("", True)  # "END" completed: nothing more is emitted
    m = StopMatcher(["END"])
    assert m.push("foo EN") == ("foo ", False)
    assert m.push("X") == ("ENX", False)  # not a stop after all: released
    assert m.flush() == ""


def test_stop_strings_cut_the_output(engine, base):
    ids = prompt(engine, base)
    (full,), _ = run(engine.complete(base, ids, SamplingParams(max_tokens=40, temperature=0)))
    text = full[0]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    (choice,), usage = run(engine.complete(base, ids, SamplingParams(max_tokens=40, temperature=0, stop=["@@@", stop])))
    assert choice == (cut, "stop")
    assert usage.completion_tokens < 40

    async def streamed():
        return [i async for i in engine.stream(base, ids, SamplingParams(max_tokens=40, temperature=0, stop=[stop]))]

    deltas = [d for d in run(streamed()) if isinstance(d, Delta)]
    assert "".join(d.text for d in deltas) == cut and deltas[-1].finish_reason == "stop"
    assert all(stop not in d.text for d in deltas)


# --------------------------------------------------------------------------- sampling


def test_same_seed_same_output_and_n_choices(engine, base):
    ids = prompt(engine, base)
    params = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, seed=123, n=2)
    choices, usage = run(engine.complete(base, ids, params))
    assert len(choices) == 2 and choices[0] != choices[1]
    assert run(engine.complete(base, ids, params)) == (choices, usage)
    assert usage.completion_tokens == 60 and usage.prompt_tokens == len(ids)
    other, _ = run(engine.complete(base, ids, SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, seed=124)))
    assert other[0] != choices[0]
    # A tiny top_p leaves only the most likely token: greedy.
    (nucleus,), _ = run(engine.complete(base, ids, SamplingParams(max_tokens=24, temperature=1.0, top_p=1e-6, seed=5)))
    assert nucleus == run(engine.complete(base, ids, GREEDY))[0][0]


# --------------------------------------------------------------------------- limits


@pytest.fixture(scope="module")
def short_context_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The plain tiny model with a 64-token context."""
    out = tmp_path_factory.mktemp("short")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_huge_max_tokens_is_clamped_to_the_context(engine, short_context_dir):
    handle = ModelHandle(name="short", base_path=short_context_dir)
    assert engine.context_length(handle) == 64
    ids = prompt(engine, handle, "Hi")
    (choice,), usage = run(engine.complete(handle, ids, SamplingParams(max_tokens=100000, temperature=0)))
    assert choice[1] == "length"
    assert usage.completion_tokens == 64 - len(ids) and usage.total_tokens == 64
    (choice,), usage = run(engine.complete(handle, ids, SamplingParams(max_tokens=3, temperature=0)))
    assert choice[1] == "length" and usage.completion_tokens == 3
    with pytest.raises(EngineError) as e:
        run(engine.complete(handle, list(range(5, 70)), SamplingParams()))
    assert e.value.code == "context_length_exceeded"


def test_generation_config_eos_ids_stop(engine, short_context_dir, tmp_path):
    """An id in generation_config.eos_token_id ends the answer with "stop" (and counts as a token)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "m"
    shutil.copytree(short_context_dir, out)
    handle = ModelHandle(name="eos", base_path=out)
    ids = prompt(engine, handle, "Hi")
    with torch.inference_mode():  # the model's first greedy token becomes an end token
        first = int(AutoModelForCausalLM.from_pretrained(out)(torch.tensor([ids])).logits[0, -1].argmax())
    gen = json.loads((out / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], first]
    (out / "generation_config.json").write_text(json.dumps(gen))
    (choice,), usage = run(engine.complete(handle, ids, SamplingParams(max_tokens=50, temperature=0)))
    assert choice == ("", "stop") and usage.completion_tokens == 1


# --------------------------------------------------------------------------- errors


def test_bad_adapter_fails_only_its_request(engine, base, tmp_path):
    ids = prompt(engine, base)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all")
    pickle_only = tmp_path / "pickle"
    pickle_only.mkdir()
    (pickle_only / "adapter_config.json").write_text((corrupt / "adapter_config.json").read_text())
    (pickle_only / "adapter_model.bin").write_bytes(b"\x80\x04")

    async def together():
        return await asyncio.gather(
            engine.complete(with_adapter(base, tmp_path / "missing"), ids, GREEDY),
            engine.complete(base, ids, GREEDY),
            engine.complete(with_adapter(base, corrupt), ids, GREEDY),
            engine.complete(with_adapter(base, pickle_only), ids, GREEDY),
            return_exceptions=True,
        )

    missing, good, bad, pickled = run(together())
    assert isinstance(missing, EngineError) and missing.code == "adapter_not_found" and missing.status == 404
    assert isinstance(bad, EngineError) and bad.code == "adapter_invalid"
    assert isinstance(pickled, EngineError) and "pickle" in pickled.message
    assert good == run(engine.complete(base, ids, GREEDY))
    with pytest.raises(EngineError) as e:
        run(engine.complete(ModelHandle(name="nope", base_path=tmp_path / "no-model"), ids, GREEDY))
    assert e.value.code == "model_not_found"
    with pytest.raises(EngineError) as e:
        run(engine.complete(base, ids, SamplingParams(top_p=0)))
    assert e.value.code == "invalid_request"


def test_adapter_of_another_base_is_refused(engine, base, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from openft.train.lora import LoraParams, apply_lora, save_adapter

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 32, 64
    other = AutoModelForCausalLM.from_config(config)
    params = LoraParams(rank=2, alpha=4.0, dropout=0.0, target_modules=("q_proj",))
    apply_lora(other, params)
    save_adapter(other, params, tmp_path / "other", base_model="other")
    with pytest.raises(EngineError) as e:
        run(engine.complete(with_adapter(base, tmp_path / "other"), prompt(engine, base), GREEDY))
    assert e.value.code == "adapter_incompatible"


def test_abandoned_stream_frees_its_row(engine, base):
    ids = prompt(engine, base)

    async def abandon():
        agen = engine.stream(base, ids, SamplingParams(max_tokens=500, temperature=0))
        async for _item in agen:
            break
        await agen.aclose()
        return await engine.complete(base, ids, GREEDY)

    (choice,), _ = run(abandon())
    assert choice[1] == "length"
    for _ in range(100):
        if not engine._batches:
            break
        run(asyncio.sleep(0.01))
    assert not engine._batches
    assert all(b["running_rows"] == 0 for b in engine.loaded()["bases"])


def test_two_bases_share_one_slot_in_turn(talkative_dir, short_context_dir):
    """With room for one base, a request for a second base waits until the first
    base's batch drains, then evicts it; both answers are right."""
    eng = Engine(max_loaded_bases=1, device="cpu", dtype=torch.float32)
    eng.start()
    try:
        a, b = ModelHandle(name="a", base_path=talkative_dir), ModelHandle(name="b", base_path=short_context_dir)
        pa, pb = prompt(eng, a), prompt(eng, b, "Hi")
        alone_a = run(eng.complete(a, pa, GREEDY))
        alone_b = run(eng.complete(b, pb, GREEDY))

        async def together():
            return await asyncio.gather(eng.complete(a, pa, GREEDY), eng.complete(b, pb, GREEDY))

        assert run(together()) == [alone_a, alone_b]
        assert len(eng.loaded()["bases"]) == 1
    finally:
        eng.stop()


def test_waves_when_caches_cannot_merge(base, adapters, monkeypatch):
    """Models whose KV cache cannot be merged (sliding windows) batch in waves:
    a late request waits for the running batch to drain, and still gets its answer."""
    eng = Engine(device="cpu", dtype=torch.float32)
    eng.start()
    monkeypatch.setattr(engine_mod, "mergeable", lambda cache: False)
    try:
        first, second = base, with_adapter(base, adapters[0])
        p1, p2 = prompt(eng, first, "Write a long story."), prompt(eng, second, "Hello")
        alone2 = run(eng.complete(second, p2, GREEDY))

        async def staggered():
            joined, n = None, 0
            async for _item in eng.stream(first, p1, SamplingParams(max_tokens=30, temperature=0)):
                n += 1
                if n == 3:
                    joined = asyncio.create_task(eng.complete(second, p2, GREEDY))
            return await joined

        assert run(staggered()) == alone2
        assert eng.stats.joins == 0
    finally:
        eng.stop()


def test_stop_fails_running_and_waiting_requests(base):
    """Stopping the engine ends both a request whose answer is streaming and one
    waiting for room in the batch, each with engine_stopped (none hangs)."""
    eng = Engine(max_batch_size=1, device="cpu", dtype=torch.float32)
    ids = prompt(eng, base)

    async def go():
        running = eng.stream(base, ids, SamplingParams(temperature=0))  # ~2000 tokens: still streaming at stop
        await running.__anext__()  # its first token is out: it holds the batch's only row
        waiting = asyncio.create_task(eng.complete(base, ids, GREEDY))
        await asyncio.sleep(0)  # the task submits its request (synchronously) before its first await
        await asyncio.to_thread(eng.stop)
        try:
            async for _item in running:
                pass
            ended = None
        except EngineError as e:
            ended = e
        return ended, *(await asyncio.gather(waiting, return_exceptions=True))

    running_end, waiting_end = run(go())
    assert isinstance(running_end, EngineError) and running_end.code == "engine_stopped", running_end
    assert isinstance(waiting_end, EngineError) and waiting_end.code == "engine_stopped", waiting_end


@pytest.mark.gpu
def test_cuda_engine_matches_cpu_and_runs_in_bf16(base, adapters, talkative_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    handles = [base, with_adapter(base, adapters[0]), with_adapter(base, adapters[1])]
    eng = Engine(device="cuda", dtype=torch.float32)
    try:
        prompts = [prompt(eng, h, q) for h, q in zip(handles, ["Hi", "Tell me about the sea.", "Why?"])]

        async def together(e):
            return await asyncio.gather(*[e.complete(h, p, GREEDY) for h, p in zip(handles, prompts)])

        gpu = run(together(eng))
        ref = [
            hf_greedy(talkative_dir, p, GREEDY.max_tokens, adapter=h.adapter_path)[:2] for h, p in zip(handles, prompts)
        ]
        assert [g[0][0] for g in gpu] == ref
    finally:
        eng.stop()
    eng = Engine(device="cuda")  # bf16 by default on GPUs
    try:
        results = run(together(eng))
        assert all(r[1].completion_tokens > 0 for r in results)
        assert eng.loaded()["bases"][0]["bytes"] > 0
    finally:
        eng.stop()


def test_forget_drops_a_deleted_adapter(base, talkative_dir, tmp_path):
    eng = Engine(device="cpu", dtype=torch.float32)
    try:
        handle = ModelHandle(
            name="ft:tiny:me:x:ftjob-1",
            base_path=base.base_path,
            adapter_path=make_adapter(talkative_dir, tmp_path / "x", seed=4),
        )
        run(eng.complete(handle, prompt(eng, handle), GREEDY))
        assert len(eng.loaded()["adapters"]) == 1
        eng.forget(handle.name)
        for _ in range(200):
            if not eng.loaded()["adapters"]:
                break
            run(asyncio.sleep(0.01))
        assert eng.loaded()["adapters"] == [] and len(eng.loaded()["bases"]) == 1
    finally:
        eng.stop()


# --------------------------------------------------------------------------- multi-adapter rows and adapter memory


def test_stacked_mixed_rows_equal_each_row_alone():
    """The mixed path (one matmul pair against stacked A's and B's, per-row column
    mask) gives every row what its own adapter alone gives it: adapters of different
    ranks and scalings, an adapter that does not target the layer, bare rows."""
    from openft.serve.engine_lora import LoraRouting

    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    routing = LoraRouting()
    layer = MultiLoraLinear(base, routing)
    layer.adapters["a"] = (torch.randn(4, 12), torch.randn(10, 4), 2.0)
    layer.adapters["b"] = (torch.randn(2, 12), torch.randn(10, 2), 0.5)
    rows = ["b", None, "a", "c", "a", "b"]  # "c" exists elsewhere in the model, not in this layer
    x = torch.randn(len(rows), 3, 12)
    with torch.inference_mode():
        routing.set_rows(rows, torch.device("cpu"))
        mixed = layer(x)
        alone = []
        for i, key in enumerate(rows):
            routing.set_rows([key], torch.device("cpu"))
            alone.append(layer(x[i : i + 1]))
    assert mixed.shape == (6, 3, 10)
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone[0], base(x[:1])) and torch.equal(alone[1], base(x[1:2]))


def test_adapters_stored_compact_answers_unchanged_and_working_copies_freed(base, adapters):
    """Under an fp32 base, loaded adapters are kept in fp16 (half the bytes) and
    answer as the fp32 adapters do; the widened working copies and mixed stacks of a
    batch are freed when it drains, and one tokenizer serves adapters that saved identical files."""
    exact, compact = (
        Engine(device="cpu", dtype=torch.float32, adapter_dtype=torch.float32),
        Engine(device="cpu", dtype=torch.float32),
    )
    handles = [with_adapter(base, adapters[0]), with_adapter(base, adapters[1]), base]
    try:
        prompts = [prompt(compact, h, q) for h, q in zip(handles, ["Tell me about the sea.", "Why?", "Hi"])]

        async def together(e):
            return await asyncio.gather(*[e.complete(h, p, GREEDY) for h, p in zip(handles, prompts)])

        assert [r[0] for r in run(together(compact))] == [r[0] for r in run(together(exact))]
        sizes = {e: sorted(a["bytes"] for a in e.loaded()["adapters"]) for e in (exact, compact)}
        assert sizes[compact] and [2 * n for n in sizes[compact]] == sizes[exact]
        (b,) = compact._bases.values()
        layers = [m for m in b.model.modules() if isinstance(m, MultiLoraLinear)]
        assert all(a.dtype == torch.float16 for m in layers for a, _, _ in m.adapters.values())
        assert all(m._stack is None and not m._hot for m in layers)  # the batch drained
        tok_dir = adapters[0].parent / "with-tokenizer"
        for i, a in enumerate(adapters):
            d = shutil.copytree(a, tok_dir / str(i))
            for f in base.base_path.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                    shutil.copy(f, d / f.name)
        t0, t1 = (compact.tokenizer(with_adapter(base, tok_dir / str(i))) for i in range(2))
        assert t0 is t1 is compact.tokenizer(base)
    finally:
        exact.stop()
        compact.stop()


def test_slack_cache_layer_appends_in_place_and_survives_reassignment():
    """SlackLayer gives what DynamicLayer's concatenation gives, writes a step into
    spare columns (no copy of the cache), and takes tensors assigned from outside
    (merge_into / select_rows do that) at the next update."""
    from transformers.cache_utils import DynamicLayer

    from openft.serve.engine_batch import _hf_cache_types

    SlackLayer = _hf_cache_types()[2]

    slack, plain = SlackLayer(), DynamicLayer()
    chunks = [torch.randn(2, 3, n, 4) for n in (5, 1, 1, 1)]
    ptrs = []
    for c in chunks:
        k, v = slack.update(c, -c)
        pk, pv = plain.update(c, -c)
        assert torch.equal(k, pk) and torch.equal(v, pv)
        ptrs.append(k.data_ptr())
    assert len(set(ptrs[1:])) == 1  # decode steps reuse one buffer
    slack.keys, slack.values = slack.keys[:1].clone(), slack.values[:1].clone()  # as select_rows does
    k, _ = slack.update(chunks[1][:1], chunks[1][:1])
    assert torch.equal(k, torch.cat([plain.keys[:1], chunks[1][:1]], -2))


def test_prefill_groups_cut_by_padded_tokens():
    from types import SimpleNamespace

    from openft.serve.engine import prefill_groups

    def req(length, n=1):
        return SimpleNamespace(prompt_ids=[1] * length, params=SimpleNamespace(n=n))

    reqs = [req(400) for _ in range(16)]
    groups = prefill_groups(reqs, 2048)
    assert [len(g) for g in groups] == [5, 5, 5, 1]
    assert [r for g in groups for r in g] == reqs  # order kept, nothing lost
    # A prompt longer than the budget goes alone; n choices count as n rows.
    assert [len(g) for g in prefill_groups([req(10), req(5000), req(10, n=3), req(10)], 64)] == [1, 1, 2]
    assert prefill_groups([], 64) == []


# --------------------------------------------------------------------------- penalties, log-probs, statuses


def _reference_logprobs(model_dir: Path, prompt_ids: list[int], tokens: list[int], presence: float, frequency: float):
    """Per generated token: log_softmax(logits - frequency * count - presence * (count > 0))[token],
    counts over the tokens generated before it, from one HF forward over the whole text."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + tokens[:-1]])).logits[0, len(prompt_ids) - 1 :].float()
    out = []
    for j, t in enumerate(tokens):
        counts = torch.bincount(torch.tensor(tokens[:j], dtype=torch.long), minlength=logits.shape[-1]).float()
        penalised = logits[j] - frequency * counts - presence * (counts > 0).float()
        out.append(float(penalised.log_softmax(-1)[t]))
    return out


def test_penalties_and_logprobs_follow_openais_formulas_exactly(engine, base, talkative_dir):
    ids = prompt(engine, base)
    params = SamplingParams(max_tokens=16, temperature=0, presence_penalty=0.4, frequency_penalty=0.7, logprobs=2)
    ((choice,), _) = run(engine.choices(base, ids, params))
    tokens = [e.token_id for e in choice.logprobs]
    assert len(tokens) == 16 and choice.finish_reason == "length"
    want = _reference_logprobs(talkative_dir, ids, tokens, 0.4, 0.7)
    got = [e.logprob for e in choice.logprobs]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-3, (got, want)
    for e in choice.logprobs:  # greedy on the penalised distribution: the chosen token is the top one
        assert e.top[0] == (e.token_id, e.logprob) and e.top[0][1] >= e.top[1][1]
    (plain,), _ = run(engine.choices(base, ids, SamplingParams(max_tokens=16, temperature=0, logprobs=0)))
    assert [e.token_id for e in plain.logprobs] != tokens  # the penalties changed the answer
    assert all(e.top == [] for e in plain.logprobs)


def test_frequency_penalty_breaks_a_repeating_model(engine, tiny_model_dir):
    # The plain tiny model (near-zero weights) repeats one token forever.
    handle = ModelHandle(name="plain", base_path=tiny_model_dir)
    ids = prompt(engine, handle, "Hi")

    def tokens(**kw):
        ((c,), _) = run(engine.choices(handle, ids, SamplingParams(max_tokens=12, temperature=0, logprobs=0, **kw)))
        return [e.token_id for e in c.logprobs]

    plain, penalised = tokens(), tokens(frequency_penalty=2.0)
    assert max(map(plain.count, plain)) > max(map(penalised.count, penalised))


def test_stopped_engine_refuses_with_503_until_started_again(base):
    eng = Engine(device="cpu", dtype=torch.float32)
    ids = prompt(eng, base)
    eng.start()
    eng.stop()
    with pytest.raises(EngineError) as e:
        run(eng.complete(base, ids, GREEDY))
    assert e.value.code == "engine_stopped" and e.value.status == 503
    eng.start()
    try:
        assert run(eng.complete(base, ids, GREEDY))[0][0][1] in ("stop", "length")
    finally:
        eng.stop()


def test_unloadable_model_is_422_and_a_missing_one_404(engine, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"garbage")
    handle = ModelHandle(name="broken", base_path=broken)
    with pytest.raises(EngineError) as e:
        run(engine.complete(handle, prompt(engine, handle), GREEDY))
    assert e.value.code == "model_invalid" and e.value.status == 422
    bad_config = tmp_path / "bad-config"
    shutil.copytree(tiny_model_dir, bad_config)
    (bad_config / "config.json").write_text("{not json")
    with pytest.raises(EngineError) as e:
        engine.context_length(ModelHandle(name="b2", base_path=bad_config))
    assert e.value.status == 422
    with pytest.raises(EngineError) as e:
        engine.tokenizer(ModelHandle(name="gone", base_path=tmp_path / "nothing-here"))
    assert e.value.code == "model_not_found" and e.value.status == 404
