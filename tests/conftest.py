"""Shared fixtures: an isolated OPENFT_HOME and a tiny random model of the
built-in's architecture (real tokenizer and chat template, 2 small layers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
if not SHARED_DATASETS.exists():  # CI clones main into another folder, shared/ beside it
    SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _ieee_floats():
    """Each test starts with denormals honoured. openft.models.load.setup_torch
    flushes them (for training and decoding speed) in the thread that calls it, and
    hypothesis refuses to draw floats in a thread left that way by an earlier test."""
    import torch

    torch.set_flush_denormal(False)


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    # Reuse the user's converted-model cache when tests run under `make test`
    # (OPENFT_HOME set), so the 30 s GGUF conversion happens once per machine.
    base = os.environ.get("OPENFT_HOME")
    path = Path(base) if base else tmp_path_factory.mktemp("openft-home")
    os.environ["OPENFT_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(session_home, tmp_path_factory) -> Path:
    from openft.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def shared_datasets() -> Path:
    if not SHARED_DATASETS.exists():
        pytest.skip("../shared/datasets is not present (a user's fresh clone)")
    return SHARED_DATASETS
