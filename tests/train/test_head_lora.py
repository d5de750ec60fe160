"""LoRA on the output head where the data teaches control tokens (`needs_head`): a
tiny fine-tune whose answers write `<filename>` (an added token of the built-in's
vocabulary, as `<tool_call>` is of Qwen's) trains the head too, the adapter loads
and merges to the same logits, and the exports that cannot take a head LoRA on a
tied base say to merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from openft.config import JobSpec
from openft.train.recipe import finetune


def _run(tiny_model_dir, tmp_path, answer: str):
    rows = [
        {"messages": [{"role": "user", "content": f"Which file holds part {i}?"}, {"role": "assistant", "content": answer.format(i=i)}]}
        for i in range(8)
    ]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = JobSpec(model=str(tiny_model_dir))
    spec.data.path = str(tmp_path / "train.jsonl")
    spec.output_dir = str(tmp_path / "run")
    spec.train.max_steps = 2
    spec.train.learning_rate = 1e-2
    spec.train.precision = "fp32"
    return finetune(spec, progress=False).run_dir


def test_a_control_token_in_the_answers_trains_the_head_and_merges_to_the_same_logits(tiny_model_dir, tmp_path):
    from openft.train.export import load_run

    run = _run(tiny_model_dir, tmp_path, "<filename> part{i}.txt")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert "lm_head" in config["target_modules"]
    state = load_file(run / "adapter" / "adapter_model.safetensors")
    assert state["base_model.model.lm_head.lora_B.weight"].abs().sum() > 0  # the head's B moved off zero
    ids = torch.tensor([[1, 7, 42, 9, 3]])
    with torch.no_grad():
        unmerged = load_run(run).model(ids).logits
        merged = load_run(run, merged=True)
        assert not merged.model.config.tie_word_embeddings
        torch.testing.assert_close(merged.model(ids).logits, unmerged, rtol=1e-4, atol=1e-4)


def test_plain_answers_keep_the_head_frozen(tiny_model_dir, tmp_path):
    run = _run(tiny_model_dir, tmp_path, "It is in part{i}.txt")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert "lm_head" not in config["target_modules"]


def test_a_head_lora_on_a_tied_base_is_refused_as_a_gguf_lora_naming_the_merge(tiny_model_dir, tmp_path):
    from openft.export.gguf import ExportError
    from openft.export.gguf_lora import export_gguf_lora

    run = _run(tiny_model_dir, tmp_path, "<filename> part{i}.txt")
    with pytest.raises(ExportError, match="tied.*merged model"):
        export_gguf_lora(run, tmp_path / "lora.gguf")
    assert not (tmp_path / "lora.gguf").exists()
