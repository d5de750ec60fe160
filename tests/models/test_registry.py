import shutil
from pathlib import Path

import pytest
import torch

from openft.models.load import is_materialised, load_model, materialise
from openft.models.registry import (
    BUILTINS,
    ModelNotFound,
    ModelSource,
    add,
    builtin_gguf_path,
    pickle_files,
    registered,
    remove,
    resolve,
    resolve_name,
    unknown_name,
)


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


# ---------------------------------------------------------------- pickle detection


@pytest.mark.parametrize("name", ["pytorch_model.bin", "w.pt", "w.pth", "w.pkl", "w.pickle", "last.ckpt", "W.PT"])
def test_every_pickle_suffix_is_detected(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
    assert pickle_files(tmp_path) == [name]


def test_safetensors_bytes_under_a_pickle_suffix_and_other_files_are_not_pickles(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.bin"))  # safetensors content, .bin name
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub.bin").mkdir()  # a folder is no weights file
    assert pickle_files(tmp_path) == []


def test_the_three_callers_name_the_same_pickles(tmp_path, tiny_model_dir):
    """The registry (CLI paths and `models add`) and the engine's adapter reader use one detector."""
    from openft.models.load import load_model
    from openft.serve.engine import EngineError
    from openft.serve.engine_lora import read_adapter

    names = ["a.ckpt", "b.pickle", "c.pth"]
    for n in names:
        (tmp_path / n).write_bytes(b"\x80\x04")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
    found = ", ".join(names)
    with pytest.raises(ModelNotFound, match=f"found {found}: pickle weights are never loaded"):
        resolve(str(tmp_path))
    with pytest.raises(ModelNotFound, match=f"found {found}"):
        add(tmp_path, "pickled")
    model = load_model(str(tiny_model_dir)).model
    with pytest.raises(EngineError, match=f"found {found}") as e:
        read_adapter(tmp_path, model)
    assert e.value.code == "adapter_invalid"


def test_a_model_folder_whose_adapter_is_a_pickle_is_refused(tmp_path, tiny_model_dir):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    (tmp_path / "m" / "adapter_config.json").write_text("{}")
    (tmp_path / "m" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelNotFound, match="adapter_model.bin: pickle weights are never loaded"):
        resolve(str(tmp_path / "m"))


# ---------------------------------------------------------------- registered models


@pytest.fixture
def own_home(tmp_path, monkeypatch, tiny_model_dir):  # after the session fixtures have set OPENFT_HOME
    home = tmp_path / "home"
    monkeypatch.setenv("OPENFT_HOME", str(home))
    return home


def test_add_list_resolve_and_remove_a_registered_directory(own_home, tiny_model_dir):
    m = add(tiny_model_dir, "tiny-base")
    assert m.kind == "hf_dir" and Path(m.path) == Path(tiny_model_dir).resolve()
    assert list(registered()) == ["tiny-base"]
    for resolver in (resolve, resolve_name):
        src = resolver("tiny-base")
        assert (src.name, src.kind, src.path) == ("tiny-base", "hf_dir", Path(tiny_model_dir).resolve())
    # the registry is one JSON file, replaced whole: no temp file is left beside it
    assert sorted(p.name for p in own_home.iterdir() if "registered" in p.name) == ["registered_models.json"]
    assert remove("tiny-base").name == "tiny-base"
    assert registered() == {}
    with pytest.raises(ModelNotFound):
        resolve_name("tiny-base")
    assert Path(tiny_model_dir, "config.json").exists()  # removing a name leaves the files


def test_a_registered_gguf_is_checked_by_its_magic_bytes(own_home, tmp_path):
    gguf = builtin_gguf_path(BUILTINS["smollm2-135m-instruct"])
    m = add(gguf, "smol")
    assert m.kind == "gguf"
    # converted into a folder of its own, never another model's cache (a merged run's, a path's)
    assert m.source().cache_dir.name == "registered--smol" and resolve("smol").cache_dir == m.source().cache_dir
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"\x80\x04 a pickle named .gguf")
    with pytest.raises(ModelNotFound, match="not a GGUF file"):
        add(fake, "fake")
    assert list(registered()) == ["smol"]


@pytest.mark.parametrize("name", ["", "a/b", "ft:x", "../up", ".hidden", "x" * 65, "smollm2-135m-instruct"])
def test_bad_or_taken_names_are_refused(own_home, tiny_model_dir, name):
    with pytest.raises(ValueError, match="model name"):
        add(tiny_model_dir, name)
    assert registered() == {}


def test_a_name_is_not_silently_repointed(own_home, tiny_model_dir, tmp_path):
    add(tiny_model_dir, "base")
    other = shutil.copytree(tiny_model_dir, tmp_path / "other")
    with pytest.raises(FileExistsError, match="already registered"):
        add(other, "base")
    assert Path(registered()["base"].path) == Path(tiny_model_dir).resolve()


def test_a_missing_path_cannot_be_added(own_home, tmp_path):
    with pytest.raises(FileNotFoundError):
        add(tmp_path / "nothing", "x")


def test_names_only_over_http_one_answer_whatever_is_on_disk(own_home, tmp_path, tiny_model_dir):
    """resolve_name never looks at the file system: a real model folder, a folder without
    config.json, a file, a missing path and a hub id all get the same message shape."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    names = [str(tiny_model_dir), str(tmp_path / "empty"), str(tmp_path / "file.txt"), str(tmp_path / "none")]
    names += ["SomeOrg/some-model", "no-such-model"]
    for name in names:
        with pytest.raises(ModelNotFound) as e:
            resolve_name(name)
        assert str(e.value) == unknown_name(name)
    assert not (own_home / "models").exists() or not any((own_home / "models").iterdir())


def test_a_cached_conversion_of_another_gguf_is_not_reused(own_home, tmp_path):
    """A registered GGUF converts into models/<name>; a name removed and added again for
    another file must not be served the first file's weights."""
    src = ModelSource(name="n", kind="gguf", path=tmp_path / "b.gguf")
    cache = src.cache_dir
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{}")
    (cache / "model.safetensors").write_bytes(b"")
    (cache / "SOURCE").write_text(f"{tmp_path / 'a.gguf'}\n")
    assert not is_materialised(src)
    (cache / "SOURCE").write_text(f"{tmp_path / 'b.gguf'}\n")
    assert is_materialised(src)


def test_the_same_gguf_through_a_linked_folder_is_the_same_conversion(own_home, tmp_path):
    """A second home whose builtins folder links to the first's names the same GGUF by
    another path: its conversion is reused, not redone (before, two such homes
    converted a shared cache back and forth, 60 s each time for the Qwen built-in)."""
    real = tmp_path / "builtins"
    real.mkdir()
    (real / "b.gguf").write_bytes(b"GGUF")
    (tmp_path / "linked").symlink_to(real, target_is_directory=True)
    src = ModelSource(name="n", kind="gguf", path=tmp_path / "linked" / "b.gguf")
    cache = src.cache_dir
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{}")
    (cache / "model.safetensors").write_bytes(b"")
    (cache / "SOURCE").write_text(f"{real / 'b.gguf'}\n")
    assert is_materialised(src)
    (real / "c.gguf").write_bytes(b"GGUF")
    (cache / "SOURCE").write_text(f"{real / 'c.gguf'}\n")
    assert not is_materialised(src)
