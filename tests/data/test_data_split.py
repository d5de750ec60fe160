"""The validation split: seeded, deterministic, whole prompt groups per side."""

from __future__ import annotations

import random

import pytest

from openft.data.split import split_examples, validate_fraction
from openft.data.types import Example, Location, Message


def make(prompt: str, answer: str, i: int = 0) -> Example:
    return Example(
        messages=[Message("user", prompt), Message("assistant", answer)], where=Location("f.jsonl", line=i + 1)
    )


def grouped_dataset(seed: int) -> list[Example]:
    """Prompts repeated 1-15 times with different answers, shuffled."""
    rng = random.Random(seed)
    rows = [make(f"prompt {p}", f"answer {p}.{k}") for p in range(40) for k in range(rng.randint(1, 15))]
    rng.shuffle(rows)
    return rows


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.3])
def test_shared_prompts_never_cross_and_fraction_roughly_holds(seed, fraction):
    rows = grouped_dataset(seed)
    train, valid = split_examples(rows, fraction, seed=seed)
    assert len(train) + len(valid) == len(rows)
    assert not {e.prompt_key for e in train} & {e.prompt_key for e in valid}
    assert valid and train
    # whole groups are at most 15 rows, so the target is met within one group
    assert abs(len(valid) - round(fraction * len(rows))) <= 15


def test_deterministic_and_seeded():
    rows = grouped_dataset(0)
    a = split_examples(rows, 0.2, seed=1)
    assert a == split_examples(rows, 0.2, seed=1)
    assert a[1] != split_examples(rows, 0.2, seed=2)[1]


def test_unique_prompts_split_exactly_and_keep_order():
    rows = [make(f"p{i}", "a", i) for i in range(100)]
    train, valid = split_examples(rows, 0.1, seed=3)
    assert len(valid) == 10 and len(train) == 90
    assert valid == sorted(valid, key=lambda e: e.where.line)


def test_small_datasets():
    one_group = [make("same", f"a{i}") for i in range(5)]
    assert split_examples(one_group, 0.2) == (one_group, [])
    two = [make("p1", "a"), make("p2", "b")]
    train, valid = split_examples(two, 0.1)  # round(0.2) == 0, but two groups: hold out one
    assert len(train) == 1 and len(valid) == 1
    assert split_examples(two, 0.0) == (two, [])
    assert split_examples([], 0.1) == ([], [])


def test_one_huge_group_does_not_swallow_the_split():
    rows = [make("big", f"a{i}") for i in range(90)] + [make(f"p{i}", "a") for i in range(10)]
    for seed in range(10):
        train, valid = split_examples(rows, 0.1, seed=seed)
        assert len(valid) == 10


def test_validate_fraction():
    for bad in (-0.1, 0.5, 0.9, "0.1"):
        with pytest.raises(ValueError, match="10-20%"):
            validate_fraction(bad)
    with pytest.raises(ValueError):
        split_examples([make("a", "b")], 0.5)
    assert validate_fraction(0.1) == [] and validate_fraction(0.2) == []
    assert "10-20%" in validate_fraction(0)[0]
    assert "noisy" in validate_fraction(0.01)[0]
    assert "less data" in validate_fraction(0.4)[0]
    assert any("nothing can be held out" in m for m in validate_fraction(0.1, n_examples=1))


def test_text_examples_group_by_text():
    rows = [Example(text=f"doc {i % 5}") for i in range(20)]
    train, valid = split_examples(rows, 0.2, seed=0)
    assert len(valid) == 4 and not {e.text for e in train} & {e.text for e in valid}
