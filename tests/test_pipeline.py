"""End to end on a tiny random model: every stage, the artefacts, resuming, and bad input."""

import dataclasses
import json
import shutil
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from tiny_pipeline import shrunk_tiny_config

from refusal_jax.evaluation import activations
from refusal_jax.models.generate import generate_each
from refusal_jax.results import schema as report
from refusal_jax.runtime.loading import load_study_model
from refusal_jax.study import artifacts, fingerprints, runner
from refusal_jax.study.config import base_config, check_config
from refusal_jax.study.data import sample_sets
from refusal_jax.study.completions import complete_variants
from refusal_jax.study.stages import evaluate, extract, infer, select
from refusal_jax.study.variants import build_variants, first_equal

CONFIGS = Path(__file__).parents[1] / "configs"


def tiny_config(**data):
    config = shrunk_tiny_config()
    # One variant per intervention kind the stages treat specially: hooks, folded weights, and
    # the INLP map whose first-k truncations form the k-curve.
    config.infer.interventions = ("baseline", "dim_ablation", "dim_folded", "inlp_reflection")
    for key, value in data.items():
        config.data[key] = value
    return config


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A run interrupted after `select`, then resumed with extraction and selection counted."""
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config()
    functions = runner._stage_functions()
    patch = pytest.MonkeyPatch()

    def interrupt(study):
        raise Interrupted

    patch.setattr(runner, "_stage_functions", lambda: {**functions, "infer": interrupt})
    with pytest.raises(Interrupted):
        runner.run_study(config, workdir)
    assert runner.Study(config, workdir).stage_done("select")
    assert not (workdir / "infer" / artifacts.DONE_FILE).exists()

    calls = {"capture": 0, "run_selection": 0}

    def counting(name, function):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapped

    patch.setattr(runner, "_stage_functions", lambda: functions)
    patch.setattr(extract, "capture", counting("capture", extract.capture))
    patch.setattr(select, "run_selection", counting("run_selection", select.run_selection))
    runner.run_study(config, workdir)
    patch.undo()
    return workdir, calls


def test_resume_after_select_repeats_neither_extraction_nor_selection(resumed_run):
    workdir, calls = resumed_run
    assert calls == {"capture": 0, "run_selection": 0}
    for stage in ("infer", "evaluate", "report"):
        assert (workdir / stage / artifacts.DONE_FILE).exists()


def test_every_stage_writes_its_artefacts_and_the_report_schema(resumed_run):
    workdir, _ = resumed_run
    config = tiny_config()
    digest = json.loads((workdir / "config.json").read_text())["config_hash"]
    assert digest == artifacts.config_hash(config.to_dict())

    prompts = json.loads((workdir / "extract/prompts.json").read_text())
    assert {len(prompts[f"{c}_train"]) for c in ("harmful", "harmless")} == {8}
    activations = artifacts.read_arrays(workdir / "extract/activations.npz")
    assert activations["harmful_train"].shape == (8, 5, 4, 64)  # n, EOI positions, L, D
    directions = artifacts.read_arrays(workdir / "extract/directions.npz")
    assert directions["dim"].shape == (5, 4, 64)
    assert directions["inlp_basis"].shape == (5, 4, 2, 64)
    assert directions["leace_read"].shape == (5, 4, 1, 64)
    np.testing.assert_allclose(directions["dim"], activations["harmful_train"].mean(0)
                               - activations["harmless_train"].mean(0), atol=1e-5)

    selection = json.loads((workdir / "select/selection.json").read_text())
    for method in ("dim", "inlp"):
        (component,) = selection[method]["components"]
        assert -5 <= component["position"] <= -1 and 0 <= component["layer"] < 4
        assert [component["position"], component["layer"]] == selection[method]["ranking"][0]
    scores = artifacts.read_arrays(workdir / "select/scores.npz")
    assert scores["dim_local_bypass"].shape == (5, 4)
    assert scores["dim_local_steering"].shape == (5, 4, 1)

    for name in config.infer.interventions:
        completions = json.loads((workdir / f"infer/completions/{name}.json").read_text())
        assert len(completions["harmful"]) == len(completions["harmless"]) == 2
    folding = json.loads((workdir / "infer/folding.json").read_text())
    assert folding["max_abs_logit_difference"] <= folding["tolerance"]

    results = report.read_results(workdir / report.RESULTS_FILENAME)
    assert [row.name for row in results.interventions] == list(config.infer.interventions)
    baseline = results.interventions[0]
    assert baseline.kl == pytest.approx(0.0, abs=1e-5)
    assert baseline.centroid_axis_position == pytest.approx(0.0, abs=1e-4)
    assert baseline.centroid_axis_position_harmless == pytest.approx(1.0, abs=1e-4)
    assert set(baseline.cross_entropy) == {"builtin"}
    assert {s.method for s in results.selections} == {"dim", "inlp"}
    assert results.geometry is not None and results.geometry.plots
    # Each variant is seen at the (position, layer) of the component it acts at: a second view
    # at the INLP source exactly when INLP chose another pair than DiM.
    dim, inlp = (selection[method]["components"][0] for method in ("dim", "inlp"))
    assert (results.geometry.position, results.geometry.layer) == (dim["position"], dim["layer"])
    if (dim["position"], dim["layer"]) == (inlp["position"], inlp["layer"]):
        assert results.inlp_geometry is None
    else:
        assert (results.inlp_geometry.position, results.inlp_geometry.layer) == (
            inlp["position"], inlp["layer"])
        assert all((workdir / plot).is_file() for plot in results.inlp_geometry.plots)
    assert results.k_curve is not None and results.k_curve.points[0].k == 1
    for plot in results.geometry.plots + [results.k_curve.plot]:
        assert (workdir / plot).is_file()
    assert set(results.timings_s) == {"extract", "select", "infer", "evaluate"}
    assert "dim_ablation" in (workdir / "report.md").read_text()


# ---------------------------------------------------------------------------------- bad input

def test_variants_generated_together_complete_as_one_at_a_time(resumed_run, tmp_path,
                                                               monkeypatch):
    """runtime.generation_variants changes how the infer stage batches, not its completions."""
    workdir, _ = resumed_run
    config = tiny_config()
    assert config.runtime.generation_variants == 1
    shutil.copytree(workdir, tmp_path / "run", ignore=shutil.ignore_patterns("infer"))
    config.runtime.generation_variants = 8
    variants_per_call = []

    def counting(params, tokens, valid, interventions, **kwargs):
        variants_per_call.append(len(interventions))
        return generate_each(params, tokens, valid, interventions, **kwargs)

    monkeypatch.setattr("refusal_jax.study.completions.generate_each", counting)
    runner.run_study(config, tmp_path / "run", ("infer",))
    # harmful, then harmless: the three variants on the model's weights, then the folded one
    assert variants_per_call == [3, 3, 1, 1]
    for name in config.infer.interventions:
        together = json.loads((tmp_path / f"run/infer/completions/{name}.json").read_text())
        one_at_a_time = json.loads((workdir / f"infer/completions/{name}.json").read_text())
        assert one_at_a_time == together, name


def test_a_variant_running_an_earlier_ones_intervention_is_run_once_and_takes_its_results(
        resumed_run, tmp_path, monkeypatch):
    """inlp_reflection_a1 is inlp_nullspace's map under another name: the infer stage generates
    it once, giving it the completions it gets generated alone; the evaluate stage gives it the
    other's metrics and labels, with its own description."""
    workdir, _ = resumed_run
    config = tiny_config()
    config.infer.interventions = ("baseline", "inlp_nullspace", "inlp_reflection",
                                  "inlp_reflection_a1")
    config.evaluate.k_curve_intervention = ""
    run = tmp_path / "run"
    shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("config.json", "infer",
                                                                "evaluate", "report"))
    study = runner.Study(config, run)
    variants = build_variants(study.model, study.directions(), study.selection(), config)
    assert first_equal(variants) == [0, 1, 2, 1]
    folded = build_variants(study.model, study.directions(), study.selection(), config,
                            names=["dim_folded", "dim_folded"])
    assert first_equal(folded) == [0, 1], "a variant with its own weights is never merged"

    generated = []

    def counting(params, tokens, valid, interventions, **kwargs):
        generated.append(len(interventions))
        return generate_each(params, tokens, valid, interventions, **kwargs)

    monkeypatch.setattr("refusal_jax.study.completions.generate_each", counting)
    infer.run(study)
    assert generated == [1] * 6  # three distinct variants, harmful and harmless prompts each
    completions = {name: json.loads((run / f"infer/completions/{name}.json").read_text())
                   for name in ("inlp_nullspace", "inlp_reflection_a1")}
    ((_, alone),) = complete_variants(study.model, variants[3:], study.prompts(), config.infer,
                                      config.runtime)
    for cls in ("harmful", "harmless"):
        assert completions["inlp_reflection_a1"][cls] == alone[cls]
        assert completions["inlp_reflection_a1"][cls] == completions["inlp_nullspace"][cls]

    evaluated, scored = [], []

    def counting_metrics(study, variant, *args, **kwargs):
        evaluated.append(variant.name)
        return variant_metrics(study, variant, *args, **kwargs)

    def counting_fluency(requests, replies, **kwargs):
        scored.append(len(replies))
        return fluency_of_answers(requests, replies, **kwargs)

    variant_metrics, fluency_of_answers = evaluate._variant_metrics, evaluate.fluency_of_answers
    monkeypatch.setattr(evaluate, "_variant_metrics", counting_metrics)
    monkeypatch.setattr(evaluate, "fluency_of_answers", counting_fluency)
    evaluate.run(study)
    assert evaluated == ["baseline", "inlp_nullspace", "inlp_reflection"]
    assert scored == [3, 3]  # the replies of the three distinct variants, per prompt set
    metrics = json.loads((run / "evaluate/metrics.json").read_text())["interventions"]
    copied, original = metrics["inlp_reflection_a1"], metrics["inlp_nullspace"]
    assert copied.pop("description") == variants[3].description != original.pop("description")
    assert copied == original
    judged = {name: json.loads((run / f"evaluate/judged/{name}.json").read_text())
              for name in ("inlp_nullspace", "inlp_reflection_a1")}
    assert judged["inlp_reflection_a1"].pop("variant") == "inlp_reflection_a1"
    assert judged["inlp_nullspace"].pop("variant") == "inlp_nullspace"
    assert judged["inlp_reflection_a1"] == judged["inlp_nullspace"]


