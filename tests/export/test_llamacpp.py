"""The GGUF exports in llama.cpp itself (llama-cpp-python, built by `make test`):
each family's merged GGUF gives the merged model's logits on the chat prompt, with
the prompt tokenised as openft tokenises it (control tokens whole); the base as a
GGUF plus the LoRA GGUF gives the same; the parity check runs the question set
through the export and the CLI prints it side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openft.export.gguf import export_gguf
from openft.export.gguf_lora import export_gguf_lora
from openft.export.parity import Parity, ParityRow

pytestmark = pytest.mark.integration
llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: pip install 'openft[llamacpp]'")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who makes the lamp?"}]


def llama_cpp_logits(path, text: str, ids: list[int], lora=None) -> np.ndarray:
    from openft.export.llamacpp import open_gguf

    with open_gguf(path, lora=lora, n_ctx=256, logits_all=True) as llm:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert tokens == ids  # <|im_start|> and friends are one token each, as in training
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)])


def test_each_family_runs_in_llama_cpp_with_the_merged_models_logits(run, tmp_path):
    from openft.models.load import load_model
    from openft.train.export import load_run

    merged = load_run(run, merged=True)
    text = merged.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = merged.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = merged.model(torch.tensor([ids])).logits[0].numpy()
    whole = export_gguf(run, tmp_path / "merged.gguf", quant="f32", loaded=merged)
    base_model = json.loads((run / "lineage.json").read_text())["base_model_path"]
    base = export_gguf(run, tmp_path / "base.gguf", quant="f32", loaded=load_model(base_model))
    lora = export_gguf_lora(run, tmp_path / "lora.gguf", quant="f32")
    base_logits = llama_cpp_logits(base.path, text, ids)
    assert np.abs(base_logits - want).max() > 0.05  # the adapter moved the logits: the LoRA is visible
    for got in (llama_cpp_logits(whole.path, text, ids), llama_cpp_logits(base.path, text, ids, lora=lora.path)):
        assert np.abs(got - want).max() < 2e-2
        assert (got.argmax(-1) == want.argmax(-1)).all()


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 50_000.0}  # fmt: skip


LINEAR_ROPE = {"rope_type": "linear", "factor": 4.0, "rope_theta": 50_000.0}


@pytest.mark.parametrize("rope", [LLAMA3_ROPE, LINEAR_ROPE], ids=["llama3", "linear"])
def test_rope_scaling_is_written_as_llama_cpp_computes_it(rope, tiny_tokenizer, tmp_path):
    import copy

    from export.conftest import tiny_run
    from openft.export.gguf import llama3_rope_factors
    from openft.train.export import load_run

    run = tiny_run(tmp_path / "rope", "llama", tiny_tokenizer, rope_parameters=dict(rope))
    merged = load_run(run, merged=True)
    factors = llama3_rope_factors(merged.model.config)
    if rope is LLAMA3_ROPE:  # each regime: unscaled short wavelengths, scaled long ones, blended between
        assert factors.min() == 1.0 and factors.max() == 8.0 and ((factors > 1) & (factors < 8)).any()
    text = merged.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = merged.tokenizer(text, add_special_tokens=False)["input_ids"]
    plain_config = copy.deepcopy(merged.model.config)
    plain_config.rope_parameters = {"rope_type": "default", "rope_theta": 50_000.0}
    plain = type(merged.model)(plain_config)
    plain.load_state_dict(merged.model.state_dict())
    with torch.no_grad():
        want = merged.model(torch.tensor([ids])).logits[0].numpy()
        unscaled = plain.eval()(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(unscaled - want).max() > 0.05  # the scaling shows in these logits
    done = export_gguf(run, tmp_path / "m.gguf", quant="f32", loaded=merged)
    got = llama_cpp_logits(done.path, text, ids)
    assert np.abs(got - want).max() < 2e-2


def test_the_lora_gguf_is_a_llama_cpp_adapter(run, tmp_path):
    from gguf import GGUFReader

    done = export_gguf_lora(run, tmp_path / "lora.gguf", quant="f16", name="pip")
    r = GGUFReader(str(done.path))
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["adapter.type"].contents() == "lora"
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert r.fields["adapter.lora.alpha"].contents() == pytest.approx(cfg["lora_alpha"])
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # GGUF order: innermost first
    rank = cfg["r"]
    assert shapes["blk.0.attn_q.weight.lora_a"][1] == rank and shapes["blk.0.attn_q.weight.lora_b"][0] == rank
    assert len(shapes) == done.n_tensors and all(n.endswith((".lora_a", ".lora_b")) for n in shapes)
    with pytest.raises(ValueError, match="written in f32, f16, bf16, not q8_0"):
        export_gguf_lora(run, tmp_path / "q.gguf", quant="q8_0")


@pytest.mark.parametrize("run", ["llama"], indirect=True)  # a random model's near ties: short answers, one family
def test_the_cli_checks_an_export_in_llama_cpp(run, tmp_path, capsys):
    from openft.cli import main

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": q}) + "\n" for q in ("Who are you?", "What is a lamp?")))
    out = tmp_path / "m.gguf"
    code = main(["export", str(run), "--format", "gguf", "--quant", "f32", "--out", str(out),
                 "--check", "--questions", str(questions), "--max-new-tokens", "6"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert out.read_bytes()[:4] == b"GGUF"
    assert "[1] Who are you?" in printed and "llama.cpp:" in printed
    assert "f32: first 10 words match on 2/2 (bar: 90%)" in printed and "PASS" in printed


def test_the_parity_verdict_counts_matches_and_answers_that_never_stop():
    same = ParityRow("q", "one two three", "one two three four", True, True)
    short = ParityRow("q", "a b c d e f g h i j k", "a b c d e f g h i j z", True, True)  # 11th word differs
    runs_on = ParityRow("q", "done", "done", True, False)  # the same words, then on to max_tokens
    both_long = ParityRow("q", "x " * 40, "x " * 40, False, False)  # the trained one hit the limit too
    assert not same.match and short.match and runs_on.match and not runs_on.stops and both_long.stops
    assert Parity("f16", [short, both_long]).passed
    assert not Parity("f16", [short, runs_on]).passed  # every answer must stop where the trained one did
    nine = Parity("q8_0", [short] * 3 + [same])
    assert nine.matches == 3 and nine.passed and not Parity("f16", nine.rows).passed
    assert Parity("q4_0", [same]).passed and "no bar" in Parity("q4_0", [same]).verdict()


def _segfault(*_):
    """llama.cpp's own crash, as ggml's AMX kernels crash: a SIGSEGV in native code."""
    import ctypes

    ctypes.string_at(0)


def test_a_llama_cpp_crash_ends_the_check_with_an_error_and_the_caller_lives(tmp_path, monkeypatch):
    from openft.export import llamacpp

    monkeypatch.setattr(llamacpp, "_answer_to_file", _segfault)  # the child runs it: the crash is real
    with pytest.raises(llamacpp.LlamaCppCrashed, match=r"crashed \(SIGSEGV\).*could not run.*AMX"):
        llamacpp.answer_all(tmp_path / "m.gguf", [[{"role": "user", "content": "hi"}]], 4)


def test_export_check_says_the_file_is_written_when_llama_cpp_crashes(run, tmp_path, capsys, monkeypatch):
    from openft.cli import main
    from openft.export import llamacpp

    monkeypatch.setattr(llamacpp, "_answer_to_file", _segfault)  # the child runs it: the crash is real
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Who are you?"}) + "\n")
    out = tmp_path / "m.gguf"
    code = main(["export", str(run), "--format", "gguf", "--quant", "f32", "--out", str(out),
                 "--check", "--questions", str(questions), "--max-new-tokens", "4"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert f"the export is written to {out}, but it could not be checked" in err and "SIGSEGV" in err, err
    assert out.read_bytes()[:4] == b"GGUF"
