"""Tiny random Hugging Face models of every supported family, for parity tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.io.convert import params_from_hf

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               max_position_embeddings=256, attn_implementation="eager")

# name -> (transformers config class, kwargs). MHA, GQA and MQA across the families, plus the
# features that differ: rope scaling, sliding windows, QKV bias, Gemma norms, softcaps.
TINY_CONFIGS = {
    "llama_mha": (transformers.LlamaConfig,
                  dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    "llama_linear_rope": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=2,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "llama3_gqa_rope_scaling": (transformers.LlamaConfig, dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))),
    "mistral_gqa_sliding": (transformers.MistralConfig,
                            dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                 head_dim=16)),
    "qwen2_gqa_bias": (transformers.Qwen2Config,
                       dict(num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=True)),
    "qwen2_sliding_upper_layers": (transformers.Qwen2Config, dict(
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
        max_window_layers=1)),
    "gemma_mqa": (transformers.GemmaConfig,
                  dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                       hidden_act="gelu")),  # the released Gemma configs' legacy value
    "gemma2_gqa_softcap_sliding": (transformers.Gemma2Config, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
        query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
}


def tiny_hf_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random float32 HF causal LM with non-trivial norm weights and biases."""
    config_cls, kwargs = TINY_CONFIGS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**_COMMON, **kwargs))
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name or param_name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))  # default init is all ones / zeros
    return model.eval().float()


def to_ours(model: transformers.PreTrainedModel):
    """(config, params) of a transformers model through our declarative converter."""
    hf_config = model.config.to_dict()
    config = ModelConfig.from_hf_config(hf_config)
    state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return config, params_from_hf(config, state_dict)


def ragged_batch(lengths=(12, 7, 3), vocab: int = 128, seed: int = 0):
    """Left-padded random token batch: (tokens [B, T] int32, valid [B, T] bool)."""
    rng = np.random.default_rng(seed)
    T = max(lengths)
    tokens = np.zeros((len(lengths), T), np.int32)
    valid = np.zeros((len(lengths), T), bool)
    for row, n in enumerate(lengths):
        tokens[row, T - n:] = rng.integers(1, vocab, n)
        valid[row, T - n:] = True
    return tokens, valid


def hf_logits(model, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
    mask = torch.tensor(valid, dtype=torch.long)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=mask,
                    position_ids=position_ids)
    return out.logits.float().numpy()