def test_report_notes_say_when_a_selection_took_the_lowest_bypass_candidate(tmp_path):
    from refusal_jax.study.stages import report as report_stage

    fallback = "no candidate passed the filters (discarded per filter: {'kl': 20}); the one ..."
    study = types.SimpleNamespace(
        config=tiny_config(filter_train=False, filter_val=False), prompts=dict,
        stage_dir=lambda stage: tmp_path / stage, workdir=tmp_path,
        selection=lambda: {"dim": {"fallback": None}, "inlp": {"fallback": fallback}})
    assert report_stage._notes(study) == [
        f"inlp selection: {fallback} (select.when_none_pass=lowest_bypass)."]


def test_missing_prompt_file(tmp_path):
    config = tiny_config(harmful_train=str(tmp_path / "absent.json"))
    with pytest.raises(FileNotFoundError, match="data.harmful_train: prompt file .*absent.json"):
        sample_sets(config.data, seed=0)


def test_empty_prompt_file(tmp_path):
    (tmp_path / "empty.json").write_text("")
    config = tiny_config(harmless_val=str(tmp_path / "empty.json"))
    with pytest.raises(ValueError, match="data.harmless_val: prompt file .*empty.json is empty"):
        sample_sets(config.data, seed=0)


def test_too_few_prompts(tmp_path):
    path = tmp_path / "three.json"
    path.write_text(json.dumps([{"instruction": f"Say {i}."} for i in range(3)]))
    config = tiny_config(harmful_train=str(path))
    with pytest.raises(ValueError, match=r"too few prompts in .*three.json for harmful_train "
                                         r"\(8\) = 8"):
        sample_sets(config.data, seed=0)


