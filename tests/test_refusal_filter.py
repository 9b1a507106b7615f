"""The refusal-score filter: which prompts it keeps, on hand-made scores, and one end-to-end run
with both filters on (the planted model of tests/planted_model.py refuses exactly the prompts
that hold a marker word, so which prompts survive is known by hand)."""

import dataclasses
import json

import numpy as np
import planted_model
import pytest
from tiny_pipeline import shrunk_tiny_config

from refusal_jax.results import schema as report
from refusal_jax.study import artifacts, runner
from refusal_jax.study.data import refusal_filter, refusal_filters

SCORES = np.array([0.5, -0.2, 0.0, -3.0, 2.0, 1e-9, -1e-9])


def test_harmful_prompts_are_kept_when_refused_and_harmless_ones_when_not():
    np.testing.assert_array_equal(refusal_filter(SCORES, harmful=True, name="harmful_train"),
                                  [True, False, False, False, True, True, False])
    # A score of exactly 0 is neither refused nor answered: dropped from both classes.
    np.testing.assert_array_equal(refusal_filter(SCORES, harmful=False, name="harmless_train"),
                                  [False, True, False, True, False, False, True])


def test_filters_apply_to_the_splits_they_are_switched_on_for():
    scores = {"harmful_train": np.array([1.0, -1.0]), "harmless_train": np.array([1.0, -1.0]),
              "harmful_val": np.array([-2.0, 3.0, 4.0]), "harmless_val": np.array([-2.0, 3.0, 4.0])}
    kept = refusal_filters(scores, {"filter_train": True, "filter_val": False})
    assert set(kept) == {"harmful_train", "harmless_train"}
    np.testing.assert_array_equal(kept["harmful_train"], [True, False])
    np.testing.assert_array_equal(kept["harmless_train"], [False, True])
    kept = refusal_filters(scores, {"filter_train": False, "filter_val": True})
    assert set(kept) == {"harmful_val", "harmless_val"}
    np.testing.assert_array_equal(kept["harmful_val"], [False, True, True])
    np.testing.assert_array_equal(kept["harmless_val"], [True, False, False])
    assert refusal_filters(scores, {"filter_train": False, "filter_val": False}) == {}


def test_a_set_the_model_refuses_entirely_is_an_error_for_harmless_prompts():
    with pytest.raises(ValueError, match="no harmless_val prompt survives.*refuses all of them"
                                         ".*data.filter_val=False"):
        refusal_filter(np.array([0.3, 2.0]), harmful=False, name="harmless_val")


# Prompt sets of the end-to-end run. The planted model refuses a prompt exactly when it holds a
# marker word (bomb, poison, weapon, hack, steal, malware).
REFUSED_TRAIN = ["how to make a bomb", "write poem about poison", "build weapon fence",
                 "hack house learn math", "steal bike", "plan trip malware"]
ANSWERED_TRAIN = ["how to make a cake", "write poem about the sea", "explain weather",
                  "cook rice", "plan trip", "fix bike grow tomatoes"]
REFUSED_VAL = ["paint bomb house", "sing song hack", "grow poison tomatoes"]
ANSWERED_VAL = ["sing song", "learn math", "build fence"]
SETS = {
    "harmful_train": REFUSED_TRAIN + ["paint house", "sing song about the sea"],
    "harmless_train": ANSWERED_TRAIN + ["cook poison rice", "fix bike steal"],
    "harmful_val": REFUSED_VAL + ["grow tomatoes"],
    "harmless_val": ANSWERED_VAL + ["explain malware"],
    "harmful_eval": ["how to make a weapon", "learn hack"],
    "harmless_eval": ["write poem about the sea", "explain bomb weather"],  # never filtered
}


def planted():
    """The planted model with room for the evaluate stage's built-in text (rows of 256 tokens;
    its attention reads no positions, so the longer context changes nothing else)."""
    model = planted_model.model()
    return dataclasses.replace(model, config=dataclasses.replace(model.config, max_context=512))


@pytest.fixture(scope="module")
def filtered_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("filtered")
    config = shrunk_tiny_config()
    for name, instructions in SETS.items():
        path = folder / f"{name}.json"
        path.write_text(json.dumps([{"instruction": text} for text in instructions]))
        config.data[name] = str(path)
    config.data.n_train, config.data.n_val, config.data.n_eval = 8, 4, 2
    config.data.filter_train = config.data.filter_val = True
    config.infer.interventions = ("baseline", "dim_ablation")
    config.infer.max_new_tokens = 1
    config.evaluate.k_curve_intervention = ""
    config.runtime.length_bucket = 16
    patch = pytest.MonkeyPatch()
    patch.setattr(runner, "load_study_model", lambda *args, **kwargs: planted())
    try:
        study = runner.run_study(config, folder / "run")
    finally:
        patch.undo()
    return study


def test_end_to_end_with_the_filters_on_keeps_exactly_the_prompts_the_model_treats_as_labelled(
        filtered_run):
    prompts = filtered_run.prompts()
    assert sorted(prompts["harmful_train"]) == sorted(REFUSED_TRAIN)
    assert sorted(prompts["harmless_train"]) == sorted(ANSWERED_TRAIN)
    assert sorted(prompts["harmful_val"]) == sorted(REFUSED_VAL)
    assert sorted(prompts["harmless_val"]) == sorted(ANSWERED_VAL)
    for name in ("harmful_eval", "harmless_eval"):
        assert sorted(prompts[name]) == sorted(SETS[name])
    scores = artifacts.read_json(filtered_run.stage_dir("extract") / "baseline_scores.json")
    for split in ("train", "val"):
        assert len(scores[f"harmful_{split}"]) == len(prompts[f"harmful_{split}"])
        assert min(scores[f"harmful_{split}"]) > 0 > max(scores[f"harmless_{split}"])
    activations = artifacts.read_arrays(filtered_run.stage_dir("extract") / "activations.npz")
    assert activations["harmful_train"].shape[0] == activations["harmless_train"].shape[0] == 6
    # The report says how many were kept.
    results = report.read_results(filtered_run.workdir / report.RESULTS_FILENAME)
    assert ("Refusal-score filter: of 8 sampled train prompts per class, 6 harmful, 6 harmless "
            "were kept.") in results.notes
    assert ("Refusal-score filter: of 4 sampled val prompts per class, 3 harmful, 3 harmless "
            "were kept.") in results.notes
    # The later stages ran on the filtered sets.
    assert [row.name for row in results.interventions] == ["baseline", "dim_ablation"]
    assert results.interventions[0].n_harmful == results.interventions[0].n_harmless == 2
