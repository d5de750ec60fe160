"""openft's own Llama forward and tokenizer (serving start-up) against transformers'."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from openft.models import fastllama, fasttok
from openft.models.load import load_builtin_tokenizer, load_model
from openft.models.padding import left_pad
from openft.models.tiny import build_tiny_model, redraw_weights


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
    ours = fastllama.load(varied_model_dir)
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
    ours = fastllama.load(varied_model_dir)
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


def test_grouped_attention_equals_repeated_kv_heads():
    """Query heads laid along the query axis (no K/V copies) give what SDPA gives
    with K/V repeated to every query head, for a padded prefill and a decode step."""
    torch.manual_seed(0)
    b, kv, g, d, total = 3, 2, 3, 16, 9
    mask = torch.ones(b, total, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    k, v = torch.randn(b, kv, total, d), torch.randn(b, kv, total, d)
    for n in (total, 1):  # prefill of every column; decode of the last one
        q = torch.randn(b, kv * g, n, d)
        seen = fastllama.attention_bias(mask, n, 1, torch.float32) == 0  # (B, 1, n, total)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=seen
        )
        out = fastllama.grouped_attention(q, k, v, fastllama.attention_bias(mask, n, g, torch.float32))
        assert torch.isfinite(out).all()  # padding queries still see their own column
        assert torch.allclose(out, ref, atol=1e-6)
    assert fastllama.attention_bias(torch.ones(2, 5, dtype=torch.long), 1, g, torch.float32) is None


def test_logits_to_keep_and_tied_head(tiny_model_dir):
    ours = fastllama.load(tiny_model_dir)
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
        {"model_type": "qwen2"},
        {"attention_bias": True},
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
    ):
        assert fastllama.shape_of({**config, **change}) is None, change
    assert fastllama.shape_of(config) is not None
    # Weights that do not match the config's layout: None, so transformers reports the problem.
    d = tmp_path / "odd"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    for f in tiny_model_dir.glob("*.safetensors"):
        (d / f.name).write_bytes(f.read_bytes())
    assert fastllama.load(d) is None


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


def test_serving_never_imports_transformers_for_a_llama_model(tiny_model_dir):
    """The point of fastllama: a server process answering from a Llama model never pays for the import."""
    code = (
        "import sys, asyncio\n"
        "from pathlib import Path\n"
        "from openft.serve.engine import Engine, ModelHandle, SamplingParams\n"
        "async def main():\n"
        "    e = Engine()\n"
        f"    h = ModelHandle(name='tiny', base_path=Path({str(tiny_model_dir)!r}))\n"
        "    ids = e.apply_chat_template(h, [{'role': 'user', 'content': 'hello'}])\n"
        "    texts, usage = await e.complete(h, ids, SamplingParams(max_tokens=4, temperature=0.0))\n"
        "    e.stop()\n"
        "    print(usage.completion_tokens, 'transformers' in sys.modules)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["4", "False"]
