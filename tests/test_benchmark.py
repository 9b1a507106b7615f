"""Smoke test of scripts/benchmark.py: every section at a tiny size, the JSON schema and the
Markdown report (never timings), plus the benchmark's input checks; and the selection section's
two sides (the pipeline's selection code, the hooked transformers loop) computing the same
scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from refusal_jax.directions import mean_difference
from refusal_jax.evaluation.activations import capture
from refusal_jax.evaluation.k_curve import k_values
from refusal_jax.evaluation.refusal import refusal_rate
from refusal_jax.runtime.random_models import random_model
from refusal_jax.study import artifacts
from refusal_jax.study.runner import run_study
from refusal_jax.text import load_instructions

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from bench_lib import (  # noqa: E402
    activations,
    measure,
    pipeline,
    scaling,
    selection,
    torch_pipeline,
    torch_stack,
    workload,
)

TINY_RUN = [
    "--model=random:tiny", "--sections=capture,inlp,selection,generation,pipeline,scaling",
    "--warmup=1", "--repeats=1", "--random_prompt_length=12", "--capture_batch=4",
    "--inlp_prompts=8", "--extract_batch=8", "--inlp_max_directions=2",
    "--inlp_pairs=3", "--inlp_baseline_pairs=2", "--inlp_repeats=1", "--selection_candidates=3",
    "--selection_baseline_candidates=2", "--selection_prompts=2", "--selection_batch=2",
    "--generation_batch=2", "--generation_new_tokens=3", "--generation_sweep=2",
    "--scaling_axes=layers", "--scaling_layers=1", "--scaling_new_tokens=2",
    "--scaling_repeats=1", "--pipeline_module=fake_pipeline",
    "--pipeline_flags=--workdir={workdir}", "--nopipeline_twin",
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
# Largest |ours - transformers| allowed for bypass, steering and KL. Both sides are float32
# forwards of the same weights, whose logits tests/test_model_parity.py holds within 1e-4. A
# refusal score log P(R) - log(1 - P(R)) and KL(p || softmax(z)) each move by at most
# 2 max|dz| when the logits z move by dz (their gradients in z have an L1 norm of at most 2), and
# so do their means over prompts: 2e-4.
SCORE_TOLERANCE = 2e-4
TORCH_CPU = {"attention": "sdpa", "dtype": "float32", "device": "cpu"}
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
    selections = [row for row in result["rows"] if row["section"] == "3 selection"]
    assert len(selections) == 2
    for row in selections:
        differences = row["details"]["max_abs_diff"]
        assert set(differences) == {"bypass", "steering", "kl"}
        assert all(d <= SCORE_TOLERANCE for d in differences.values() if d is not None)
    # filters="all" scores every score of every candidate the baseline ran.
    assert None not in selections[0]["details"]["max_abs_diff"].values()
    generations = [row for row in result["rows"] if row["section"] == "4 generation"]
    assert len(generations) == 3  # no intervention, ablation, a sweep of 2 ablations
    assert [row["details"]["rows_identical"] for row in generations] == [2, 2, 4]
    assert all(row["details"]["leading_tokens_identical"] == [row["details"]["new_tokens"]] * 2
               for row in generations)


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


def test_selection_rows_time_the_pipeline_stage_against_an_extrapolated_hooked_loop(tiny_run):
    result, stdout, _ = tiny_run
    info = result["sections"]["selection"]
    assert len(info["candidates_position_layer"]) == 3
    assert len(info["baseline_candidates_position_layer"]) == 2
    assert all(pair in info["candidates_position_layer"]
               for pair in info["baseline_candidates_position_layer"])
    rows = [row for row in result["rows"] if row["section"] == "3 selection"]
    assert ["filters='all'" in rows[0]["step"], "filters='until_chosen'" in rows[1]["step"]] == [
        True, True]
    for row in rows:
        details = row["details"]
        assert row["extrapolated"] and "extrapolated" in details["note"]
        assert row["work"] == details["candidates"] == 3 and row["work_unit"] == "cand"
        assert details["val_prompts_per_set"] == 2 and details["batch_size"] == 2
        assert details["mode"] == "local" and details["multipliers"] == [0.5, 1.0, 2.0]
        # Compiled before timing: the warm-up compiled, the timed runs did not.
        assert row["compile_s"] > 0 and details["compile_s_in_timed_runs"] == 0
        assert 1 <= details["filters_scored"] <= 3
    assert rows[0]["details"]["filters_scored"] == 3
    assert rows[1]["details"]["same_choice_as_all"]
    assert "(baseline extrapolated)" in stdout


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


def test_unknown_selection_filter_is_a_usage_error():
    child = subprocess.run([sys.executable, str(SCRIPTS / "benchmark.py"), "--sections=selection",
                            "--selection_filters=all,some", "--out="], capture_output=True,
                           text=True, timeout=60)
    assert child.returncode != 0
    assert "--selection_filters takes 'all' and/or 'until_chosen'" in child.stderr


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


def _one_padded_length(model, instructions, count):
    """The first `count` instructions whose chat prompts take 37 to 44 tokens: after the
    template's 4 shared tokens, each batch pads them to 40 (a multiple of 8), so one compiled
    program serves every batch of both sets (a fast test), while rows still differ in length."""
    lengths = model.chat.encode(list(instructions), context_length=model.config.max_context,
                                length_bucket=1).valid.sum(axis=1)
    chosen = [text for text, length in zip(instructions, lengths) if 37 <= length <= 44][:count]
    assert len(chosen) == count
    return chosen


@pytest.fixture(scope="module")
def tiny_chat_selection():
    """The pipeline's tiny random chat model (`random:llama-tiny`), its transformers twin, DiM
    directions from 8 + 8 training prompts, and 4 + 4 val prompts."""
    model = random_model("llama-tiny", seed=1)
    harmful, harmless = (capture(model, load_instructions(name)[:8], batch_size=8,
                                 length_bucket=32, name=name)[0]
                         for name in ("harmful_train", "harmless_train"))
    twin = torch_stack.torch_model(torch_stack.llama_hf_config(model.config), model.config,
                                   model.params)
    return (model, twin, np.asarray(mean_difference(harmful, harmless)),
            *(_one_padded_length(model, load_instructions(name), 4)
              for name in ("harmful_val", "harmless_val")))


def test_pipeline_selection_agrees_with_the_hooked_transformers_loop(tiny_chat_selection):
    model, twin, directions, harmful, harmless = tiny_chat_selection
    baseline = {}
    for mode in ("local", "global"):
        # Batches of 2 prompts: two per set on both sides.
        problem = selection.selection_problem(model, directions, harmful, harmless,
                                              candidates=3, mode=mode, batch_size=2, chunk=4)
        assert len(problem.pairs) == 3 and problem.multipliers == (0.5, 1.0, 2.0)
        ours = selection.score_ours(problem, problem.pairs, "all").scores
        baseline[mode] = selection.score_baseline(problem, twin, problem.pairs)
        differences = selection.max_abs_differences(ours, baseline[mode], problem.pairs)
        assert None not in differences.values()
        assert max(differences.values()) <= SCORE_TOLERANCE, (mode, differences)
    # Agreement is not vacuous: the scores move far more than the tolerance with what differs
    # between interventions (ablation at one layer or at every layer, the multiplier,
    # ablation or none).
    local, every_layer = baseline["local"], baseline["global"]
    assert np.abs(local.bypass - every_layer.bypass).max() > 100 * SCORE_TOLERANCE
    assert np.ptp(local.steering, axis=1).max() > 100 * SCORE_TOLERANCE
    assert local.kl.max() > 100 * SCORE_TOLERANCE


def test_candidates_spread_over_the_non_zero_pairs_and_0_takes_them_all(tiny_chat_selection):
    model, _, directions, harmful, harmless = tiny_chat_selection
    directions = directions.copy()
    directions[:, 0] = 0.0  # layer 0: zero DiM directions, never candidates
    n_positions, n_layers, _ = directions.shape
    every = [(p, l) for p in range(n_positions) for l in range(1, n_layers)]
    problem = selection.selection_problem(model, directions, harmful, harmless, candidates=0)
    assert list(problem.pairs) == every and problem.zero[:, 0].all()
    problem = selection.selection_problem(model, directions, harmful, harmless, candidates=3)
    assert list(problem.pairs) == [every[0], every[len(every) // 2], every[-1]]


def test_selection_problem_rejects_bad_input(tiny_chat_selection):
    model, _, directions, harmful, harmless = tiny_chat_selection
    with pytest.raises(ValueError, match="mode must be one of"):
        selection.selection_problem(model, directions, harmful, harmless, candidates=1,
                                    mode="everywhere")
    with pytest.raises(ValueError, match="DiM grid"):
        selection.selection_problem(model, directions[0], harmful, harmless, candidates=1)
    with pytest.raises(ValueError, match="every DiM direction is zero"):
        selection.selection_problem(model, np.zeros_like(directions), harmful, harmless,
                                    candidates=1)
    with pytest.raises(ValueError, match="at least one harmful"):
        selection.selection_problem(model, directions, (), harmless, candidates=1)
    with pytest.raises(ValueError, match=">= 0"):
        selection.selection_problem(model, directions, harmful, harmless, candidates=-1)


def test_workload_chat_inputs_explain_what_is_missing():
    small = workload.random_workload(workload.llama_config(256, 16, 1, 1, 1, 16, 32),
                                     prompt_length=8, dtype="float32", torch_options=TORCH_CPU)
    assert len(small.instructions("harmless_val", 3)) == 3
    with pytest.raises(ValueError, match="at most 32"):
        small.instructions("harmless_val", 33)
    with pytest.raises(ValueError, match="vocab_size >= 512"):
        _ = small.chat_model


def test_compile_seconds_counts_compilations_only():
    double = jax.jit(lambda x: 2 * x + 1)
    with selection.compile_seconds() as first:
        double(jnp.ones(7)).block_until_ready()
    with selection.compile_seconds() as cached:
        double(jnp.ones(7)).block_until_ready()
    assert first[0] > 0 and cached[0] == 0


def test_interleaved_timing_rotates_the_order_and_keeps_every_result():
    order = []
    calls = {name: (lambda name=name: order.append(name) or name) for name in "abc"}
    runs = selection.time_interleaved(calls, {"a": (lambda: None, 2)}, repeats=3)
    assert "".join(order) == "abc" + "bca" + "cab"
    assert runs["b"].results == ["b"] * 3 and len(runs["c"].seconds) == 3
    assert runs["a"].first_call_s is not None and runs["b"].first_call_s is None


# The tiny config at test sizes, as `python -m refusal_jax.main` flags.
TINY_PIPELINE_FLAGS = [
    f"--config={Path(__file__).resolve().parents[1] / 'configs/tiny_random.py'}",
    "--config.data.n_train=8", "--config.data.n_val=4", "--config.data.n_eval=2",
    "--config.directions.inlp_max_directions=2", "--config.infer.max_new_tokens=2",
    "--workdir=ignored",
]
# DiM is a difference of means of float32 activations of the same weights; transformers' and
# our forwards agree to ~1e-5 relative (tests/test_model_parity.py holds logits within 1e-4).
DIM_RTOL, DIM_ATOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def tiny_pipeline_and_twin(tmp_path_factory):
    """Our pipeline (in process) and its PyTorch twin on the same tiny config."""
    config = torch_pipeline.config_from_flags(TINY_PIPELINE_FLAGS)
    workdir = tmp_path_factory.mktemp("pipeline")
    # Our evaluate stage is left out (time): its refusal rates are `refusal_rate` of the infer
    # stage's files, compared below.
    study = run_study(config, workdir, stages=("extract", "select", "infer"))
    twin = torch_pipeline.run_twin(config, torch_options=TORCH_CPU)
    return config, study, twin


def test_twin_runs_every_mirrored_stage_with_our_pipelines_work(tiny_pipeline_and_twin):
    config, study, twin = tiny_pipeline_and_twin
    assert list(twin.stages) == list(torch_pipeline.MIRRORED_STAGES)
    assert all(stage.seconds > 0 for stage in twin.stages.values())
    assert "report stage" in twin.not_mirrored
    ours_prompts = study.prompts()
    assert twin.prompts == ours_prompts  # same samples (the tiny config filters nothing)
    work = {name: stage.work for name, stage in twin.stages.items()}
    # extract: four sets of 8 + 8 + 4 + 4 prompts, one forward per batch of 8.
    assert work["extract"]["prompt_rows"] == 24 and work["extract"]["forward_passes"] == 4
    n_positions, n_layers = study.directions()["dim"].shape[:2]
    assert work["extract"]["inlp_pairs"] == n_positions * n_layers
    # select: the candidates our stage scored (finite bypass), per method.
    scores = artifacts.read_arrays(study.stage_dir("select") / "scores.npz")
    for method in ("dim", "inlp"):
        ours_candidates = int(np.isfinite(scores[f"{method}_local_bypass"]).sum())
        assert work["select"][f"{method}_candidates"] == ours_candidates > 0
        # The published loop scores every candidate's filters; ours stops once one survives.
        assert twin.selection[method]["filters_scored"] == ours_candidates
        assert study.selection()[method]["filters_scored"] <= ours_candidates
    # infer: every variant's completions of every eval prompt, as ours wrote.
    interventions = config.infer.interventions
    assert list(twin.completions) == list(interventions)
    infer_dir = study.stage_dir("infer") / "completions"
    for name in interventions:
        ours_rows = artifacts.read_json(infer_dir / f"{name}.json")
        for cls in ("harmful", "harmless"):
            assert len(twin.completions[name][cls]) == len(ours_rows[cls]) == 2
    assert work["infer"]["completions"] == 4 * len(interventions)
    assert 0 < work["infer"]["generated_tokens"] <= (
        work["infer"]["completions"] * config.infer.max_new_tokens)
    assert work["infer"]["folding_max_abs_logit_difference"] < 1e-3
    # evaluate: metrics of every variant, and the k-curve points below the full basis.
    k_max = max(c["k"] for c in twin.selection["inlp"]["components"])
    assert set(twin.metrics) == set(interventions) | {
        f"{config.evaluate.k_curve_intervention}_k{k}" for k in k_values(k_max)[:-1]}
    assert work["evaluate"]["k_curve_points"] == len(k_values(k_max)) - 1


def test_twin_takes_the_lowest_bypass_candidate_when_no_candidate_passes_the_filters():
    config = torch_pipeline.config_from_flags(
        [*TINY_PIPELINE_FLAGS, "--config.select.kl_threshold=0.0"])  # every KL fails
    twin = torch_pipeline.run_twin(config, torch_options=TORCH_CPU, stages=("extract", "select"))
    for method in ("dim", "inlp"):
        chosen = twin.selection[method]
        assert "no candidate passed the filters" in chosen["fallback"]
        bypass = [c["bypass"] for c in chosen["components"]]
        assert len(bypass) == 1 and np.isfinite(bypass[0])


def test_twin_chooses_our_dim_component_from_its_hooked_scores(tiny_pipeline_and_twin):
    _, study, twin = tiny_pipeline_and_twin
    ours = study.selection()["dim"]["components"][0]
    theirs = twin.selection["dim"]["components"][0]
    assert (theirs["position"], theirs["layer"]) == (ours["position"], ours["layer"])
    for score in ("bypass", "steering", "kl"):
        assert abs(theirs[score] - ours[score]) <= SCORE_TOLERANCE, score


def test_twin_dim_direction_equals_our_extract_stage(tiny_pipeline_and_twin):
    _, study, twin = tiny_pipeline_and_twin
    ours = study.directions()["dim"]
    assert twin.directions["dim"].shape == ours.shape
    np.testing.assert_allclose(twin.directions["dim"], ours, rtol=DIM_RTOL, atol=DIM_ATOL)
    # Not vacuous: the directions are far larger than the tolerance (outside layer 0).
    assert np.abs(ours[:, 1:]).max() > 100 * DIM_ATOL


def test_twin_completions_of_every_variant_match_ours_under_greedy_decoding(
        tiny_pipeline_and_twin):
    """The twin builds each variant from its own directions and selection (the same components
    as ours here), with hooks of its own: every variant's completions are ours."""
    config, study, twin = tiny_pipeline_and_twin
    assert len(config.infer.interventions) == 10
    for name in config.infer.interventions:
        ours_rows = artifacts.read_json(study.stage_dir("infer") / f"completions/{name}.json")
        for cls in ("harmful", "harmless"):
            ours = [row["completion"] for row in ours_rows[cls]]
            assert twin.completions[name][cls] == ours, (name, cls)
            assert twin.metrics[name][f"{cls}_refusal_rate"] == refusal_rate(ours)


