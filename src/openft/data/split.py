"""Hold out a validation split, keeping rows that share a prompt together.

Many datasets repeat one prompt with several answers (the identity dataset has
500 rows over 52 opening prompts). A row-level split would put the same prompt
on both sides, and the validation loss would measure recall of training data.
So whole groups of `Example.prompt_key` are held out, chosen by a seeded
shuffle: the same data and seed always give the same split.
"""

from __future__ import annotations

import random

from openft.data.types import Example

ADVISED = "10-20% (0.1-0.2) is usual"


def validate_fraction(fraction: float, n_examples: int | None = None) -> list[str]:
    """Raise ValueError when `fraction` is outside [0, 0.5); return advice
    (possibly empty) when it is allowed but unusual."""
    if not isinstance(fraction, (int, float)) or not 0 <= fraction < 0.5:
        raise ValueError(f"validation fraction must be at least 0 and below 0.5, got {fraction!r}; {ADVISED}")
    advice: list[str] = []
    if fraction == 0:
        advice.append(f"no validation split: valid_loss will not be reported and overfitting goes unseen; {ADVISED}")
    elif fraction < 0.05:
        advice.append(f"validation fraction {fraction:g} is small, so valid_loss will be noisy; {ADVISED}")
    elif fraction > 0.3:
        advice.append(f"validation fraction {fraction:g} leaves less data to train on; {ADVISED}")
    if n_examples is not None and fraction > 0 and n_examples < 2:
        advice.append(f"only {n_examples} example(s): nothing can be held out for validation")
    return advice


def split_examples(
    examples: list[Example], fraction: float = 0.1, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Split into (train, validation), about `fraction` of examples held out.

    Groups (by `prompt_key`) are visited in a `random.Random(seed)` shuffle and a
    group is held out when it brings the held-out count closer to
    round(fraction * n). At least one group is held out when there are two or
    more groups and fraction > 0; training always keeps at least one group.
    Both lists keep the input order.
    """
    validate_fraction(fraction)
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.prompt_key, []).append(i)
    keys = list(groups)  # first-seen order: deterministic for a given input
    if fraction == 0 or len(keys) < 2:
        return list(examples), []

    random.Random(seed).shuffle(keys)
    target = round(fraction * len(examples))
    held: set[str] = set()
    count = 0
    for key in keys:
        size = len(groups[key])
        # "Closer" rather than "until reached": one huge group must not swallow
        # the split, and many small ones should land near the target.
        if abs(count + size - target) < abs(count - target):
            held.add(key)
            count += size
    if not held:  # every group is far larger than the target: take the smallest
        held.add(min(keys, key=lambda k: len(groups[k])))

    train = [ex for ex in examples if ex.prompt_key not in held]
    valid = [ex for ex in examples if ex.prompt_key in held]
    return train, valid
