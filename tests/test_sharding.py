"""Sharding: layouts follow the rules, and sharded runs give the numbers of one device.

The sharded checks need 8 CPU devices, which jax fixes when it is first imported (pytest has
imported it by now with one device). So this file also runs as a script: the `measured` fixture
starts `python tests/test_sharding.py OUT.json` once with
XLA_FLAGS=--xla_force_host_platform_device_count=8; the script runs every sharded computation
next to its single-device reference and writes what it measured (differences, shard shapes,
bytes per device) to OUT.json, and the tests below assert on those measurements. Checks that
need no devices (errors, the memory plan's arithmetic, bfloat16) run in the pytest process.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import forward
from refusal_jax.models.io import checkpoints
from refusal_jax.models.io.convert import CheckpointMismatchError, params_to_hf
from refusal_jax.models.params import init_params, param_specs
from refusal_jax.runtime import sharded_loading, sharding
from refusal_jax.runtime.precision import DtypePolicy

TOLERANCE = 1e-5  # float32, sharded vs one device
N_DEVICES = 8
CONFIG = ModelConfig(family="qwen2", vocab_size=128, d_model=64, n_layers=2, n_heads=8,
                     n_kv_heads=4, head_dim=8, d_ff=96, max_context=64, qkv_bias=True,
                     tie_embeddings=False)
# Weights of std 0.1 give logits and residual activations of order 1 (checked below), so the
# absolute tolerance is also a relative one of about 1e-5.
WEIGHT_SCALE = 0.1
MESHES = {"2x4": {"data": 2, "model": 4}, "4x2": {"data": 4, "model": 2}, "8x1": {"data": 8},
          "fsdp8": {"fsdp": 8}}
LOADED_MESHES = ("2x4", "fsdp8")  # loaded from a sharded checkpoint; the others re-laid out
GENERATION_MESHES = ("2x4", "fsdp8")
SWEEP_MESHES = ("2x4", "8x1")
NEW_TOKENS = 6
CAPTURE_POSITIONS = 2
KV_SLOTS = 16
MEMORY_MESH = (2, 1, 4)  # data, fsdp, model


def _batch():
    """8 left-padded rows of random tokens and the indices of their last two tokens."""
    rng = np.random.default_rng(2)
    lengths = (12, 7, 3, 9, 12, 1, 5, 8)
    T = max(lengths)
    tokens = np.zeros((len(lengths), T), np.int32)
    valid = np.zeros((len(lengths), T), bool)
    for row, n in enumerate(lengths):
        tokens[row, T - n:] = rng.integers(1, CONFIG.vocab_size, n)
        valid[row, T - n:] = True
    capture = np.tile(np.arange(T - CAPTURE_POSITIONS, T, dtype=np.int32), (len(lengths), 1))
    return tokens, valid, capture


def _params():
    return init_params(CONFIG, jax.random.key(0), scale=WEIGHT_SCALE)


def _write_checkpoint(directory: Path, params, **state_dict_edits) -> Path:
    state_dict = params_to_hf(CONFIG, params)
    state_dict.update(state_dict_edits)
    state_dict = {k: v for k, v in state_dict.items() if v is not None}
    return checkpoints.save_hf_checkpoint(directory, {"model_type": "qwen2"}, state_dict,
                                          max_shard_bytes=64_000)


# ----------------------------------------------------------------------------------------------
# The measurements (run in the 8-device subprocess).


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _layout(params) -> dict:
    named = sharding.leaves_by_path(params)
    layout = {}
    for path, leaf in named.items():
        indices = {str(shard.index) for shard in leaf.addressable_shards}
        layout[path] = {"spec": list(leaf.sharding.spec),
                        "shard_shape": list(leaf.addressable_shards[0].data.shape),
                        "distinct_shards": len(indices)}
    return layout


def _inlp_features():
    """6 (position, layer) pairs of 40 examples whose classes differ along random directions."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    shifts = rng.normal(size=(6, 1, 16)) * 0.5
    features = rng.normal(size=(6, 40, 16)) + labels[None, :, None] * shifts
    return features.astype(np.float32), labels


