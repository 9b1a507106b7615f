"""End-to-end hook: times the stages of the full pipeline (`python -m refusal_jax.main`).

>>> HOOK: runs `python -m <--pipeline_module> <--pipeline_flags>` once in a child process
>>> ("{workdir}" in the flags becomes a fresh temporary directory) and reports each stage's wall
>>> time; the section is reported as skipped while the module does not exist. It is not among
>>> the default sections: the reference-size pipeline takes longer than the rest together.

Stage times need nothing from the pipeline beyond its artefact layout (refusal_jax.study
.artifacts): every stage writes `<workdir>/<stage>/DONE.json` last, so a stage's wall time is
the time between its DONE.json and the previous one (the first stage's time also contains the
child's imports and model loading). The child reports its own peak RSS (VmHWM) when it exits:
`getrusage(RUSAGE_CHILDREN)` would count the parent's pages the child had before `exec`.
When the flags name a `--config` and `twin` is set, the PyTorch twin of the pipeline
(`bench_lib.torch_pipeline`: the same config, model, prompts and work per stage, done with
transformers hooks and scikit-learn) runs afterwards in this process, and each mirrored stage
(extract, select, infer, evaluate) is a row: ours s, twin s, speed-up twin / ours (one run of
each). Our stage times are then the wall seconds each stage records in its DONE.json (model
loading inside extract, as the twin's; not the child's imports), and a last row compares the
mirrored stages summed. The twin's work counts and what it does not mirror are in the rows'
details and the section's JSON.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from absl import logging

from bench_lib.measure import PeakRSS, Stats
from bench_lib.report import Row

TWIN_LABEL = "PyTorch twin (transformers + hooks, scikit-learn INLP)"

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


def run(module: str, flags: str, timeout_s: float, *, twin: bool = False,
        torch_options: dict[str, str] | None = None,
        twin_select_sample: int = 0) -> tuple[list[Row], dict[str, Any]]:
    """Times the pipeline's stages and, with `twin`, the PyTorch twin's (see the module
    docstring). `torch_options`: the twin's device and attention (the dtype is the config's);
    `twin_select_sample`: see `torch_pipeline.run_twin`'s `select_sample`."""
    if importlib.util.find_spec(module) is None:
        return [], {"status": "skipped",
                    "reason": f"the module {module} does not exist yet; this hook times its "
                              "stages once it does"}
    with tempfile.TemporaryDirectory(prefix="refusal_jax_bench_") as workdir:
        argv = shlex.split(flags.replace("{workdir}", workdir))
        config = None
        if twin:  # read before the run, so that a bad config fails fast
            from bench_lib import torch_pipeline

            config = torch_pipeline.config_from_flags(argv)
        command = [sys.executable, "-m", module, *argv]
        start = time.time()
        try:
            child = subprocess.run([sys.executable, "-c", _LAUNCHER, *command[2:]],
                                   capture_output=True, text=True, timeout=timeout_s,
                                   check=False)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"the pipeline ran past --pipeline_timeout_s={timeout_s}: "
                               f"{shlex.join(command)}") from error
        total = time.time() - start
        if child.returncode != 0:
            raise RuntimeError(f"the pipeline failed (exit {child.returncode}): "
                               f"{shlex.join(command)}\n{child.stderr[-3000:]}")
        finished = sorted((path.stat().st_mtime, path.parent.name, _recorded_wall(path))
                          for path in Path(workdir).glob(f"*/{DONE_FILE}"))
        drafts = _draft_acceptance(Path(workdir))
    # Logged before the twin starts (it can take hours), with the walls each stage recorded.
    logging.info("the pipeline took %.1f s; its stages (wall s): %s", total,
                 {stage: wall for _, stage, wall in finished})
    peaks = re.findall(rf"{_PEAK_MARK}(\d+)", child.stderr)
    memory = {"ours": PeakRSS(peak_mb=int(peaks[-1]) / 1024.0)} if peaks else {}
    info = {"status": "ok", "command": shlex.join(command),
            "stages": [stage for _, stage, _ in finished], "draft_acceptance": drafts}
    if config is None:
        rows, previous = [], start
        for finished_at, stage, _ in finished:
            rows.append(Row(section=SECTION, step=f"stage {stage} (one run)",
                            ours=Stats.of([max(finished_at - previous, 1e-6)])))
            previous = finished_at
    else:
        ours = {stage: wall for _, stage, wall in finished}
        rows, info["twin"] = _twin_rows(config, ours, torch_options, twin_select_sample)
    rows.append(Row(section=SECTION, step="whole pipeline (one run)", ours=Stats.of([total]),
                    memory=memory))
    return rows, info


