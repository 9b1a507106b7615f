"""Timing and memory measurement.

Conventions:
- Every figure is a `Stats`: the median, min and max of several timed runs taken after warm-up
  runs. Wall-clock seconds from `time.perf_counter`; JAX results are blocked on (and CUDA
  synchronised) before the clock stops.
- `time_pair` times our implementation and a baseline interleaved (alternating which goes first)
  and computes the speed-up `baseline / ours` run by run, so that load from other processes on a
  shared machine hits both sides of each ratio alike.
- Peak memory is the peak resident set size (RSS) of this process during a step's calls
  (warm-up included). On Linux the kernel's high-water mark is reset before every call
  (`/proc/self/clear_refs`), so the peak belongs to that call; `delta_mb` is the largest peak
  minus the RSS when its call started: what the step added on top of what was resident (both
  frameworks' weights, earlier steps' leftovers). Allocators that keep freed memory (XLA's,
  glibc's) can serve a step from memory an earlier step freed, so `delta_mb` is a lower bound of
  the step's working memory and `peak_mb` an upper bound of what it needs. Elsewhere the
  process-lifetime peak (`resource.getrusage`) is reported and labelled as such.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import resource
import statistics
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


@dataclasses.dataclass(frozen=True)
class Stats:
    """Median, min and max of repeated measurements (runs kept for the JSON)."""

    median: float
    min: float
    max: float
    runs: tuple[float, ...]

    @classmethod
    def of(cls, values) -> "Stats":
        values = tuple(float(v) for v in values)
        if not values:
            raise ValueError("Stats.of needs at least one value")
        return cls(statistics.median(values), min(values), max(values), values)

    def scaled(self, factor: float) -> "Stats":
        """The same runs multiplied by `factor` (e.g. per item, or an extrapolation)."""
        return Stats.of([v * factor for v in self.runs])

    def inverse(self, numerator: float = 1.0) -> "Stats":
        """`numerator / run` for every run (time -> throughput)."""
        return Stats.of([numerator / v for v in self.runs])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"runs": list(self.runs)}


def _kib_field(name: str) -> float | None:
    try:
        with open(_STATUS) as status:
            match = re.search(rf"^{name}:\s+(\d+)\s+kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return None if match is None else int(match.group(1)) / 1024.0


def _can_reset_peak() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _kib_field("VmHWM") is not None


PEAK_RSS_METHOD = ("per-call peak RSS (Linux VmHWM reset before each call)" if _can_reset_peak()
                   else "process-lifetime peak RSS (resource.getrusage); not per call")


@dataclasses.dataclass
class PeakRSS:
    """Largest peak RSS (MiB) over the calls measured with `track`, and the largest increment."""

    peak_mb: float = 0.0
    delta_mb: float | None = None  # None where the peak cannot be reset per call

    def track(self, fn: Callable[[], Any]) -> Any:
        per_call = PEAK_RSS_METHOD.startswith("per-call")
        if per_call:
            with open(_CLEAR_REFS, "w") as clear_refs:
                clear_refs.write("5")
            start = _kib_field("VmRSS")
        result = fn()
        if per_call:
            peak = _kib_field("VmHWM")
            self.delta_mb = max(self.delta_mb or 0.0, peak - start)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        self.peak_mb = max(self.peak_mb, peak)
        return result

    def to_json(self) -> dict[str, float]:
        return {"peak_mb": round(self.peak_mb, 1),
                "delta_mb": None if self.delta_mb is None else round(self.delta_mb, 1)}


def wait_for(result: Any) -> Any:
    """Blocks until every JAX array in `result` is computed (and CUDA work is done)."""
    for leaf in jax.tree_util.tree_leaves(result):
        if isinstance(leaf, jax.Array):
            leaf.block_until_ready()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
    return result


def timed_call(fn: Callable[[], Any], memory: PeakRSS | None = None) -> tuple[float, Any]:
    """(seconds, result) of one call, the result waited for (inside the memory window, since
    JAX dispatches asynchronously)."""
    call = lambda: wait_for(fn())  # noqa: E731
    start = time.perf_counter()
    result = call() if memory is None else memory.track(call)
    return time.perf_counter() - start, result


@dataclasses.dataclass
class Timing:
    """Repeated timings of one implementation."""

    seconds: Stats
    memory: PeakRSS
    first_call_s: float | None  # the first warm-up call; None without warm-up
    result: Any = dataclasses.field(default=None, repr=False)  # the last call's output


def _warm_up(fn: Callable[[], Any], count: int, memory: PeakRSS) -> float | None:
    """Calls `fn` `count` times; returns the first call's seconds (None when count is 0).

    Warm-up calls count for memory: the first call is the one that allocates (later calls reuse
    what the allocators kept, so their increment understates the step's working memory).
    """
    seconds = [timed_call(fn, memory)[0] for _ in range(count)]
    return seconds[0] if seconds else None


def time_one(fn: Callable[[], Any], *, warmup: int, repeats: int,
             warmup_fn: Callable[[], Any] | None = None) -> Timing:
    """Times `fn` `repeats` times after `warmup` untimed calls (of `warmup_fn`, a smaller
    problem, when given)."""
    _check_counts(warmup, repeats)
    memory = PeakRSS()
    first = _warm_up(fn if warmup_fn is None else warmup_fn, warmup, memory)
    runs = []
    result = None
    for _ in range(repeats):
        seconds, result = timed_call(fn, memory)
        runs.append(seconds)
    return Timing(Stats.of(runs), memory, first, result)


@dataclasses.dataclass
class PairTiming:
    ours: Timing
    baseline: Timing
    speedup: Stats  # baseline / ours, run by run


def time_pair(ours: Callable[[], Any], baseline: Callable[[], Any], *, warmup: int,
              repeats: int, ours_warmup: int | None = None,
              baseline_warmup: Callable[[], Any] | None = None) -> PairTiming:
    """Interleaved timings of two implementations of the same step, and run-by-run ratios.

    `ours_warmup` overrides the number of warm-up calls of ours (0 for ahead-of-time compiled
    steps too long to repeat); `baseline_warmup` replaces `baseline` in its warm-up calls (a
    smaller problem, for slow baselines whose warm-up only needs to load code).
    """
    _check_counts(warmup, repeats)
    memories = (PeakRSS(), PeakRSS())
    firsts = (_warm_up(ours, warmup if ours_warmup is None else ours_warmup, memories[0]),
              _warm_up(baseline if baseline_warmup is None else baseline_warmup, warmup,
                       memories[1]))
    runs: tuple[list[float], list[float]] = ([], [])
    results = [None, None]
    for repeat in range(repeats):
        order = (0, 1) if repeat % 2 == 0 else (1, 0)
        for side in order:
            seconds, results[side] = timed_call((ours, baseline)[side], memories[side])
            runs[side].append(seconds)
    timings = [Timing(Stats.of(runs[side]), memories[side], firsts[side], results[side])
               for side in (0, 1)]
    speedup = Stats.of(b / o for o, b in zip(*runs))
    return PairTiming(ours=timings[0], baseline=timings[1], speedup=speedup)


def compile_timed(jitted: Callable, *args) -> tuple[Callable, float]:
    """AOT-compiles `jitted` for `args`; returns (compiled function, compile seconds)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def _check_counts(warmup: int, repeats: int) -> None:
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")


def machine_info() -> dict[str, Any]:
    """What the figures were measured on, and how busy the machine was."""
    import sklearn
    import torch
    import transformers

    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
        cpu_model = names[0] if names else cpu_model
    except OSError:
        pass
    memory_gb = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory_gb = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    return {
        "platform": platform.platform(),
        "cpu": cpu_model,
        "cores_available": available_cores(),
        "memory_gb": memory_gb,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "jax_devices": [str(d) for d in jax.devices()],
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "numpy": np.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "sklearn": sklearn.__version__},
        "peak_rss_method": PEAK_RSS_METHOD,
    }


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