# Largest |ours - twin| of the evaluate stage's metrics when the twin builds its variants from
# our directions and selection (float32 forwards of the same weights, summed in other orders):
# measured at most 1.3e-6 (KL of dim_folded; 4e-7 elsewhere), 5e-7 (cross-entropy) and 1.2e-7
# (centroid-axis positions) on the idle 2-core CPU; the tolerances are about 10x that. The
# variants move KL by 1.6e-2 to 0.5 and cross-entropy by 3e-4 to 4.6e-2 from the baseline.
KL_TOLERANCE, CROSS_ENTROPY_TOLERANCE, POSITION_TOLERANCE = 1e-5, 5e-6, 1e-6
# Against the twin's metrics from its own directions (its INLP is scikit-learn's, whose basis
# differs from ours in the sixth digit): measured at most 2.1e-5, tolerance 10x.
OWN_DIRECTIONS_TOLERANCE = 2e-4


def _twin_centroid_axis_positions(twin, names) -> dict[str, tuple[float, float]]:
    """Mean centroid-axis positions (harmful, harmless eval) of each variant, from the twin's
    hooked captures, in float64 numpy: at the first DiM component's (position, layer) for the
    baseline and the DiM / LEACE variants, at the first INLP component's for the INLP ones; 0 =
    baseline harmful centroid, 1 = baseline harmless centroid there."""
    prompts, selection = twin.prompts, twin.selection
    sources = [selection[method]["components"][0] for method in ("dim", "inlp")]
    eoi = [source["position_index"] for source in sources]

    def at_source(captures, index):  # captures [n, 2, L, D] at the two sources' positions
        return captures[:, index, sources[index]["layer"]].detach().double().numpy()

    base = {cls: twin.capture(prompts[f"{cls}_eval"], eoi)[0] for cls in ("harmful", "harmless")}
    positions = {}
    for name in names:
        index = 1 if name.startswith("inlp_") else 0
        harmful_hooks, harmless_hooks, model = twin.variant(name)
        mu_h = at_source(base["harmful"], index).mean(0)
        axis = at_source(base["harmless"], index).mean(0) - mu_h
        moved = []
        for cls, hooks in (("harmful", harmful_hooks), ("harmless", harmless_hooks)):
            with hooks():
                points = at_source(twin.capture(prompts[f"{cls}_eval"], eoi, model)[0], index)
            moved.append(float(((points - mu_h) @ axis / (axis @ axis)).mean()))
        positions[name] = tuple(moved)
    return positions


