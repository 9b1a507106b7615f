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
and its 95% interval under ``intervals[name]``. A metric depends on the run's intervention,
weights and completions, not on the variant's name: a variant running the same intervention as an
earlier one takes that one's metrics (only ``description`` is its own).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from refusal_jax.evaluation import cross_entropy as ce
from refusal_jax.evaluation import multiple_choice as mc
from refusal_jax.evaluation.intervals import Estimate, mean_estimate, rate_estimate
from refusal_jax.evaluation.judge import SafetyJudge
from refusal_jax.evaluation.kl import kl_divergence
from refusal_jax.evaluation.outcomes import label_completions, measure_completions
from refusal_jax.evaluation.refusal import is_refusal
from refusal_jax.evaluation.relevance import TextEmbeddings
from refusal_jax.models.config import ModelConfig
from refusal_jax.models.params import Params
from refusal_jax.study.variants import Variant


@dataclasses.dataclass(frozen=True)
class VariantRun:
    """What a metric of one variant reads.

    completions: {"harmful" | "harmless": [{"instruction", "completion"}, ...]} of the eval
    prompts; harmless_logits / base_harmless_logits: [n, V] last-position logits of the harmless
    eval prompts under the variant / the baseline; params, config: the variant's weights and
    model config (its own, or the study model's); corpora, judge, mc_sets, embeddings: the
    cross-entropy corpora, the safety judge (None when not configured), the multiple-choice
    sets (name -> (questions, shot pool, number of shots)) and the sentence embeddings of the
    three-way judge (``evaluation.outcomes``), shared by every variant; reply_nll: per prompt
    set, the completions' NLLs under the unsteered model when already scored (the evaluate
    stage scores every variant's at once), else None.
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
    embeddings: TextEmbeddings
    reply_nll: dict[str, np.ndarray] | None = None

    def texts(self, prompt_set: str) -> list[str]:
        """The completions of ``prompt_set`` ("harmful" or "harmless")."""
        return [row["completion"] for row in self.completions[prompt_set]]

    @functools.cached_property
    def judged(self) -> dict[str, list[dict]]:
        """Per prompt set, each completion with its three-way label and measures
        (``evaluation.outcomes``; fluency under the unsteered study model)."""
        model, runtime = self.study.model, self.study.config.runtime
        judged = {}
        for prompt_set in ("harmful", "harmless"):
            rows = self.completions[prompt_set]
            measures = measure_completions(
                [row["instruction"] for row in rows], self.texts(prompt_set),
                embeddings=self.embeddings, params=model.params, chat=model.chat,
                config=model.config, batch_size=runtime.batch_size,
                placement=self.study.placement,
                nll=None if self.reply_nll is None else self.reply_nll[prompt_set])
            labels = label_completions(measures)
            judged[prompt_set] = [
                {"instruction": row["instruction"], "completion": row["completion"],
                 "label": labels[index],
                 **{name: _json_value(values[index]) for name, values in measures.items()}}
                for index, row in enumerate(rows)]
        return judged


def _json_value(value: np.generic) -> Any:
    """A numpy scalar as a JSON value (None for NaN: an empty reply's NLL)."""
    value = value.item()
    return None if isinstance(value, float) and not np.isfinite(value) else value


Metric = Callable[[VariantRun], Any]
METRICS: dict[str, Metric] = {}


def metric(name: str) -> Callable[[Metric], Metric]:
    """Registers the decorated function as the metric ``name`` (replacing one of that name)."""
    def register(function: Metric) -> Metric:
        METRICS[name] = function
        return function

    return register


def variant_metrics(run: VariantRun, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Every registered metric of ``run`` (or only those of ``names``) that has a value, in
    registration order, and under ``intervals`` the [low, high] of each metric that returned an
    `Estimate`."""
    values, intervals = {}, {}
    for name, function in METRICS.items():
        if names is not None and name not in names:
            continue
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


def _outcome_metrics(prompt_set: str) -> None:
    """Registers the three-way judge's metrics of ``prompt_set``: the rates of on-topic
    compliance and of off-topic-or-degenerate replies, and the mean relevance and reply NLL of
    the replies that are not refusals (None when every reply is one)."""
    def labels(run: VariantRun) -> list[str]:
        return [row["label"] for row in run.judged[prompt_set]]

    def mean(run: VariantRun, measure: str) -> Estimate | None:
        values = [row[measure] for row in run.judged[prompt_set]
                  if not row["refusal"] and row[measure] is not None]  # an empty reply: no NLL
        return mean_estimate(values) if values else None

    for label, name in (("on_topic", "on_topic_compliance"), ("degenerate", "degenerate")):
        metric(f"{prompt_set}_{name}_rate")(
            lambda run, label=label: rate_estimate([row == label for row in labels(run)]))
    metric(f"{prompt_set}_mean_relevance")(lambda run: mean(run, "relevance"))
    metric(f"{prompt_set}_mean_reply_nll")(lambda run: mean(run, "reply_nll"))


_outcome_metrics("harmful")
_outcome_metrics("harmless")
