"""Expand a product of config overrides into study runs.

    python scripts/sweep.py --config=configs/default.py --root=runs/sweep \
        --sweep=select.mode=local,global --sweep=directions.k_policy=none,acc99 [--print_only]

Each ``--sweep=KEY=V1,V2,...`` is one axis; the runs are the Cartesian product of all axes, each
in its own work directory ``ROOT/KEY=V_KEY=V...`` (so reruns resume). ``--set=KEY=V`` adds an
override common to every run. Without ``--print_only`` the runs execute one after another here;
with it, one shell command per line is printed (for a pod launcher or a job array).
"""

from __future__ import annotations

import itertools
import shlex
import subprocess
import sys
from pathlib import Path

from absl import app, flags


def _define_flags() -> dict:
    """The command line's flags (defined only when run as a script, so that importing
    ``expand`` and ``commands`` leaves the global absl flags alone)."""
    defined = {
        "config": flags.DEFINE_string("config", None, "config file with get_config()"),
        "root": flags.DEFINE_string("root", None, "directory holding one work directory per run"),
        "sweep": flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,...: one axis of the product"),
        "set": flags.DEFINE_multi_string("set", [], "KEY=V: an override shared by every run"),
        "stages": flags.DEFINE_string("stages", None, "comma-separated stages (default: all)"),
        "print_only": flags.DEFINE_bool("print_only", False,
                                        "print the commands instead of running"),
    }
    flags.mark_flags_as_required(["config", "root"])
    return defined


def _split(assignment: str, flag: str) -> tuple[str, str]:
    key, sep, value = assignment.partition("=")
    if not sep or not key or not value:
        raise app.UsageError(f"--{flag}={assignment!r}: expected KEY=VALUE")
    return key, value


def expand(sweeps: list[str]) -> list[list[tuple[str, str]]]:
    """The runs of a product of axes: each a list of (key, value) overrides."""
    axes = []
    for axis in sweeps:
        key, values = _split(axis, "sweep")
        axes.append([(key, value) for value in values.split(",")])
    return [list(run) for run in itertools.product(*axes)]


def commands(config: str, root: str, runs, shared, stages: str | None, *,
             python: str = "python") -> list[list[str]]:
    """One ``python -m refusal_jax.main`` command line per run."""
    out = []
    for overrides in runs:
        name = "_".join(f"{key}={value}" for key, value in overrides) or "run"
        command = [python, "-m", "refusal_jax.main", f"--config={config}",
                   f"--workdir={Path(root) / name}"]
        command += [f"--config.{key}={value}" for key, value in shared + overrides]
        if stages:
            command.append(f"--stages={stages}")
        out.append(command)
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    value = {name: holder.value for name, holder in _FLAGS.items()}
    shared = [_split(assignment, "set") for assignment in value["set"]]
    python = "python" if value["print_only"] else sys.executable
    runs = commands(value["config"], value["root"], expand(value["sweep"]), shared,
                    value["stages"], python=python)
    for index, command in enumerate(runs, start=1):
        if value["print_only"]:
            print(shlex.join(command))
            continue
        print(f"[{index}/{len(runs)}] {shlex.join(command)}", flush=True)
        subprocess.run(command, check=True)


if __name__ == "__main__":
    _FLAGS = _define_flags()
    app.run(main)
