"""Memory plan: bytes per device for weights, KV cache and captures; the mesh a machine needs.

    python scripts/memory_plan.py [--batch 64] [--length 1024] [--variants 1]
                                  [--capture_positions 5] [--dtype bfloat16] [--headroom 0.2]

Everything is computed from shapes, never allocated: `jax.eval_shape` of the parameter
initialiser and of an empty KV cache, laid out on a device-free `AbstractMesh` by the sharding
rules of `refusal_jax.runtime.sharding`, gives each array's per-device shard shape. For every
machine the script tries every (data, fsdp, model) mesh over its devices and keeps the one with
the most data parallelism among those that fit, preferring tensor parallelism (model) to FSDP,
because FSDP re-gathers every weight on every forward pass. A mesh fits when weights + KV cache
+ captures take at most (1 - headroom) of a device's memory (the headroom is left for XLA's
temporaries); the model axis must divide the number of KV heads (heads are never split), and
the global batch must divide over data x fsdp. `--variants` is the number of KV caches held at
once: generation under V interventions together (`generate_each`, the pipeline's
`runtime.generation_variants`) keeps one cache per intervention, and one more (the layers
below the first intervened one, shared) during the prefill, which the plan leaves out. The
model configs below are the published config.json values.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from refusal_jax.models.config import ModelConfig
from refusal_jax.models.core import KVCache
from refusal_jax.models.params import abstract_params
from refusal_jax.runtime import sharding
from refusal_jax.runtime.precision import DtypePolicy

GIB = 2**30

# Shape fields of the published config.json files (Hugging Face hub, the instruct variants share
# them): meta-llama/Meta-Llama-3-8B(-Instruct), meta-llama/Meta-Llama-3-70B(-Instruct),
# google/gemma-2-9b(-it), Qwen/Qwen2.5-72B(-Instruct).
PUBLISHED_CONFIGS = {
    "Llama-3-8B": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "Llama-3-70B": dict(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "Gemma-2-9B": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
        num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
        max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=1),
    "Qwen2.5-72B": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        use_sliding_window=False, sliding_window=131072, max_window_layers=70,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645),
}


@dataclasses.dataclass(frozen=True)
class Machine:
    name: str
    n_devices: int
    device_bytes: int  # memory one JAX device may allocate


# Google Cloud TPU docs: v4 has 32 GiB HBM per chip, v5p 95 GiB user-allocatable per chip; a
# v4-32 / v5p-64 slice has 32 / 64 TensorCores = 16 / 32 chips (one JAX device per chip).
# NVIDIA H100 SXM: 80 GB.
MACHINES = (
    Machine("TPU v4-32", 16, 32 * GIB),
    Machine("TPU v5p-64", 32, 95 * GIB),
    Machine("8 x H100", 8, 80 * 10**9),
)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes one device holds on a (data, fsdp, model) mesh."""

    mesh: tuple[int, int, int]
    weights: int
    kv_cache: int
    captures: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.captures


def plan(config: ModelConfig, mesh: Sequence[int], *, batch: int, length: int,
         capture_positions: int, dtype=jnp.bfloat16, variants: int = 1,
         rules: sharding.Rules = sharding.DEFAULT_RULES) -> MemoryPlan:
    """Per-device bytes of the weights, `variants` KV caches of `batch` x `length` and one batch of
    captures.

    Captures are the [batch, capture_positions, n_layers, d_model] block inputs of one forward
    pass in the compute dtype. Raises ValueError when a dimension does not divide over the mesh.
    """
    abstract = sharding.abstract_mesh(tuple(mesh), math.prod(mesh))
    weights = sharding.abstract_sharded_params(config, abstract, dtype, rules)
    cache_shapes = jax.eval_shape(lambda: KVCache.empty(config, batch, length, dtype))
    cache = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         cache_shapes,
                         sharding.kv_cache_shardings(config, abstract, batch, length, rules))
    captures = jax.ShapeDtypeStruct(
        (batch, capture_positions, config.n_layers, config.d_model), dtype,
        sharding=sharding.capture_sharding(config, abstract, batch, capture_positions, rules))
    return MemoryPlan(mesh=tuple(mesh),
                      weights=sharding.planned_bytes_per_device(weights),
                      kv_cache=variants * sharding.planned_bytes_per_device(cache),
                      captures=sharding.planned_bytes_per_device(captures))


