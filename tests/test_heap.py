"""openft.heap: freed training buffers are reused rather than faulted back in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from openft.heap import _libc

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
