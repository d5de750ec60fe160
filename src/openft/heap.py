"""The few calls openft makes to glibc's allocator (no-ops without glibc).

PyTorch's CPU tensors come from malloc. glibc serves big requests (above a
threshold that adapts up to 32 MB) with fresh mmaps and unmaps them on free,
and trims the heap's top once 128 KB+ is free there: memory goes back to the
OS eagerly and every reuse faults it in again, zeroed page by page.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_MAX = 32 << 20  # glibc's ceiling for the mmap threshold on 64-bit
TRIM_NEVER = 1 << 30  # more than training ever frees at the heap's top


@functools.cache
def _libc():
    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.mallopt, lib.malloc_trim  # noqa: B018 - both must exist (glibc)
        return lib
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Keep freed blocks in the heap for reuse instead of unmapping them.

    A training step allocates and frees the same activation buffers every
    micro-batch (hundreds of MB for the built-in); with glibc's defaults each
    step faulted ~25-30k pages back in (`benchmarks/heap_ab.py`). Peak memory
    is unchanged: the same buffers are reused instead of returned and
    re-requested. Blocks over 32 MB still come from the heap once it has grown
    past them (after the first micro-batch), since only a request the heap
    cannot serve goes to mmap. For processes that live to
    train (the CLI, a job's worker), not for the server, whose idle footprint
    should shrink after a burst. Returns whether the setting took."""
    lib = _libc()
    if lib is None:
        return False
    return bool(lib.mallopt(M_MMAP_THRESHOLD, MMAP_MAX)) and bool(lib.mallopt(M_TRIM_THRESHOLD, TRIM_NEVER))


def release_free_memory() -> None:
    """Hand free heap pages back to the OS (malloc_trim; ~2 ms here).

    A serving batch's KV cache, activations and widened adapter copies are
    thousands of tensors under the mmap threshold, so once freed they stay in
    the heap, counted in the server's resident memory until reused; the engine
    calls this when its last running batch ends."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
