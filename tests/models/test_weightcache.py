"""The serving dtype's weights cached on disk (`openft.models.weightcache`): cast
once, then mapped; a changed source is cast again, never served stale; a cache
that cannot be written or read only costs the cast; fp32 and sources already in
the dtype are never copied."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from openft.models import weightcache


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENFT_HOME", str(tmp_path / "home"))
    # Whether the test machine's disk has room is not what these tests are about
    # (a CI disk can be nearly full): the rule has its own test below.
    monkeypatch.setattr(weightcache, "room_for", lambda where, nbytes: True)
    return tmp_path / "home"


def _source(d, seed: int):
    d.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {"a.weight": torch.randn(64, 32, generator=g), "b.ids": torch.arange(5)}
    save_file(tensors, d / "model.safetensors")
    return [d / "model.safetensors"], tensors


def test_cast_once_then_read_back_and_a_changed_source_is_cast_again(home, tmp_path):
    files, tensors = _source(tmp_path / "m", seed=0)
    first = weightcache.load(files, torch.bfloat16)
    weightcache.flush()  # written by a thread of its own: the first load does not wait for it
    where = weightcache.cache_dir(files, torch.bfloat16)
    assert (where / weightcache.WEIGHTS).is_file() and (where / weightcache.SOURCE).is_file()
    assert torch.equal(first["a.weight"], tensors["a.weight"].to(torch.bfloat16))
    assert first["b.ids"].dtype == torch.int64  # only floating tensors are cast
    again = weightcache.load(files, torch.bfloat16)
    assert torch.equal(again["a.weight"], first["a.weight"]) and torch.equal(again["b.ids"], tensors["b.ids"])
    # The source rewritten (another model saved in the same folder): new weights, not the cached ones.
    _, changed = _source(tmp_path / "m", seed=1)
    os.utime(files[0], ns=(1, 1))  # even a file that kept its size and got an old mtime differs in SOURCE
    got = weightcache.load(files, torch.bfloat16)
    weightcache.flush()
    assert torch.equal(got["a.weight"], changed["a.weight"].to(torch.bfloat16))
    assert torch.equal(weightcache.load(files, torch.bfloat16)["a.weight"], got["a.weight"])


def test_a_corrupt_or_unwritable_cache_only_costs_the_cast(home, tmp_path):
    files, tensors = _source(tmp_path / "m", seed=0)
    want = tensors["a.weight"].to(torch.bfloat16)
    weightcache.load(files, torch.bfloat16)
    weightcache.flush()
    where = weightcache.cache_dir(files, torch.bfloat16)
    (where / weightcache.WEIGHTS).write_bytes(b"not safetensors")  # SOURCE still says it is current
    assert torch.equal(weightcache.load(files, torch.bfloat16)["a.weight"], want)
    weightcache.flush()
    assert torch.equal(weightcache.load(files, torch.bfloat16)["a.weight"], want)  # and it was rewritten
    other, t2 = _source(tmp_path / "n", seed=2)
    blocked = weightcache.cache_dir(other, torch.bfloat16)
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("a file where the cache folder would go")
    assert torch.equal(weightcache.load(other, torch.bfloat16)["a.weight"], t2["a.weight"].to(torch.bfloat16))
    weightcache.flush()  # the blocked write fails in its thread, logged, and nothing else happens


def test_a_write_that_fails_midway_leaves_no_cache_and_still_serves(home, tmp_path, monkeypatch):
    files, tensors = _source(tmp_path / "m", seed=0)

    def full_disk(state, path):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weightcache, "write_safetensors", full_disk)
    got = weightcache.load(files, torch.bfloat16)
    weightcache.flush()
    assert torch.equal(got["a.weight"], tensors["a.weight"].to(torch.bfloat16))
    where = weightcache.cache_dir(files, torch.bfloat16)
    assert sorted(p.name for p in where.iterdir()) == []  # no SOURCE, no half-written weights


def test_no_cache_where_it_would_leave_the_disk_nearly_full(home, tmp_path, monkeypatch):
    files, tensors = _source(tmp_path / "m", seed=0)
    monkeypatch.setattr(weightcache, "room_for", lambda where, nbytes: False)
    got = weightcache.load(files, torch.bfloat16)
    weightcache.flush()
    assert torch.equal(got["a.weight"], tensors["a.weight"].to(torch.bfloat16))
    assert not (weightcache.cache_dir(files, torch.bfloat16) / weightcache.WEIGHTS).exists()


@pytest.mark.parametrize(
    ("free_gib", "cache_gib", "room"),
    [
        (100, 1, True),
        (10, 2, True),
        (10, 2.5, False),
        (2, 0.4, True),
        (2, 0.5, False),
        (1.2, 0.1, True),
        (1.05, 0.1, False),
    ],
)
def test_the_cache_takes_at_most_a_fifth_of_the_free_space_and_leaves_1_gib(
    monkeypatch, tmp_path, free_gib, cache_gib, room
):
    gib = 1 << 30
    usage = shutil.disk_usage(tmp_path)._replace(total=4000 * gib, free=int(free_gib * gib))
    monkeypatch.setattr(weightcache.shutil, "disk_usage", lambda where: usage)
    assert weightcache.room_for(tmp_path, int(cache_gib * gib)) is room


def test_fp32_and_sources_already_in_the_dtype_are_not_copied(home, tmp_path):
    files, tensors = _source(tmp_path / "m", seed=0)
    assert torch.equal(weightcache.load(files, torch.float32)["a.weight"], tensors["a.weight"])
    save_file({"a.weight": tensors["a.weight"].to(torch.bfloat16)}, tmp_path / "m" / "model.safetensors")
    assert weightcache.load(files, torch.bfloat16)["a.weight"].dtype == torch.bfloat16
    assert not (home / "cache").exists()


def test_a_served_model_from_the_cache_gives_the_same_logits(home, tiny_model_dir):
    from openft.models import decoder

    ids = torch.tensor([[1, 5, 9, 14, 3]])
    cold = decoder.load(tiny_model_dir, torch.bfloat16)
    weightcache.flush()
    assert any(weightcache.cache_dir(sorted(tiny_model_dir.glob("*.safetensors")), torch.bfloat16).iterdir())
    warm = decoder.load(tiny_model_dir, torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(cold(ids, use_cache=False).logits, warm(ids, use_cache=False).logits)
    assert next(warm.parameters()).dtype == torch.bfloat16


def test_a_removed_model_takes_its_cache_with_it_and_others_stay(home, tmp_path):
    (tmp_path / "run").mkdir()
    mine, _ = _source(tmp_path / "run" / "model", seed=0)
    other, _ = _source(tmp_path / "other", seed=1)
    gone, _ = _source(tmp_path / "gone", seed=2)
    for files in (mine, other, gone):
        weightcache.load(files, torch.bfloat16)
    shutil.rmtree(tmp_path / "gone")  # a source deleted behind openft's back
    (weightcache.cache_dir(other, torch.bfloat16).parent / "half-written").mkdir()  # no SOURCE
    assert weightcache.drop_for(tmp_path / "run") == 3
    left = list((home / "cache" / "weights").iterdir())
    assert left == [weightcache.cache_dir(other, torch.bfloat16)]
    assert weightcache.drop_for(None) == 0  # nothing stale left; the live cache stays


def test_the_first_load_serves_the_cast_weights_while_the_cache_is_written(home, tmp_path, monkeypatch):
    files, tensors = _source(tmp_path / "m", seed=0)
    release, started = threading.Event(), threading.Event()
    real = weightcache.write_safetensors

    def slow_disk(state, path):
        started.set()
        assert release.wait(60)
        real(state, path)

    monkeypatch.setattr(weightcache, "write_safetensors", slow_disk)
    # Loaded from a daemon thread, as the serving engine's: the write must still not be
    # a daemon (threads inherit it), or the process's exit would cut it short.
    out: dict = {}
    loader = threading.Thread(target=lambda: out.update(weightcache.load(files, torch.bfloat16)), daemon=True)
    loader.start()
    loader.join()  # returned with the write still blocked
    got = out
    assert started.wait(60)
    writers = [t for t in threading.enumerate() if t.name == "weightcache-write"]
    assert writers and not any(t.daemon for t in writers)
    where = weightcache.cache_dir(files, torch.bfloat16)
    assert torch.equal(got["a.weight"], tensors["a.weight"].to(torch.bfloat16))
    assert not (where / weightcache.SOURCE).exists()  # not yet trusted: a second load casts again
    release.set()
    weightcache.flush()
    assert json.loads((where / weightcache.SOURCE).read_text()) == weightcache.source_of(files)
    assert torch.equal(weightcache.load(files, torch.bfloat16)["a.weight"], got["a.weight"])


def test_a_write_cut_short_leaves_a_temp_that_the_next_write_removes(home, tmp_path):
    files, _ = _source(tmp_path / "m", seed=0)
    where = weightcache.cache_dir(files, torch.bfloat16)
    where.mkdir(parents=True)
    killed, live = where / ".weights.killed.tmp", where / ".weights.live.tmp"
    killed.write_bytes(b"half a model")
    live.write_bytes(b"another process writing now")
    old = time.time() - weightcache.STALE_TMP_S - 5
    os.utime(killed, (old, old))
    weightcache.load(files, torch.bfloat16)
    weightcache.flush()
    assert not killed.exists() and live.exists()
    assert (where / weightcache.WEIGHTS).is_file()