@pytest.fixture(scope="module")
def evaluated_and_twin_on_our_artefacts(tiny_pipeline_and_twin):
    """Our evaluate stage on the fixture's run, and a twin whose infer and evaluate stages start
    from our prompts, directions and selection: each variant is built twice from the same
    inputs, by `study.variants` and by the twin's hooks, and measured twice."""
    config, study, _ = tiny_pipeline_and_twin
    run_study(config, study.workdir, stages=("evaluate",))
    metrics = artifacts.read_json(study.stage_dir("evaluate") / "metrics.json")["interventions"]
    with torch.no_grad():
        twin = torch_pipeline._Twin(config, TORCH_CPU)
        twin.prompts = study.prompts()
        twin.directions, twin.selection = study.directions(), study.selection()
        twin.infer()
        twin.evaluate()
        positions = _twin_centroid_axis_positions(twin, config.infer.interventions)
    return config, study, metrics, twin, positions


def test_every_variant_on_our_artefacts_completes_as_the_twin(evaluated_and_twin_on_our_artefacts):
    config, study, _, twin, _ = evaluated_and_twin_on_our_artefacts
    for name in config.infer.interventions:
        ours_rows = artifacts.read_json(study.stage_dir("infer") / f"completions/{name}.json")
        for cls in ("harmful", "harmless"):
            assert twin.completions[name][cls] == [row["completion"] for row in ours_rows[cls]], (
                name, cls)


