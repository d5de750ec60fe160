"""The real public datasets in ../shared/datasets (skipped where absent)."""

from __future__ import annotations

import pytest

from openft.data.load import load_dataset
from openft.data.split import split_examples


@pytest.mark.parametrize("name,rows", [("alpaca_en_demo.json", 999), ("alpaca_zh_demo.json", 1000)])
def test_alpaca_demos_load_cleanly(shared_datasets, name, rows):
    r = load_dataset(shared_datasets / name)
    assert r.errors == [] and r.ok
    assert r.layout == "alpaca" and r.records == rows and len(r.examples) == rows
    assert all(e.messages[-1].role == "assistant" for e in r.examples)


def test_identity_conversations_load_as_sharegpt(shared_datasets):
    r = load_dataset(shared_datasets / "identity_conversations.json")
    assert r.errors == [] and r.ok and r.layout == "sharegpt" and len(r.examples) == 500
    assert r.examples[0].messages[0].content == "Who are you?"
    assert len({e.prompt_key for e in r.examples}) == 52


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identity_split_keeps_opening_prompts_apart(shared_datasets, seed):
    r = load_dataset(shared_datasets / "identity_conversations.json")
    train, valid = split_examples(r.examples, 0.1, seed=seed)
    opening = lambda e: e.messages[0].content.strip()  # noqa: E731
    assert not {opening(e) for e in train} & {opening(e) for e in valid}
    assert 30 <= len(valid) <= 70
