"""openft's own decoder forward (every family) and tokenizer (serving start-up) against transformers'."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openft.models import decoder, fasttok
from openft.models.load import load_builtin_tokenizer, load_for_serving, load_model
from openft.models.padding import left_pad
from openft.models.tiny import build_tiny_model, redraw_weights

# --------------------------------------------------------------------------- tiny models of every family

SHAPE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16
)
WINDOW = 4  # sliding windows shorter than the test prompts (11 tokens) and their decode steps


def _family_configs(vocab: int, ids: dict) -> dict:
    """transformers' own config classes, one (or two) per family; `ids`: bos/eos/pad ids."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(SHAPE, vocab_size=vocab, **ids)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    return {
        # original_max_position_embeddings 16: head_dim 16's wavelengths fall in all three bands.
        "llama3": LlamaConfig(**common, rope_parameters={**llama3, "original_max_position_embeddings": 16}),
        "llama-linear": LlamaConfig(
            **common, attention_bias=True, rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 5e4}
        ),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=True),
        "qwen2-sliding": Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
        "qwen3": Qwen3Config(**common),
        "gemma3": Gemma3TextConfig(
            **common,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
            final_logit_softcapping=6.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
        "mistral": MistralConfig(**common, sliding_window=WINDOW + 1),
    }


FAMILIES = ("llama3", "llama-linear", "qwen2", "qwen2-sliding", "qwen3", "gemma3", "mistral")


