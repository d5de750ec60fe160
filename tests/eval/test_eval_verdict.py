from __future__ import annotations

from openft.eval.verdict import TrainingSignals, judge


def signals(**kw):
    base = dict(
        first_train_loss=2.41,
        last_train_loss=0.83,
        first_valid_loss=2.5,
        last_valid_loss=0.95,
        weights_changed=True,
        weight_delta_norm=0.12,
        fully_masked_examples=0,
        total_examples=200,
    )
    base.update(kw)
    return TrainingSignals(**base)


def by_name(verdict):
    return {c.name: c for c in verdict.checks}


SUMMARY_BETTER = {
    "questions": 10,
    "with_reference": 10,
    "answers_changed": 9,
    "metric": "rouge_l",
    "improved": 8,
    "worse": 1,
    "unchanged": 1,
    "before": {"exact": 0, "contains": 0, "exact_rate": 0.0, "contains_rate": 0.0, "rouge_l": 0.12, "similarity": None},
    "after": {"exact": 3, "contains": 8, "exact_rate": 0.3, "contains_rate": 0.8, "rouge_l": 0.61, "similarity": None},
}


def test_loss_fell_is_ok_with_a_plain_summary():
    v = judge(signals(), SUMMARY_BETTER)
    assert v.ok
    assert all(c.ok for c in v.checks)
    assert v.summary.startswith("Training worked: loss fell from 2.41 to 0.83")
    assert "validation loss followed it (0.95)" in v.summary
    assert "contains 8/10 vs 0/10" in v.summary
    assert "-66%" in by_name(v)["loss_decreased"].detail


def test_loss_rose_is_not_ok_with_the_reason():
    v = judge(signals(first_train_loss=1.2, last_train_loss=1.5))
    assert not v.ok
    check = by_name(v)["loss_decreased"]
    assert not check.ok and "rose" in check.detail and "learning rate" in check.detail
    assert v.summary.startswith("Training did not work: the training loss rose (1.20 → 1.50)")
    nan = judge(signals(last_train_loss=float("nan")))
    assert not nan.ok and "diverged" in by_name(nan)["loss_decreased"].detail


def test_fully_masked_examples_are_flagged():
    v = judge(signals(fully_masked_examples=7))
    check = by_name(v)["no_fully_masked_examples"]
    assert not check.ok and check.severity == "warning"
    assert "7 of 200" in check.detail and "teach nothing" in check.detail and "truncated" in check.detail
    assert v.ok and "But 7 of 200 examples had nothing to learn from" in v.summary
    # Every example masked: nothing was trained at all.
    assert not judge(signals(fully_masked_examples=200)).ok


def test_diverging_validation_is_flagged_as_overfitting():
    v = judge(signals(first_valid_loss=1.9, last_valid_loss=2.6, last_train_loss=0.3))
    check = by_name(v)["validation_follows_training"]
    assert not check.ok and check.severity == "warning" and "overfitting" in check.detail
    assert "overfitting" in v.summary
    # Far above training but falling: still learning, not flagged.
    assert by_name(judge(signals(first_valid_loss=3.5, last_valid_loss=2.6, last_train_loss=0.3)))[
        "validation_follows_training"
    ].ok


def test_unknown_signals_are_skipped_not_failed():
    v = judge(TrainingSignals(None, None, None, None, None, None, 0, 0))
    assert not v.checks and not v.ok and "Cannot tell" in v.summary
    v = judge(signals(first_valid_loss=None, last_valid_loss=None, weights_changed=None, weight_delta_norm=None))
    assert v.ok and set(by_name(v)) == {"loss_decreased", "no_fully_masked_examples"}


def test_weights_unchanged_and_answers_not_better_fail():
    v = judge(signals(weights_changed=False, weight_delta_norm=0.0))
    assert not v.ok and "no update was applied" in by_name(v)["weights_changed"].detail
    same = dict(SUMMARY_BETTER, answers_changed=0)
    assert not by_name(judge(signals(), same))["answers_improved"].ok
    worse = dict(SUMMARY_BETTER, after=dict(SUMMARY_BETTER["after"], rouge_l=0.10, contains=0))
    v = judge(signals(), worse)
    assert not v.ok and "did not get closer to the references" in v.summary