def _lapack_sized_inlp_features():
    """16 pairs of 96 examples x 64 features: two pairs per device, big enough that jaxlib's CPU
    LAPACK kernels split their batches over the thread pool (which deadlocked on a CPU mesh)."""
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 48)
    shifts = rng.normal(size=(16, 1, 64)) * 0.3
    features = rng.normal(size=(16, 96, 64)) + labels[None, :, None] * shifts
    return features.astype(np.float32), labels


def _candidates(n: int):
    from refusal_jax import interventions
    directions = jax.random.normal(jax.random.key(5), (n, CONFIG.d_model))
    return interventions.stack([
        interventions.directional_ablation(d, n_layers=CONFIG.n_layers, layers=None)
        for d in directions])


def _measure_model(workdir: Path) -> dict:
    """Forward, captures, generation, sweep, loading and bytes per device on every mesh."""
    from refusal_jax.models.core import KVCache
    from refusal_jax.models.generate import generate

    assert jax.device_count() == N_DEVICES, jax.devices()
    params = _params()
    tokens, valid, capture = _batch()
    run_forward = jax.jit(forward, static_argnames=("config", "logits"))

    def sweep(params, candidates, tokens, valid):
        def one(candidate):
            return forward(params, tokens, valid, config=CONFIG, intervention=candidate,
                           logits="last").logits
        return jax.vmap(one)(candidates)

    run_sweep = jax.jit(sweep)
    candidates = _candidates(N_DEVICES)
    reference = {
        "forward": run_forward(params, tokens, valid, config=CONFIG, capture_positions=capture),
        "generation": generate(params, tokens, valid, config=CONFIG, max_new_tokens=NEW_TOKENS,
                               stop_ids=[-1]).tokens,
        "sweep": run_sweep(params, candidates, tokens, valid),
    }
    checkpoint = _write_checkpoint(workdir / "checkpoint", params)
    results = {"devices": jax.device_count(),
               "checkpoint_files": len(list(checkpoint.glob("*.safetensors"))), "meshes": {},
               "max_abs_logit": float(jnp.max(jnp.abs(reference["forward"].logits))),
               "max_abs_capture": float(jnp.max(jnp.abs(reference["forward"].captures)))}

    live_counts = []
    original_iter = sharded_loading.iter_hf_tensors

    def watched_iter(*args, **kwargs):  # how many earlier tensors are alive at each read
        alive = []
        for name, tensor in original_iter(*args, **kwargs):
            live_counts.append(sum(ref() is not None for ref in alive))
            alive.append(weakref.ref(tensor))
            yield name, tensor

    sharded_loading.iter_hf_tensors = watched_iter  # this process only measures, then exits
    for name, shape in MESHES.items():
        mesh = sharding.make_mesh(shape)
        if name in LOADED_MESHES:
            sharded = sharded_loading.load_sharded_params(checkpoint, CONFIG, mesh)
        else:
            sharded = sharding.shard_params(params, CONFIG, mesh)
        batch = sharding.shard_batch((tokens, valid, capture), mesh)
        out = run_forward(sharded, batch[0], batch[1], config=CONFIG, capture_positions=batch[2])
        pairs = zip(jax.tree.leaves(sharded), jax.tree.leaves(params), strict=True)
        result = {
            "layout": _layout(sharded),
            "weights_vs_original": max(_max_diff(a, b) for a, b in pairs),
            "forward_logits": _max_diff(out.logits, reference["forward"].logits),
            "forward_captures": _max_diff(out.captures, reference["forward"].captures),
            "logits_shard_shape": list(out.logits.addressable_shards[0].data.shape),
        }
        if name in GENERATION_MESHES:
            generated = generate(sharded, batch[0], batch[1], config=CONFIG,
                                 max_new_tokens=NEW_TOKENS, stop_ids=[-1]).tokens
            result["generation_mismatches"] = int(np.sum(np.asarray(generated)
                                                          != np.asarray(reference["generation"])))
        if name in SWEEP_MESHES:
            swept = run_sweep(sharded, sharding.shard_leading_axis(candidates, mesh, "candidates"),
                              tokens, valid)
            result["sweep"] = _max_diff(swept, reference["sweep"])
            result["sweep_shard_shape"] = list(swept.addressable_shards[0].data.shape)
        if tuple(sharding.mesh_shape(shape, N_DEVICES)) == MEMORY_MESH:
            cache = jax.jit(lambda: KVCache.empty(CONFIG, len(tokens), KV_SLOTS),
                            out_shardings=sharding.kv_cache_shardings(CONFIG, mesh, len(tokens),
                                                                      KV_SLOTS))()
            results["memory"] = {
                part: sorted(set(sharding.addressable_bytes(tree).values()))
                for part, tree in (("weights", sharded), ("kv_cache", cache),
                                   ("captures", out.captures))}
        results["meshes"][name] = result
    results["loader_max_earlier_tensors_alive"] = max(live_counts)
    return results


