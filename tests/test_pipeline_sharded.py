"""The pipeline on a mesh writes the artefacts of one device.

The sharded run needs 8 CPU devices, which jax fixes when it is first imported (pytest has
imported it with one device), so this file also runs as a script: the `runs` fixture starts
`python tests/test_pipeline_sharded.py WORKDIR OUT.json` with
XLA_FLAGS=--xla_force_host_platform_device_count=8, which runs every stage of
configs/tiny_random.py (shrunk) on a data=2 x fsdp=2 x model=2 mesh and records where the stages
placed their arrays, while the pytest process runs the same stages on one device without a
mesh. The tests compare the two work directories and assert on the recorded placements.

Tolerances. The mesh splits the matmuls' sums over fsdp and model, so float32 results differ
from one device's by rounding: arrays are compared at 1e-5 relative to their largest magnitude
(the random model's activations reach about 30; for arrays of order 1 this is 1e-5 absolute).
INLP's L-BFGS fits amplify rounding differences (even on one device, fitting the same pairs in
groups of another size moves its unit directions by about 1e-5), so the INLP fit on the mesh is
compared with one device fitting the same pair groups as the devices, where it must agree to
1e-5; against the unsharded run its discrete outcomes must agree, and the selections and
completions built from it must be identical.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_pipeline import shrunk_tiny_config

from refusal_jax.runtime import sharding
from refusal_jax.runtime.placement import Placement
from refusal_jax.study import artifacts, runner
from refusal_jax.study.config import check_config

REPOSITORY = Path(__file__).resolve().parents[1]
MESH = "data=2,fsdp=2,model=2"
N_DEVICES = 8
STAGES = ("extract", "select", "infer", "evaluate")
TOLERANCE = 1e-5
TIMEOUT_S = 540


def tiny_config(mesh: str = "", multiple_choice: Path | None = None):
    """configs/tiny_random.py, shrunk; runtime.mesh does not enter the config hash. With
    `multiple_choice` (a folder holding `_write_multiple_choice`'s files), the evaluate stage
    also scores a 2-shot multiple-choice set."""
    config = shrunk_tiny_config()
    config.infer.interventions = ("baseline", "dim_ablation", "inlp_nullspace")
    config.runtime.generation_variants = 3  # generated together
    config.runtime.mesh = mesh
    if multiple_choice is not None:
        config.evaluate.mc_files = (str(multiple_choice / "sums.json"),)
        config.evaluate.mc_shot_files = (str(multiple_choice / "shots.json"),)
        config.evaluate.mc_n_shots = 2
    return config


def _write_multiple_choice(folder: Path) -> Path:
    """Five arithmetic questions: three to score, two as shots (see `tiny_config`)."""
    questions = [{"question": f"What is {i} + {i}?", "choices": [str(2 * i), str(i), "0", "7"],
                  "answer": 0, "subject": "arithmetic"} for i in range(1, 6)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sums.json").write_text(json.dumps(questions[:3]))
    (folder / "shots.json").write_text(json.dumps(questions[3:]))
    return folder


def _scaled_diff(found, expected) -> float:
    """max |found - expected| / max(1, max |expected|), NaNs required at the same places."""
    found, expected = np.asarray(found, np.float64), np.asarray(expected, np.float64)
    assert found.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(found), np.isnan(expected))
    if not found.size:
        return 0.0
    scale = max(1.0, float(np.nanmax(np.abs(expected))))
    return float(np.nanmax(np.abs(found - expected))) / scale


# ----------------------------------------------------------------------------------------------
# The sharded run (in the 8-device subprocess).


def _spec(array) -> list:
    return [list(axes) if isinstance(axes, tuple) else axes for axes in array.sharding.spec]


def _shard_shape(array) -> list[int]:
    return list(array.addressable_shards[0].data.shape)


def _recording(module, name: str, record: list, arguments):
    """Replaces `module.name` by a wrapper that records `arguments(*args, **kwargs)` per call."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        record.append(arguments(*args, **kwargs))
        return original(*args, **kwargs)

    setattr(module, name, wrapped)


def _sharded_run(workdir: Path) -> dict:
    """Runs the stages on the mesh, recording where the arrays were; then the side checks."""
    import jax

    from refusal_jax.directions import fit
    from refusal_jax.evaluation import activations, cross_entropy, multiple_choice
    from refusal_jax.study import completions
    from refusal_jax.study.stages import evaluate

    assert jax.device_count() == N_DEVICES, jax.devices()
    captured, fitted, generated, forwarded, scored = [], [], [], [], []
    _recording(activations, "_capture", captured,
               lambda params, tokens, valid, positions, *_, **__: {
                   "tokens": _spec(tokens), "tokens_shard": _shard_shape(tokens),
                   "positions": _spec(positions)})
    _recording(fit, "fit_inlp", fitted, lambda features, *_, **__: {
        "features": _spec(features), "shape": list(features.shape),
        "shard": _shard_shape(features)})
    _recording(completions, "generate_each", generated,
               lambda params, tokens, valid, interventions, **kwargs: {
                   "tokens": _spec(tokens), "tokens_shard": _shard_shape(tokens),
                   "variants": len(interventions),
                   "mesh": dict(kwargs["cache_shardings"].keys.mesh.shape)})
    _recording(evaluate, "_logits_and_captures", forwarded,
               lambda params, prefix, tokens, *_, **__: {
                   "tokens": _spec(tokens), "tokens_shard": _shard_shape(tokens)})
    for module, name in ((cross_entropy, "_nll_sum"), (multiple_choice, "last_position_logits")):
        _recording(module, name, scored, lambda params, tokens, *_, name=name, **__: {
            "pass": name, "tokens": _spec(tokens), "tokens_shard": _shard_shape(tokens)})
    study = runner.run_study(tiny_config(MESH, workdir.parents[1] / "multiple_choice"),
                             workdir, STAGES)
    params = sharding.leaves_by_path(study.model.params)
    expected = sharding.leaves_by_path(sharding.param_shardings(
        study.model.config, study.placement.mesh, study.placement.rules))
    return {
        "devices": jax.device_count(),
        "mesh": dict(study.placement.mesh.shape),
        "weights_as_rules": sorted(path for path, leaf in params.items()
                                   if leaf.sharding.spec == expected[path].spec),
        "weights": sorted(params),
        "weight_split": {"embed": _shard_shape(params["embed"]),
                         "layers.q_proj": _shard_shape(params["layers.q_proj"])},
        "captured": captured, "fitted": fitted, "generated": generated, "forwarded": forwarded,
        "scored": scored,
        "grouped_inlp": _grouped_inlp(workdir, jax.devices()[0]),
        "kv_cache": _kv_cache_layouts(study.model),
        "sharded_checkpoint": _sharded_checkpoint(workdir.parent / "checkpoint", study),
        "batch_size_error": _batch_size_error(workdir.parent / "bad"),
    }


def _grouped_inlp(workdir: Path, device) -> dict:
    """INLP refitted on one device in the pair groups the mesh gave each device."""
    import jax

    from refusal_jax.directions import fit_inlp

    config = tiny_config()
    activations = artifacts.read_arrays(workdir / "extract/activations.npz")
    harmful, harmless = activations["harmful_train"], activations["harmless_train"]
    n_positions, n_layers, width = harmful.shape[1:]
    examples = np.concatenate([harmful, harmless])
    features = np.moveaxis(examples, 0, -2).reshape(-1, len(examples), width)
    labels = np.r_[np.ones(len(harmful), np.int32), np.zeros(len(harmless), np.int32)]
    padded, n_pairs = sharding.pad_leading_axis(features, N_DEVICES)
    per_device = len(padded) // N_DEVICES
    with jax.default_device(device):
        groups = [fit_inlp(padded[start:start + per_device], labels, seed=config.seed,
                           max_directions=config.directions.inlp_max_directions,
                           inverse_regularization=config.directions.inlp_inverse_regularization)
                  for start in range(0, len(padded), per_device)]
    found = artifacts.read_arrays(workdir / "extract/directions.npz")
    differences = {}
    for field in ("basis", "first_direction", "dev_accuracies", "n_directions"):
        refit = np.concatenate([np.asarray(getattr(group, field)) for group in groups])[:n_pairs]
        refit = refit.reshape((n_positions, n_layers) + refit.shape[1:])
        differences[field] = float(np.nanmax(np.abs(refit - found[f"inlp_{field}"])))
    return differences


def _kv_cache_layouts(model) -> dict:
    """The KV-cache constraint `generate` lowers on two meshes, and on the mesh whose model axis
    does not divide the KV heads (the pipeline's mesh is covered by the completions) the tokens
    against one device."""
    import jax

    from refusal_jax.models.generate import generate

    generate_module = importlib.import_module("refusal_jax.models.generate")
    batch = model.chat.encode(["Tell me a joke.", "Name a colour.", "Hi", "Count to 3."],
                              context_length=model.config.max_context, length_bucket=8)
    stop_ids = sorted(model.chat.stop_token_ids)
    reference = generate(model.params, batch.tokens, batch.valid, config=model.config,
                         max_new_tokens=3, stop_ids=stop_ids).tokens
    slots = batch.tokens.shape[1] + 3
    kv_type = f"x{model.config.n_kv_heads}x{slots}x{model.config.head_dim}xf32>"  # keys, values
    layouts = {}
    for shape in ({"data": 2, "fsdp": 2, "model": 2}, {"data": 2, "model": 4}):
        mesh = sharding.make_mesh(shape)
        params = sharding.shard_params(jax.device_get(model.params), model.config, mesh)
        tokens, valid = sharding.shard_batch((batch.tokens, batch.valid), mesh)
        shardings = tuple(jax.tree.leaves(sharding.kv_cache_shardings(
            model.config, mesh, 4, tokens.shape[1] + 3, replicate_indivisible=True)))
        lowered = generate_module._generate.lower(
            params, np.zeros(0, np.int32), tokens, valid, None, np.asarray(stop_ids, np.int32),
            np.asarray(stop_ids[0], np.int32), None, None, config=model.config,
            max_new_tokens=3, cache_shardings=shardings, share_prefill=True).as_text()
        layouts[",".join(f"{k}={v}" for k, v in shape.items())] = {
            "constraints": sorted({line.split("<@mesh, ")[1].split(">")[0]
                                   for line in lowered.splitlines()
                                   if "sdy.sharding_constraint" in line and kv_type in line})}
    tokens_out = generate(params, tokens, valid, config=model.config, max_new_tokens=3,
                          stop_ids=stop_ids, cache_shardings=Placement(mesh).kv_cache(
                              model.config, 4, tokens.shape[1] + 3)).tokens
    layouts["token_mismatches"] = int(np.sum(np.asarray(tokens_out) != np.asarray(reference)))
    return layouts


def _sharded_checkpoint(directory: Path, study) -> dict:
    """The random model saved as an HF checkpoint and loaded by the pipeline with the mesh."""
    import jax

    from refusal_jax.models.io.checkpoints import save_hf_checkpoint
    from refusal_jax.models.io.convert import params_to_hf
    from refusal_jax.runtime.loading import load_study_model

    model, config = study.model, study.model.config
    hf_config = {"model_type": "llama", "vocab_size": config.vocab_size,
                 "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
                 "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
                 "head_dim": config.head_dim, "intermediate_size": config.d_ff,
                 "max_position_embeddings": config.max_context, "rms_norm_eps": config.norm_eps,
                 "rope_theta": config.rope_theta, "tie_word_embeddings": config.tie_embeddings,
                 "hidden_act": "silu", "eos_token_id": list(config.eos_token_ids)}
    host_params = jax.device_get(model.params)
    save_hf_checkpoint(directory, hf_config, params_to_hf(config, host_params),
                       max_shard_bytes=100_000, tokenizer=model.tokenizer)
    loaded = load_study_model(str(directory), placement=study.placement)
    params = sharding.leaves_by_path(loaded.params)
    expected = sharding.leaves_by_path(sharding.param_shardings(config, study.placement.mesh))
    originals = sharding.leaves_by_path(host_params)
    return {
        "files": len(list(directory.glob("*.safetensors"))),
        "same_config": loaded.config == config,
        "max_weight_difference": max(float(np.max(np.abs(np.asarray(leaf) - originals[path])))
                                     for path, leaf in params.items()),
        "laid_out_by_rules": all(leaf.sharding.spec == expected[path].spec
                                 for path, leaf in params.items()),
        "same_prompt_tokens": loaded.chat.encode(["Hi"], context_length=64).tokens.tolist()
        == model.chat.encode(["Hi"], context_length=64).tokens.tolist(),
    }


def _batch_size_error(workdir: Path) -> str:
    config = tiny_config("data=8")  # generation_batch_size 4 does not split over 8 devices
    try:
        runner.Study(config, workdir).placement
    except ValueError as error:
        return str(error)
    return ""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The sharded run in an 8-device subprocess, and the one-device run here, side by side."""
    root = tmp_path_factory.mktemp("pipeline_sharded")
    multiple_choice = _write_multiple_choice(root / "multiple_choice")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={N_DEVICES}",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                   [str(REPOSITORY), *filter(None, [os.environ.get("PYTHONPATH")])]))
    process = subprocess.Popen(
        [sys.executable, __file__, str(root / "sharded" / "run"), str(root / "sharded.json")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        runner.run_study(tiny_config(multiple_choice=multiple_choice), root / "one_device",
                         STAGES)
        log = process.communicate(timeout=TIMEOUT_S)[0]
    finally:
        if process.poll() is None:
            process.kill()
    if process.returncode:
        pytest.fail(f"the 8-device run failed:\n{log[-4000:]}")
    return {"sharded": root / "sharded" / "run", "one": root / "one_device",
            "recorded": json.loads((root / "sharded.json").read_text())}


# ----------------------------------------------------------------------------------------------
# Where the stages put their arrays.


def test_weights_are_loaded_into_the_layout_of_the_rules(runs):
    recorded = runs["recorded"]
    assert recorded["devices"] == N_DEVICES
    assert recorded["mesh"] == {"data": 2, "fsdp": 2, "model": 2}
    assert recorded["weights_as_rules"] == recorded["weights"]
    assert recorded["weight_split"] == {"embed": [256, 32],  # vocab / model, width / fsdp
                                        "layers.q_proj": [4, 32, 32]}


def test_prompt_batches_are_split_over_data_and_fsdp(runs):
    captured = runs["recorded"]["captured"]
    assert len(captured) == 4  # one batch of 8 rows per train / val set
    for call in captured:
        assert call["tokens"][0] == ["data", "fsdp"] and call["positions"][0] == ["data", "fsdp"]
        assert call["tokens_shard"][0] == 2  # 8 rows over 4 devices
    generated = runs["recorded"]["generated"]
    # The infer stage: harmful, harmless, one batch each, the 3 variants together; then the
    # evaluate stage's k-curve.
    assert [call["variants"] for call in generated[:2]] == [3, 3] and len(generated) > 2
    for call in generated:
        assert call["tokens"][0] == ["data", "fsdp"] and call["tokens_shard"][0] == 1
        assert call["mesh"] == {"data": 2, "fsdp": 2, "model": 2}
    forwarded = runs["recorded"]["forwarded"]  # the evaluate stage's logits and activations
    assert forwarded
    for call in forwarded:
        assert call["tokens"][0] == ["data", "fsdp"] and call["tokens_shard"][0] == 1
    # Its cross-entropy (one row of text under cross_entropy_max_tokens=64, filled up to 4 rows)
    # and multiple-choice (3 questions in a batch of 8) passes.
    scored = runs["recorded"]["scored"]
    assert {call["pass"] for call in scored} == {"_nll_sum", "last_position_logits"}
    for call in scored:
        assert call["tokens"][0] == ["data", "fsdp"]
        assert call["tokens_shard"][0] == (1 if call["pass"] == "_nll_sum" else 2), call


def test_inlp_pairs_are_split_over_every_device(runs):
    (call,) = runs["recorded"]["fitted"]
    assert call["features"][0] == ["data", "fsdp", "model"]
    assert call["shape"][0] == 24 and call["shard"][0] == 3  # 5 x 4 pairs padded to 24


def test_kv_cache_is_split_over_batch_and_over_kv_heads_where_they_divide(runs):
    layouts = runs["recorded"]["kv_cache"]
    # keys/values [L, B, K=2, S, head_dim]: two KV heads split over model=2, replicated on 4;
    # once filled they carry generate's leading variant axis, left open ({?}) to the partitioner.
    assert layouts["data=2,fsdp=2,model=2"]["constraints"] == [
        '[{?}, {}, {"data", "fsdp"}, {"model"}, {}, {}]',
        '[{}, {"data", "fsdp"}, {"model"}, {}, {}]']
    # (On that mesh fsdp has size 1, which the open constraint drops.)
    assert layouts["data=2,model=4"]["constraints"] == [
        '[{?}, {}, {"data"}, {}, {}, {}]', '[{}, {"data", "fsdp"}, {}, {}, {}]']
    assert layouts["token_mismatches"] == 0


def test_a_checkpoint_loads_straight_into_the_sharded_layout(runs):
    loaded = runs["recorded"]["sharded_checkpoint"]
    assert loaded["files"] > 1  # read shard file by shard file
    assert loaded["same_config"] and loaded["same_prompt_tokens"] and loaded["laid_out_by_rules"]
    assert loaded["max_weight_difference"] == 0.0


def test_batch_sizes_that_do_not_split_over_the_mesh_are_refused(runs):
    error = runs["recorded"]["batch_size_error"]
    assert "runtime.generation_batch_size=4 must be a multiple of 8" in error


# ----------------------------------------------------------------------------------------------
# Same artefacts as one device.


def test_activations_scores_and_closed_form_directions_match_one_device(runs):
    for name in ("activations.npz", "directions.npz"):
        sharded = artifacts.read_arrays(runs["sharded"] / "extract" / name)
        one = artifacts.read_arrays(runs["one"] / "extract" / name)
        assert sorted(sharded) == sorted(one)
        for key in one:
            if not key.startswith("inlp_"):
                assert _scaled_diff(sharded[key], one[key]) <= TOLERANCE, (name, key)
    assert np.abs(one["dim"]).max() > 0.1  # the comparison covers real directions
    sharded_scores = artifacts.read_json(runs["sharded"] / "extract/baseline_scores.json")
    one_scores = artifacts.read_json(runs["one"] / "extract/baseline_scores.json")
    for name, values in one_scores.items():
        assert _scaled_diff(sharded_scores[name], values) <= TOLERANCE, name
    assert (artifacts.read_json(runs["sharded"] / "extract/prompts.json")
            == artifacts.read_json(runs["one"] / "extract/prompts.json"))


def test_inlp_on_the_mesh_equals_one_device_fitting_the_same_pair_groups(runs):
    grouped = runs["recorded"]["grouped_inlp"]
    assert grouped["n_directions"] == 0.0
    assert max(grouped.values()) <= TOLERANCE


def test_inlp_outcomes_match_one_device(runs):
    sharded = artifacts.read_arrays(runs["sharded"] / "extract/directions.npz")
    one = artifacts.read_arrays(runs["one"] / "extract/directions.npz")
    assert one["inlp_n_directions"].max() > 0
    for key in ("inlp_n_directions", "inlp_dev_accuracies", "inlp_majority_rate",
                "inlp_converged"):
        np.testing.assert_array_equal(sharded[key], one[key], err_msg=key)


def test_selection_matches_one_device(runs):
    sharded = artifacts.read_json(runs["sharded"] / "select/selection.json")
    one = artifacts.read_json(runs["one"] / "select/selection.json")
    for method in ("dim", "inlp"):
        assert sharded[method]["ranking"] == one[method]["ranking"]
        assert sharded[method]["discarded"] == one[method]["discarded"]
        for found, expected in zip(sharded[method]["components"], one[method]["components"],
                                   strict=True):
            assert {k: v for k, v in found.items() if isinstance(v, int)} == {
                k: v for k, v in expected.items() if isinstance(v, int)}
            for key in ("bypass", "steering", "kl"):
                assert _scaled_diff(found[key], expected[key]) <= TOLERANCE, (method, key)
    sharded_scores = artifacts.read_arrays(runs["sharded"] / "select/scores.npz")
    for key, values in artifacts.read_arrays(runs["one"] / "select/scores.npz").items():
        assert _scaled_diff(sharded_scores[key], values) <= TOLERANCE, key


def test_completions_match_one_device(runs):
    for name in tiny_config().infer.interventions:
        sharded = artifacts.read_json(runs["sharded"] / f"infer/completions/{name}.json")
        one = artifacts.read_json(runs["one"] / f"infer/completions/{name}.json")
        assert sharded["harmful"] == one["harmful"] and sharded["harmless"] == one["harmless"]
    # The mesh is not in the config hash (the completions' own key also digests the earlier
    # stages' artefacts, whose last bits differ between meshes).
    done = [artifacts.read_json(runs[run] / "infer" / artifacts.DONE_FILE)
            for run in ("sharded", "one")]
    assert len({record["config_hash"] for record in done}) == 1


def _numbers(tree, path=""):
    """(path, value) of every number in a JSON tree (booleans aside)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{path}/{key}")
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _numbers(value, f"{path}/{index}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_evaluation_metrics_match_one_device(runs):
    sharded = artifacts.read_json(runs["sharded"] / "evaluate/metrics.json")
    one = artifacts.read_json(runs["one"] / "evaluate/metrics.json")
    expected = dict(_numbers(one))
    found = dict(_numbers(sharded))
    assert sorted(found) == sorted(expected)
    assert any("/kl" in path for path in expected) and any("k_curve" in path for path in expected)
    assert any("/multiple_choice/sums" in path for path in expected)
    for path, value in expected.items():
        if "refusal_rate" in path or path.endswith(("/k", "/n_harmful", "/n_harmless")):
            assert found[path] == value, path  # decided by identical completions
        else:
            assert _scaled_diff(found[path], value) <= TOLERANCE, path


# ----------------------------------------------------------------------------------------------
# Config keys and their errors (no devices needed).


def test_mesh_and_rule_strings_parse():
    assert sharding.parse_mesh("data=-1, model=4") == {"data": -1, "model": 4}
    rules = sharding.parse_rules("embed=none,batch=data+fsdp,vocab=model")
    assert rules["embed"] is None and rules["batch"] == ("data", "fsdp")
    assert rules["vocab"] == "model" and rules["mlp"] == sharding.DEFAULT_RULES["mlp"]
    assert sharding.parse_rules("") == sharding.DEFAULT_RULES


@pytest.mark.parametrize("text, match", [
    ("data=2,modle=4", "unknown mesh axis 'modle'"),
    ("data=two", "must be an integer"),
    ("data=2,data=4", "twice"),
    ("data", "comma-separated 'name=value'"),
    ("", "comma-separated"),
])
def test_bad_mesh_strings_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        sharding.parse_mesh(text)


@pytest.mark.parametrize("text, match", [
    ("embedding=model", "logical axis 'embedding'"),
    ("embed=tensor", "mesh axes from"),
    ("embed=", "mesh axes from"),
    ("embed", "comma-separated"),
])
def test_bad_rule_strings_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        sharding.parse_rules(text)


def test_config_checks_the_mesh_keys():
    config = tiny_config("data=2,modle=4")
    with pytest.raises(ValueError, match="runtime.mesh.*unknown mesh axis 'modle'"):
        check_config(config)
    config = tiny_config()
    config.runtime.sharding_rules = "embed=none"
    with pytest.raises(ValueError, match="needs a mesh"):
        check_config(config)
    with pytest.raises(ValueError, match="needs a mesh"):
        Placement.from_config("", "embed=none")


def test_no_mesh_places_on_one_device():
    placement = Placement.from_config("")
    assert placement.mesh is None and placement.multiple("batch") == 1
    assert placement.rows(6) == slice(0, 6)
    placed, size = placement.leading(np.arange(5.0), "pairs")
    assert size == 5 and placed.shape == (5,)


def test_kv_cache_rule_falls_back_to_replication_where_it_does_not_divide():
    from refusal_jax.models.config import ModelConfig

    config = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                         n_kv_heads=2, head_dim=8, d_ff=64, max_context=64)
    mesh = sharding.abstract_mesh({"data": 2, "model": 4}, 8)
    with pytest.raises(ValueError, match="KV cache"):
        sharding.kv_cache_shardings(config, mesh, 4, 16)
    cache = sharding.kv_cache_shardings(config, mesh, 3, 16, replicate_indivisible=True)
    assert tuple(cache.keys.spec) == (None, None, None, None, None)  # 3 rows, 2 heads: neither
    cache = sharding.kv_cache_shardings(config, mesh, 4, 16, replicate_indivisible=True)
    assert tuple(cache.keys.spec) == (None, ("data", "fsdp"), None, None, None)


if __name__ == "__main__":
    workdir, output = Path(sys.argv[1]), Path(sys.argv[2])
    output.write_text(json.dumps(_sharded_run(workdir)))