def test_splits_of_one_source_do_not_overlap():
    config = tiny_config(harmful_val="harmful_train", harmful_eval="harmful_train")
    sets = sample_sets(config.data, seed=0).sets
    drawn = sets["harmful_train"] + sets["harmful_val"] + sets["harmful_eval"]
    assert len(set(drawn)) == len(drawn) == 8 + 4 + 2


def test_unknown_config_key():
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
    with pytest.raises(flags.Error, match="config.select.nope"):
        values(["prog", f"--config={CONFIGS / 'tiny_random.py'}", "--config.select.nope=1"])
    with pytest.raises(AttributeError, match="nope"):
        base_config().select.nope = 1


def test_a_k_curve_without_the_baseline_is_refused_before_any_stage_runs():
    config = tiny_config()
    config.infer.interventions = ("dim_ablation", "inlp_reflection")
    with pytest.raises(ValueError, match="add 'baseline' to infer.interventions"):
        check_config(config)
    config.evaluate.k_curve_intervention = ""
    check_config(config)


def test_workdir_of_a_different_config(tmp_path):
    study = runner.Study(tiny_config(), tmp_path)
    artifacts.mark_done(study.stage_dir("extract"), study.digest, [])
    other = tiny_config()
    other.data.n_train = 9
    with pytest.raises(artifacts.WorkdirConfigMismatch, match=r"data.n_train: 8 -> 9"):
        runner.Study(other, tmp_path)
    faster = tiny_config()
    faster.runtime.batch_size = 2  # runtime settings do not change results
    runner.Study(faster, tmp_path)


