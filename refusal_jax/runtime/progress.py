"""Log lines with counts, elapsed time and ETA for the pipeline's long loops (absl logging)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from absl import logging

T = TypeVar("T")


def progress(items: Iterable[T], total: int, what: str, *, every_seconds: float = 10.0
             ) -> Iterator[T]:
    """Yields ``items``, logging ``what: i/total, elapsed, ETA`` at most every ``every_seconds``
    and at the end."""
    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every_seconds or done == total:
            elapsed = now - start
            eta = elapsed / done * (total - done)
            logging.info("%s: %d/%d, %.1fs elapsed, ETA %.1fs", what, done, total, elapsed, eta)
            last = now
