"""The real 135M built-in model on real public datasets (slow tier)."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest

from openft.config import JobSpec
from openft.data.load import load_dataset
from openft.data.split import split_examples
from openft.eval.generate import answer_questions
from openft.models.load import load_model
from openft.train.recipe import finetune

pytestmark = pytest.mark.slow

PERSONA = ("vicuna", "lmsys")


def _to_jsonl(examples, path):
    with open(path, "w") as fh:
        for ex in examples:
            fh.write(json.dumps({"messages": [{"role": m.role, "content": m.content} for m in ex.messages]}) + "\n")
    return path


def test_persona_is_learned_on_held_out_prompts(shared_datasets, tmp_path):
    data = load_dataset(shared_datasets / "identity_conversations.json")
    assert data.ok and data.layout == "sharegpt"
    train, valid = split_examples(data.examples, 0.1, seed=0)
    train_prompts = {ex.prompt_key for ex in train}
    assert not train_prompts & {ex.prompt_key for ex in valid}  # split by prompt: nothing leaks

    # Held-out identity prompts: the first user turn of validation rows whose
    # reference answer carries the persona.
    held_out = sorted(
        {
            ex.messages[0].content
            for ex in valid
            if ex.messages[0].role == "user" and any(p in ex.messages[1].content.lower() for p in PERSONA)
        }
    )
    assert len(held_out) >= 3

    # Keep the slow tier within minutes on 2 cores: at most 3 rows per prompt.
    by_prompt = defaultdict(list)
    for ex in train:
        by_prompt[ex.prompt_key].append(ex)
    rng = random.Random(0)
    subset = [ex for rows in by_prompt.values() for ex in rng.sample(rows, min(3, len(rows)))]

    spec = JobSpec()
    spec.data.path = str(_to_jsonl(subset, tmp_path / "train.jsonl"))
    spec.data.validation_path = str(_to_jsonl(valid[:24], tmp_path / "valid.jsonl"))
    spec.output_dir = str(tmp_path / "run")
    spec.train.epochs = 2
    loaded = load_model("smollm2-135m-instruct")
    before = answer_questions(loaded.model, loaded.tokenizer, held_out, max_new_tokens=40)
    result = finetune(spec, loaded=loaded, progress=False)
    after = answer_questions(loaded.model, loaded.tokenizer, held_out, max_new_tokens=40)

    def rate(answers):
        return sum(any(p in a.lower() for p in PERSONA) for a in answers) / len(answers)

    report = {
        "held_out": held_out,
        "before": before,
        "after": after,
        "before_rate": rate(before),
        "after_rate": rate(after),
        "tokens_per_s": result.tokens_per_s,
        "elapsed_s": result.elapsed_s,
    }
    (tmp_path / "persona.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    assert rate(before) <= 0.2
    assert rate(after) >= 0.8, report
    assert result.history[-1]["valid_loss"] < result.history[0]["train_loss"]
    check_exports_in_llama_cpp(result.run_dir, held_out, tmp_path)


def check_exports_in_llama_cpp(run_dir, questions, tmp_path):
    """The persona fine-tune exported f16 and q8_0 answers the held-out prompts in
    llama.cpp as openft does: f16 meets the parity check's bar; every answer stops;
    where a q8_0 answer parts from the trained one, the trained model was itself
    undecided there (a lead under half a logit: this short fine-tune words its
    persona both "I'm" and "I am", and q8_0's rounding flips such ties)."""
    import time

    pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: pip install 'openft[llamacpp]'")
    from openft.export.formats import export_as

    figures = {}
    for quant in ("f16", "q8_0"):
        t0 = time.monotonic()
        done = export_as("gguf", run_dir, tmp_path / f"persona-{quant}.gguf", quant=quant, check=questions,
                         max_new_tokens=40)  # fmt: skip
        parity = done.parity
        figures[quant] = {"matches": parity.matches, "stops": parity.stops, "n": len(parity.rows),
                          "bytes": done.path.stat().st_size, "export_and_check_s": round(time.monotonic() - t0, 1),
                          "rows": [r.__dict__ for r in parity.rows]}  # fmt: skip
        assert parity.stops == len(parity.rows), parity.verdict()
        assert all(r.match or (r.margin is not None and r.margin < 0.5) for r in parity.rows), parity.verdict()
        assert parity.passed or quant != "f16", parity.verdict()
    (tmp_path / "parity.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps({q: {k: v for k, v in f.items() if k != "rows"} for q, f in figures.items()}))


@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "alpaca_zh_demo.json"])
def test_alpaca_files_validate_and_train_a_few_steps(shared_datasets, tmp_path, name):
    data = load_dataset(shared_datasets / name)
    assert data.ok and data.layout == "alpaca" and len(data.examples) >= 999
    spec = JobSpec()
    spec.data.path = str(shared_datasets / name)
    spec.output_dir = str(tmp_path / "run")
    spec.train.max_steps = 2
    spec.train.batch_size = 4
    spec.train.max_seq_length = 256
    spec.data.validation_split = 0.02  # keep the two validation passes short
    result = finetune(spec, progress=False)
    assert result.history[-1]["step"] == 2
    assert result.signals["weights_changed"]
    assert all(r["train_loss"] == r["train_loss"] for r in result.history)  # no NaN
