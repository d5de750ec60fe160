"""The allocator training runs under, and the few calls openft makes to glibc's.

PyTorch's CPU tensors come from malloc. glibc serves big requests (above a
threshold that adapts up to 32 MB) with fresh mmaps and unmaps them on free,
and trims the heap's top once 128 KB+ is free there: memory goes back to the
OS eagerly and every reuse faults it in again, zeroed page by page. Told to
keep what it frees (`keep_freed_memory`), it stops faulting but fragments: a
training step's thousands of activation blocks of ever-changing sizes leave
the heap full of free pieces too small for the next micro-batch's, and a full
fine-tune's resident memory ends ~1.5 GB above what is live.

So the processes that train (`openft finetune`, `openft demo`, `openft
worker`) re-execute themselves once at start with tcmalloc preloaded where the
machine has it (`make install` unpacks Debian's libtcmalloc-minimal4 into the
virtual environment; jemalloc is the second choice). Its size classes and
page-level spans reuse freed memory without fragmenting it. Against glibc in
one A/B run each on the built-in model (train_bench at 8f4a9fd, 2026-11-30; benchmarks/RESULTS.md):
full fine-tune 1.35x the tokens/s at 0.755x the peak RSS (4004 vs 5303 MB),
LoRA 1.29x at 0.97x. `OPENFT_MALLOC=system` keeps glibc;
`OPENFT_MALLOC=/path/to/lib.so` preloads that library instead. The server is
left on glibc: its idle footprint shrinks with `release_free_memory`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from pathlib import Path

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


MALLOC_ENV = "OPENFT_MALLOC"  # "auto" (the default), "system" (glibc) or a library's path
PRELOADED_ENV = "OPENFT_MALLOC_PRELOADED"  # set on the re-executed process: never re-execute twice
# Searched in this order, in the virtual environment's lib/openft-malloc (where
# `make install` puts it), then the system's library directories.
ALLOCATORS = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
# Set unless the user has: gperftools reports every allocation over 1 GB on
# stderr (a larger model's embedding gradients are that big, and it is not
# news); jemalloc with its defaults hands freed pages back within 10 s and
# faults them in again, 1.07x slower than glibc on the full fine-tune, while a
# background purging thread and 30 s decay was 1.03x faster at the same memory
# (results/2026-11-30/allocator_scan_*; without decay it grew to 19 GB).
ALLOCATOR_ENV = {
    "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 62),
    "MALLOC_CONF": "background_thread:true,dirty_decay_ms:30000,muzzy_decay_ms:30000",
}


def _library_dirs() -> list[Path]:
    arch = f"{platform.machine()}-linux-gnu"
    return [
        Path(sys.prefix) / "lib" / "openft-malloc",
        Path("/usr/lib") / arch,
        Path("/lib") / arch,
        Path("/usr/lib64"),
        Path("/usr/lib"),
        Path("/usr/local/lib"),
    ]


def training_allocator(dirs: list[Path] | None = None, env: dict[str, str] | None = None) -> str | None:
    """The malloc library a training process started with `env` (default:
    this process's) preloads, or None for the system's."""
    choice = (os.environ if env is None else env).get(MALLOC_ENV, "auto").strip()
    if choice in ("system", "glibc", "none"):
        return None
    if choice not in ("", "auto"):
        if not Path(choice).is_file():
            raise ValueError(f"{MALLOC_ENV}={choice}: no such file (use 'auto', 'system' or a library's path)")
        return str(Path(choice).resolve())
    if not sys.platform.startswith("linux"):
        return None
    for name in ALLOCATORS:
        for d in dirs if dirs is not None else _library_dirs():
            if (d / name).is_file():
                return str(d / name)
    return None


def training_env(env: dict[str, str] | None = None, *, dirs: list[Path] | None = None) -> dict[str, str]:
    """`env` (default: this process's) for a process that trains: the training
    allocator preloaded ahead of anything already there, and marked so the
    process does not re-execute itself. Unchanged when there is no allocator."""
    env = dict(os.environ if env is None else env)
    lib = training_allocator(dirs, env)
    if lib is None or env.get(PRELOADED_ENV):
        return env
    env["LD_PRELOAD"] = ":".join(x for x in (lib, env.get("LD_PRELOAD", "")) if x)
    env[PRELOADED_ENV] = lib
    for k, v in ALLOCATOR_ENV.items():
        env.setdefault(k, v)
    return env


def reexec_with_training_allocator() -> None:
    """Replace this process with itself under the training allocator, once.

    Call it first thing in an entry point, before torch is imported: the
    preload has to be in place when the process starts. Returns (doing
    nothing) where there is no allocator or this process is the re-executed
    one; if the loader refuses the library it says so and the run goes on
    under glibc, without looping."""
    env = training_env()
    if PRELOADED_ENV in os.environ or PRELOADED_ENV not in env or not sys.executable:
        return  # (an embedded interpreter has no executable to start again)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def allocator_in_use() -> str:
    """The malloc this process runs under: "tcmalloc", "jemalloc", the file
    name of another library preloaded through OPENFT_MALLOC, or "system"
    (recorded in a run's summary). Read from the libraries mapped into the
    process, so a preload the loader refused reads as "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for short in ("tcmalloc", "jemalloc"):
        if f"lib{short}" in maps:
            return short
    wanted = os.environ.get(PRELOADED_ENV)
    if wanted and Path(wanted).name in maps:
        return Path(wanted).name
    return "system"


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
    should shrink after a burst. Under a preloaded allocator (which keeps and
    reuses freed memory by itself) it does nothing. Returns whether the
    setting took."""
    lib = _libc()
    if lib is None or allocator_in_use() != "system":
        return False
    return bool(lib.mallopt(M_MMAP_THRESHOLD, MMAP_MAX)) and bool(lib.mallopt(M_TRIM_THRESHOLD, TRIM_NEVER))


def release_free_memory() -> None:
    """Hand free heap pages back to the OS (malloc_trim; ~2 ms here).

    A serving batch's KV cache, activations and widened adapter copies are
    thousands of tensors under the mmap threshold, so once freed they stay in
    the heap, counted in the server's resident memory until reused; the engine
    calls this when its last running batch ends. Under tcmalloc (training's
    allocator), its own call: glibc's trim does not reach tcmalloc's page heap,
    which otherwise keeps every freed span resident."""
    tc = _tcmalloc_release()
    if tc is not None:
        tc()
        return
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


@functools.cache
def _tcmalloc_release():
    """gperftools' MallocExtension_ReleaseFreeMemory when tcmalloc is preloaded, else None."""
    try:
        return ctypes.CDLL(None).MallocExtension_ReleaseFreeMemory
    except (OSError, AttributeError):
        return None
