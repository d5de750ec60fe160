"""DPO on the tiny model: the loss against the plain formula and TRL's, the
reference with adapters off against a frozen copy, only the answers labelled, and
whole runs where the preference moves the way the data says."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from openft.config import JobSpec
from openft.data.load import load_dataset
from openft.models.load import load_model
from openft.train import dpo
from openft.train.lora import LoraParams, adapters_disabled, apply_lora
from openft.train.recipe import finetune
from openft.train.tokenize import IGNORE

from .helpers import write_chat_jsonl, write_pairs_jsonl


def test_the_loss_is_the_sigmoid_formula():
    pi_c, pi_r = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    ref_c, ref_r = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -3.5])
    t = dpo.dpo_terms(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    plain = [-torch.log(torch.sigmoid(0.1 * ((a - b) - (c - d)))) for a, c, b, d in zip(pi_c, pi_r, ref_c, ref_r)]
    assert torch.allclose(t.losses, torch.stack(plain))
    assert torch.allclose(t.chosen_rewards, 0.1 * (pi_c - ref_c)) and torch.allclose(
        t.rejected_rewards, 0.1 * (pi_r - ref_r)
    )


def test_only_the_answer_is_labelled_on_both_sides(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    ex = load_dataset(str(write_pairs_jsonl(tmp_path / "p.jsonl", 12))).examples[0]
    pair = dpo.encode_pair(loaded.tokenizer, ex, 512, 0)
    tok = loaded.tokenizer
    for side, answer in ((pair.chosen, ex.messages[-1].content), (pair.rejected, ex.rejected[0].content)):
        trained = tok.decode([t for t, lab in zip(side.input_ids, side.labels) if lab != IGNORE])
        assert trained.startswith(answer) and "(#0)" not in trained  # the answer and its end of turn, no prompt
        assert tok.decode(side.input_ids).count(ex.prompt[0].content) == 1  # the prompt is there, as context
    prompt_len = next(i for i, lab in enumerate(pair.chosen.labels) if lab != IGNORE)
    assert pair.chosen.input_ids[:prompt_len] == pair.rejected.input_ids[:prompt_len]


def test_the_reference_with_adapters_off_equals_a_frozen_copy(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    model, tok = loaded.model, loaded.tokenizer
    frozen = copy.deepcopy(model).eval()
    apply_lora(model, LoraParams(rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter: the policy now differs from the base
    examples = load_dataset(str(write_pairs_jsonl(tmp_path / "p.jsonl", 12))).examples
    pairs = dpo.encode_pairs(tok, examples, 512)
    nullctx = torch.autocast("cpu", enabled=False)
    ref = dpo.reference_logps(model, pairs, tok.pad_token_id or 0, 4096, lambda: nullctx, lora=True)
    copy_ref = dpo.reference_logps(frozen, pairs, tok.pad_token_id or 0, 4096, lambda: nullctx, lora=False)
    policy = dpo.reference_logps(model, pairs, tok.pad_token_id or 0, 4096, lambda: nullctx, lora=False)
    assert torch.allclose(ref, copy_ref, atol=1e-4)
    assert not torch.allclose(policy, copy_ref, atol=1e-2)  # with the adapter on it is another model
    with adapters_disabled(model):
        assert all(m.disabled for n, m in model.named_modules() if hasattr(m, "lora_A"))
    assert not any(m.disabled for n, m in model.named_modules() if hasattr(m, "lora_A"))


def test_one_forward_per_group_matches_each_side_alone(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    tok = loaded.tokenizer
    pairs = dpo.encode_pairs(tok, load_dataset(str(write_pairs_jsonl(tmp_path / "p.jsonl", 12))).examples, 512)
    together = dpo.sequence_logps(loaded.model, pairs[:4], tok.pad_token_id or 0).logps
    alone = torch.stack([dpo.sequence_logps(loaded.model, [p], tok.pad_token_id or 0).logps for p in pairs[:4]])
    assert torch.allclose(together[:4], alone[:, 0], atol=1e-4) and torch.allclose(together[4:], alone[:, 1], atol=1e-4)
    # and a side's log-prob is the plain sum of its answer tokens' log-softmax
    p = pairs[0].chosen
    logits = loaded.model(input_ids=torch.tensor([p.input_ids])).logits[0, :-1]
    y = torch.tensor(p.labels[1:])
    plain = F.log_softmax(logits.float(), -1)[y != IGNORE].gather(1, y[y != IGNORE][:, None]).sum()
    assert torch.allclose(alone[0, 0], plain, atol=1e-4)


def _spec(tiny_model_dir, data, out, **train):
    spec = JobSpec(model=str(tiny_model_dir))
    spec.data.path = str(data)
    spec.output_dir = str(out)
    spec.train.objective = "dpo"
    spec.train.learning_rate = 5e-3
    spec.train.epochs = 3
    spec.train.batch_size = 4
    for k, v in train.items():
        setattr(spec.train, k, v)
    return spec


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_dpo_run_moves_the_preference_the_way_the_data_says(tiny_model_dir, tmp_path, method):
    data = write_pairs_jsonl(tmp_path / "p.jsonl", 24)
    lr = 5e-3 if method == "lora" else 5e-4
    result = finetune(_spec(tiny_model_dir, data, tmp_path / "run", method=method, learning_rate=lr), progress=False)
    hist = result.history
    assert hist[0]["train_loss"] == pytest.approx(0.6931, abs=0.02)  # log 2: the policy starts as the reference
    assert sum(r["train_loss"] for r in hist[-3:]) / 3 < 0.8 * hist[0]["train_loss"]
    assert hist[-1]["train_reward_margin"] > 0 and hist[-1]["train_reward_accuracy"] >= 0.75
    valid = [r for r in hist if "valid_reward_accuracy" in r]
    assert valid and valid[-1]["valid_reward_margin"] > valid[0]["valid_reward_margin"]
    assert result.signals["weights_changed"]
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["train"]["objective"] == "dpo" and config["train"]["beta"] == 0.1


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_resume_ends_where_an_uninterrupted_run_ends(tiny_model_dir, tmp_path, method):
    """Full fine-tuning resumes with the reference log-probs of its first start (the
    model has moved since); LoRA's are computed again with the adapters off."""
    data = write_pairs_jsonl(tmp_path / "p.jsonl", 16)
    lr = 5e-3 if method == "lora" else 5e-4
    whole = finetune(
        _spec(tiny_model_dir, data, tmp_path / "whole", save_every=2, method=method, learning_rate=lr), progress=False
    )

    class Crash(Exception):
        pass

    def crash_after_step_4(kind, data):
        if kind == "checkpoint" and data["step"] == 4:
            raise Crash

    part = tmp_path / "part"
    with pytest.raises(Crash):
        spec = _spec(tiny_model_dir, data, part, save_every=2, method=method, learning_rate=lr)
        finetune(spec, progress=False, on_event=crash_after_step_4)
    assert (part / "reference_logps.pt").exists() == (method == "full")
    spec = _spec(tiny_model_dir, data, part, save_every=2, method=method, learning_rate=lr)
    resumed = finetune(spec, resume=True, progress=False)
    a = [r["train_loss"] for r in whole.history]
    b = [r["train_loss"] for r in resumed.history]
    assert len(a) == len(b) and b == pytest.approx(a, abs=1e-5)
    assert resumed.history[-1]["train_reward_margin"] == pytest.approx(
        whole.history[-1]["train_reward_margin"], abs=1e-5
    )


def test_dpo_on_sft_data_is_refused_naming_the_layouts(tiny_model_dir, tmp_path):
    data = write_chat_jsonl(tmp_path / "chat.jsonl", 24)
    with pytest.raises(ValueError, match="DPO trains on preference pairs.*openai_preference"):
        finetune(_spec(tiny_model_dir, data, tmp_path / "run"), progress=False)


def test_sft_on_pairs_learns_the_preferred_answers(tiny_model_dir, tmp_path):
    data = write_pairs_jsonl(tmp_path / "p.jsonl", 24)
    spec = _spec(tiny_model_dir, data, tmp_path / "run", objective="sft", learning_rate=1e-2)
    result = finetune(spec, progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
