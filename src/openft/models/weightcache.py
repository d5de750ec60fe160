"""A model's weights kept on disk in the dtype the server computes in.

Converted and Hugging Face models are stored in fp32 (GGUF conversion
de-quantizes to fp32). A server computing in bf16 read every fp32 byte and
cast it at each start: 1.1 s of the Gemma 3 270M built-in's 2.3 s load on an
AMX machine, more for bigger models. The first such load writes the cast
weights once, as safetensors, under OPENFT_HOME/cache/weights/; later loads
map that file (half the bytes, no cast; the pages are shared with the page
cache and read as the first forward touches them). The first load does not wait
for that write: it serves the cast tensors from memory while a thread writes
them (1.6 s of a fresh server's 8.7 s to its first answer for the Qwen 0.5B
built-in on an AMX machine, `benchmarks/RESULTS.md`).

One cache file per source folder and dtype: its SOURCE records the source
files' names, sizes and modification times, and a source that changed is cast
again over the old copy. A cache that cannot be written (a full disk, a
read-only home) only costs the cast; one that is unreadable is cast again. It
is not written where it would take more than a fifth of the disk's free space
or leave it under 1 GiB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from openft.home import home
from openft.tensorfile import write_safetensors

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
SOURCE = "SOURCE.json"
STALE_TMP_S = 60  # a temp file nobody has written to for this long is a write cut short (SIGKILL)

_writes: list[threading.Thread] = []  # cache writes under way in this process
_writes_lock = threading.Lock()


def cache_dir(files: list[Path], dtype: torch.dtype) -> Path:
    key = hashlib.sha256(f"{Path(files[0]).resolve().parent}\0{dtype}".encode()).hexdigest()[:24]
    return home() / "cache" / "weights" / key


def source_of(files: list[Path]) -> list[list]:
    """What the cache was made from: each source file's path, size and mtime."""
    out = []
    for f in files:
        st = Path(f).stat()
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    return out


def load(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of `files`, the floating ones in `dtype`."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))  # mapped, not read: only the header is parsed here
    if all(v.dtype == dtype for v in state.values() if v.is_floating_point()):
        return state  # stored in that dtype already: nothing to cast or cache
    where, source = cache_dir(files, dtype), source_of(files)
    try:
        if json.loads((where / SOURCE).read_text()) == source:
            return load_file(where / WEIGHTS)
    except Exception:  # noqa: BLE001 - absent, stale or unreadable (SafetensorError): cast again
        pass
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    log.info("caching the %s weights of %s in %s", dtype, source[0][0], where)
    _write_later(where, dict(state), source)  # a copy of the dict: the caller pops from its own
    return state


def _write_later(where: Path, state: dict[str, torch.Tensor], source: list[list]) -> None:
    """Write the cache in a thread of its own. Not a daemon: a process that ends
    normally finishes the write first; one killed mid-write leaves a temp file,
    which the next write removes."""
    # daemon=False said outright: a thread inherits daemon from the one starting it (the engine's is one).
    t = threading.Thread(target=_write, args=(where, state, source), name="weightcache-write", daemon=False)
    with _writes_lock:
        _writes[:] = [w for w in _writes if w.is_alive()]
        _writes.append(t)
    t.start()


def flush() -> None:
    """Wait for this process's cache writes under way."""
    with _writes_lock:
        pending = list(_writes)
    for t in pending:
        t.join()


def room_for(where: Path, nbytes: int) -> bool:
    """Whether `nbytes` is at most a fifth of the disk's free space and leaves it
    1 GiB: the cache must never be what fills the disk that checkpoints and the
    job store write to. Relative to what is free, not to the disk's size: a big
    disk that is 95% full still has room for a small model's cache."""
    free = shutil.disk_usage(where).free
    return nbytes * 5 <= free and free - nbytes >= 1 << 30


def _write(where: Path, state: dict[str, torch.Tensor], source: list[list]) -> None:
    """Write the cache atomically: the weights under a temp name, renamed, then SOURCE."""
    tmp = None
    try:
        where.mkdir(parents=True, exist_ok=True)
        if not room_for(where, sum(v.nbytes for v in state.values())):
            log.info("not caching the weights in %s: the disk would be left with too little free space", where)
            return
        (where / SOURCE).unlink(missing_ok=True)  # no SOURCE: the weights are never trusted half-written
        _remove_stale_temps(where)
        fd, tmp = tempfile.mkstemp(dir=where, prefix=".weights.", suffix=".tmp")
        os.close(fd)
        write_safetensors(state, Path(tmp))
        os.replace(tmp, where / WEIGHTS)
        tmp = None
        (where / SOURCE).write_text(json.dumps(source))
    except Exception as e:  # noqa: BLE001 - a full disk, a read-only home: serve uncached
        # The cache is optional: whatever stops the write (ENOSPC, a read-only home) costs only the cast.
        log.warning("could not cache the weights in %s: %s", where, e)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _remove_stale_temps(where: Path) -> None:
    """Temp files of writes cut short (another process's live write keeps its mtime fresh)."""
    for old in where.glob(".weights.*.tmp"):
        try:
            if time.time() - old.stat().st_mtime > STALE_TMP_S:
                old.unlink()
        except OSError:
            pass


def drop_for(folder: Path | None) -> int:
    """Remove every cache made from files under `folder` (a deleted fine-tuned model's
    run, a registered model's folder when its name is removed), and any whose sources
    are all gone: the cache is openft's copy, and must not outlive what it copies.
    Returns how many were removed."""
    flush()  # a write under way would bring back what is removed here
    root = home() / "cache" / "weights"
    if not root.is_dir():
        return 0
    folder = Path(folder).resolve() if folder is not None else None
    removed = 0
    for entry in root.iterdir():
        try:
            paths = [Path(p) for p, _size, _mtime in json.loads((entry / SOURCE).read_text())]
        except Exception:  # noqa: BLE001 - no SOURCE (a write cut short) or unreadable: never trusted, so go
            paths = []
        mine = folder is not None and any(p.is_relative_to(folder) for p in paths)
        if not paths or mine or not any(p.exists() for p in paths):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed
