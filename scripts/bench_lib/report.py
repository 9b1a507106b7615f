"""Benchmark rows, their JSON form and the Markdown tables printed on stdout.

A `Row` is one step measured for our implementation and (usually) one baseline. Times are in
seconds; `speedup` is baseline / ours computed run by run (see `measure.time_pair`); `work` is
the number of items one call processes (tokens, classifiers, candidates) so that throughput is
`work / seconds`. Rows marked `extrapolated` contain a baseline figure that was not measured in
full but scaled from a measured subset; the table says so in the step's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bench_lib.measure import PairTiming, PeakRSS, Stats

SCHEMA_VERSION = 1


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


@dataclasses.dataclass
class Row:
    """One measured step (see the module docstring); `memory` maps "ours" / "baseline" to peaks."""

    section: str
    step: str
    ours: Stats
    baseline: Stats | None = None
    baseline_label: str = ""
    speedup: Stats | None = None
    work: float | None = None
    work_unit: str = ""
    compile_s: float | None = None
    memory: dict[str, PeakRSS] = dataclasses.field(default_factory=dict)
    extrapolated: bool = False
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_pair(cls, section: str, step: str, pair: PairTiming, *, baseline_label: str,
                  work: float | None = None, work_unit: str = "", compile_s: float | None = None,
                  details: dict[str, Any] | None = None) -> "Row":
        return cls(section=section, step=step, ours=pair.ours.seconds,
                   baseline=pair.baseline.seconds, baseline_label=baseline_label,
                   speedup=pair.speedup, work=work, work_unit=work_unit, compile_s=compile_s,
                   memory={"ours": pair.ours.memory, "baseline": pair.baseline.memory},
                   details={"first_call_s": {"ours": _rounded(pair.ours.first_call_s),
                                             "baseline": _rounded(pair.baseline.first_call_s)},
                            **(details or {})})

    def throughput(self, stats: Stats | None) -> Stats | None:
        if stats is None or not self.work:
            return None
        return stats.inverse(self.work)

    def to_json(self) -> dict[str, Any]:
        def stats(value: Stats | None):
            return None if value is None else value.to_json()

        return {
            "section": self.section, "step": self.step,
            "ours_s": stats(self.ours), "baseline_s": stats(self.baseline),
            "baseline": self.baseline_label, "speedup": stats(self.speedup),
            "work": self.work, "work_unit": self.work_unit,
            "ours_per_s": stats(self.throughput(self.ours)),
            "baseline_per_s": stats(self.throughput(self.baseline)),
            "compile_s": self.compile_s,
            "peak_rss": {side: memory.to_json() for side, memory in self.memory.items()},
            "extrapolated": self.extrapolated, "details": self.details,
        }


def _range(stats: Stats | None, digits: int = 3, suffix: str = "") -> str:
    if stats is None:
        return "–"
    fmt = f"{{:.{digits}g}}"
    if len(stats.runs) == 1:
        return fmt.format(stats.median) + suffix
    return (f"{fmt.format(stats.median)}{suffix} "
            f"[{fmt.format(stats.min)}–{fmt.format(stats.max)}]")


def _memory(row: Row) -> str:
    parts = []
    for side in ("ours", "baseline"):
        if side in row.memory:
            memory = row.memory[side]
            delta = "" if memory.delta_mb is None else f" (+{memory.delta_mb:.0f})"
            parts.append(f"{memory.peak_mb:.0f}{delta}")
    return " / ".join(parts) or "–"


def markdown_table(rows: list[Row]) -> str:
    """One line per step: times median [min–max] over the runs, speed-up baseline / ours."""
    header = ("| section | step | ours (s) | baseline (s) | baseline | speed-up | "
              "throughput ours / baseline | compile (s) | peak RSS MiB ours / baseline (+step) |")
    lines = [header, "|" + "|".join([" --- "] * (header.count("|") - 1)) + "|"]
    for row in rows:
        ours_rate, base_rate = row.throughput(row.ours), row.throughput(row.baseline)
        rate = "–"
        if ours_rate is not None:
            rate = f"{ours_rate.median:.4g}"
            if base_rate is not None:
                rate += f" / {base_rate.median:.4g}"
            rate += f" {row.work_unit}/s"
        step = row.step + (" (baseline extrapolated)" if row.extrapolated else "")
        compile_s = "–" if row.compile_s is None else f"{row.compile_s:.3g}"
        lines.append(f"| {row.section} | {step} | {_range(row.ours)} | {_range(row.baseline)} | "
                     f"{row.baseline_label or '–'} | {_range(row.speedup, suffix='×')} | {rate} | "
                     f"{compile_s} | {_memory(row)} |")
    return "\n".join(lines)


def machine_lines(machine: dict[str, Any], settings: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    return "\n".join([
        f"- Machine: {machine['cpu']}, {machine['cores_available']} cores available, "
        f"{machine['memory_gb']} GB RAM; {machine['platform']}",
        f"- Load average (1/5/15 min) at start {machine['load_average_1_5_15']}, at end "
        f"{machine.get('load_average_at_end', '?')}",
        f"- Threads: torch intra-op {machine['torch_threads']} (set to the core count), "
        f"inter-op {machine['torch_interop_threads']}; JAX/XLA on {machine['jax_devices']} with "
        f"its default thread pool (one thread per core); XLA_FLAGS='{machine['xla_flags']}'",
        f"- Versions: {versions}",
        f"- Memory: {machine['peak_rss_method']}",
        f"- Settings: {settings}",
    ])