def test_evaluate_metrics_of_every_variant_match_the_twin(evaluated_and_twin_on_our_artefacts,
                                                          tiny_pipeline_and_twin):
    """KL on harmless eval (harmless-prompt intervention), cross-entropy of the built-in text
    (harmful-prompt intervention) and the centroid-axis positions, variant by variant, against
    the twin's hooks on the same directions; and against the twin's own run."""
    config, _, metrics, twin, positions = evaluated_and_twin_on_our_artefacts
    own = tiny_pipeline_and_twin[2]
    assert set(metrics) == set(config.infer.interventions)
    for name in config.infer.interventions:
        ours, theirs = metrics[name], twin.metrics[name]
        assert abs(ours["kl"] - theirs["kl"]) <= KL_TOLERANCE, (name, ours["kl"], theirs["kl"])
        assert abs(ours["cross_entropy"]["builtin"] - theirs["cross_entropy"]["builtin"]) <= (
            CROSS_ENTROPY_TOLERANCE), (name, ours["cross_entropy"], theirs["cross_entropy"])
        harmful, harmless = positions[name]
        assert abs(ours["centroid_axis_position"] - harmful) <= POSITION_TOLERANCE, (
            name, ours["centroid_axis_position"], harmful)
        assert abs(ours["centroid_axis_position_harmless"] - harmless) <= POSITION_TOLERANCE, (
            name, ours["centroid_axis_position_harmless"], harmless)
        for cls in ("harmful", "harmless"):
            assert ours[f"{cls}_refusal_rate"] == theirs[f"{cls}_refusal_rate"]
        assert abs(ours["kl"] - own.metrics[name]["kl"]) <= OWN_DIRECTIONS_TOLERANCE, name
        assert abs(ours["cross_entropy"]["builtin"] - own.metrics[name]["cross_entropy"][
            "builtin"]) <= OWN_DIRECTIONS_TOLERANCE, name
    # Not vacuous: every variant but the baseline moves the KL, and the cross-entropy, far more
    # than the tolerances (a sign flip of any variant's coefficient moves them too).
    baseline = metrics["baseline"]
    assert baseline["kl"] == pytest.approx(0.0, abs=KL_TOLERANCE)
    for name in config.infer.interventions[1:]:
        assert metrics[name]["kl"] > 1000 * KL_TOLERANCE, name
        assert abs(metrics[name]["cross_entropy"]["builtin"]
                   - baseline["cross_entropy"]["builtin"]) > 20 * CROSS_ENTROPY_TOLERANCE, name


