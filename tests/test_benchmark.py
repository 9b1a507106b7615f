"""Smoke test of scripts/benchmark.py: every section at a tiny size, the JSON schema and the
Markdown report (never timings), plus the benchmark's input checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from bench_lib import measure, scaling, workload  # noqa: E402

TINY_RUN = [
    "--model=random:tiny", "--sections=capture,inlp,selection,generation,pipeline,scaling",
    "--warmup=1", "--repeats=1", "--random_prompt_length=12", "--capture_batch=4",
    "--inlp_prompts=8", "--extract_batch=8", "--inlp_max_directions=2",
    "--inlp_pairs=3", "--inlp_baseline_pairs=2", "--inlp_repeats=1", "--selection_candidates=2",
    "--selection_prompts=2", "--generation_batch=2", "--generation_new_tokens=3",
    "--scaling_axes=layers", "--scaling_layers=1", "--scaling_new_tokens=2",
    "--scaling_repeats=1", "--pipeline_module=fake_pipeline",
    "--pipeline_flags=--workdir={workdir}",
]
# Stands in for `python -m refusal_jax.main`: follows its artefact layout (each stage writes
# <workdir>/<stage>/DONE.json last), which is all the end-to-end hook relies on.
FAKE_PIPELINE = """
import pathlib, sys, time
workdir = pathlib.Path(sys.argv[1].split("=", 1)[1])
for stage in ("extract", "select"):
    time.sleep(0.05)
    (workdir / stage).mkdir()
    (workdir / stage / "DONE.json").write_text("{}")
