"""Say in plain words whether a fine-tuning run worked, and if not, why.

A user who sees "loss 0.83" cannot tell whether that is good. The verdict turns
what a run recorded (losses, whether the weights moved, how many examples had
nothing to learn) and, when there is one, the before/after comparison into a list
of checks and one sentence. Every check that fails says what it means and what to
try. A check whose inputs were not recorded (None) is skipped, never failed.

Checks are errors or warnings: an error means training did not do its job (loss
did not fall, weights did not move, answers did not improve); a warning means it
did, with a caveat (overfitting, some examples wasted). `Verdict.ok` is False only
for errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# The training loss must fall by at least this fraction: first and last losses are
# single noisy batch losses, so a drop of a few tenths of a percent is noise.
MIN_LOSS_DROP = 0.01
# Validation diverges from training when it ends above 1.5x the training loss plus
# 0.5 nats (the constant keeps near-zero training losses from tripping it) AND it
# is rising; or when it rose by more than 10% while the training loss fell.
DIVERGE_RATIO = 1.5
DIVERGE_OFFSET = 0.5
VALID_RISE = 0.10
# The comparison's mean score (similarity or rouge-L, 0..1) must rise by this much
# for the answers to count as better: smaller changes are wording noise.
ANSWER_MARGIN = 0.01


@dataclass
class TrainingSignals:
    first_train_loss: float | None
    last_train_loss: float | None
    first_valid_loss: float | None
    last_valid_loss: float | None
    weights_changed: bool | None  # adapter/weights differ from the initial ones
    weight_delta_norm: float | None
    fully_masked_examples: int  # examples with no trained token (all labels masked)
    total_examples: int


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    severity: Literal["error", "warning"] = "error"


@dataclass
class Verdict:
    ok: bool
    checks: list[Check]
    summary: str


def judge(signals: TrainingSignals, comparison_summary: dict | None = None) -> Verdict:
    """Run every check whose inputs exist; `comparison_summary` is
    `Comparison.summary` from `openft.eval.compare`."""
    results = [
        _loss_check(signals),
        _validation_check(signals),
        _weights_check(signals),
        _masked_check(signals),
        _answers_check(comparison_summary) if comparison_summary else None,
    ]
    results = [r for r in results if r is not None]
    checks = [c for c, _ in results]
    if not checks:
        return Verdict(False, [], "Cannot tell whether training worked: no losses, weights or answers were recorded.")
    ok = not any(not c.ok and c.severity == "error" for c in checks)
    passed = [clause for c, clause in results if c.ok and clause]
    failed = [clause for c, clause in results if not c.ok and c.severity == "error"]
    warned = [clause for c, clause in results if not c.ok and c.severity == "warning"]
    if ok:
        summary = "Training worked: " + _join(passed) + "." if passed else "Training worked."
        if warned:
            summary += " But " + _join(warned) + "."
    else:
        summary = "Training did not work: " + _join(failed) + "."
        if warned:
            summary += " Also, " + _join(warned) + "."
    return Verdict(ok=ok, checks=checks, summary=summary)


def _join(clauses: list[str]) -> str:
    if len(clauses) <= 1:
        return "".join(clauses)
    return ", ".join(clauses[:-1]) + ", and " + clauses[-1]


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


# Each check returns (Check, clause): the Check's detail is a full explanation;
# the clause is the few words the one-sentence summary is built from.


def _loss_check(s: TrainingSignals) -> tuple[Check, str] | None:
    first, last = s.first_train_loss, s.last_train_loss
    if first is None or last is None:
        return None
    if not (_finite(first) and _finite(last)):
        detail = (
            f"the training loss became {last} (it was {first}): training diverged. "
            "Lower the learning rate, or check the data for empty or broken examples."
        )
        return Check("loss_decreased", False, detail), f"the training loss became {last}"
    change = (last - first) / first if first else 0.0
    if last < first and -change >= MIN_LOSS_DROP:
        detail = f"the training loss fell from {first:.2f} to {last:.2f} ({change:+.0%})."
        return Check("loss_decreased", True, detail), f"loss fell from {first:.2f} to {last:.2f}"
    verb = "rose" if last > first else "barely moved"
    detail = (
        f"the training loss {verb}: {first:.2f} → {last:.2f} ({change:+.0%}), so the model did not learn "
        "the data. Try a higher learning rate or more epochs; if the loss rose, the learning rate may be too high."
    )
    return Check("loss_decreased", False, detail), f"the training loss {verb} ({first:.2f} → {last:.2f})"


def _weights_check(s: TrainingSignals) -> tuple[Check, str] | None:
    changed = s.weights_changed
    if changed is None and s.weight_delta_norm is not None:
        changed = s.weight_delta_norm > 0
    if changed is None:
        return None
    norm = f" (‖Δ‖ = {s.weight_delta_norm:.3g})" if s.weight_delta_norm is not None else ""
    if changed:
        return Check("weights_changed", True, f"the trained weights moved away from their initial values{norm}."), (
            "the weights changed"
        )
    detail = (
        f"the trained weights are identical to their initial values{norm}: no update was applied. "
        "Check that the learning rate is above zero, that some parameters are trainable, "
        "and that examples have trained (unmasked) tokens."
    )
    return Check("weights_changed", False, detail), "the weights never changed"


def _masked_check(s: TrainingSignals) -> tuple[Check, str] | None:
    if s.total_examples <= 0:
        return None
    n, total = s.fully_masked_examples, s.total_examples
    if n == 0:
        # Passing, it is not worth a clause in the one-sentence summary.
        return Check("no_fully_masked_examples", True, f"all {total} examples have trained tokens."), ""
    why = (
        f"{n} of {total} training examples have no trained token (every label is masked), so they teach "
        "nothing while still costing time. Most likely the prompt fills the maximum length and the answer "
        "was truncated away: raise the maximum sequence length or shorten those examples."
    )
    # All of them masked means nothing was trained at all: an error, not a caveat.
    severity = "error" if n >= total else "warning"
    return Check("no_fully_masked_examples", False, why, severity), (
        f"{n} of {total} examples had nothing to learn from (probably truncated by the maximum length)"
    )


def _validation_check(s: TrainingSignals) -> tuple[Check, str] | None:
    train, valid, first_valid = s.last_train_loss, s.last_valid_loss, s.first_valid_loss
    if not (_finite(train) and _finite(valid)):
        return None
    rising = first_valid is None or valid > first_valid
    gap = valid > DIVERGE_RATIO * train + DIVERGE_OFFSET
    rose_a_lot = (
        _finite(first_valid)
        and valid > first_valid * (1 + VALID_RISE)
        and _finite(s.first_train_loss)
        and train < s.first_train_loss
    )
    if (gap and rising) or rose_a_lot:
        start = f" (from {first_valid:.2f})" if _finite(first_valid) else ""
        detail = (
            f"the validation loss ended at {valid:.2f}{start} while the training loss ended at {train:.2f}: "
            "the model is memorising the training examples rather than learning what generalises (overfitting). "
            "Use fewer epochs, a lower learning rate, or more data, and prefer an earlier checkpoint."
        )
        return Check("validation_follows_training", False, detail, "warning"), (
            f"the validation loss ({valid:.2f}) drifted away from the training loss ({train:.2f}), a sign of overfitting"
        )
    detail = f"the validation loss ({valid:.2f}) stayed close to the training loss ({train:.2f})."
    return Check("validation_follows_training", True, detail), f"validation loss followed it ({valid:.2f})"


def _answers_check(summary: dict) -> tuple[Check, str] | None:
    n = summary.get("questions", 0)
    if not n:
        return None
    changed = summary.get("answers_changed", 0)
    if changed == 0:
        detail = (
            f"the fine-tuned model gave exactly the base model's answer to all {n} questions: "
            "training had no visible effect. Train longer or with a higher learning rate."
        )
        return Check("answers_improved", False, detail), "the fine-tuned model answers exactly like the base model"
    metric = summary.get("metric")
    if metric is None:  # no references: all we can say is that the answers changed
        detail = (
            f"the fine-tuned model answers differently on {changed} of {n} questions (no references to score against)."
        )
        return Check("answers_improved", True, detail), f"the answers changed on {changed} of {n} questions"
    before, after = summary["before"], summary["after"]
    k = summary["with_reference"]
    scores = f"contains {after['contains']}/{k} vs {before['contains']}/{k}"
    label = "similarity" if metric == "similarity" else "ROUGE-L"
    scores += f", {label} {before[metric]:.2f} → {after[metric]:.2f}"
    moved = f"{summary['improved']} better, {summary['worse']} worse"
    if after[metric] > before[metric] + ANSWER_MARGIN:
        detail = f"the fine-tuned model's answers match the references better ({scores}; {moved})."
        return Check("answers_improved", True, detail), (
            f"the fine-tuned model's answers match the references better ({scores})"
        )
    detail = (
        f"the fine-tuned model's answers do not match the references better ({scores}; {moved}). "
        "If the losses look right, the question set may ask about things the training data does not teach."
    )
    return Check("answers_improved", False, detail), f"the answers did not get closer to the references ({scores})"