# The offline judge's two model measures, ours against the twin's on the same completions. Reply
# NLL: a mean of logsumexp(z) - z_target over reply tokens, which moves by at most 2 max|dz| when
# the logits z move by dz, as the refusal score above: float32 logits of the same weights agree
# within 1e-4 (tests/test_model_parity.py), so SCORE_TOLERANCE. Relevance: for unit vectors,
# |cos(a, b) - cos(a', b')| <= |a - a'| + |b - b'|; float32 all-MiniLM-L6-v2 embeddings agree
# with transformers' within 3.1e-7 per component (issue 23's parity run), so within
# sqrt(384) * 3.1e-7 = 6.1e-6 each, and the cosine within 1.2e-5: tolerance 2e-5.
REPLY_NLL_TOLERANCE, RELEVANCE_TOLERANCE = SCORE_TOLERANCE, 2e-5
JUDGE_METRICS = [f"{cls}_{name}" for cls in ("harmful", "harmless") for name in (
    "on_topic_compliance_rate", "degenerate_rate", "mean_relevance", "mean_reply_nll")]


def test_twin_judges_every_completion_as_our_evaluate_stage(evaluated_and_twin_on_our_artefacts,
                                                            tiny_pipeline_and_twin):
    """Labels, reply NLLs and relevances of every completion (our `judged/<variant>.json`)
    against the twin's transformers fluency forward and sentence encoder, and the judge's
    metrics; the k-curve's points are not judged, as in ours."""
    config, study, metrics, twin, _ = evaluated_and_twin_on_our_artefacts
    assert set(twin.judged) == set(config.infer.interventions)
    nlls, relevances = [], []
    for name in config.infer.interventions:
        ours_judged = artifacts.read_json(study.stage_dir("evaluate") / f"judged/{name}.json")
        for cls in ("harmful", "harmless"):
            ours, theirs = ours_judged[cls], twin.judged[name][cls]
            assert theirs["label"] == [row["label"] for row in ours], (name, cls)
            for column in ("refusal", "repeated_ngram_fraction", "n_words"):
                assert list(theirs[column]) == [row[column] for row in ours], (name, column)
            ours_nll = np.asarray([np.nan if row["reply_nll"] is None else row["reply_nll"]
                                   for row in ours])
            np.testing.assert_array_equal(np.isnan(theirs["reply_nll"]), np.isnan(ours_nll))
            np.testing.assert_allclose(theirs["reply_nll"], ours_nll, rtol=0,
                                       atol=REPLY_NLL_TOLERANCE, err_msg=f"{name} {cls}")
            np.testing.assert_allclose(theirs["relevance"], [row["relevance"] for row in ours],
                                       rtol=0, atol=RELEVANCE_TOLERANCE, err_msg=f"{name} {cls}")
            nlls += list(ours_nll[np.isfinite(ours_nll)])
            relevances += [row["relevance"] for row in ours]
        for key in JUDGE_METRICS:
            assert (key in metrics[name]) == (key in twin.metrics[name]), (name, key)
            if key.endswith("_rate"):
                assert twin.metrics[name][key] == metrics[name][key], (name, key)
            elif key in metrics[name]:
                tolerance = (REPLY_NLL_TOLERANCE if key.endswith("nll") else RELEVANCE_TOLERANCE)
                assert abs(twin.metrics[name][key] - metrics[name][key]) <= tolerance, (name, key)
    # Not vacuous: most tiny-model replies are gibberish (labelled degenerate whatever their
    # NLL), so the NLLs and relevances themselves are compared above; they spread far more than
    # the tolerances across the completions.
    assert len(nlls) >= 20 and np.ptp(nlls) > 100 * REPLY_NLL_TOLERANCE
    assert np.ptp(relevances) > 100 * RELEVANCE_TOLERANCE
    # The twin's own run judges its variants too, counting the fluency forwards and encodings.
    own = tiny_pipeline_and_twin[2]
    assert set(own.judged) == set(config.infer.interventions)
    work = own.stages["evaluate"].work
    assert work["fluency_rows"] == sum(int(np.isfinite(judged[cls]["reply_nll"]).sum())
                                       for judged in own.judged.values()
                                       for cls in ("harmful", "harmless"))
    assert work["encoded_texts"] > 0 and work["encoder_batches"] >= 1