def choose_mesh(config: ModelConfig, machine: Machine, *, batch: int, length: int,
                capture_positions: int, dtype=jnp.bfloat16, variants: int = 1,
                headroom: float = 0.2) -> MemoryPlan | None:
    """The plan of the mesh `machine` needs (see the module docstring), or None if none fits."""
    budget = (1.0 - headroom) * machine.device_bytes
    fitting = []
    for data, fsdp in itertools.product(_divisors(machine.n_devices), repeat=2):
        model, remainder = divmod(machine.n_devices, data * fsdp)
        if remainder or config.n_kv_heads % model or batch % (data * fsdp):
            continue
        try:
            candidate = plan(config, (data, fsdp, model), batch=batch, length=length,
                             capture_positions=capture_positions, dtype=dtype,
                             variants=variants)
        except ValueError:  # some dimension does not divide over this mesh
            continue
        if candidate.total <= budget:
            fitting.append(candidate)
    return min(fitting, key=lambda p: (-p.mesh[0], p.mesh[1], p.mesh[2]), default=None)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parameter_count(config: ModelConfig) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params(config)))


def markdown_table(*, batch: int, length: int, capture_positions: int, dtype=jnp.bfloat16,
                   variants: int = 1, headroom: float = 0.2) -> str:
    rows = ["| model | params | machine | mesh data x fsdp x model | weights | KV cache | "
            "captures | total | device memory |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, hf_config in PUBLISHED_CONFIGS.items():
        config = ModelConfig.from_hf_config(hf_config)
        params = f"{parameter_count(config) / 1e9:.2f} B"
        for machine in MACHINES:
            chosen = choose_mesh(config, machine, batch=batch, length=length,
                                 capture_positions=capture_positions, dtype=dtype,
                                 variants=variants, headroom=headroom)
            memory = f"{machine.device_bytes / GIB:.1f}"
            if chosen is None:
                rows.append(f"| {name} | {params} | {machine.name} | does not fit | | | | | "
                            f"{memory} |")
                continue
            mesh = " x ".join(str(size) for size in chosen.mesh)
            rows.append(f"| {name} | {params} | {machine.name} | {mesh} | "
                        f"{chosen.weights / GIB:.2f} | {chosen.kv_cache / GIB:.2f} | "
                        f"{chosen.captures / GIB:.3f} | {chosen.total / GIB:.2f} | {memory} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="global batch (prompts per step)")
    parser.add_argument("--length", type=int, default=1024,
                        help="KV cache slots per row (prompt + generated tokens)")
    parser.add_argument("--variants", type=int, default=1,
                        help="KV caches held at once (interventions generated together)")
    parser.add_argument("--capture_positions", type=int, default=5,
                        help="token positions captured per prompt (e.g. the EOI tokens)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--headroom", type=float, default=0.2,
                        help="fraction of device memory left for XLA temporaries")
    args = parser.parse_args(argv)
    if not 0.0 <= args.headroom < 1.0:
        parser.error(f"--headroom must lie in [0, 1); got {args.headroom}")
    if args.variants < 1:
        parser.error(f"--variants must be >= 1; got {args.variants}")
    dtype = DtypePolicy(params=args.dtype).params_dtype
    caches = "KV cache" if args.variants == 1 else f"{args.variants} KV caches"
    print(f"Per-device memory in GiB; {args.dtype} weights and activations, batch {args.batch}, "
          f"{caches} of {args.length} slots, captures at {args.capture_positions} positions, "
          f"{args.headroom:.0%} headroom.\n")
    print(markdown_table(batch=args.batch, length=args.length,
                         capture_positions=args.capture_positions, dtype=dtype,
                         variants=args.variants, headroom=args.headroom))


if __name__ == "__main__":
    main()
