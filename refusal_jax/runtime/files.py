"""Atomic file writes: a file is written under a temporary name in its own directory and moved
onto its path with ``os.replace``, so a reader (or a crash) sees the old file or the new one,
never a torn one. NFS renames are atomic; a gcsfuse bucket renames by copy and delete. Files get
the mode an ordinary ``open`` would give them (0666 less the umask)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a new empty file beside ``path`` (its name ends in ``suffix``) to write to; moves
    it onto ``path`` when the block ends, or deletes it when the block raises. Creates the
    parent directory if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.fchmod(handle, 0o666 & ~_umask())  # mkstemp creates files readable by their owner only
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically, flushed to disk before the rename."""
    with atomic_path(path) as temporary, temporary.open("wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomically(path, text.encode("utf-8"))