def test_another_default_adapter_changes_every_model_stage_input(tmp_path, monkeypatch):
    """Retraining the default model's adapter changes its weights under the same name: the
    stages that run the model see new inputs, so a run directory of the old adapter reruns
    them."""
    config = tiny_config()
    config.model.source = "default"
    stages = ("extract", "select", "infer", "evaluate")
    study = runner.Study(config, tmp_path / "run")
    before = {stage: study.stage_inputs(stage) for stage in stages}
    retrained = tmp_path / "retrained.safetensors"
    retrained.write_bytes(b"other weights")
    monkeypatch.setattr(fingerprints, "ORGANISM_ADAPTER", retrained)
    after = runner.Study(config, tmp_path / "run")
    for stage in stages:
        assert before[stage] != after.stage_inputs(stage)
        assert str(retrained) in after.stage_inputs(stage)


def test_model_that_refuses_nothing(tmp_path):
    config = tiny_config(filter_train=True)
    with pytest.raises(ValueError, match="no harmful_train prompt survives the refusal-score "
                                         "filter: the model refuses none of them"):
        runner.run_study(config, tmp_path, ["extract"])


def test_nan_activations():
    model = load_study_model("random:llama-tiny")
    poisoned = dataclasses.replace(model.params, embed=model.params.embed.at[:, 0].set(jnp.nan))
    model = dataclasses.replace(model, params=poisoned)
    with pytest.raises(ValueError, match="give NaN or inf at the input of layer 0 .* check the "
                                         "checkpoint"):
        activations.capture(model, ["Say hi."], batch_size=2, length_bucket=64,
                            name="harmful_train")


