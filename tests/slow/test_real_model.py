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