def _measure_inlp() -> dict:
    """INLP with its pair axis split over the 8 devices against one device."""
    from refusal_jax.directions import fit_inlp

    assert jax.device_count() == N_DEVICES, jax.devices()
    features, labels = _inlp_features()
    expected = fit_inlp(features, labels, max_directions=3)
    # Each device fits its own pairs; a one-device mesh fitting the same pairs runs the same
    # computation (batching pairs differently moves late directions by float32 rounding).
    one_device = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])

    def on_one_device(pairs, labels):
        return fit_inlp(sharding.shard_leading_axis(pairs, one_device, "pairs"), labels,
                        max_directions=3)

    one_at_a_time = [on_one_device(pair[None], labels).basis[0] for pair in features]
    mesh = sharding.make_mesh(MESHES["2x4"])
    padded, n_pairs = sharding.pad_leading_axis(features, sharding.axis_size(mesh, "pairs"))
    found = fit_inlp(sharding.shard_leading_axis(padded, mesh, "pairs"), labels, max_directions=3)
    accuracies = np.nan_to_num(np.asarray(found.dev_accuracies[:n_pairs]), nan=-1.0)
    several, several_labels = _lapack_sized_inlp_features()
    several_found = fit_inlp(sharding.shard_leading_axis(several, sharding.make_mesh(
        MESHES["8x1"]), "pairs"), several_labels, max_directions=3)
    per_device = [on_one_device(several[i:i + 2], several_labels) for i in range(0, 16, 2)]
    return {
        "several_pairs_per_device": {
            "basis": _max_diff(several_found.basis,
                               np.concatenate([fit.basis for fit in per_device])),
            "n_directions": np.asarray(several_found.n_directions).tolist(),
            "expected_n_directions": np.asarray(fit_inlp(several, several_labels,
                                                         max_directions=3).n_directions).tolist(),
            "basis_shard_shape": list(several_found.basis.addressable_shards[0].data.shape)},
        "basis": _max_diff(found.basis[:n_pairs], np.stack(one_at_a_time)),
        "dev_accuracies": _max_diff(accuracies, np.nan_to_num(expected.dev_accuracies, nan=-1.0)),
        "n_directions": np.asarray(found.n_directions[:n_pairs]).tolist(),
        "expected_n_directions": np.asarray(expected.n_directions).tolist(),
        "basis_shard_shape": list(found.basis.addressable_shards[0].data.shape),
        "padded_pairs": int(padded.shape[0]),
    }


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """Runs the two 8-device measurements side by side; {"model": ..., "inlp": ...}."""
    workdir = tmp_path_factory.mktemp("sharded")
    repository = str(Path(__file__).resolve().parents[1])  # importable without an install
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={N_DEVICES}",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                   [repository, *filter(None, [os.environ.get("PYTHONPATH")])]))
    runs = {part: subprocess.Popen([sys.executable, __file__, part, str(workdir / f"{part}.json")],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
            for part in ("model", "inlp")}
    errors = {part: run.communicate(timeout=600)[1] for part, run in runs.items()}
    for part, run in runs.items():
        if run.returncode:
            pytest.fail(f"the 8-device {part} run failed:\n{errors[part][-4000:]}")
    return {part: json.loads((workdir / f"{part}.json").read_text()) for part in runs}


# ----------------------------------------------------------------------------------------------
# Sharded == one device.


def test_subprocess_sees_eight_devices_and_a_multi_file_checkpoint(measured):
    assert measured["model"]["devices"] == N_DEVICES
    assert measured["model"]["checkpoint_files"] > 1
    # Values of order 1, so that the absolute tolerance is a strict relative one too.
    assert 1.0 < measured["model"]["max_abs_logit"] < 10.0
    assert 1.0 < measured["model"]["max_abs_capture"] < 10.0


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_forward_logits_and_captures_match_one_device(measured, mesh):
    result = measured["model"]["meshes"][mesh]
    assert result["forward_logits"] <= TOLERANCE
    assert result["forward_captures"] <= TOLERANCE


@pytest.mark.parametrize("mesh", GENERATION_MESHES)
def test_greedy_generation_matches_one_device(measured, mesh):
    assert measured["model"]["meshes"][mesh]["generation_mismatches"] == 0


@pytest.mark.parametrize("mesh", SWEEP_MESHES)
def test_candidate_sweep_matches_one_device_and_splits_candidates(measured, mesh):
    result = measured["model"]["meshes"][mesh]
    assert result["sweep"] <= TOLERANCE
    data, fsdp, _ = sharding.mesh_shape(MESHES[mesh], N_DEVICES)
    assert result["sweep_shard_shape"][0] == N_DEVICES // (data * fsdp)


def test_inlp_over_a_sharded_pair_axis_matches_one_device(measured):
    inlp = measured["inlp"]
    assert inlp["padded_pairs"] == 8
    assert inlp["basis_shard_shape"][0] == 1  # one pair per device
    assert inlp["n_directions"] == inlp["expected_n_directions"]
    assert max(inlp["expected_n_directions"]) > 0  # the comparison covers fitted directions
    assert inlp["basis"] <= TOLERANCE
    assert inlp["dev_accuracies"] <= TOLERANCE


def test_inlp_with_several_lapack_sized_pairs_per_device_finishes_and_matches_one_device(
        measured):
    """Batched LAPACK calls on every device of a CPU mesh at once deadlocked (0% CPU, forever);
    the sharded fit does its decompositions one matrix at a time there."""
    several = measured["inlp"]["several_pairs_per_device"]
    assert several["basis_shard_shape"][0] == 2
    assert several["n_directions"] == several["expected_n_directions"]
    assert min(several["expected_n_directions"]) > 0
    assert several["basis"] <= TOLERANCE


def test_loaded_and_relaid_weights_equal_the_originals(measured):
    for mesh in MESHES:
        assert measured["model"]["meshes"][mesh]["weights_vs_original"] == 0.0


def test_loader_holds_one_checkpoint_tensor_at_a_time(measured):
    assert measured["model"]["loader_max_earlier_tensors_alive"] == 0


# Per-device shard shapes the default rules imply for CONFIG (written out by hand).
EXPECTED_SHARDS = {
    "2x4": {  # vocab, q_heads, kv_heads, mlp split 4 ways; embed over fsdp = 1
        "embed": (32, 64), "lm_head": (64, 32), "final_norm": (64,),
        "layers.attn_norm": (2, 64), "layers.mlp_norm": (2, 64),
        "layers.q_proj": (2, 64, 16), "layers.k_proj": (2, 64, 8), "layers.v_proj": (2, 64, 8),
        "layers.o_proj": (2, 16, 64), "layers.q_bias": (2, 16), "layers.k_bias": (2, 8),
        "layers.v_bias": (2, 8), "layers.gate_proj": (2, 64, 24), "layers.up_proj": (2, 64, 24),
        "layers.down_proj": (2, 24, 64),
    },
    "fsdp8": {  # embed split 8 ways, everything else whole
        "embed": (128, 8), "lm_head": (8, 128), "final_norm": (8,),
        "layers.attn_norm": (2, 8), "layers.mlp_norm": (2, 8),
        "layers.q_proj": (2, 8, 64), "layers.k_proj": (2, 8, 32), "layers.v_proj": (2, 8, 32),
        "layers.o_proj": (2, 64, 8), "layers.q_bias": (2, 64), "layers.k_bias": (2, 32),
        "layers.v_bias": (2, 32), "layers.gate_proj": (2, 8, 96), "layers.up_proj": (2, 8, 96),
        "layers.down_proj": (2, 96, 8),
    },
}


@pytest.mark.parametrize("mesh", sorted(EXPECTED_SHARDS))
def test_weights_are_partitioned_as_the_rules_say(measured, mesh):
    layout = measured["model"]["meshes"][mesh]["layout"]
    full_shapes = {path: spec.shape
                   for path, spec in sharding.leaves_by_path(param_specs(CONFIG)).items()}
    assert set(layout) == set(EXPECTED_SHARDS[mesh])
    for path, shard_shape in EXPECTED_SHARDS[mesh].items():
        assert tuple(layout[path]["shard_shape"]) == shard_shape, path
        pieces = math.prod(full_shapes[path]) // math.prod(shard_shape)
        assert layout[path]["distinct_shards"] == pieces, path  # devices hold different pieces
    assert layout["layers.q_proj"]["spec"] == [None, "fsdp", "model"]
    assert layout["embed"]["spec"] == ["model", "fsdp"]


def test_batch_is_split_over_data(measured):
    assert measured["model"]["meshes"]["2x4"]["logits_shard_shape"][0] == 4
    assert measured["model"]["meshes"]["8x1"]["logits_shard_shape"][0] == 1


# ----------------------------------------------------------------------------------------------
# The memory plan against the bytes JAX actually allocated.


def _memory_plan_module():
    path = Path(__file__).resolve().parents[1] / "scripts" / "memory_plan.py"
    spec = importlib.util.spec_from_file_location("memory_plan", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module
    spec.loader.exec_module(module)
    return module


def test_memory_plan_equals_the_bytes_each_device_holds(measured):
    plan = _memory_plan_module().plan(CONFIG, MEMORY_MESH, batch=8, length=KV_SLOTS,
                                      capture_positions=CAPTURE_POSITIONS, dtype=jnp.float32)
    actual = measured["model"]["memory"]
    assert actual["weights"] == [plan.weights]  # the same on every device
    assert actual["kv_cache"] == [plan.kv_cache]
    assert actual["captures"] == [plan.captures]


def test_published_configs_have_the_published_parameter_counts():
    memory_plan = _memory_plan_module()
    counts = {name: memory_plan.parameter_count(ModelConfig.from_hf_config(hf))
              for name, hf in memory_plan.PUBLISHED_CONFIGS.items()}
    # The parameter counts the Hugging Face hub reports for these checkpoints.
    assert counts == {"Llama-3-8B": 8_030_261_248, "Llama-3-70B": 70_553_706_496,
                      "Gemma-2-9B": 9_241_705_984, "Qwen2.5-72B": 72_706_203_648}


def test_memory_plan_chooses_a_mesh_that_fits_and_rejects_one_that_does_not():
    memory_plan = _memory_plan_module()
    llama70 = ModelConfig.from_hf_config(memory_plan.PUBLISHED_CONFIGS["Llama-3-70B"])
    h100 = next(m for m in memory_plan.MACHINES if m.name == "8 x H100")
    options = dict(batch=64, length=1024, capture_positions=5)
    chosen = memory_plan.choose_mesh(llama70, h100, **options)
    assert chosen.total <= 0.8 * h100.device_bytes
    # 141 GB of bfloat16 weights need at least 3 shards within 80% of 80 GB, hence 4 of the 8
    # GPUs per copy: two data-parallel copies, tensor parallelism preferred to FSDP.
    assert chosen.mesh == (2, 1, 4)
    assert memory_plan.plan(llama70, (4, 1, 2), **options).total > 0.8 * h100.device_bytes
    assert memory_plan.plan(llama70, (8, 1, 1), **options).weights > h100.device_bytes
    tiny = memory_plan.Machine("tiny", 8, 10**9)
    assert memory_plan.choose_mesh(llama70, tiny, **options) is None


def test_memory_plan_counts_one_kv_cache_per_variant_generated_together():
    memory_plan = _memory_plan_module()
    llama70 = ModelConfig.from_hf_config(memory_plan.PUBLISHED_CONFIGS["Llama-3-70B"])
    h100 = next(m for m in memory_plan.MACHINES if m.name == "8 x H100")
    options = dict(batch=64, length=1024, capture_positions=5)
    one = memory_plan.plan(llama70, (2, 1, 4), **options)
    sixteen = memory_plan.plan(llama70, (2, 1, 4), variants=16, **options)
    assert (sixteen.weights, sixteen.captures) == (one.weights, one.captures)
    assert sixteen.kv_cache == 16 * one.kv_cache
    # On 2 x 1 x 4, 16 caches of 64 x 1024 slots take 43 GB of each GPU beside 35 GB of weights,
    # over 80% of its 80 GB; on 1 x 1 x 8 the caches take the same and the weights half as much.
    assert memory_plan.choose_mesh(llama70, h100, variants=16, **options).mesh == (1, 1, 8)


def test_memory_plan_rejects_a_headroom_outside_0_1_and_fewer_than_one_variant(capsys):
    with pytest.raises(SystemExit):
        _memory_plan_module().main(["--headroom", "1.5"])
    assert "--headroom must lie in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _memory_plan_module().main(["--variants", "0"])
    assert "--variants must be >= 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Errors (no devices needed).


def test_mesh_shape_errors():
    assert sharding.mesh_shape({"data": -1, "model": 4}, 8) == (2, 1, 4)
    assert sharding.mesh_shape((1, 8, 1), 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.mesh_shape({"dta": 2}, 2)
    with pytest.raises(ValueError, match="needs 3 devices but 8"):
        sharding.mesh_shape({"data": 3}, 8)
    with pytest.raises(ValueError, match="cannot be split"):
        sharding.mesh_shape({"data": -1, "model": 3}, 8)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.mesh_shape({"data": -1, "model": -1}, 8)
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        sharding.make_mesh({"data": jax.device_count() + 1})


def test_rule_errors():
    with pytest.raises(ValueError, match="mesh axis 'fsdp' would shard both"):
        sharding.logical_to_spec(("batch", "embed"))
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'heads'"):
        sharding.logical_to_spec(("heads",))
    with pytest.raises(ValueError, match="names mesh axis 'tensor'"):
        sharding.logical_to_spec(("mlp",), {"mlp": "tensor"})
    assert sharding.logical_to_spec(("layers", None, "mlp")) == jax.sharding.PartitionSpec(
        None, None, "model")


def test_indivisible_weight_is_named():
    config = ModelConfig(**{**vars(CONFIG), "d_ff": 90})
    with pytest.raises(ValueError, match=r"weight layers.gate_proj .* \('mlp', size 90\)"):
        sharding.param_shardings(config, sharding.abstract_mesh({"model": 4}, 4))


def test_leading_axis_errors_and_padding():
    mesh = sharding.abstract_mesh({"data": 2, "model": 4}, 8)
    with pytest.raises(ValueError, match="'pairs', size 6"):
        sharding.leading_axis_sharding(mesh, (6, 3), "pairs")
    with pytest.raises(ValueError, match="one leading axis"):
        sharding.shard_leading_axis((np.zeros(4), np.zeros(2)),
                                    sharding.make_mesh({"data": 1}), "pairs")
    values = np.arange(12.0).reshape(6, 2)
    (padded, labels), size = sharding.pad_leading_axis((values, np.arange(6)), 8)
    assert size == 6 and padded.shape == (8, 2) and labels.shape == (8,)
    np.testing.assert_array_equal(padded[:6], values)
    np.testing.assert_array_equal(padded[6:], np.stack([values[-1]] * 2))
    assert sharding.axis_size(mesh, "pairs") == 8 and sharding.axis_size(mesh, "batch") == 2


def test_dtype_policy():
    policy = DtypePolicy(params="bfloat16")
    assert policy.params_dtype == jnp.bfloat16 and policy.captures_dtype == jnp.float32
    with pytest.raises(ValueError, match="float16 overflows"):
        DtypePolicy(params="float16")


# ----------------------------------------------------------------------------------------------
# Loading errors: every mismatch reported at once. (Exact values: the 8-device run above.)


def test_sharded_loading_reports_every_mismatch(tmp_path):
    params = _params()
    hf = params_to_hf(CONFIG, params)
    checkpoint = _write_checkpoint(
        tmp_path / "ckpt", params,
        **{"model.layers.1.mlp.up_proj.weight": None,
           "model.layers.0.self_attn.q_proj.weight": np.zeros((64, 63), np.float32),
           "model.extra.weight": np.zeros(3, np.float32),
           "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32)})
    assert "model.layers.1.mlp.up_proj.weight" in hf
    with pytest.raises(CheckpointMismatchError) as error:  # bfloat16 reuses the next test's jits
        sharded_loading.load_sharded_params(checkpoint, CONFIG, sharding.make_mesh({"data": 1}),
                                            dtype=jnp.bfloat16)
    message = str(error.value)
    assert "3 problem(s)" in message
    assert "missing tensor model.layers.1.mlp.up_proj.weight (expected shape (96, 64))" in message
    assert ("tensor model.layers.0.self_attn.q_proj.weight has shape (64, 63), expected (64, 64)"
            in message)
    assert "unexpected tensor model.extra.weight" in message


# ----------------------------------------------------------------------------------------------
# bfloat16 against float32.


def test_bfloat16_loading_and_forward_close_to_float32(tmp_path):
    params = _params()
    checkpoint = _write_checkpoint(tmp_path / "ckpt", params)  # float32 tensors
    half_params = sharded_loading.load_sharded_params(checkpoint, CONFIG,
                                                      sharding.make_mesh({"data": 1}),
                                                      dtype=jnp.bfloat16)
    for loaded, original in zip(jax.tree.leaves(half_params), jax.tree.leaves(params),
                                strict=True):
        assert loaded.dtype == jnp.bfloat16
        np.testing.assert_array_equal(loaded, original.astype(jnp.bfloat16))
    tokens, valid, capture = _batch()
    run = jax.jit(forward, static_argnames=("config", "logits"))
    full = run(params, tokens, valid, config=CONFIG, capture_positions=capture)
    half = run(half_params, tokens, valid, config=CONFIG, capture_positions=capture)
    assert half.logits.dtype == jnp.float32  # logits are always float32
    assert half.captures.dtype == jnp.bfloat16
    logits, reference = np.asarray(half.logits)[valid], np.asarray(full.logits)[valid]
    # bfloat16 keeps 8 significant bits (rounding error up to 2**-9 = 0.2% per operation); a
    # few dozen roundings in series through two blocks give errors of order 1% of the values
    # (measured: 1.2% for logits and 1.0% for captures); 5% would mean a float32 step was lost.
    relative = np.linalg.norm(logits - reference) / np.linalg.norm(reference)
    assert relative < 0.05
    captures, captures32 = np.asarray(half.captures, np.float32), np.asarray(full.captures)
    assert np.linalg.norm(captures - captures32) / np.linalg.norm(captures32) < 0.05
    assert np.mean(np.argmax(logits, -1) == np.argmax(reference, -1)) >= 0.9  # measured 0.98
    log_p, log_q = jax.nn.log_softmax(reference), jax.nn.log_softmax(logits)
    kl = np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))
    assert kl < 1e-3  # measured 4e-5

if __name__ == "__main__":
    part, output = sys.argv[1], Path(sys.argv[2])
    # A deadlock (see the INLP test) fails the run with every thread's stack, not a 10-min wait.
    faulthandler.dump_traceback_later(300, exit=True)
    result = _measure_model(output.parent) if part == "model" else _measure_inlp()
    output.write_text(json.dumps(result))
