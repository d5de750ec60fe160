"""Hand back the resident pages of weights read from a memory-mapped file.

transformers loads safetensors weights as views of the file's mapping, and
`safe_open(...).get_tensor` returns such views too. Reading one (to convert a
frozen base to bf16, or to put fp32 weights back after training) faults the
file's pages in, and they stay resident, counted in the process's RSS, for as
long as the mapping lives, after the copy made from them is all that is used.
On the Qwen 0.5B built-in that was 2.3 GB on top of the bf16 copy while
training's precision was prepared (peak 4.0 GB for a 1.3 GB model), and again
while the fp32 weights were restored.

`FileMaps.copy` copies such a view a chunk at a time and tells the kernel
after each chunk that this process no longer needs its pages (madvise
MADV_DONTNEED). That is only safe on a mapping that is backed by
a file and not writable: dropped pages are then read again from the file if
anything touches them, so no data is lost; anonymous memory would read back as
zeros, and a written page of a private mapping would lose the write, so
neither is touched.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from pathlib import Path

import torch

MADV_DONTNEED = 4  # from <sys/mman.h>, the same on every Linux architecture


@functools.cache
def _madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


CHUNK_BYTES = 64 << 20  # copied (and its pages dropped) at a time: a 545 MB head never resides twice


def safe_ranges(smaps: str) -> list[tuple[int, int]]:
    """The address ranges of `smaps` (the text of /proc/self/smaps) whose pages can
    be dropped losslessly: mappings backed by a file that are read-only or, if
    writable (transformers maps safetensors files private and writable), have not
    a single page written (`Anonymous: 0 kB`; a written page is this process's own
    copy, and dropping it would undo the write)."""
    out: list[tuple[int, int]] = []
    cur: tuple[int, int] | None = None  # a writable file mapping awaiting its Anonymous line
    for line in smaps.splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
            cur = None
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            if len(head) == 6 and head[5].startswith("/") and not head[5].endswith("(deleted)"):
                if "w" in head[1]:
                    cur = (lo, hi)
                else:
                    out.append((lo, hi))
        elif cur is not None and line.startswith("Anonymous:"):
            if int(line.split()[1]) == 0:
                out.append(cur)
            cur = None
    return out


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The addresses [start, end) of a contiguous tensor's elements."""
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


class FileMaps:
    """This process's droppable file mappings, read once (/proc/self/smaps): valid
    while nothing writes into them, as while a loop converts a model's weights."""

    def __init__(self, smaps: str | None = None):
        if smaps is None:
            try:
                smaps = Path("/proc/self/smaps").read_text()
            except OSError:
                smaps = ""
        self.ranges = safe_ranges(smaps)

    def covers(self, t: torch.Tensor) -> bool:
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0 or _madvise() is None:
            return False
        start, end = _span(t)
        return any(lo <= start and end <= hi for lo, hi in self.ranges)

    def drop(self, t: torch.Tensor) -> int:
        """Drop the resident pages under `t` where that is safe; returns the bytes
        handed back (0 when nothing was)."""
        if not self.covers(t):
            return 0
        start, end = _span(t)
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
        return hi - lo if hi > lo and _madvise()(lo, hi - lo, MADV_DONTNEED) == 0 else 0

    def copy(self, src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """An owned copy of `src` in `dtype`; when `src` lies in a droppable mapping
        it is copied a chunk at a time and each chunk's pages are dropped, so at
        most one chunk of the file is resident beside the copy."""
        if not self.covers(src) or src.dim() == 0:
            return src.to(dtype, copy=True)
        out = torch.empty(src.shape, dtype=dtype)
        rows = max(1, CHUNK_BYTES // max(1, src[0].numel() * src.element_size()))
        for i in range(0, src.shape[0], rows):
            out[i : i + rows].copy_(src[i : i + rows])
            self.drop(src[i : i + rows])
        return out