def build_family_model(out: Path, family: str, vocab: int = 256, ids: dict | None = None) -> Path:
    """A tiny random model of `family` saved with save_pretrained. Every tensor is
    redrawn large (matrices and biases N(0, 0.2), norms around their neutral value)
    so that a wrong switch shows in the logits."""
    from transformers import AutoModelForCausalLM

    config = _family_configs(vocab, ids or {})[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    neutral = 0.0 if config.model_type.startswith("gemma") else 1.0  # Gemma's norms scale by (1 + w)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = neutral if "norm" in name else 0.0
            p.copy_(centre + torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(out)
    return Path(out)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, our model, transformers' model in eager fp32) for each family."""
    from transformers import AutoModelForCausalLM

    d = build_family_model(tmp_path_factory.mktemp(request.param), request.param)
    ours = decoder.load(d)
    assert ours is not None, f"{request.param} should run on openft's decoder"
    theirs = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32).eval()
    return request.param, ours, theirs, d


PROMPTS = [list(range(3, 14)), [40, 41, 42, 43], [7, 8, 9, 10, 11, 12, 99]]


def test_each_family_reads_its_switches(family):
    name, ours, _, _ = family
    a = ours.arch
    assert a.qk_norm == (name in ("qwen3", "gemma3"))
    assert a.qkv_bias == (name in ("qwen2", "qwen2-sliding", "llama-linear"))
    assert a.gemma_norm == a.sandwich_norm == (a.embed_scale is not None) == (name == "gemma3")
    assert (a.final_softcap == 6.0) == (name == "gemma3")
    windows = {"qwen2-sliding": (None, None, 4, 4), "gemma3": (4, 4, None, 4), "mistral": (5,) * 4}
    assert a.windows == windows.get(name, (None,) * 4)
    kinds = {"llama3": {"llama3"}, "llama-linear": {"linear"}, "gemma3": {"default", "linear"}}
    assert {r.kind for r in a.ropes} == kinds.get(name, {"default"})
    assert a.tie_word_embeddings == (ours.lm_head.weight is ours.model.embed_tokens.weight)


def test_single_sequence_matches_transformers(family):
    _, ours, theirs, _ = family
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        ref = theirs(input_ids=ids).logits
        out = ours(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_padded_batch_and_cached_decode_match_transformers(family):
    """A left-padded prefill, then six greedy steps from our cache, each against
    transformers re-reading the whole sequence: every sliding window is passed
    (prompt 11 tokens, windows 4 and 5) in the prefill and again while decoding."""
    _, ours, theirs, _ = family
    ids, mask, pos = left_pad(PROMPTS, 0)
    real = mask.bool()
    with torch.inference_mode():
        ref = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        cache = ours.new_cache()
        out = ours(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
        torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)
        seq, seq_mask, step_pos = ids, mask, pos[:, -1:]
        for _ in range(6):
            nxt = out[:, -1].argmax(-1, keepdim=True)
            seq, seq_mask = torch.cat([seq, nxt], 1), torch.cat([seq_mask, torch.ones_like(nxt)], 1)
            step_pos = step_pos + 1
            out = ours(input_ids=nxt, attention_mask=seq_mask, position_ids=step_pos, past_key_values=cache).logits
            full = theirs(input_ids=seq, attention_mask=seq_mask, position_ids=(seq_mask.cumsum(1) - 1).clamp(min=0))
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out[:, -1], full.logits[:, -1], atol=1e-4, rtol=1e-4)
    assert cache.layers[0].keys.shape[-2] == ids.shape[1] + 6  # the whole history is kept; windows are masks


def test_bf16_matches_transformers_sdpa(family):
    """In bf16 the rounding follows transformers' SDPA path (its eager path differs
    from both by ~0.1 on these logits): same casts, in the same places."""
    from transformers import AutoModelForCausalLM

    _, _, _, d = family
    ours = decoder.load(d, torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.bfloat16).eval()
    ids, mask, pos = left_pad(PROMPTS, 0)
    with torch.inference_mode():
        out = ours(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ref = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert out.dtype == torch.bfloat16
    real = mask.bool()
    torch.testing.assert_close(out[real].float(), ref[real].float(), atol=2e-2, rtol=0)


# --------------------------------------------------------------------------- masks and attention


def _reference_seen(mask: torch.Tensor, n: int, window: int | None) -> torch.Tensor:
    """(B, 1, n, total) bool, written out: query column c sees real key j when j <= c
    (and c - j < window), and always itself."""
    b, total = mask.shape
    seen = torch.zeros(b, 1, n, total, dtype=torch.bool)
    for i in range(n):
        c = total - n + i
        for j in range(total):
            inside = j <= c and (window is None or c - j < window)
            seen[:, 0, i, j] = (mask[:, j].bool() & inside) | (j == c)
    return seen


def test_grouped_attention_equals_repeated_kv_heads():
    """Query heads laid along the query axis (no K/V copies) give what SDPA gives
    with K/V repeated to every query head, for a padded prefill and a decode step,
    with and without a sliding window (whose masked-off columns are not read)."""
    torch.manual_seed(0)
    b, kv, g, d, total = 3, 2, 3, 16, 9
    mask = torch.ones(b, total, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    k, v = torch.randn(b, kv, total, d), torch.randn(b, kv, total, d)
    for window in (None, 3):
        for n in (total, 2, 1):  # prefill of every column; a short prefill after a cache; decode
            q = torch.randn(b, kv * g, n, d)
            want = _reference_seen(mask, n, window)
            plain = decoder.attention_bias(mask, n, 1, torch.float32, window)
            kept = want[..., plain.start :]
            assert torch.equal(plain.bias == 0, kept) if plain.bias is not None else bool(kept.all())
            assert not want[..., : plain.start].any()  # only columns nobody sees are dropped
            ref = torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=want
            )
            grouped = decoder.attention_bias(mask, n, g, torch.float32, window)
            s = grouped.start
            out = decoder.grouped_attention(q, k[:, :, s:], v[:, :, s:], grouped.bias)
            assert torch.isfinite(out).all()  # padding queries still see their own column
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    ones = torch.ones(2, 5, dtype=torch.long)
    assert decoder.attention_bias(ones, 1, g, torch.float32).bias is None
    assert decoder.attention_bias(ones, 1, g, torch.float32, window=3) == decoder.LayerMask(2, None)


# --------------------------------------------------------------------------- the built-in's Llama


@pytest.fixture(scope="module")
def varied_model_dir(tmp_path_factory):
    """A tiny model with larger random weights (so differences would show), untied head."""
    from transformers import LlamaForCausalLM

    d = build_tiny_model(tmp_path_factory.mktemp("fast-tiny"), layers=3, hidden=64, seed=3)
    model = LlamaForCausalLM.from_pretrained(d)
    redraw_weights(model, std=0.2, seed=1)
    model.config.rope_theta = 50000.0
    model.save_pretrained(d)
    return d


def _prompts():
    return [[5, 17, 300, 42, 7, 99, 1000, 12], [8, 9, 10], [400, 401, 402, 403, 404]]


def test_padded_prefill_and_cached_decode_match_transformers(varied_model_dir):
    ours = decoder.load(varied_model_dir)
    assert ours is not None
    theirs = load_model(str(varied_model_dir)).model
    ids, mask, pos = left_pad(_prompts(), 0)
    with torch.inference_mode():
        ref = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        cache = ours.new_cache()
        out = ours(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
        real = mask.bool()
        assert torch.allclose(out[real], ref[real], atol=1e-4, rtol=1e-4)
        # Three decode steps from our cache against transformers re-reading the whole sequence.
        seq, seq_mask, step_pos = ids, mask, pos[:, -1:]
        for _ in range(3):
            nxt = out[:, -1].argmax(-1, keepdim=True)
            seq, seq_mask = torch.cat([seq, nxt], 1), torch.cat([seq_mask, torch.ones_like(nxt)], 1)
            step_pos = step_pos + 1
            out = ours(input_ids=nxt, attention_mask=seq_mask, position_ids=step_pos, past_key_values=cache).logits
            full = theirs(
                input_ids=seq, attention_mask=seq_mask, position_ids=(seq_mask.cumsum(1) - 1).clamp(min=0)
            ).logits
            assert torch.isfinite(out).all()
            assert torch.allclose(out[:, -1], full[:, -1], atol=1e-4, rtol=1e-4)
        assert cache.layers[0].keys.shape[-2] == ids.shape[1] + 3


def test_extra_left_padding_changes_nothing(varied_model_dir):
    """Prompts padded to a wider (bucketed) width, as the bf16 engine does for
    oneDNN's per-shape kernels: the real positions' logits are those of the
    exact width, and so are the next decode step's."""
    ours = decoder.load(varied_model_dir)
    with torch.inference_mode():
        outs = []
        for width in (0, 13):
            ids, mask, pos = left_pad(_prompts(), 0, width=width)
            assert ids.shape[1] == max(8, width) and int(mask.sum()) == 16
            cache = ours.new_cache()
            first = ours(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
            nxt = first[:, -1].argmax(-1, keepdim=True)
            step = ours(
                input_ids=nxt,
                attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                position_ids=pos[:, -1:] + 1,
                past_key_values=cache,
            ).logits
            outs.append((first[mask.bool()], step[:, -1]))
        for exact, padded in zip(*outs):
            torch.testing.assert_close(padded, exact, atol=1e-5, rtol=1e-5)


def test_logits_to_keep_and_tied_head(tiny_model_dir):
    ours = decoder.load(tiny_model_dir)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied: one copy
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.inference_mode():
        full = ours(input_ids=ids, past_key_values=None).logits
        last = ours(input_ids=ids, logits_to_keep=1, past_key_values=None).logits
    assert last.shape == (1, 1, full.shape[-1])
    assert torch.allclose(last[:, -1], full[:, -1], atol=1e-6)


def test_unsupported_configs_fall_back(tmp_path, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    for change in (
        {"model_type": "phi3"},
        {"model_type": "gemma2"},
        {"hidden_act": "relu"},
        {"pretraining_tp": 2},
        {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
        {"model_type": "gemma3_text", "use_bidirectional_attention": True},
        {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4, "layer_types": ["chunked"] * 2},
    ):
        assert decoder.arch_of({**config, **change}) is None, change
    assert decoder.arch_of(config) is not None
    # Weights that do not match the config's layout: None, so transformers reports the problem.
    d = tmp_path / "odd"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    for f in tiny_model_dir.glob("*.safetensors"):
        (d / f.name).write_bytes(f.read_bytes())
    assert decoder.load(d) is None


def test_multimodal_gemma3_layout_falls_back(tmp_path):
    """A Gemma 3 checkpoint with a vision tower (`model.language_model.*` keys under
    a `text_config`) is not this module's layout: None, transformers serves it."""
    from safetensors.torch import load_file, save_file

    text = build_family_model(tmp_path / "text", "gemma3")
    text_config = json.loads((text / "config.json").read_text())
    (d := tmp_path / "mm").mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text_config}))
    state = load_file(text / "model.safetensors")
    save_file({k.replace("model.", "model.language_model.", 1): v for k, v in state.items()}, d / "model.safetensors")
    assert decoder.arch_of(decoder.read_config(d)) is not None  # the text part alone is supported ...
    assert decoder.load(d) is None  # ... but not under these names


# --------------------------------------------------------------------------- served end to end


@pytest.fixture(scope="module")
def gemma_serving_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The Gemma 3 family model with the built-in's tokenizer and chat template, servable."""
    tok = load_builtin_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    d = build_family_model(tmp_path_factory.mktemp("gemma-serve"), "gemma3", vocab=len(tok), ids=ids)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, d / f.name)
    return d


def test_gemma_with_adapter_serves_what_transformers_generates(gemma_serving_dir, tmp_path):
    """The engine on our Gemma 3 forward (sliding windows, LoRA adapter keys mapped
    one to one) answers token for token what transformers' generate answers."""
    from transformers import AutoModelForCausalLM

    from openft.serve.engine import Engine, ModelHandle, SamplingParams
    from openft.train.lora import LoraParams, apply_lora, load_adapter, lora_layers, save_adapter

    assert isinstance(load_for_serving(str(gemma_serving_dir)).model, decoder.DecoderLM)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(gemma_serving_dir)
    params = LoraParams(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "o_proj", "down_proj"))
    apply_lora(model, params)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    save_adapter(model, params, adapter, base_model=str(gemma_serving_dir))
    engine = Engine(max_batch_size=4, device="cpu", dtype=torch.float32)
    engine.start()
    answers = []
    try:
        for path in (None, adapter):
            handle = ModelHandle(
                name="g" if path is None else "ft:g:x:a", base_path=gemma_serving_dir, adapter_path=path
            )
            ids = engine.apply_chat_template(handle, [{"role": "user", "content": "Tell me about the sea."}])
            greedy = SamplingParams(max_tokens=12, temperature=0, logprobs=0)
            ((choice,), _) = asyncio.run(engine.choices(handle, ids, greedy))
            got = [e.token_id for e in choice.logprobs]
            answers.append(got)
            ref = AutoModelForCausalLM.from_pretrained(gemma_serving_dir, attn_implementation="eager")
            if path is not None:
                load_adapter(ref, path)
            with torch.inference_mode():
                out = ref.eval().generate(
                    torch.tensor([ids]), do_sample=False, max_new_tokens=12, eos_token_id=[], pad_token_id=0
                )
            assert len(ids) > 2 * WINDOW and len(got) >= 4 and got == out[0, len(ids) :][: len(got)].tolist(), path
    finally:
        engine.stop()
    assert answers[0] != answers[1], "the adapter should change the answer"


# --------------------------------------------------------------------------- the light tokenizer

MESSAGES = [
    [{"role": "user", "content": "Hi there! What's 2+2?"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Explain LoRA.\nIn one line."},
        {"role": "assistant", "content": "Low-rank adapters."},
        {"role": "user", "content": "中文也可以吗？ 🙂"},
    ],
]


def test_light_tokenizer_matches_transformers(tiny_model_dir):
    ours, theirs = fasttok.load(tiny_model_dir), load_builtin_tokenizer()
    assert ours is not None
    assert (ours.eos_token_id, ours.pad_token_id, ours.bos_token_id) == (
        theirs.eos_token_id,
        theirs.pad_token_id,
        theirs.bos_token_id,
    )
    assert ours.get_vocab() == theirs.get_vocab() and len(ours) == len(theirs)
    for messages in MESSAGES:
        for gen in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert text == theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            ids = ours(text, add_special_tokens=False)["input_ids"]
            assert ids == theirs(text, add_special_tokens=False)["input_ids"]
            assert ours(text, return_offsets_mapping=True)["offset_mapping"] == [
                tuple(o) for o in theirs(text, return_offsets_mapping=True)["offset_mapping"]
            ]
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                    ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False
                )


def test_template_errors_and_generation_tag(tmp_path, tiny_model_dir):
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}"
    )
    tok = fasttok.load(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "é"}], tokenize=False) == '"é"'
    with pytest.raises(Exception, match="no tools"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    (tmp_path / "chat_template.jinja").write_text("{% for %}")  # does not compile: transformers decides
    assert fasttok.load(tmp_path) is None


@pytest.mark.parametrize("which", ["llama", "gemma3"])
def test_serving_never_imports_transformers(which, tiny_model_dir, gemma_serving_dir):
    """The point of the decoder: a server process answering from a model of a
    covered family never pays for the transformers import."""
    path = tiny_model_dir if which == "llama" else gemma_serving_dir
    code = (
        "import sys, asyncio\n"
        "from pathlib import Path\n"
        "from openft.serve.engine import Engine, ModelHandle, SamplingParams\n"
        "async def main():\n"
        "    e = Engine()\n"
        f"    h = ModelHandle(name='tiny', base_path=Path({str(path)!r}))\n"
        "    ids = e.apply_chat_template(h, [{'role': 'user', 'content': 'hello'}])\n"
        "    texts, usage = await e.complete(h, ids, SamplingParams(max_tokens=4, temperature=0.0))\n"
        "    e.stop()\n"
        "    print(usage.completion_tokens, 'transformers' in sys.modules)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["4", "False"]
