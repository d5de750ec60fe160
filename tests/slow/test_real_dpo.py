"""DPO on the real built-in model and real preference pairs (slow tier): on
`dpo_en_demo.json`, held-out pairs the model never trained on come to be
preferred as the data prefers them."""

from __future__ import annotations

import json
import math

import pytest

from openft.config import JobSpec
from openft.data.load import load_dataset
from openft.models.load import load_model
from openft.train import dpo
from openft.train.recipe import finetune

pytestmark = pytest.mark.slow

MAX_LEN = 256  # both sides of a pair: keeps a step within seconds on 2 cores
N_TRAIN, N_HELD = 64, 32


def test_dpo_raises_the_preference_for_held_out_pairs(shared_datasets, tmp_path):
    path = shared_datasets / "dpo_en_demo.json"
    rows = json.loads(path.read_text())
    data = load_dataset(path)
    assert data.ok and data.layout == "sharegpt_preference"
    loaded = load_model("smollm2-135m-instruct")
    tok = loaded.tokenizer

    def pair(i: int, k: int = 0):
        return dpo.encode_pair(tok, data.examples[i], MAX_LEN, k)

    # Pairs whose prompt fits and whose both answers keep 16 tokens or more under MAX_LEN.
    usable = [i for i in range(len(rows)) if min((p := pair(i)).chosen.n_trained, p.rejected.n_trained) >= 16]
    train, held = usable[:N_TRAIN], usable[N_TRAIN : N_TRAIN + N_HELD]
    assert len(held) == N_HELD
    (tmp_path / "train.json").write_text(json.dumps([rows[i] for i in train]))
    (tmp_path / "held.json").write_text(json.dumps([rows[i] for i in held]))
    held_pairs = [pair(i, k) for k, i in enumerate(held)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    before = dpo.preference_accuracy(loaded.model, held_pairs, pad, 4096)

    spec = JobSpec()
    spec.data.path = str(tmp_path / "train.json")
    spec.data.validation_path = str(tmp_path / "held.json")
    spec.output_dir = str(tmp_path / "run")
    spec.train.objective = "dpo"
    spec.train.learning_rate = 5e-4
    spec.train.epochs = 1  # one pass and one validation at the end: the slow tier's budget
    spec.train.max_seq_length = MAX_LEN
    spec.train.eval_every = 1000
    result = finetune(spec, loaded=loaded, progress=False)
    after = dpo.preference_accuracy(loaded.model, held_pairs, pad, 4096)

    valid = [r for r in result.history if "valid_reward_accuracy" in r]
    report = {
        "own_preference_before": before,
        "own_preference_after": after,
        "valid": [(r["step"], r["valid_reward_accuracy"], r["valid_reward_margin"]) for r in valid],
        "train_loss": [r["train_loss"] for r in result.history],
        "elapsed_s": result.elapsed_s,
    }
    (tmp_path / "dpo.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    # The implicit reward (policy against the frozen base) ranks held-out pairs as the
    # data does: at the start every margin is 0, a coin toss.
    assert valid[-1]["valid_reward_accuracy"] >= 0.6, report
    assert valid[-1]["valid_reward_margin"] > 0.1, report
    # The model itself now finds the preferred answers likelier than it did.
    assert after > before, report
    assert result.history[-1]["train_loss"] < math.log(2), report
