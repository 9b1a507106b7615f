"""A metric registered in `refusal_jax.study.metrics` (and nowhere else) is reported by the
evaluate stage for every variant, after the built-in ones, and reaches results.json."""

import pytest
from tiny_pipeline import shrunk_tiny_config

from refusal_jax.evaluation.intervals import wilson_interval
from refusal_jax.results import schema
from refusal_jax.study import artifacts, metrics, runner

TOY = "toy_harmless_completion_characters"


@pytest.fixture
def toy_metric():
    """A metric of the completions, registered for one test."""
    @metrics.metric(TOY)
    def characters(run: metrics.VariantRun) -> int:
        return sum(len(text) for text in run.texts("harmless"))

    yield characters
    del metrics.METRICS[TOY]


def test_a_registered_metric_runs_in_the_evaluate_stage(toy_metric, tmp_path):
    config = shrunk_tiny_config()
    config.infer.interventions = ("baseline", "dim_ablation")
    config.evaluate.k_curve_intervention = ""
    study = runner.run_study(config, tmp_path)
    reported = artifacts.read_json(study.stage_dir("evaluate") / "metrics.json")["interventions"]
    assert sorted(reported) == ["baseline", "dim_ablation"]
    for name, values in reported.items():
        completions = artifacts.read_json(study.stage_dir("infer") / f"completions/{name}.json")
        assert values[TOY] == sum(len(row["completion"]) for row in completions["harmless"])
        built_in = [key for key in metrics.METRICS if key != TOY and key in values]
        assert list(values)[:len(built_in) + 1] == built_in + [TOY]
        assert "judge_unsafe_rate" not in values  # None (no judge) leaves a metric out
        judged = artifacts.read_json(study.stage_dir("evaluate") / f"judged/{name}.json")
        for prompt_set in ("harmful", "harmless"):
            labels = [row["label"] for row in judged[prompt_set]]
            assert [row["completion"] for row in judged[prompt_set]] == [
                row["completion"] for row in completions[prompt_set]]
            assert values[f"{prompt_set}_degenerate_rate"] == (
                labels.count("degenerate") / len(labels))
            assert values[f"{prompt_set}_on_topic_compliance_rate"] == (
                labels.count("on_topic") / len(labels))
            # each rate's Wilson interval reaches results.json beside it
            assert values["intervals"][f"{prompt_set}_degenerate_rate"] == list(
                wilson_interval(labels.count("degenerate"), len(labels)))
    results = schema.read_results(tmp_path / "results.json")
    for row in results.interventions:
        assert row.other_metrics[TOY] == reported[row.name][TOY]