"""
STATS_KEYS = {"median", "min", "max", "runs"}
ROW_KEYS = {"section", "step", "ours_s", "baseline_s", "baseline", "speedup", "work",
            "work_unit", "ours_per_s", "baseline_per_s", "compile_s", "peak_rss", "extrapolated",
            "details"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    (folder / "fake_pipeline.py").write_text(FAKE_PIPELINE)
    out = folder / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, str(SCRIPTS / "benchmark.py"), f"--out={out}",
                            *TINY_RUN], capture_output=True, text=True, timeout=300, env=env)
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(out.read_text()), child.stdout, out


def _check_stats(stats, n_runs=None):
    assert set(stats) == STATS_KEYS
    assert stats["min"] <= stats["median"] <= stats["max"]
    assert all(value > 0 for value in stats["runs"])
    if n_runs is not None:
        assert len(stats["runs"]) == n_runs


def test_every_section_reports_rows_with_the_documented_schema(tiny_run):
    result, _, _ = tiny_run
    assert result["schema_version"] == 1
    assert {"machine", "settings", "model", "rows", "sections", "command", "wall_s"} <= set(result)
    assert result["machine"]["torch_threads"] == result["machine"]["cores_available"]
    for row in result["rows"]:
        assert set(row) == ROW_KEYS
        _check_stats(row["ours_s"])
        if row["baseline_s"] is not None:
            _check_stats(row["baseline_s"])
            _check_stats(row["speedup"])
            assert row["baseline"]
            assert set(row["peak_rss"]) == {"ours", "baseline"}
        assert all(memory["peak_mb"] > 0 for memory in row["peak_rss"].values())
    sections = {row["section"].split()[1] for row in result["rows"]}
    assert sections == {"capture", "inlp", "selection", "generation", "end-to-end"}
    for record in result["sections"]["scaling"]["records"]:
        assert set(record["rows"]) == {"capture", "selection", "generation"}
        for row in record["rows"].values():
            assert set(row) == ROW_KEYS
            _check_stats(row["speedup"])
    assert set(result["sections"]) == {"capture", "inlp", "selection", "generation", "pipeline",
                                       "scaling"}


def test_outputs_of_both_stacks_agree(tiny_run):
    result, _, _ = tiny_run
    by_step = {row["step"]: row for row in result["rows"]}
    capture = next(row for step, row in by_step.items() if step.startswith("capture"))
    assert capture["details"]["max_abs_diff"] < 1e-4
    selection = next(row for row in result["rows"] if row["section"] == "3 selection")
    assert selection["details"]["max_abs_score_diff"] < 1e-3
    generations = [row for row in result["rows"] if row["section"] == "4 generation"]
    assert len(generations) == 2
    assert all(row["details"]["rows_identical"] == 2 for row in generations)


def test_inlp_section_compares_each_baseline_under_its_rules_on_the_same_pairs(tiny_run):
    result, _, _ = tiny_run
    inlp = result["sections"]["inlp"]
    assert len(inlp["pairs"]) == 3 and len(inlp["baseline_pairs"]) == 2
    assert all(pair in inlp["pairs"] for pair in inlp["baseline_pairs"])
    assert {name: c["rules"] for name, c in inlp["comparisons"].items()} == {
        "scikit-learn loop": "default rules", "torch L-BFGS loop": "reference rules",
        "torch L-BFGS loop + line search": "reference rules"}
    for comparison in inlp["comparisons"].values():
        for side in ("first_accuracy_ours", "first_accuracy_baseline"):
            assert len(comparison[side]) == 2
            assert all(0 <= a <= 1 for a in comparison[side])
    rows = [row for row in result["rows"] if row["section"] == "2 inlp"]
    assert rows[0]["step"].startswith("extract activations")
    assert [row["extrapolated"] for row in rows[1:]] == [True, True, True]
    assert all("extrapolated" in row["details"]["note"] for row in rows[1:])


def test_pipeline_hook_times_each_stage_from_its_done_file(tiny_run):
    result, _, _ = tiny_run
    assert result["sections"]["pipeline"]["stages"] == ["extract", "select"]
    rows = [row for row in result["rows"] if row["section"] == "5 end-to-end"]
    assert [row["step"] for row in rows] == ["stage extract (one run)", "stage select (one run)",
                                             "whole pipeline (one run)"]
    stage_total = sum(row["ours_s"]["median"] for row in rows[:2])
    assert stage_total <= rows[2]["ours_s"]["median"]
    # The child's own peak (a small script), not the benchmark process's pages before exec.
    assert 0 < rows[2]["peak_rss"]["ours"]["peak_mb"] < 300


def test_scaling_writes_a_plot_and_the_report_has_the_tables(tiny_run):
    result, stdout, out = tiny_run
    scaling_info = result["sections"]["scaling"]
    assert [r["value"] for r in scaling_info["records"]] == [1]
    assert Path(scaling_info["plot"]) == out.with_suffix(".png")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| section | step |" in stdout and "| axis | value |" in stdout
    assert "Load average" in stdout and "Command:" in stdout


def test_unknown_section_is_a_usage_error():
    child = subprocess.run([sys.executable, str(SCRIPTS / "benchmark.py"), "--sections=capture,foo",
                            "--out="], capture_output=True, text=True, timeout=60)
    assert child.returncode != 0
    assert "unknown sections ['foo']" in child.stderr


def test_unknown_random_preset_names_the_presets():
    with pytest.raises(ValueError, match="tiny"):
        workload.preset_config("huge")


def test_bad_scaling_values_are_rejected():
    with pytest.raises(ValueError, match="positive integers"):
        scaling.parse_values("8,0")
    with pytest.raises(ValueError, match="positive integers"):
        scaling.parse_values("eight")


def test_stats_and_timing_reject_empty_or_missing_runs():
    with pytest.raises(ValueError, match="at least one"):
        measure.Stats.of([])
    with pytest.raises(ValueError, match="repeats"):
        measure.time_one(lambda: None, warmup=1, repeats=0)


def test_pairwise_speedups_are_ratios_of_interleaved_runs():
    pair = measure.time_pair(lambda: sum(range(10)), lambda: sum(range(100_000)), warmup=1,
                             repeats=3)
    ratios = np.asarray(pair.baseline.seconds.runs) / np.asarray(pair.ours.seconds.runs)
    np.testing.assert_allclose(pair.speedup.runs, ratios)
    assert pair.ours.result == 45
