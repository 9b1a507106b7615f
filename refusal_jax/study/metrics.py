"""The evaluate stage's per-variant metrics: a registry, name -> function of a `VariantRun`.

Adding a metric: write it in ``refusal_jax/evaluation/<name>.py``, then register here a function
that reads what it needs from the run::

    @metric("my_metric")
    def _my_metric(run: VariantRun):
        return my_module.my_metric(run.texts("harmful"))

The stage reports every registered metric of every variant in ``metrics.json``, in registration
order; a function returning None leaves its metric out for that run (e.g. no judge configured).
A function returning an `Estimate` (``refusal_jax.evaluation.intervals``: `rate_estimate` for a
fraction of completions, `mean_estimate` for a mean over prompts) reports its value under its name
and its 95% interval under ``intervals[name]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from refusal_jax.evaluation import cross_entropy as ce
from refusal_jax.evaluation import multiple_choice as mc
from refusal_jax.evaluation.intervals import Estimate, mean_estimate, rate_estimate
from refusal_jax.evaluation.judge import SafetyJudge
from refusal_jax.evaluation.kl import kl_divergence
from refusal_jax.evaluation.refusal import is_refusal
from refusal_jax.models.config import ModelConfig
from refusal_jax.models.params import Params
from refusal_jax.study.variants import Variant


@dataclasses.dataclass(frozen=True)
class VariantRun:
    """What a metric of one variant reads.

    completions: {"harmful" | "harmless": [{"instruction", "completion"}, ...]} of the eval
    prompts; harmless_logits / base_harmless_logits: [n, V] last-position logits of the harmless
    eval prompts under the variant / the baseline; params, config: the variant's weights and
    model config (its own, or the study model's); corpora, judge, mc_sets: the cross-entropy
    corpora, the safety judge (None when not configured) and the multiple-choice sets (name ->
    (questions, shot pool, number of shots)), shared by every variant.
    """

    study: Any
    variant: Variant
    params: Params
    config: ModelConfig
    completions: dict
    harmless_logits: np.ndarray
    base_harmless_logits: np.ndarray
    corpora: dict[str, ce.ScoredTokens]
    judge: SafetyJudge | None
    mc_sets: dict[str, tuple[list, list, int]]

    def texts(self, prompt_set: str) -> list[str]:
        """The completions of ``prompt_set`` ("harmful" or "harmless")."""
        return [row["completion"] for row in self.completions[prompt_set]]


Metric = Callable[[VariantRun], Any]
METRICS: dict[str, Metric] = {}


def metric(name: str) -> Callable[[Metric], Metric]:
    """Registers the decorated function as the metric ``name`` (replacing one of that name)."""
    def register(function: Metric) -> Metric:
        METRICS[name] = function
        return function

    return register


def variant_metrics(run: VariantRun) -> dict[str, Any]:
    """Every registered metric of ``run`` that has a value, in registration order, and under
    ``intervals`` the [low, high] of each metric that returned an `Estimate`."""
    values, intervals = {}, {}
    for name, function in METRICS.items():
        value = function(run)
        if isinstance(value, Estimate):
            value, intervals[name] = value.value, value.interval
        if value is not None:
            values[name] = value
    return {**values, "intervals": intervals}


@metric("description")
def _description(run: VariantRun) -> str:
    return run.variant.description


@metric("harmful_refusal_rate")
def _harmful_refusal_rate(run: VariantRun) -> Estimate:
    return rate_estimate([is_refusal(text) for text in run.texts("harmful")])


@metric("harmless_refusal_rate")
def _harmless_refusal_rate(run: VariantRun) -> Estimate:
    return rate_estimate([is_refusal(text) for text in run.texts("harmless")])


@metric("n_harmful")
def _n_harmful(run: VariantRun) -> int:
    return len(run.completions["harmful"])


@metric("n_harmless")
def _n_harmless(run: VariantRun) -> int:
    return len(run.completions["harmless"])


@metric("kl")
def _kl(run: VariantRun) -> Estimate:
    """Mean KL(baseline || variant) of the harmless eval prompts' next-token distributions."""
    per_prompt = kl_divergence(jnp.asarray(run.base_harmless_logits),
                               jnp.asarray(run.harmless_logits))
    return mean_estimate(np.asarray(per_prompt, np.float64))


@metric("cross_entropy")
def _cross_entropy(run: VariantRun) -> dict[str, float]:
    """Nats per token of each corpus under the variant's harmful-prompt intervention."""
    runtime = run.study.config.runtime
    return {name: ce.cross_entropy(run.params, corpus, config=run.config,
                                   intervention=run.variant.harmful,
                                   batch_size=runtime.batch_size,
                                   placement=run.study.placement).nats
            for name, corpus in run.corpora.items()}


@metric("multiple_choice")
def _multiple_choice(run: VariantRun) -> dict[str, float]:
    """Accuracy on each multiple-choice set under the variant's harmful-prompt intervention."""
    model, runtime = run.study.model, run.study.config.runtime
    return {name: mc.evaluate_multiple_choice(
                run.params, questions, config=run.config, tokenizer=model.tokenizer,
                shot_pool=pool, n_shots=n_shots, chat=model.chat,
                intervention=run.variant.harmful, batch_size=runtime.batch_size,
                placement=run.study.placement).accuracy
            for name, (questions, pool, n_shots) in run.mc_sets.items()}


@metric("judge_unsafe_rate")
def _judge_unsafe_rate(run: VariantRun) -> Estimate | None:
    """The safety judge's unsafe rate on the harmful completions (None without a judge)."""
    if run.judge is None:
        return None
    instructions = [row["instruction"] for row in run.completions["harmful"]]
    verdicts = run.judge.judge(instructions, run.texts("harmful"))
    return rate_estimate(list(verdicts.unsafe))
