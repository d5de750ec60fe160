"""openft.heap: freed training buffers are reused rather than faulted back in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openft.heap import MALLOC_ENV, PRELOADED_ENV, _libc, training_allocator, training_env

PROBE = """
import json, resource, sys, torch
from openft.heap import keep_freed_memory, release_free_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
pieces = [torch.ones(1 << 20) for _ in range(32)]  # the heap grows by 128 MB, every page written
del pieces
before = faults()
y = torch.ones(16 << 20)  # 64 MB
again = faults() - before
del y
release_free_memory()  # still returns the kept pages when asked
print(json.dumps({"took": took, "faults": again}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_libc() is None, reason="glibc only")
def test_kept_heap_reuses_a_freed_buffer_without_page_faults():
    pages = (64 << 20) // 4096
    default, kept = _probe("default"), _probe("keep")
    # glibc's default returns the freed pieces to the OS and maps the 64 MB block
    # afresh, so it faults in again (fewer faults than pages with huge pages).
    assert default["faults"] > 200
    assert kept["took"] is True
    assert kept["faults"] < min(100, pages // 100)


# ------------------------------------------------ the training allocator -----

REEXEC = """
import json, os, sys
print("start", flush=True)
from openft.heap import allocator_in_use, keep_freed_memory, reexec_with_training_allocator
reexec_with_training_allocator()
import torch
x = torch.ones(1 << 22) * 2  # the process runs torch under it
print(json.dumps({"allocator": allocator_in_use(), "preload": os.environ.get("LD_PRELOAD", ""),
                  "kept": keep_freed_memory(), "sum": float(x.sum())}))
"""


def _reexec(env: dict) -> tuple[list[str], dict]:
    out = subprocess.run(
        [sys.executable, "-c", REEXEC],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={k: v for k, v in env.items() if k != PRELOADED_ENV},
    )
    lines = out.stdout.strip().splitlines()
    return lines, {**json.loads(lines[-1]), "stderr": out.stderr}


def test_choosing_the_training_allocator(tmp_path, monkeypatch):
    both, je_only, empty = tmp_path / "both", tmp_path / "je", tmp_path / "empty"
    for d in (both, je_only, empty):
        d.mkdir()
    for d, names in ((both, ["libjemalloc.so.2", "libtcmalloc_minimal.so.4"]), (je_only, ["libjemalloc.so.2"])):
        for n in names:
            (d / n).write_bytes(b"\x7fELF")
    monkeypatch.delenv(MALLOC_ENV, raising=False)
    assert training_allocator([empty, both]) == str(both / "libtcmalloc_minimal.so.4")  # tcmalloc first
    assert training_allocator([je_only]) == str(je_only / "libjemalloc.so.2")
    assert training_allocator([empty]) is None
    monkeypatch.setenv(MALLOC_ENV, "system")
    assert training_allocator([both]) is None
    monkeypatch.setenv(MALLOC_ENV, str(je_only / "libjemalloc.so.2"))
    assert training_allocator([both]) == str(je_only / "libjemalloc.so.2")
    monkeypatch.setenv(MALLOC_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(ValueError, match=r"OPENFT_MALLOC=.*nope\.so: no such file"):
        training_allocator([both])


def test_training_env_preloads_ahead_of_the_users_preload_once(tmp_path, monkeypatch):
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"\x7fELF")
    monkeypatch.delenv(MALLOC_ENV, raising=False)
    lib = str(tmp_path / "libtcmalloc_minimal.so.4")
    env = training_env({"LD_PRELOAD": "/opt/mine.so", "PATH": "/bin"}, dirs=[tmp_path])
    assert env["LD_PRELOAD"] == f"{lib}:/opt/mine.so" and env[PRELOADED_ENV] == lib and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) > 1 << 40
    assert "background_thread:true" in env["MALLOC_CONF"]  # jemalloc's, when it is the one found
    assert training_env({"MALLOC_CONF": "narenas:1"}, dirs=[tmp_path])["MALLOC_CONF"] == "narenas:1"  # the user's wins
    assert training_env(env, dirs=[tmp_path]) == env  # already marked: nothing added twice
    assert training_env({"PATH": "/bin"}, dirs=[]) == {"PATH": "/bin"}  # no allocator: unchanged
    # The choice is read from the environment being built, not this process's.
    assert training_env({MALLOC_ENV: "system"}, dirs=[tmp_path]) == {MALLOC_ENV: "system"}


@pytest.mark.skipif(training_allocator() is None, reason="no tcmalloc/jemalloc here (scripts/install-tcmalloc.sh)")
def test_a_training_process_reexecutes_itself_under_the_allocator_once():
    lib = training_allocator()
    lines, got = _reexec({k: v for k, v in os.environ.items() if k != MALLOC_ENV})
    assert lines.count("start") == 2  # the original process, then its re-executed self; no third
    assert got["allocator"] in ("tcmalloc", "jemalloc") and got["allocator"] in Path(lib).name
    assert got["preload"].split(":")[0] == lib
    assert got["kept"] is False  # glibc's settings do not apply under another allocator
    assert got["sum"] == 2.0 * (1 << 22)


def test_system_malloc_on_request_and_a_refused_library_does_not_loop(tmp_path):
    lines, got = _reexec({**os.environ, MALLOC_ENV: "system"})
    assert lines.count("start") == 1 and got["allocator"] == "system"
    not_a_library = tmp_path / "libfake.so"
    not_a_library.write_text("not an ELF file\n")
    lines, got = _reexec({**os.environ, MALLOC_ENV: str(not_a_library)})
    # The loader refuses it and says so; the run goes on under glibc, re-executed once.
    assert lines.count("start") == 2 and got["allocator"] == "system"
    assert "libfake.so" in got["stderr"]
    assert got["sum"] == 2.0 * (1 << 22)
