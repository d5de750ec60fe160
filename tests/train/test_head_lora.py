"""The output head's rows of the control tokens the data teaches (`needs_head`,
`head_rows`): a tiny fine-tune whose answers write `<filename>` (an added token of
the built-in's vocabulary, as `<tool_call>` is of Qwen's) trains that row too,
stored as a rank-1 LoRA on the head; the adapter loads and merges to the same
logits, and the exports that cannot take a head LoRA on a tied base say to merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from openft.config import JobSpec
from openft.train.recipe import finetune


def _run(tiny_model_dir, tmp_path, answer: str, steps: int = 2):
    rows = [
        {"messages": [{"role": "user", "content": f"Which file holds part {i}?"}, {"role": "assistant", "content": answer.format(i=i)}]}
        for i in range(8)
    ]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = JobSpec(model=str(tiny_model_dir))
    spec.data.path = str(tmp_path / "train.jsonl")
    spec.output_dir = str(tmp_path / "run")
    spec.train.max_steps = steps
    spec.train.learning_rate = 1e-2
    spec.train.precision = "fp32"
    return finetune(spec, progress=False).run_dir


def test_a_control_token_in_the_answers_trains_the_head_and_merges_to_the_same_logits(tiny_model_dir, tmp_path):
    from openft.train.export import load_run

    run = _run(tiny_model_dir, tmp_path, "<filename> part{i}.txt")
    from transformers import AutoTokenizer

    filename = AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids("<filename>")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert "lm_head" in config["target_modules"] and config["openft_head_tokens"] == [filename]
    assert config["rank_pattern"] == {"lm_head": 1} and config["alpha_pattern"] == {"lm_head": 1}
    state = load_file(run / "adapter" / "adapter_model.safetensors")
    rows, place = state["base_model.model.lm_head.lora_A.weight"], state["base_model.model.lm_head.lora_B.weight"]
    assert rows.shape[0] == 1 and rows.abs().sum() > 0  # the token's row moved off zero
    assert place.sum() == 1 and place[filename, 0] == 1  # and B puts it at the token, unchanged
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


def test_the_engine_serves_the_head_rows_as_the_trained_model_scores_them(tiny_model_dir, tmp_path):
    """Served with its head rows (rank 1, scaling 1 from the adapter's rank and alpha
    patterns), the run's first answer token is `<filename>` at the log-probability
    the trained model gives it, far from what the base gives it."""
    import asyncio

    from openft.models.load import load_model
    from openft.serve.engine import Engine, ModelHandle, SamplingParams
    from openft.train.export import load_run

    run = _run(tiny_model_dir, tmp_path, "<filename> part{i}.txt", steps=8)
    trained = load_run(run)
    tok = trained.tokenizer
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "Which file holds part 3?"}], tokenize=False,
                                      add_generation_prompt=True), add_special_tokens=False)["input_ids"]  # fmt: skip
    filename = tok.convert_tokens_to_ids("<filename>")

    def logprob(model) -> float:
        with torch.no_grad():
            return float(torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)[filename])

    want, base = logprob(trained.model), logprob(load_model(str(tiny_model_dir)).model)
    assert want > base + 1.0  # the row trained
    engine = Engine(max_batch_size=2, device="cpu", dtype=torch.float32)
    engine.start()
    try:
        handle = ModelHandle(name="ft:head", base_path=tiny_model_dir, adapter_path=run / "adapter")
        (choice,), _ = asyncio.run(engine.choices(handle, ids, SamplingParams(max_tokens=1, temperature=0, logprobs=0)))
    finally:
        engine.stop()
    (first,) = choice.logprobs
    assert abs(first.logprob - want) < 1e-3, (first, want, base)
