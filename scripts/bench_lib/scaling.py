"""Scaling: how capture, the candidate sweep and generation grow with the number of prompts, the
sequence length, the number of layers and the width, on random-initialised Llama-shaped models.

One axis varies at a time around a base point; every point builds a fresh random model and the
same weights in transformers, and times the three model-running steps of `model_steps` against
it. The results go to a table and a PNG plot (time per step, log-log, and the speed-up).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bench_lib import model_steps
from bench_lib.report import Row
from bench_lib.workload import llama_config, random_workload

AXES = ("prompts", "length", "layers", "width")
STEPS = ("capture", "selection", "generation")
SCALING_VOCAB = 8192
SCALING_CANDIDATES = 4


@dataclasses.dataclass(frozen=True)
class ScalingPoint:
    prompts: int = 8
    length: int = 64
    layers: int = 4
    width: int = 256

    def config(self):
        heads = max(1, self.width // 64)
        kv_heads = max(1, heads // 2)
        return llama_config(SCALING_VOCAB, self.width, self.layers, heads, kv_heads,
                            self.width // heads, 3 * self.width, tied=True)


def parse_values(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"scaling values must be positive integers, got {text!r}")
    return values


def run(axes: dict[str, list[int]], base: ScalingPoint, *, new_tokens: int, warmup: int,
        repeats: int, dtype: str, torch_options: dict[str, str]) -> list[dict[str, Any]]:
    """Times every step at every point; returns one record per (axis, value)."""
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise ValueError(f"unknown scaling axes {unknown}; choose from {AXES}")
    records, measured = [], {}
    for axis, values in axes.items():
        for value in values:
            point = dataclasses.replace(base, **{axis: value})
            if point.length < 8:
                raise ValueError(f"scaling length must be >= 8 tokens, got {point.length}")
            if point in measured:  # the base point lies on every axis: measure it once
                records.append({**measured[point], "axis": axis, "value": value})
                continue
            w = random_workload(point.config(), prompt_length=point.length, dtype=dtype,
                                torch_options=torch_options, name=f"scaling {axis}={value}")
            rng = np.random.default_rng(value)
            directions = rng.normal(size=(SCALING_CANDIDATES, point.width)).astype(np.float32)
            section = f"6 scaling {axis}={value}"
            prompts = w.mixed(point.prompts)
            rows = {
                "capture": model_steps.capture_rows(w, prompts, warmup=warmup, repeats=repeats,
                                                    section=section)[0],
                "selection": model_steps.selection_rows(
                    w, prompts, directions, warmup=warmup, repeats=repeats, section=section)[0],
                "generation": model_steps.generation_rows(
                    w, prompts, directions[0], max_new_tokens=new_tokens, warmup=warmup,
                    repeats=repeats, section=section)[0],
            }
            measured[point] = {"axis": axis, "value": value,
                               "point": dataclasses.asdict(point), "rows": rows}
            records.append(measured[point])
    return records


def to_json(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**record, "rows": {step: row.to_json() for step, row in record["rows"].items()}}
            for record in records]


def markdown_table(records: list[dict[str, Any]]) -> str:
    """One line per point: ours / baseline seconds (median) and the speed-up, per step."""
    header = "| axis | value | " + " | ".join(
        f"{step}: ours / torch s (speed-up)" for step in STEPS) + " |"
    lines = [header, "|" + "|".join([" --- "] * (2 + len(STEPS))) + "|"]
    for record in records:
        cells = []
        for step in STEPS:
            row: Row = record["rows"][step]
            cells.append(f"{row.ours.median:.3g} / {row.baseline.median:.3g} "
                         f"({row.speedup.median:.3g}×)")
        lines.append(f"| {record['axis']} | {record['value']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: str, title: str) -> None:
    """Seconds per step (ours solid, transformers dashed) and speed-ups, one column per axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_present = [axis for axis in AXES if any(r["axis"] == axis for r in records)]
    figure, grid = plt.subplots(2, len(axes_present), figsize=(4 * len(axes_present), 7),
                                squeeze=False)
    colours = dict(zip(STEPS, ("tab:blue", "tab:orange", "tab:green")))
    for column, axis in enumerate(axes_present):
        points = sorted((r for r in records if r["axis"] == axis), key=lambda r: r["value"])
        x = [r["value"] for r in points]
        for step in STEPS:
            rows = [r["rows"][step] for r in points]
            grid[0, column].plot(x, [row.ours.median for row in rows], "o-",
                                 color=colours[step], label=f"{step} ours")
            grid[0, column].plot(x, [row.baseline.median for row in rows], "s--",
                                 color=colours[step], label=f"{step} transformers")
            grid[1, column].errorbar(
                x, [row.speedup.median for row in rows],
                yerr=[[row.speedup.median - row.speedup.min for row in rows],
                      [row.speedup.max - row.speedup.median for row in rows]],
                fmt="o-", color=colours[step], capsize=3, label=step)
        for row_index, label in ((0, "seconds per call"), (1, "speed-up (transformers / ours)")):
            cell = grid[row_index, column]
            cell.set_xscale("log", base=2)
            cell.set_yscale("log")
            cell.set_xlabel(axis)
            cell.set_ylabel(label)
            cell.grid(True, which="both", alpha=0.3)
        grid[1, column].axhline(1.0, color="grey", linewidth=1)
    grid[0, 0].legend(fontsize=7)
    grid[1, 0].legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
