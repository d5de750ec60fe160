"""The one atomic-write helper and the one file hash every writer and hasher uses."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys

import pytest

from openft.fileio import CHUNK_BYTES, atomic_dir, atomic_write, sha256_files
from openft.models.load import hash_weights
from openft.train.prepare import file_hash

# A write that fails halfway, for real: the file-size limit (RLIMIT_FSIZE) lets the
# first 1000 bytes reach the disk and refuses the rest with EFBIG.
FAIL_MIDWAY = """
import resource, signal, sys
from openft.fileio import atomic_write
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
try:
    atomic_write(sys.argv[1], "new " * 5000)
except OSError as e:
    print(e.errno)
"""


def test_a_write_that_fails_midway_leaves_the_old_file(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old content")
    proc = subprocess.run([sys.executable, "-c", FAIL_MIDWAY, str(target)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(errno.EFBIG)  # it did fail, mid-write
    assert target.read_text() == "old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temp file left


def test_atomic_write_replaces_text_and_bytes(tmp_path):
    target = tmp_path / "a.json"
    atomic_write(target, "ünïcode\n")
    assert target.read_bytes() == "ünïcode\n".encode()
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01" and os.listdir(tmp_path) == ["a.json"]


def test_atomic_dir_keeps_the_old_folder_when_the_block_raises(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("disk full")
    assert (final / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("new")
    assert [p.name for p in final.iterdir()] == ["weights"] and (final / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no .tmp- or .del- left


def test_hash_streams_and_equals_hashlib_over_a_file_larger_than_a_chunk(tmp_path):
    data = os.urandom(2 * CHUNK_BYTES + 123)
    f = tmp_path / "model.safetensors"
    f.write_bytes(data)
    assert sha256_files([f]) == hashlib.sha256(data).hexdigest()
    assert sha256_files([f], names=True) == hashlib.sha256(b"model.safetensors" + data).hexdigest()
    # The two hashes the lineage records, both through it, with their values unchanged.
    assert hash_weights(tmp_path) == hashlib.sha256(data).hexdigest()
    assert file_hash(f) == file_hash(tmp_path) == hashlib.sha256(b"model.safetensors" + data).hexdigest()
    (tmp_path / "b.jsonl").write_bytes(b"{}\n")
    assert file_hash(tmp_path) == hashlib.sha256(b"b.jsonl{}\nmodel.safetensors" + data).hexdigest()
