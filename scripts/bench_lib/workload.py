"""What the benchmark runs on: a model (ours and the same weights in transformers) and prompts.

Two kinds of workload:
- A real chat model (default SmolLM2-135M-Instruct) with the prompt splits of
  `../shared/data/refusal_prompts` (the built-in sets when that folder is absent): prompts are
  wrapped in the chat template, left padded per batch (lengths rounded up to a multiple of 16),
  and captured at the template's end-of-instruction (EOI) tokens.
- A random-initialised Llama-shaped model (`random:<preset>`, or any shape for the scaling
  section) with random token prompts: "harmful" prompts draw tokens from the lower half of the
  vocabulary and "harmless" ones from the upper half, so that the two classes are linearly
  separable and INLP has something to find. The last `n_eoi` tokens stand in for EOI tokens.

The candidate-selection section runs the pipeline's own selection code, which takes a chat
`Model` and instruction texts (`Workload.chat_model`, `Workload.instructions`). A chat workload
has both. A random model gets the pipeline's tiny ChatML tokenizer (512 tokens, the one of
`random:llama-tiny`, trained on the built-in prompts) when its vocabulary holds those ids, and
instructions from the built-in prompt sets.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench_lib import torch_stack
from refusal_jax.models.config import ModelConfig
from refusal_jax.models.loading import Model
from refusal_jax.models.params import Params, init_params

SHARED_PROMPTS = Path(__file__).resolve().parents[3] / "shared/data/refusal_prompts"
# Split files of the shared folder and the built-in sets used when it is absent.
PROMPT_SETS = {
    "harmful_train": ("splits_harmful_train.json", "harmful_train"),
    "harmless_train": ("splits_harmless_train.json", "harmless_train"),
    "harmful_val": ("splits_harmful_val.json", "harmful_val"),
    "harmless_val": ("splits_harmless_val.json", "harmless_val"),
}
BUILTIN_SOURCE = "refusal_jax built-in prompt sets"
PROMPT_SEED = 42  # docs/method.md: the reference samples its prompt sets with seed 42
RANDOM_N_EOI = 4

# Llama-shaped presets: (vocab, d_model, layers, heads, kv_heads, head_dim, d_ff, tied).
RANDOM_PRESETS = {
    "tiny": (512, 64, 4, 4, 2, 16, 128, True),  # 512: the tiny ChatML tokenizer fits
    "small": (4096, 512, 8, 8, 4, 64, 1536, True),
    "1b": (128256, 2048, 16, 32, 8, 64, 8192, True),  # Llama-3.2-1B's shape
    "8b": (128256, 4096, 32, 32, 8, 128, 14336, False),  # Llama-3-8B's shape
}


def llama_config(vocab: int, d_model: int, layers: int, heads: int, kv_heads: int,
                 head_dim: int, d_ff: int, tied: bool = True,
                 max_context: int = 4096) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=vocab, d_model=d_model, n_layers=layers,
                       n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, d_ff=d_ff,
                       max_context=max_context, rope_theta=500000.0, tie_embeddings=tied,
                       bos_token_id=1, eos_token_ids=(2,))


@dataclasses.dataclass(frozen=True)
class Prompts:
    """A left-padded token batch and the indices of its EOI tokens."""

    tokens: np.ndarray  # [B, T] int32
    valid: np.ndarray  # [B, T] bool
    eoi_positions: np.ndarray  # [B, n_eoi] int32

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclasses.dataclass
class Workload:
    """A model in both frameworks plus a way to make prompt batches."""

    name: str
    config: ModelConfig
    params: Params
    hf_config: dict[str, Any]
    refusal_ids: np.ndarray
    n_eoi: int
    encode: Any  # (set name, first index, count) -> Prompts
    prompt_source: str
    torch_options: dict[str, str]
    texts: Callable[[str], tuple[str, ...]]  # set name -> its instructions, sampled (seed 42)
    instruction_source: str  # where `texts` come from
    load_chat_model: Callable[[], Model]  # the model with its chat format (raises if none)

    @functools.cached_property
    def torch_model(self):
        return torch_stack.torch_model(self.hf_config, self.config, self.params,
                                       **self.torch_options)

    @functools.cached_property
    def chat_model(self) -> Model:
        """This model as refusal_jax's pipeline holds it: the same params, a tokenizer and a chat
        format. Raises ValueError when the workload has none."""
        return self.load_chat_model()

    def instructions(self, split: str, count: int) -> tuple[str, ...]:
        """The first `count` instructions of `split` (any key of PROMPT_SETS)."""
        texts = self.texts(split)
        if len(texts) < count:
            raise ValueError(f"{split} has {len(texts)} instructions; asked for {count} (ask "
                             f"for at most {len(texts)}, e.g. with --selection_prompts)")
        return texts[:count]

    @property
    def torch_device(self) -> str:
        return self.torch_options["device"]

    def prompts(self, split: str, count: int, start: int = 0) -> Prompts:
        """`count` prompts of `split` (a key of PROMPT_SETS) from `start`."""
        return self.encode(split, start, count)

    def mixed(self, count: int) -> Prompts:
        """`count` training prompts, half harmful and half harmless, in one batch."""
        harmful = count // 2
        return concatenate([self.prompts("harmful_train", harmful),
                            self.prompts("harmless_train", count - harmful)])


def concatenate(batches: list[Prompts]) -> Prompts:
    """Stacks batches, re-padding on the left to the longest."""
    length = max(b.tokens.shape[1] for b in batches)

    def pad(array, value):
        return np.pad(array, ((0, 0), (length - array.shape[1], 0)), constant_values=value)

    tokens = np.concatenate([pad(b.tokens, 0) for b in batches])
    valid = np.concatenate([pad(b.valid, False) for b in batches])
    eoi = np.concatenate([b.eoi_positions + (length - b.tokens.shape[1]) for b in batches])
    return Prompts(tokens.astype(np.int32), valid, eoi.astype(np.int32))


def chat_workload(source: str, *, prompts_dir: Path | None, dtype: str, torch_options) -> Workload:
    """A real chat model loaded with `refusal_jax.models.loading.load_model`."""
    from refusal_jax.models.loading import load_model
    from refusal_jax.text.chat import refusal_token_ids

    model = load_model(source, dtype=jnp.dtype(dtype))
    folder = SHARED_PROMPTS if prompts_dir is None else Path(prompts_dir)
    if prompts_dir is not None and not folder.is_dir():
        raise FileNotFoundError(f"--prompts_dir {folder} does not exist; point it at a folder "
                                "with splits_harmful_train.json etc., or omit it")
    use_shared = folder.is_dir()

    @functools.lru_cache(maxsize=None)
    def instructions(split: str) -> tuple[str, ...]:
        file_name, builtin = PROMPT_SETS[split]
        return _sampled(str(folder / file_name) if use_shared else builtin)

    def encode(split: str, start: int, count: int) -> Prompts:
        texts = instructions(split)[start:start + count]
        if len(texts) < count:
            raise ValueError(f"{split} has {len(instructions(split))} prompts; asked for "
                             f"{count} from index {start}")
        batch = model.chat.encode(list(texts), context_length=model.config.max_context)
        return Prompts(batch.tokens, batch.valid, model.chat.eoi_positions(batch))

    return Workload(
        name=source, config=model.config, params=model.params, hf_config=model.hf_config,
        refusal_ids=np.asarray(refusal_token_ids(model.tokenizer), np.int32),
        n_eoi=model.chat.n_eoi, encode=encode,
        prompt_source=str(folder) if use_shared else BUILTIN_SOURCE,
        torch_options=torch_options, texts=instructions,
        instruction_source=str(folder) if use_shared else BUILTIN_SOURCE,
        load_chat_model=lambda: model)


def random_workload(config: ModelConfig, *, prompt_length: int, dtype: str, torch_options,
                    seed: int = 0, name: str | None = None) -> Workload:
    """A random-initialised Llama-shaped model with random token prompts."""
    params = init_params(config, jax.random.key(seed), dtype=jnp.dtype(dtype))
    half = config.vocab_size // 2
    if half < 8:
        raise ValueError(f"vocab_size {config.vocab_size} is too small for random prompts")
    low = {"harmful_train": (4, half), "harmless_train": (half, config.vocab_size),
           "harmful_val": (4, half), "harmless_val": (half, config.vocab_size)}

    def encode(split: str, start: int, count: int) -> Prompts:
        rng = np.random.default_rng([seed, start, list(PROMPT_SETS).index(split)])
        lengths = rng.integers(max(RANDOM_N_EOI + 1, prompt_length // 2), prompt_length + 1,
                               count)
        lengths[0] = prompt_length  # the batch length is exactly prompt_length
        tokens = np.zeros((count, prompt_length), np.int32)
        valid = np.zeros((count, prompt_length), bool)
        for row, n in enumerate(lengths):
            tokens[row, prompt_length - n:] = rng.integers(*low[split], n)
            valid[row, prompt_length - n:] = True
        eoi = np.arange(prompt_length - RANDOM_N_EOI, prompt_length, dtype=np.int32)
        return Prompts(tokens, valid, np.tile(eoi, (count, 1)))

    return Workload(
        name=name or f"random Llama d={config.d_model} L={config.n_layers}", config=config,
        params=params, hf_config=torch_stack.llama_hf_config(config),
        refusal_ids=np.arange(4, 8, dtype=np.int32), n_eoi=RANDOM_N_EOI, encode=encode,
        prompt_source=f"random tokens, length {prompt_length}", torch_options=torch_options,
        texts=_builtin_instructions, instruction_source=BUILTIN_SOURCE,
        load_chat_model=lambda: _tiny_chat_model(config, params))


def _sampled(source: str) -> tuple[str, ...]:
    """Every instruction of a prompt set, shuffled as the pipeline samples (seed 42)."""
    from refusal_jax.text import load_instructions

    every = load_instructions(source)
    return tuple(load_instructions(source, n=len(every), seed=PROMPT_SEED))


@functools.lru_cache(maxsize=None)
def _builtin_instructions(split: str) -> tuple[str, ...]:
    return _sampled(PROMPT_SETS[split][1])


def _tiny_chat_model(config: ModelConfig, params: Params) -> Model:
    """A random model with the pipeline's tiny ChatML tokenizer (see the module docstring)."""
    from refusal_jax.runtime.random_models import tiny_chatml_tokenizer
    from refusal_jax.text.chat import ChatFormat

    tokenizer = tiny_chatml_tokenizer()
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"a random model of vocabulary {config.vocab_size} cannot take the "
                         f"{len(tokenizer)}-token ChatML tokenizer that chat prompts need here; "
                         f"use a shape with vocab_size >= {len(tokenizer)} (e.g. random:tiny)")
    return Model(config=config, params=params, tokenizer=tokenizer, chat=ChatFormat(tokenizer),
                 hf_config=torch_stack.llama_hf_config(config), source="random (tiny ChatML "
                 "tokenizer)")


def preset_config(preset: str) -> ModelConfig:
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"unknown random preset {preset!r}; choose one of "
                         f"{sorted(RANDOM_PRESETS)}")
    return llama_config(*RANDOM_PRESETS[preset])
