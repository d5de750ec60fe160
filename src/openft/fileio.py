"""Files written so that neither a reader nor a crash ever sees half of one, and
files hashed without reading them whole.

A rename within one directory is atomic (POSIX `rename`, `os.replace`), so
everything is written beside its final place under a temporary name, flushed to
disk, then renamed over it: a reader gets the old content or the new, and a
crash mid-write leaves the old file (or nothing) plus a hidden temp to clean up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

CHUNK_BYTES = 1 << 20  # what one read takes while hashing


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename is durable only once its directory
    is); a file system that cannot fsync a directory is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` with `data` (text is written as UTF-8). On any error,
    `path` keeps what it held before and the temp file is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty folder `.tmp-NAME` beside `final` to fill; when the block
    ends, its files are flushed to disk and it takes `final`'s place. An old
    `final` is moved to `.del-NAME` first and deleted after, so there is never a
    moment with neither on disk. If the block raises, the temp folder is removed
    and `final` is untouched."""
    final = Path(final)
    tmp, old = final.with_name(f".tmp-{final.name}"), final.with_name(f".del-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def sha256_files(files: Iterable[str | Path], *, names: bool = False) -> str:
    """sha256 over the files' bytes in the order given, read `CHUNK_BYTES` at a
    time (model weights and datasets can be larger than memory). With `names`,
    each file's name goes in before its bytes, so a renamed file changes it."""
    h = hashlib.sha256()
    for f in files:
        if names:
            h.update(Path(f).name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(CHUNK_BYTES):
                h.update(chunk)
    return h.hexdigest()


def read_json_object(path: Path) -> dict:
    """A JSON object kept as a cache (measured figures, decisions): an unreadable or
    malformed file, or one holding something else, counts as empty (the caller measures
    again and rewrites it)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
