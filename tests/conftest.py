"""Shared fixtures: an isolated OPENFT_HOME and a tiny random model of the
built-in's architecture (real tokenizer and chat template, 2 small layers)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
if not SHARED_DATASETS.exists():  # CI clones main into another folder, shared/ beside it
    SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


# Disk: a whole run's folders add up to ~8 GB, more than some CI disks have free. pytest
# removes a passed test's tmp_path (pyproject: tmp_path_retention_policy = "failed"); these
# hooks do the same for the folders a module- or class-scoped fixture makes with
# tmp_path_factory.mktemp, once that fixture is torn down. Session fixtures keep theirs.
_making: list[list[Path]] = []  # one list per fixture being set up, innermost last
_made: dict[int, list[Path]] = {}  # id(fixturedef) -> folders it made


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    _making.append([])
    try:
        yield
    finally:
        made = _making.pop()
        if fixturedef.scope in ("module", "class", "package") and made:
            _made.setdefault(id(fixturedef), []).extend(made)


def pytest_fixture_post_finalizer(fixturedef, request):
    for path in _made.pop(id(fixturedef), []):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _track_mktemp(tmp_path_factory):
    real = tmp_path_factory.mktemp

    def mktemp(basename: str, numbered: bool = True) -> Path:
        path = real(basename, numbered)
        if _making:
            _making[-1].append(path)
        return path

    tmp_path_factory.mktemp = mktemp
    yield
    tmp_path_factory.mktemp = real


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


# Qwen2.5's own chat template (read from the Qwen2.5-Coder GGUF's tokenizer.chat_template):
# the tool-calling template of the tool tests.
QWEN_TOOL_TEMPLATE = Path(__file__).resolve().parent / "fixtures" / "qwen2.5_chat_template.jinja"


@pytest.fixture(scope="session")
def qwen_tool_template() -> str:
    return QWEN_TOOL_TEMPLATE.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tool_tokenizer(tiny_model_dir, qwen_tool_template):
    """The tiny model's tokenizer (ChatML tokens) with Qwen2.5's tool-calling template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = qwen_tool_template
    return tok


@pytest.fixture(scope="session")
def tiny_tool_model_dir(tool_tokenizer, tmp_path_factory) -> Path:
    """A tiny random qwen2 model whose tokenizer carries Qwen2.5's tool template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("tiny-qwen2-tools")
    config = Qwen2Config(
        vocab_size=len(tool_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.1,  # as build_tiny_model's: at 0.02 LoRA barely moves the loss
        bos_token_id=tool_tokenizer.bos_token_id,
        eos_token_id=tool_tokenizer.eos_token_id,
        pad_token_id=tool_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tool_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def pg_cluster():
    """A real PostgreSQL server for the session (tests/pgserver.py), removed at the end."""
    from pgserver import PgCluster, unavailable

    why = unavailable()
    if why:
        pytest.skip(why)
    with PgCluster() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """The same store test on both engines: a new SQLite file, or a new PostgreSQL database."""
    import secrets

    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'openft.db'}"
    return request.getfixturevalue("pg_cluster").create_database(f"t_{secrets.token_hex(6)}")
