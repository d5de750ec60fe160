"""The Gemma built-in exported to GGUF and run in llama.cpp (slow tier): its
SentencePiece vocabulary, written from the scores of the GGUF it came from,
tokenises the chat prompt to openft's ids, and the merged fine-tune's logits come
back from llama.cpp as openft computes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openft.models.registry import BUILTINS

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: pip install 'openft[llamacpp]'")
GEMMA = "gemma-3-270m"
CHAT = [{"role": "user", "content": "Who makes the lamp? Tell me in one line, please."}]


def test_gemma_exports_with_its_sentencepiece_vocabulary_and_gives_its_logits_in_llama_cpp(session_home, tmp_path):
    from gguf import GGUFReader
    from train.helpers import write_chat_jsonl

    from openft.config import JobSpec
    from openft.export.gguf import export_gguf
    from openft.export.llamacpp import open_gguf
    from openft.models.builtins import state
    from openft.train.export import load_run
    from openft.train.recipe import finetune

    if not state(BUILTINS[GEMMA]).installed:
        pytest.skip(f"built-in not installed (openft models pull {GEMMA})")
    spec = JobSpec(model=GEMMA)
    spec.data.path = str(write_chat_jsonl(tmp_path / "train.jsonl", n=8))
    spec.output_dir = str(tmp_path / "run")
    spec.train.max_steps = 1
    spec.train.precision = "fp32"
    merged = load_run(finetune(spec, progress=False).run_dir, merged=True)
    text = merged.tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = merged.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "<start_of_turn>" in text  # Gemma's own turn markers, each one token
    with torch.no_grad():
        want = merged.model(torch.tensor([ids])).logits[0].numpy()
    done = export_gguf(spec.output_dir, tmp_path / "gemma.gguf", quant="f32", loaded=merged)
    fields = GGUFReader(str(done.path)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(fields["tokenizer.ggml.scores"].data) == len(merged.tokenizer)
    with open_gguf(done.path, n_ctx=256, logits_all=True) as llm:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert tokens == ids
        llm.eval(tokens)
        got = np.array(llm.scores[: len(tokens)])
    assert np.abs(got - want).max() < 0.1  # measured 0.041 (f32 GGUF against the fp32 merged model)
    assert (got.argmax(-1) == want.argmax(-1)).all()
