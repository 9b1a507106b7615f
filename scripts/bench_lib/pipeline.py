"""End-to-end hook: times the stages of the full pipeline (`python -m refusal_jax.main`).

>>> HOOK: runs `python -m <--pipeline_module> <--pipeline_flags>` once in a child process
>>> ("{workdir}" in the flags becomes a fresh temporary directory) and reports each stage's wall
>>> time; the section is reported as skipped while the module does not exist. It is not among
>>> the default sections: the reference-size pipeline takes longer than the rest together.

Stage times need nothing from the pipeline beyond its artefact layout (refusal_jax.pipeline
.artifacts): every stage writes `<workdir>/<stage>/DONE.json` last, so a stage's wall time is
the time between its DONE.json and the previous one (the first stage's time also contains the
child's imports and model loading). The child reports its own peak RSS (VmHWM) when it exits:
`getrusage(RUSAGE_CHILDREN)` would count the parent's pages the child had before `exec`.
There is no PyTorch pipeline to run beside it here, so these rows have no baseline.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_lib.measure import PeakRSS, Stats
from bench_lib.report import Row

SECTION = "5 end-to-end"
DONE_FILE = "DONE.json"
_PEAK_MARK = "BENCHMARK_CHILD_PEAK_RSS_KB="
# Runs `python -m <argv[1]> <argv[2:]>` and prints the process's peak RSS on stderr at exit.
_LAUNCHER = r"""
import atexit, re, runpy, sys

def _report_peak():
    try:
        status = open("/proc/self/status").read()
    except OSError:
        return
    match = re.search(r"VmHWM:\s+(\d+)", status)
    if match:
        sys.stderr.write("\nPEAK_MARK" + match.group(1) + "\n")

atexit.register(_report_peak)
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
""".replace("PEAK_MARK", _PEAK_MARK)


def run(module: str, flags: str, timeout_s: float) -> tuple[list[Row], dict[str, Any]]:
    if importlib.util.find_spec(module) is None:
        return [], {"status": "skipped",
                    "reason": f"the module {module} does not exist yet; this hook times its "
                              "stages once it does"}
    with tempfile.TemporaryDirectory(prefix="refusal_jax_bench_") as workdir:
        command = [sys.executable, "-m", module, *shlex.split(flags.replace("{workdir}", workdir))]
        start = time.time()
        try:
            child = subprocess.run([sys.executable, "-c", _LAUNCHER, *command[2:]],
                                   capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"the pipeline ran past --pipeline_timeout_s={timeout_s}: "
                               f"{shlex.join(command)}") from error
        total = time.time() - start
        if child.returncode != 0:
            raise RuntimeError(f"the pipeline failed (exit {child.returncode}): "
                               f"{shlex.join(command)}\n{child.stderr[-3000:]}")
        finished = sorted((path.stat().st_mtime, path.parent.name)
                          for path in Path(workdir).glob(f"*/{DONE_FILE}"))
    rows, previous = [], start
    for finished_at, stage in finished:
        rows.append(Row(section=SECTION, step=f"stage {stage} (one run)",
                        ours=Stats.of([max(finished_at - previous, 1e-6)])))
        previous = finished_at
    peaks = re.findall(rf"{_PEAK_MARK}(\d+)", child.stderr)
    memory = {"ours": PeakRSS(peak_mb=int(peaks[-1]) / 1024.0)} if peaks else {}
    rows.append(Row(section=SECTION, step="whole pipeline (one run)", ours=Stats.of([total]),
                    memory=memory))
    return rows, {"status": "ok", "command": shlex.join(command),
                  "stages": [stage for _, stage in finished]}
