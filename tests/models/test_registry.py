from pathlib import Path

import pytest

from openft.models.load import load_model, materialise
from openft.models.registry import BUILTINS, ModelNotFound, builtin_gguf_path, resolve


def test_builtin_resolves_to_the_packaged_gguf():
    src = resolve("smollm2-135m-instruct")
    assert src.kind == "gguf" and src.path.suffix == ".gguf" and src.path.exists()
    assert builtin_gguf_path(BUILTINS["smollm2-135m-instruct"]) == src.path


def test_a_gguf_file_path_is_accepted():
    gguf = builtin_gguf_path(BUILTINS["smollm2-135m-instruct"])
    src = resolve(str(gguf))
    assert src.kind == "gguf" and src.path == gguf.resolve()


def test_local_hf_directory_loads(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    assert loaded.source.kind == "hf_dir" and loaded.path == Path(tiny_model_dir).resolve()
    assert loaded.tokenizer.chat_template and "<|im_start|>" in loaded.tokenizer.chat_template


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelNotFound, match="pickle weights are never loaded"):
        resolve(str(tmp_path))


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve(str(tmp_path))


def test_unknown_name_lists_what_is_accepted():
    with pytest.raises(ModelNotFound, match="not a built-in"):
        resolve("no-such-model")


def test_hub_id_without_a_reachable_hub_says_so(monkeypatch):
    # Offline mode is what "no hub reachable" looks like to huggingface_hub; it
    # also keeps this test from downloading anything where a hub is reachable.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = resolve("SomeOrg/some-model")
    assert src.kind == "hub"
    with pytest.raises(ModelNotFound, match="hub is not reachable"):
        materialise(src)