def test_section_rows_pair_each_mirrored_stage_with_the_twin(tiny_pipeline_and_twin):
    _, _, twin = tiny_pipeline_and_twin
    ours = {"extract": 2.0, "select": 1.0, "infer": 0.5, "evaluate": 0.25, "report": 0.5}
    rows = pipeline.stage_rows(ours, twin)
    assert [row.step for row in rows] == [
        "stage extract (one run)", "stage select (one run)", "stage infer (one run)",
        "stage evaluate (one run)", "stage report (one run; not mirrored)",
        "stages extract, select, infer, evaluate (one run)"]
    for row, stage in zip(rows, torch_pipeline.MIRRORED_STAGES):
        assert row.ours.median == ours[stage]
        assert row.baseline.median == pytest.approx(twin.stages[stage].seconds)
        assert row.speedup.median == pytest.approx(row.baseline.median / ours[stage])
        assert row.details["twin_work"] == twin.stages[stage].work
    assert rows[4].baseline is None and rows[4].ours.median == 0.5
    assert rows[-1].ours.median == 3.75
    assert rows[-1].baseline.median == pytest.approx(
        sum(stage.seconds for stage in twin.stages.values()))


def test_sklearn_loop_returns_its_orthonormal_basis_of_classifier_normals():
    rng = np.random.default_rng(0)
    labels = np.tile([1, 0], 20)
    x = rng.normal(size=(40, 6)) + np.outer(labels, [3.0, -2.0, 1.0, 0, 0, 0])
    pair_fit, _ = torch_pipeline.inlp_bench.BASELINES[torch_pipeline.INLP_LOOP]
    fit = pair_fit(x[:32], labels[:32], x[32:], labels[32:], max_directions=3)
    assert fit.n_directions >= 2 and fit.basis.shape == (fit.n_directions, 6)
    np.testing.assert_allclose(fit.basis @ fit.basis.T, np.eye(fit.n_directions), atol=1e-6)
    np.testing.assert_allclose(fit.basis[0], fit.first_weight / np.linalg.norm(fit.first_weight),
                               atol=1e-12)


