"""The PyTorch stack we compare against: a transformers model with the same weights, and the
forward hooks the published refusal pipelines use (Arditi et al.'s `refusal_direction` code).

- The model is built from our params (`params_to_hf`) and an HF config dict, so both sides
  compute the same function; it runs in eval mode under `torch.no_grad()` (the caller's job).
- Activations are collected by forward pre-hooks on every decoder layer (the block input,
  `resid_pre`), gathered at the requested token indices.
- Directional ablation is a forward pre-hook on a decoder layer plus forward hooks on its
  attention and MLP modules, each removing the direction's component: at every layer (Arditi et
  al.'s global ablation) or at chosen ones (local ablation at a candidate's layer). On Llama-family
  models these are our `resid_pre`, `attn_out` and `mlp_out` sites (Gemma2's post-norms would sit
  after the module outputs hooked here).
- Activation addition (ActAdd) is a forward pre-hook on one decoder layer adding a vector at
  every position.
- Left padding: position ids are `cumsum(mask) - 1` (clamped at 0), as `generate` derives them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import transformers

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.io.convert import params_to_hf
from refusal_jax.models.params import Params

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def llama_hf_config(config: ModelConfig) -> dict[str, Any]:
    """An HF `config.json` dict of a Llama-family `config` (for random-initialised models)."""
    if config.family != "llama" or config.rope_scaling or config.sliding_windows:
        raise ValueError("llama_hf_config describes plain Llama configs only; pass the model's own "
                         "hf_config for other families")
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_context,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids) or None,
    }


def torch_model(hf_config: dict[str, Any], config: ModelConfig, params: Params, *,
                attention: str = "sdpa", dtype: str = "float32",
                device: str = "cpu") -> transformers.PreTrainedModel:
    """A transformers causal LM holding exactly `params`."""
    hf = {k: v for k, v in hf_config.items() if k not in ("torch_dtype", "dtype")}
    hf_config_object = transformers.AutoConfig.for_model(**hf)
    with torch.device(device):  # initialise on the target device (fast for large models)
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config_object, attn_implementation=attention, dtype=TORCH_DTYPES[dtype])
    state_dict = {name: torch.from_numpy(np.array(array)).to(device, TORCH_DTYPES[dtype])
                  for name, array in params_to_hf(config, params).items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if config.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"the transformers model does not match our params: missing "
                         f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    if config.tie_embeddings:
        model.tie_weights()
    model.generation_config.eos_token_id = None  # benchmarks generate a fixed number of tokens
    return model.to(device).eval()


def decoder_layers(model: transformers.PreTrainedModel) -> torch.nn.ModuleList:
    return model.model.layers


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def as_torch(tokens: np.ndarray, valid: np.ndarray, device: str = "cpu"):
    """(input_ids, attention_mask) int64 tensors of a left-padded batch."""
    return (torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=device),
            torch.as_tensor(np.asarray(valid), dtype=torch.long, device=device))


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden_states(args: tuple, kwargs: dict, value: torch.Tensor):
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


@contextlib.contextmanager
def _removed_on_exit(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_hooks(model: transformers.PreTrainedModel, positions: torch.Tensor
                  ) -> Iterator[list[torch.Tensor]]:
    """Collects every layer's block input at `positions` [B, P] into the yielded list."""
    captured: list[torch.Tensor] = []
    index = positions[:, :, None]

    def pre_hook(module, args, kwargs):
        hidden = _hidden_states(args, kwargs)
        captured.append(torch.take_along_dim(hidden, index, dim=1))  # a copy already

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
               for layer in decoder_layers(model)]
    with _removed_on_exit(handles):
        yield captured


def capture_resid_pre(model: transformers.PreTrainedModel, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, P, L, D] block inputs at `positions`, collected with forward pre-hooks.

    Runs the base model without the LM head (logits are not needed to collect activations).
    """
    with capture_hooks(model, positions) as captured:
        model.model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids(attention_mask), use_cache=False)
    return torch.stack(captured, dim=2)


def logits(model: transformers.PreTrainedModel, input_ids: torch.Tensor,
           attention_mask: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
    """[B, T, V] logits, or [B, V] at the last position."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids(attention_mask), use_cache=False,
                logits_to_keep=1 if last_only else 0)
    return out.logits[:, -1] if last_only else out.logits


@contextlib.contextmanager
def ablation_hooks(model: transformers.PreTrainedModel, direction: torch.Tensor,
                   layers: Sequence[int] | None = None) -> Iterator[None]:
    """Directional ablation at the block input, attention output and MLP output of `layers`
    (None: every layer)."""
    unit = direction / direction.norm()

    def ablate(x: torch.Tensor) -> torch.Tensor:
        return x - (x @ unit.to(x.dtype))[..., None] * unit.to(x.dtype)

    def pre_hook(module, args, kwargs):
        return _replace_hidden_states(args, kwargs, ablate(_hidden_states(args, kwargs)))

    def output_hook(module, inputs, output):
        if isinstance(output, tuple):
            return (ablate(output[0]), *output[1:])
        return ablate(output)

    all_layers = decoder_layers(model)
    handles = []
    for layer in all_layers if layers is None else [all_layers[index] for index in layers]:
        handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(output_hook))
        handles.append(layer.mlp.register_forward_hook(output_hook))
    with _removed_on_exit(handles):
        yield


@contextlib.contextmanager
def addition_hook(model: transformers.PreTrainedModel, vector: torch.Tensor,
                  layer: int) -> Iterator[None]:
    """ActAdd: `vector` added to the block input of `layer` at every position (padding
    included, as in the reference code; padding is never attended to)."""
    def pre_hook(module, args, kwargs):
        hidden = _hidden_states(args, kwargs)
        return _replace_hidden_states(args, kwargs, hidden + vector.to(hidden.dtype))

    handle = decoder_layers(model)[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    with _removed_on_exit([handle]):
        yield


def refusal_score(last_logits: torch.Tensor, refusal_ids: torch.Tensor,
                  eps: float = 1e-8) -> torch.Tensor:
    """The reference refusal score in float64: log(P(R) + eps) - log(1 - P(R) + eps)."""
    probs = torch.softmax(last_logits.double(), dim=-1)
    p = probs[:, refusal_ids].sum(dim=-1)
    return torch.log(p + eps) - torch.log(1 - p + eps)


def kl_divergence(baseline_logprobs: torch.Tensor, last_logits: torch.Tensor) -> torch.Tensor:
    """[B] KL(baseline || intervened) of next-token distributions in float64, exact (the
    reference code adds 1e-6 inside both logs; docs/method.md asks for the KL itself, as ours).

    baseline_logprobs: [B, V] float64 log-softmax of the unintervened last-position logits.
    """
    logprobs = torch.log_softmax(last_logits.double(), dim=-1)
    return torch.sum(baseline_logprobs.exp() * (baseline_logprobs - logprobs), dim=-1)


def generate(model: transformers.PreTrainedModel, input_ids: torch.Tensor,
             attention_mask: torch.Tensor, *, max_new_tokens: int, pad_id: int) -> torch.Tensor:
    """Greedy `generate` of exactly `max_new_tokens` per row (no stop token): [B, N]."""
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    return out[:, input_ids.shape[1]:]
