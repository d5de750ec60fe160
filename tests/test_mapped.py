"""openft.mapped: weights read through a file mapping hand their pages back, and
nothing that could lose data (anonymous memory, a written private page) is touched."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openft.mapped import FileMaps, safe_ranges

ROWS, COLS = 2048, 1024  # 8 MB of fp32: many whole pages


def rss_file_kb() -> int:
    return int(re.search(r"RssFile:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


@pytest.fixture
def weights(tmp_path) -> tuple[Path, torch.Tensor]:
    w = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "model.safetensors"
    save_file({"w": w}, str(path))
    return path, w


def test_a_copy_from_a_mapped_file_is_equal_and_hands_its_pages_back(weights):
    path, w = weights
    with safe_open(str(path), "pt") as f:
        view = f.get_tensor("w")  # a view of the file's mapping, not yet read
        maps = FileMaps()
        assert maps.covers(view)
        before = rss_file_kb()
        copy = maps.copy(view, torch.bfloat16)
        after = rss_file_kb()
        assert torch.equal(copy, w.to(torch.bfloat16))
        # Read whole, the view would have added its 8 MB; chunk by chunk each chunk
        # was dropped once copied (allow a chunk's worth of slack at the edges).
        assert after - before < (ROWS * COLS * 4 // 1024) // 2
        # Lossless: the dropped pages read back from the file.
        assert torch.equal(view, w)


def test_a_plain_read_of_the_same_view_keeps_its_pages(weights):
    # The control for the test above: the file's pages do stay resident otherwise.
    path, _ = weights
    with safe_open(str(path), "pt") as f:
        view = f.get_tensor("w")
        before = rss_file_kb()
        view.to(torch.bfloat16)
        assert rss_file_kb() - before > (ROWS * COLS * 4 // 1024) // 2


def test_anonymous_memory_is_never_dropped():
    t = torch.randn(ROWS, COLS)
    keep = t.clone()
    maps = FileMaps()
    assert not maps.covers(t)
    assert maps.drop(t) == 0
    assert torch.equal(t, keep)  # MADV_DONTNEED on anonymous memory would have zeroed it
    assert torch.equal(maps.copy(t, torch.float32), keep)


def test_a_written_page_of_a_private_mapping_keeps_the_write(weights):
    path, w = weights
    nbytes = path.stat().st_size
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=nbytes)  # private, writable
    t = torch.empty(0, dtype=torch.uint8).set_(storage)
    maps = FileMaps()
    assert maps.covers(t)  # nothing written yet: every page is the file's
    t[-1] = 7  # this process's own copy of the last page now
    written = FileMaps()
    assert not written.covers(t)
    assert written.drop(t) == 0
    assert int(t[-1]) == 7


SMAPS = """\
7f0000000000-7f0000100000 rw-p 00000000 fe:00 12 /models/a.safetensors
Size:               1024 kB
Anonymous:             0 kB
7f0000100000-7f0000200000 rw-p 00000000 fe:00 13 /models/b.safetensors
Size:               1024 kB
Anonymous:             4 kB
7f0000200000-7f0000300000 r--s 00000000 fe:00 14 /models/c.safetensors
Size:               1024 kB
Anonymous:             0 kB
7f0000300000-7f0000400000 rw-p 00000000 00:00 0
Anonymous:          1024 kB
7f0000400000-7f0000500000 r--p 00000000 fe:00 15 /models/d.safetensors (deleted)
Anonymous:             0 kB
"""


def test_only_file_mappings_without_written_pages_are_droppable():
    assert safe_ranges(SMAPS) == [(0x7F0000000000, 0x7F0000100000), (0x7F0000200000, 0x7F0000300000)]