def _draft_acceptance(workdir: Path) -> dict[str, Any]:
    """`drafts.acceptance` of the run's variants (its model's tokenizer), {} without a run
    config or completions."""
    config_file = workdir / "config.json"
    if not config_file.exists():
        return {}
    from bench_lib import drafts
    from refusal_jax.runtime.loading import load_study_model

    model_config = json.loads(config_file.read_text())["config"]["model"]
    model = load_study_model(model_config["source"], dtype=model_config["dtype"])
    return drafts.acceptance(workdir, model.tokenizer)


def _recorded_wall(done_file: Path) -> float | None:
    """The stage's own wall seconds from its DONE.json (None when it records none)."""
    try:
        return json.loads(done_file.read_text()).get("seconds", {}).get("wall")
    except (OSError, ValueError):
        return None


def _twin_rows(config, ours: dict[str, float | None], torch_options, select_sample: int
               ) -> tuple[list[Row], dict[str, Any]]:
    """Runs the twin and makes the section's rows (see `stage_rows`)."""
    from bench_lib import torch_pipeline

    # The stages ours ran (e.g. `--stages=extract,select` in the flags) and the twin mirrors.
    stages = [stage for stage in torch_pipeline.MIRRORED_STAGES if stage in ours]
    missing = [stage for stage in stages if ours[stage] is None]
    if missing:
        raise RuntimeError(f"the pipeline recorded no wall time for stages {missing} in their "
                           f"{DONE_FILE}; the twin's rows need them")
    memory = PeakRSS()
    result = memory.track(lambda: torch_pipeline.run_twin(config, torch_options=torch_options,
                                                          stages=stages,
                                                          select_sample=select_sample))
    rows = stage_rows(ours, result)
    rows[-1].memory = {"baseline": memory}
    info = {"stages": list(result.stages), "not_mirrored": result.not_mirrored,
            "load_s": round(result.load_s, 3),
            "work": {stage: value.work for stage, value in result.stages.items()},
            "selection": result.selection}
    return rows, info


def stage_rows(ours: dict[str, float], twin) -> list[Row]:
    """One row per stage of ours (`ours`: stage -> wall seconds) with the twin's seconds where
    it mirrors the stage (`twin`: a `torch_pipeline.TwinResult`), and one row of the mirrored
    stages summed."""
    rows = []
    for stage, wall in ours.items():
        mirrored = twin.stages.get(stage)
        if mirrored is None:
            rows.append(Row(section=SECTION, step=f"stage {stage} (one run; not mirrored)",
                            ours=Stats.of([max(wall, 1e-6)])))
            continue
        step = f"stage {stage} (one run)"
        if "seconds_extrapolated" in mirrored.work:
            step = (f"stage {stage} (one run; the twin's time extrapolated from a sample of "
                    "candidates)")
        rows.append(_pair_row(step, wall, mirrored.seconds, {"twin_work": mirrored.work}))
    ours_total = sum(ours[stage] for stage in twin.stages)
    twin_total = sum(stage.seconds for stage in twin.stages.values())
    rows.append(_pair_row(f"stages {', '.join(twin.stages)} (one run)", ours_total, twin_total,
                          {"twin_load_s": round(twin.load_s, 3)}))
    return rows


def _pair_row(step: str, ours_s: float, twin_s: float, details: dict[str, Any]) -> Row:
    ours_s, twin_s = max(ours_s, 1e-6), max(twin_s, 1e-6)
    return Row(section=SECTION, step=step, ours=Stats.of([ours_s]), baseline=Stats.of([twin_s]),
               baseline_label=TWIN_LABEL, speedup=Stats.of([twin_s / ours_s]), details=details)