def test_twin_rejects_a_command_without_config_and_out_of_order_stages():
    with pytest.raises(ValueError, match="no --config"):
        torch_pipeline.config_from_flags(["--workdir=somewhere"])
    config = torch_pipeline.config_from_flags(TINY_PIPELINE_FLAGS)
    with pytest.raises(ValueError, match="prefix"):
        torch_pipeline.run_twin(config, stages=("select",))


def test_spread_keeps_the_first_and_last_and_spaces_the_rest_evenly():
    assert activations.spread(10, 4).tolist() == [0, 3, 6, 9]
    assert activations.spread(10, 0).tolist() == list(range(10))
    assert activations.spread(10, 10).tolist() == list(range(10))


def test_twin_select_on_a_sample_extrapolates_its_time_to_every_candidate():
    config = torch_pipeline.config_from_flags(TINY_PIPELINE_FLAGS)
    twin = torch_pipeline.run_twin(config, torch_options=TORCH_CPU, stages=("extract", "select"),
                                   select_sample=2)
    work = twin.stages["select"].work
    for method in ("dim", "inlp"):
        assert work[f"{method}_candidates_scored"] == 2 < work[f"{method}_candidates"]
        assert twin.selection[method]["filters_scored"] == 2
    # The rest's time: the mean time of a scored candidate for each of the others (> 0).
    assert work["seconds_extrapolated"] > 0
    assert twin.stages["select"].seconds == pytest.approx(
        work["seconds_measured"] + work["seconds_extrapolated"], abs=2e-3)


def test_draft_acceptance_is_the_share_of_target_tokens_before_the_first_difference(tmp_path):
    from bench_lib import drafts

    folder = tmp_path / "infer" / "completions"
    folder.mkdir(parents=True)
    texts = {"a": (["1 2 3 4", "5 6"], ["7 8"]), "b": (["1 2 9 9", "6 5"], ["7 8"])}
    for name, (harmful, harmless) in texts.items():
        (folder / f"{name}.json").write_text(json.dumps({
            "name": name, "harmful": [{"completion": text} for text in harmful],
            "harmless": [{"completion": text} for text in harmless]}))

    def words(text, add_special_tokens):
        return {"input_ids": text.split()}

    result = drafts.acceptance(tmp_path, words)
    # b's 8 tokens: 2 + 0 + 2 agree with a's; a's 8 tokens: the same 4.
    assert result["acceptance"] == {"a": {"b": 0.5}, "b": {"a": 0.5}}
    assert result["best"][2] == 0.5 and result["mean"] == 0.5
    assert drafts.acceptance(tmp_path / "none", words) == {}
