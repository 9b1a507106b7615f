"""The weights cache: an entry reads back what was stored, exactly; keys follow the files'
content; a recorded hash is reused while a file's size and time are unchanged."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.io import weights_cache
from refusal_jax.models.params import map_specs, param_specs
from refusal_jax.runtime.random_models import tiny_chatml_tokenizer

HF_CONFIG = {"model_type": "llama", "vocab_size": 512, "hidden_size": 16,
             "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": True}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(weights_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_an_entry_reads_back_what_was_stored(cache):
    rng = np.random.default_rng(0)
    params = map_specs(lambda spec: jnp.asarray(rng.standard_normal(spec.shape), jnp.bfloat16),
                       param_specs(ModelConfig.from_hf_config(HF_CONFIG)))
    tokenizer = tiny_chatml_tokenizer()
    assert weights_cache.load("k") is None
    weights_cache.store("k", HF_CONFIG, params, tokenizer)
    weights_cache.store("k", HF_CONFIG, params, tokenizer)  # already there: kept
    hf_config, loaded, loaded_tokenizer = weights_cache.load("k")
    assert hf_config == HF_CONFIG
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for ours, theirs in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    text = "<|im_start|>user\nHow do I bake bread?<|im_end|>\n"
    assert loaded_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert [path.name for path in (cache / "weights").iterdir()] == ["k"]  # no leftovers
    assert weights_cache.clear() > 0 and not cache.exists()


def test_keys_follow_content_adapter_and_dtype(tmp_path):
    gguf, adapter = tmp_path / "model.gguf", tmp_path / "adapter.safetensors"
    gguf.write_bytes(b"weights")
    adapter.write_bytes(b"lora")
    key = weights_cache.entry_key(gguf, adapter, jnp.float32)
    assert key == weights_cache.entry_key(gguf, adapter, jnp.float32)
    assert key != weights_cache.entry_key(gguf, None, jnp.float32)
    assert key != weights_cache.entry_key(gguf, adapter, jnp.bfloat16)
    gguf.write_bytes(b"Weights!")
    assert key != weights_cache.entry_key(gguf, adapter, jnp.float32)


def test_a_recorded_hash_is_reused_while_size_and_time_are_unchanged(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"aaaa")
    first = weights_cache.file_sha256(path)
    stamp = path.stat()
    path.write_bytes(b"bbbb")  # same size; the old time put back: the recorded hash stays
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert weights_cache.file_sha256(path) == first
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    assert weights_cache.file_sha256(path) != first
