"""`openft models add / list / remove`: the operator's registry of base models by
name (what callers of the API may name), as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def openft(*args: str, home: Path, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENFT_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "openft.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    if check:
        assert proc.returncode == 0, f"openft {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
    return proc


def test_add_list_remove(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    added = openft("models", "add", str(tiny_model_dir), "--name", "tiny", home=home, check=True)
    assert "Registered tiny" in added.stdout
    listed = openft("models", "list", home=home, check=True).stdout
    assert "Registered models" in listed and "tiny" in listed and str(tiny_model_dir) in listed
    stored = json.loads((home / "registered_models.json").read_text())["models"]
    assert stored["tiny"]["kind"] == "hf_dir" and stored["tiny"]["path"] == str(tiny_model_dir.resolve())
    again = openft("models", "add", str(tiny_model_dir), "--name", "tiny", home=home)
    assert again.returncode == 1 and "already registered" in again.stderr
    assert "Removed tiny" in openft("models", "remove", "tiny", home=home, check=True).stdout
    assert "tiny " not in openft("models", "list", home=home, check=True).stdout
    gone = openft("models", "remove", "tiny", home=home)
    assert gone.returncode == 1 and "no registered model named 'tiny'" in gone.stderr
    assert tiny_model_dir.joinpath("config.json").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-config", "no config.json"),
        ("pickle-only", "found pytorch_model.bin: pickle weights are never loaded"),
        ("not-gguf", "not a GGUF file"),
        ("missing", "no such file or directory"),
    ],
)
def test_add_refuses_what_is_not_a_safe_model(tmp_path, tiny_model_dir, case, message):
    path = tmp_path / case
    if case == "no-config":
        path.mkdir()
    elif case == "pickle-only":
        shutil.copytree(tiny_model_dir, path)
        for f in path.glob("*.safetensors"):
            f.unlink()
        (path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif case == "not-gguf":
        path = tmp_path / "model.gguf"
        path.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    proc = openft("models", "add", str(path), "--name", "x", home=tmp_path / "home")
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "home" / "registered_models.json").exists()


def test_add_refuses_a_bad_name(tmp_path, tiny_model_dir):
    proc = openft("models", "add", str(tiny_model_dir), "--name", "org/name", home=tmp_path / "home")
    assert proc.returncode == 1 and "model name 'org/name'" in proc.stderr