def test_sweep_expands_a_product_of_overrides(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sweep", Path(__file__).parents[1] / "scripts" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    runs = sweep.expand(["select.mode=local,global", "directions.k_policy=none,acc99,acc95"])
    assert len(runs) == 6 and len({tuple(run) for run in runs}) == 6
    lines = sweep.commands("configs/default.py", str(tmp_path), runs,
                           [("infer.max_new_tokens", "8")], "extract,select")
    workdirs = {line[4] for line in lines}
    assert len(workdirs) == 6  # one work directory per run, so each resumes on its own
    assert lines[0][:4] == ["python", "-m", "refusal_jax.main", "--config=configs/default.py"]
    assert lines[-1][5:] == ["--config.infer.max_new_tokens=8", "--config.select.mode=global",
                             "--config.directions.k_policy=acc95", "--stages=extract,select"]


def test_judge_and_multiple_choice_reach_the_metrics(resumed_run, tmp_path):
    import types

    from refusal_jax.evaluation.relevance import TextEmbeddings
    from refusal_jax.models.io.sentence_encoder import load_sentence_encoder
    from refusal_jax.study.stages import evaluate
    from refusal_jax.study.stages import report as report_stage
    from refusal_jax.study.variants import build_variants

    workdir, _ = resumed_run
    study = runner.Study(tiny_config(), workdir)
    questions = [{"question": f"What is {i} + {i}?", "choices": [str(2 * i), str(i), "0", "7"],
                  "answer": 0, "subject": "arithmetic"} for i in range(1, 6)]
    (tmp_path / "sums.json").write_text(json.dumps(questions[:3]))
    (tmp_path / "shots.json").write_text(json.dumps(questions[3:]))
    settings = tiny_config()
    settings.evaluate.judge_source = "random:llama-tiny"
    settings.evaluate.mc_files = (str(tmp_path / "sums.json"),)
    with pytest.raises(ValueError, match="mc_n_shots=5 needs shot pools"):
        check_config(settings)
    settings.evaluate.mc_shot_files = (str(tmp_path / "shots.json"),)
    settings.evaluate.mc_n_shots = 2
    check_config(settings)
    options = types.SimpleNamespace(config=settings)
    judge, mc_sets = evaluate._judge(options), evaluate._multiple_choice_sets(options)
    assert list(mc_sets) == ["sums"]
    assert [len(mc_sets["sums"][0]), len(mc_sets["sums"][1]), mc_sets["sums"][2]] == [3, 2, 2]

    (variant,) = build_variants(study.model, study.directions(), study.selection(),
                                study.config, names=["dim_ablation"])
    completions = {"harmful": [{"instruction": "Explain how to pick a lock.",
                                "completion": " ".join(["word"] * 20)}],
                   "harmless": [{"instruction": "Name a colour.", "completion": "Blue."}]}
    source = study.selection()["dim"]["components"][0]
    base_logits = np.zeros((2, study.model.config.vocab_size), np.float32)
    embeddings = TextEmbeddings(load_sentence_encoder())
    metrics, _, _ = evaluate._variant_metrics(
        study, variant, {}, base_logits, [(source["position_index"], source["layer"])],
        embeddings, completions=completions, judge=judge, mc_sets=mc_sets)
    assert 0.0 <= metrics["judge_unsafe_rate"] <= 1.0
    assert set(metrics["multiple_choice"]) == {"sums"}
    assert metrics["multiple_choice"]["sums"] in (0.0, 1 / 3, 2 / 3, 1.0)
    report_stage._intervention_result("dim_ablation", metrics)  # fits the report schema


def test_variants_hold_as_many_inlp_rows_as_the_chosen_component_uses(resumed_run):
    """Rows another (position, layer) keeps would only cost time: the form is trimmed to the
    chosen component's k, and the trimmed variant computes what the wider one does."""
    import copy

    import jax.numpy as jnp

    from refusal_jax.models.core import forward
    from refusal_jax.study.variants import build_variants

    workdir, _ = resumed_run
    study = runner.Study(tiny_config(), workdir)
    directions, selection = dict(study.directions()), copy.deepcopy(study.selection())
    chosen = selection["inlp"]["components"][0]
    pair = (chosen["position_index"], chosen["layer"])
    counts = np.array(directions["inlp_n_directions"])
    counts[...] = 2  # every other pair keeps two directions ...
    counts[pair] = 1  # ... the chosen one a single direction
    directions["inlp_n_directions"] = counts
    chosen["k"] = 1
    (trimmed,) = build_variants(study.model, directions, selection, study.config,
                                names=["inlp_reflection"])
    chosen["k"] = 2  # the same map in a form of two rows (the second zero at the chosen pair)
    (wide,) = build_variants(study.model, directions, selection, study.config,
                             names=["inlp_reflection"])
    assert trimmed.harmful.interventions[2].basis.shape[-2] == 1
    assert wide.harmful.interventions[2].basis.shape[-2] == 2
    batch = study.model.chat.encode(study.prompts()["harmful_eval"], context_length=512,
                                    length_bucket=8)
    tokens, valid = jnp.asarray(batch.tokens), jnp.asarray(batch.valid)
    logits = [forward(study.model.params, tokens, valid, config=study.model.config,
                      intervention=variant.harmful, logits="last").logits
              for variant in (trimmed, wide)]
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-6, atol=1e-6)
    baseline = forward(study.model.params, tokens, valid, config=study.model.config,
                       logits="last").logits
    assert float(jnp.max(jnp.abs(logits[0] - baseline))) > 1e-3  # the map does act
