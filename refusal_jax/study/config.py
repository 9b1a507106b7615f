"""The study's configuration: every key with its default, and checks of the values.

Config files in ``configs/`` call :func:`base_config` and change what differs. The returned
``ConfigDict`` is locked, so a misspelt key (in a file or a ``--config.key=value`` override)
is an error rather than a silently ignored setting. Keys:

model.source          ``"default"``, ``"smollm2-135m-instruct"``, an HF directory, a hub id, a
                      ``.gguf`` file, or ``"random:llama-tiny"``
                      (see ``refusal_jax.runtime.loading``)
model.dtype           ``"float32"`` or ``"bfloat16"``
model.system_prompt   system turn before every instruction; "" keeps the template's default
seed                  seed of prompt sampling and of random models
data.*                prompt-set sources (built-in names, JSON paths, ``hf:`` ids), the sample
                      sizes and the refusal-score filters (``study.data``)
directions.*          INLP options (docs/method.md section 2) and the k policy
select.*              candidate selection (docs/method.md section 4; ``refusal_jax.selection``)
reference.*           switches to the published code's behaviour (all False by default;
                      ``configs/paper.py`` sets them all). One per departure of docs/method.md
                      section 7 (``REFERENCE_SWITCHES`` below documents each)
infer.*               completions: which interventions, ``max_new_tokens``
evaluate.*            evaluation options, passed to the evaluation modules
runtime.*             batch sizes, chunking and the device mesh; left out of the config hash
                      (they change speed, not results)
runtime.generation_variants  how many variants of the infer stage (and of the k-curve) are
                      generated together (``models.generate.generate_each``): a decode step then
                      reads the weights once for all of them, the layers below the first
                      one any of them acts at are prefilled once, and the KV cache is this
                      many times larger (one more during the prefill). 1 in the base
                      config, 4 in configs/default.py (docs/benchmarks.md)
runtime.mesh          "" (one device, no mesh) or the (data, fsdp, model) mesh sizes as
                      ``"data=-1,model=4"`` (missing axes 1, one may be -1: the devices left
                      over; see ``refusal_jax.runtime.sharding``). Batch sizes must be multiples of
                      the devices the batch is split over (data x fsdp), and so must
                      ``candidate_chunk``.
runtime.sharding_rules  overrides of ``sharding.DEFAULT_RULES``, e.g. ``"embed=none,batch=data"``
                      (logical axis = ``none`` or mesh axes joined by ``+``); "" keeps them
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import ml_collections

from refusal_jax.directions import K_POLICIES
from refusal_jax.evaluation.judge import PromptStyle
from refusal_jax.runtime import sharding
from refusal_jax.study.variants import VARIANTS
from refusal_jax.text.prompts import REFERENCE_DATA_DIR

# Every intervention the infer stage knows (the variant table, docs/method.md section 5), and those
# whose INLP basis can be cut to its first k directions (the tunable-k curve).
INTERVENTIONS = tuple(VARIANTS)
K_CURVE_INTERVENTIONS = tuple(name for name, spec in VARIANTS.items() if spec.k_curve)
SELECT_MODES = ("local", "global")
WHEN_NONE_PASS = ("error", "lowest_bypass")
STAGES = ("extract", "select", "infer", "evaluate", "report")

# The switches of the `reference` section: each turns one departure from the published code
# (docs/method.md section 7, the row named) back into the published code's behaviour.
REFERENCE_SWITCHES = {
    "inlp_block_input_only": "row 1: INLP candidates in selection are projected at the block "
                             "input (resid_pre) of their layer only",
    "inlp_steering_best_dim_norm": "row 2: the INLP steering score scales the first INLP "
                                   "direction by the best DiM direction's norm",
    "unfiltered_components": "row 3: ablation and nullspace projection act at the top of the "
                             "unfiltered ranking with the best filtered direction",
    "inlp_split": "row 4: INLP's train/dev split is the published index rule",
    "kl_eps": "row 5: selection's KL adds eps = 1e-6 inside its logarithms",
    "inlp_keep_failing": "row 6: the INLP classifier that fails the stop rule is kept",
    "inlp_absolute_stop": "row 7: INLP stops when dev accuracy falls below 0.55",
}

# Keys whose value must be one of a list.
_CHOICES = {
    "directions.k_policy": K_POLICIES,
    "select.mode": SELECT_MODES,
    "select.when_none_pass": WHEN_NONE_PASS,
    "evaluate.judge_prompt_style": get_args(PromptStyle),
    "evaluate.k_curve_intervention": ("", *K_CURVE_INTERVENTIONS),
}
# Keys whose value must be an int >= 1.
_POSITIVE_INTS = (
    "data.n_train", "data.n_val", "data.n_eval", "directions.inlp_max_directions",
    "infer.max_new_tokens", "runtime.batch_size", "runtime.generation_batch_size",
    "runtime.generation_variants", "runtime.candidate_chunk", "runtime.length_bucket",
    "evaluate.cross_entropy_max_tokens",
)


def base_config() -> ml_collections.ConfigDict:
    """All keys with the reference settings (docs/method.md); config files override some."""
    config = ml_collections.ConfigDict()
    config.seed = 42

    config.model = ml_collections.ConfigDict()
    config.model.source = "default"
    config.model.dtype = "float32"
    config.model.system_prompt = ""

    config.data = ml_collections.ConfigDict()
    config.data.harmful_train = "harmful_train"
    config.data.harmless_train = "harmless_train"
    config.data.harmful_val = "harmful_val"
    config.data.harmless_val = "harmless_val"
    config.data.harmful_eval = "harmful_eval"
    config.data.harmless_eval = "harmless_eval"
    config.data.n_train = 128
    config.data.n_val = 32
    config.data.n_eval = 100
    config.data.filter_train = True
    config.data.filter_val = True

    config.directions = ml_collections.ConfigDict()
    config.directions.inlp_max_directions = 100
    config.directions.inlp_inverse_regularization = 0.1
    config.directions.k_policy = "none"
    config.directions.k = 1  # used by k_policy="fixed"

    config.select = ml_collections.ConfigDict()
    config.select.mode = "local"
    # EOI positions whose candidates are scored, as negative offsets (-1 = last token);
    # () scores every EOI position (the reference).
    config.select.positions = ()
    config.select.compare_global = False
    config.select.multipliers = (0.5, 1.0, 2.0)
    config.select.kl_threshold = 0.1
    config.select.min_steering_score = 0.0  # discard candidates whose steering score is below
    config.select.prune_layer_fraction = 0.2
    config.select.top_percentage = 0.0
    config.select.just_one = True
    # When no candidate of a method passes the filters: "error" stops the run (relax a filter),
    # "lowest_bypass" takes the candidate with the lowest bypass score and records that in
    # selection.json ("fallback"), as the PyTorch twin of the benchmark does.
    config.select.when_none_pass = "error"

    config.reference = ml_collections.ConfigDict(
        {name: False for name in REFERENCE_SWITCHES})

    config.infer = ml_collections.ConfigDict()
    config.infer.max_new_tokens = 512
    config.infer.interventions = INTERVENTIONS

    config.evaluate = ml_collections.ConfigDict()
    config.evaluate.cross_entropy_files = ()
    config.evaluate.cross_entropy_max_tokens = 2048
    # Safety judge: a chat model source ("" = no judge), e.g. a LlamaGuard directory with
    # judge_prompt_style="conversation"; completions of < 15 words count as safe.
    config.evaluate.judge_source = ""
    config.evaluate.judge_prompt_style = "instruction"
    # Multiple choice: question files (MMLU / ARC / TruthfulQA layouts; the benchmark is named
    # by the file stem), optional few-shot pools (one per file, "" for none), 5-shot, and at
    # most mc_n_questions questions per file (seeded sample; MMLU reference: 500).
    config.evaluate.mc_files = ()
    config.evaluate.mc_shot_files = ()
    config.evaluate.mc_n_shots = 5
    config.evaluate.mc_n_questions = 500
    # INLP variant whose first-k truncations form the tunable-k curve; "" skips the curve.
    config.evaluate.k_curve_intervention = "inlp_reflection"

    config.runtime = ml_collections.ConfigDict()
    config.runtime.batch_size = 32
    config.runtime.generation_batch_size = 32
    # Variants generated together (one decode loop; their KV caches are held at once).
    config.runtime.generation_variants = 1
    config.runtime.candidate_chunk = 8
    config.runtime.length_bucket = 32
    config.runtime.mesh = ""
    config.runtime.sharding_rules = ""

    config.lock()
    return config


def reference_config(source: str, *, dtype: str = "bfloat16",
                     data_dir: Path = REFERENCE_DATA_DIR) -> ml_collections.ConfigDict:
    """The published settings (method.md) for a model: 128 / 32 / 100 prompts from the reference
    splits (harmful: AdvBench, MaliciousInstruct, TDC2023, HarmBench; harmless: Alpaca; the
    harmful eval set is HarmBench's test split, standing in for JailbreakBench, which is not
    shipped), filtered by refusal score, multipliers {0.5, 1, 2}, up to 100 INLP directions,
    512 new tokens."""
    config = base_config()
    config.model.source = source
    config.model.dtype = dtype
    config.data.harmful_train = str(data_dir / "splits_harmful_train.json")
    config.data.harmful_val = str(data_dir / "splits_harmful_val.json")
    config.data.harmful_eval = str(data_dir / "processed_harmbench_test.json")
    config.data.harmless_train = str(data_dir / "splits_harmless_train.json")
    config.data.harmless_val = str(data_dir / "splits_harmless_val.json")
    config.data.harmless_eval = str(data_dir / "splits_harmless_test.json")
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first value that cannot work, and the fix."""
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(f"invalid config: {message}")

    def value(key: str):
        section, name = key.split(".")
        return config[section][name]

    need(isinstance(config.seed, int) and 0 <= config.seed < 2**32,
         f"seed must be an int in [0, 2**32) (numpy's seed range), got {config.seed!r}")
    for key in _POSITIVE_INTS:
        need(isinstance(value(key), int) and value(key) >= 1,
             f"{key} must be a positive int, got {value(key)!r}")
    for key, choices in _CHOICES.items():
        need(value(key) in choices, f"{key} must be one of {choices}, got {value(key)!r}")
    for name, value in config.reference.items():
        need(name in REFERENCE_SWITCHES and isinstance(value, bool),
             f"reference.{name} must be one of the switches {tuple(REFERENCE_SWITCHES)} set to "
             f"True or False, got {value!r}")
    select = config.select
    need(len(select.multipliers) >= 1 and all(m > 0 for m in select.multipliers),
         f"select.multipliers must be positive numbers, got {tuple(select.multipliers)}")
    need(all(isinstance(p, int) and p < 0 for p in select.positions),
         f"select.positions must be negative EOI offsets such as (-1, -2), got "
         f"{tuple(select.positions)}")
    need(0.0 <= select.top_percentage <= 1.0,
         f"select.top_percentage must lie in [0, 1], got {select.top_percentage}")
    need(0.0 <= select.prune_layer_fraction < 1.0,
         f"select.prune_layer_fraction must lie in [0, 1), got {select.prune_layer_fraction}")
    unknown = [name for name in config.infer.interventions if name not in INTERVENTIONS]
    need(not unknown, f"infer.interventions has unknown names {unknown}; choose from "
         f"{INTERVENTIONS}")
    evaluate = config.evaluate
    need(not evaluate.k_curve_intervention or "baseline" in config.infer.interventions,
         f"evaluate.k_curve_intervention={evaluate.k_curve_intervention!r} is drawn against the "
         "baseline's completions: add 'baseline' to infer.interventions, or set "
         "evaluate.k_curve_intervention='' to skip the curve")
    need(not evaluate.mc_shot_files or len(evaluate.mc_shot_files) == len(evaluate.mc_files),
         "evaluate.mc_shot_files must be empty or give one pool per evaluate.mc_files entry")
    need(not evaluate.mc_files or evaluate.mc_shot_files or evaluate.mc_n_shots == 0,
         f"evaluate.mc_n_shots={evaluate.mc_n_shots} needs shot pools: set "
         "evaluate.mc_shot_files (e.g. the MMLU dev split) or evaluate.mc_n_shots=0")
    runtime = config.runtime
    need(runtime.mesh.strip() or not runtime.sharding_rules.strip(),
         f"runtime.sharding_rules={runtime.sharding_rules!r} needs a mesh: set runtime.mesh "
         "(e.g. 'data=-1') or clear the rules")
    if runtime.mesh.strip():
        try:
            sharding.parse_mesh(runtime.mesh)
            sharding.parse_rules(runtime.sharding_rules)
        except ValueError as error:
            raise ValueError(f"invalid config: runtime.mesh / runtime.sharding_rules: "
                             f"{error}") from None
