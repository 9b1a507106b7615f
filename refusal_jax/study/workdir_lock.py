"""One run per work directory: an exclusive ``fcntl.flock`` on ``<workdir>/.lock``.

The lock file records the holder (pid, host, start time, command), so a second run is refused
with a message naming it. The kernel releases a flock when its process exits, however it
exits, so the lock of a killed run never blocks the next one; the file left behind is simply
taken over. flock is advisory and per host on some network filesystems (NFS before Linux 2.6.12
and some FUSE mounts do not forward it): there it guards against a second run on the same host
only.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


class WorkdirBusy(RuntimeError):
    """Another run holds the work directory."""


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds the work directory's lock for the block; WorkdirBusy naming the holder if taken."""
    path = Path(workdir) / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusy(
                f"work directory {workdir} is in use by another run ({_holder(descriptor)}); "
                "wait for it to finish, stop it, or use another --workdir") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  "command": " ".join(sys.argv)}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode("utf-8"), 0)
        try:
            yield
        finally:
            os.ftruncate(descriptor, 0)
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def _holder(descriptor: int) -> str:
    """The lock holder as recorded in the lock file."""
    try:
        holder = json.loads(os.pread(descriptor, 1 << 16, 0).decode("utf-8"))
        return (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: "
                f"{holder['command']}")
    except (ValueError, KeyError, TypeError):
        return "holder not recorded yet"
