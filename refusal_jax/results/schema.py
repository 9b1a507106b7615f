"""The study's results: the documented schema of `results.json`, its validation and JSON Schema.

Schema (version `SCHEMA_VERSION`). `results.json` is `StudyResults` serialised by
`dataclasses.asdict`; `json_schema()` gives the same layout as a JSON Schema document. Fields:

    schema_version   int, = SCHEMA_VERSION
    model            str, the model source (preset name, HF dir, hub id or GGUF path)
    config           object, the resolved run config (free-form JSON, shown in the report)
    interventions    list of InterventionResult, one row per intervention, "baseline" first:
        name                      str, unique: the study's variant name (refusal_jax.study.variants)
        description               str, one line: what was applied, where, with which k / alpha
        harmful_refusal_rate      float in [0, 1], substring refusal rate on harmful eval prompts
        harmless_refusal_rate     float in [0, 1], induced refusal rate on harmless prompts
        n_harmful, n_harmless     int, number of completions behind each rate
        kl                        float >= 0 | null, mean KL(baseline || intervened) of the
                                  last-position next-token distribution on harmless prompts
        cross_entropy             {corpus name: mean token cross-entropy in nats}, e.g.
                                  {"builtin": 3.1, "alpaca": 2.4}; perplexity = exp(value)
        judge_unsafe_rate         float in [0, 1] | null, fraction of harmful completions the
                                  safety judge calls unsafe (null where no judge was run)
        centroid_axis_position    float | null, mean position of the intervened harmful
                                  activations on the harmful(0)-to-harmless(1) centroid axis
        centroid_axis_position_harmless   float | null, the same for harmless activations
        multiple_choice           {benchmark: accuracy in [0, 1]}, e.g. {"mmlu": 0.41}
        harmful_on_topic_compliance_rate, harmful_degenerate_rate,
        harmless_on_topic_compliance_rate, harmless_degenerate_rate
                                  float in [0, 1] | null, the offline judge's three-way labels
                                  (refusal / on-topic compliance / off-topic or degenerate,
                                  refusal_jax.evaluation.completion_labels): the fraction of
                                  completions labelled on-topic compliance (on harmful prompts:
                                  the jailbreak measure) and off-topic or degenerate (null
                                  where the judge did not run)
        intervals                 {metric: [low, high]}, the 95% interval of a metric above or
                                  of other_metrics: Wilson for rates, percentile bootstrap over
                                  prompts for means (KL, the judge's mean relevance and NLL)
        other_metrics             {name: value}, metrics registered beyond these fields
    selections       list of SelectedComponent: the (position, layer) chosen per method
        method, position (EOI position, negative), layer, bypass_score, steering_score,
        kl_score (floats | null), n_directions (int | null, INLP), first_direction_accuracy
    geometry         GeometrySummary | null (refusal_jax.evaluation.geometry), at the DiM source:
                     the baseline and the DiM variants, or every variant when both methods
                     chose one (position, layer)
        position, layer              the source (EOI position, layer) of the activations shown
        cosine_dim_inlp              cosine between the DiM direction and the first INLP one
                                     (null when INLP kept no direction there)
        principal_angles_deg         principal angle(s) between the DiM direction and the INLP
                                     subspace, in degrees (one angle for a 1-D direction)
        plots                        list of PNG paths, relative to the workdir
    inlp_geometry    GeometrySummary | null, the same at the INLP source (the baseline and the
                     INLP variants) when INLP chose another (position, layer); a variant's
                     centroid_axis_position is measured at the source of the method it acts at
    k_curve          KCurve | null (refusal_jax.evaluation.k_curve: INLP keeping only its first
                     k directions)
        intervention                 which INLP intervention was truncated
        points                       list of {k, harmful_refusal_rate, harmless_refusal_rate?,
                                     cross_entropy, kl?}, k increasing
        baseline_harmful_refusal_rate, baseline_cross_entropy   floats, for reference lines
        plot                         PNG path relative to the workdir | null
    timings_s        {stage: wall seconds}
    notes            list of str: explanations added by the pipeline or the user (for example
                     why a result departs from the published findings); shown in the report

Every float must be finite (NaN/inf raise ValueError; use null for "not measured"), and every
plot path must exist inside the workdir when the report is written (`refusal_jax.results.render`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from refusal_jax.evaluation.geometry import GeometrySummary
from refusal_jax.evaluation.k_curve import KCurve, check_k_curve, check_rate
from refusal_jax.runtime.files import write_text_atomically

SCHEMA_VERSION = 2
# Version 2 added the judge's rates and `intervals`, all optional: version 1 files still read.
READABLE_VERSIONS = (1, 2)
RESULTS_FILENAME = "results.json"

@dataclasses.dataclass
class InterventionResult:
    name: str
    description: str
    harmful_refusal_rate: float
    harmless_refusal_rate: float
    n_harmful: int
    n_harmless: int
    kl: float | None = None
    cross_entropy: dict[str, float] = dataclasses.field(default_factory=dict)
    judge_unsafe_rate: float | None = None
    centroid_axis_position: float | None = None
    centroid_axis_position_harmless: float | None = None
    multiple_choice: dict[str, float] = dataclasses.field(default_factory=dict)
    harmful_on_topic_compliance_rate: float | None = None
    harmful_degenerate_rate: float | None = None
    harmless_on_topic_compliance_rate: float | None = None
    harmless_degenerate_rate: float | None = None
    intervals: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    # Metrics registered beyond the fields above (``refusal_jax.study.metrics``), by name.
    other_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


_INTERVENTION_FIELDS = {field.name for field in dataclasses.fields(InterventionResult)}


@dataclasses.dataclass
class SelectedComponent:
    method: str
    position: int
    layer: int
    bypass_score: float | None = None
    steering_score: float | None = None
    kl_score: float | None = None
    n_directions: int | None = None
    first_direction_accuracy: float | None = None


@dataclasses.dataclass
class StudyResults:
    model: str
    interventions: list[InterventionResult]
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    selections: list[SelectedComponent] = dataclasses.field(default_factory=list)
    geometry: GeometrySummary | None = None
    inlp_geometry: GeometrySummary | None = None
    k_curve: KCurve | None = None
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    schema_version: int = SCHEMA_VERSION


# --------------------------------------------------------------------------------------------
# Validation: a dict (e.g. read from results.json) -> StudyResults, with errors naming the field.


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise ValueError(f"{where} is null; it is required")
        (inner,) = [option for option in options if option is not type(None)]
        return _convert(value, inner, where)
    if value is None:
        raise ValueError(f"{where} is null; it is required ({_type_name(annotation)})")
    if dataclasses.is_dataclass(annotation):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        return _from_mapping(annotation, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {type(value).__name__}")
        (inner,) = typing.get_args(annotation)
        return [_convert(item, inner, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be an object, got {type(value).__name__}")
        _, inner = typing.get_args(annotation)
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"{where} keys must be strings, got {key!r}")
        if inner is Any:
            return _json_value(dict(value), where)
        return {key: _convert(item, inner, f"{where}.{key}") for key, item in value.items()}
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(
                value, "__float__"):
            raise ValueError(f"{where} must be a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{where} is {number}; results must be finite (use null for "
                             "'not measured')")
        return number
    if annotation is int:
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} at {where}")


def _json_value(value: Any, where: str) -> Any:
    """Checks that a free-form value is plain JSON (finite numbers, str keys)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}; results must be finite")
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"{where} holds a {type(value).__name__}, which is not JSON; convert it "
                     "to a number, string, list or dict")


def _from_mapping(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be an object ({cls.__name__}), got "
                         f"{type(value).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}; {cls.__name__} has "
                         f"{sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name not in value:
            if (field.default is dataclasses.MISSING
                    and field.default_factory is dataclasses.MISSING):
                raise ValueError(f"{where} lacks the required field {name!r}")
            continue
        kwargs[name] = _convert(value[name], hints[name], f"{where}.{name}")
    return cls(**kwargs)


RATE_FIELDS = ("harmful_refusal_rate", "harmless_refusal_rate", "judge_unsafe_rate",
               "harmful_on_topic_compliance_rate", "harmful_degenerate_rate",
               "harmless_on_topic_compliance_rate", "harmless_degenerate_rate")
_ROUNDING = 1e-9  # a bootstrap interval's quantiles may sit a rounding error off the mean


def _check_intervals(row: InterventionResult, where: str) -> None:
    """Each interval names a number the row reports (a field or one of `other_metrics`) and
    holds its value: low <= value <= high, inside [0, 1] for rates."""
    for name, interval in row.intervals.items():
        value = (getattr(row, name) if name in _INTERVENTION_FIELDS
                 else row.other_metrics.get(name))
        if not isinstance(value, (int, float)):
            raise ValueError(f"{where}.intervals.{name}: the row has no number {name!r} for "
                             "this interval to belong to")
        if len(interval) != 2:
            raise ValueError(f"{where}.intervals.{name} must be [low, high], got {interval}")
        low, high = interval
        if not low - _ROUNDING <= value <= high + _ROUNDING:
            raise ValueError(f"{where}.intervals.{name} = [{low}, {high}] does not hold its "
                             f"value {value}")
        if name in RATE_FIELDS:
            check_rate(low, f"{where}.intervals.{name}[0]")
            check_rate(high, f"{where}.intervals.{name}[1]")


def validate_k_curve(curve: KCurve | Mapping[str, Any]) -> KCurve:
    """Checks a k-curve (a `KCurve` or a dict) and returns it as a fresh `KCurve`."""
    parsed = _convert(curve, KCurve, "k_curve")
    check_k_curve(parsed, "k_curve")
    return parsed


def validate_results(results: StudyResults | Mapping[str, Any]) -> StudyResults:
    """Checks `results` against the schema and returns it as a fresh `StudyResults`.

    Accepts a `StudyResults` or a plain dict (e.g. `json.load` of results.json). Raises
    ValueError naming the offending field (path such as `results.interventions[2].kl`).
    """
    if dataclasses.is_dataclass(results) and not isinstance(results, type):
        results = dataclasses.asdict(results)
    parsed = _from_mapping(StudyResults, results, "results")
    if parsed.schema_version not in READABLE_VERSIONS:
        raise ValueError(f"results.schema_version is {parsed.schema_version}; this version of "
                         f"refusal_jax reads schemas {READABLE_VERSIONS}")
    if not parsed.interventions:
        raise ValueError("results.interventions is empty; a report needs at least one row")
    names = [row.name for row in parsed.interventions]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"results.interventions has duplicate names {duplicates}")
    for i, row in enumerate(parsed.interventions):
        where = f"results.interventions[{i}] ({row.name})"
        for rate in RATE_FIELDS:
            check_rate(getattr(row, rate), f"{where}.{rate}")
        for benchmark, accuracy in row.multiple_choice.items():
            check_rate(accuracy, f"{where}.multiple_choice.{benchmark}")
        if row.n_harmful < 1 or row.n_harmless < 1:
            raise ValueError(f"{where}: n_harmful and n_harmless must be positive, got "
                             f"{row.n_harmful} and {row.n_harmless}")
        if row.kl is not None and row.kl < 0:
            raise ValueError(f"{where}.kl = {row.kl} is negative; KL divergences are >= 0")
        _check_intervals(row, where)
    if parsed.k_curve is not None:
        check_k_curve(parsed.k_curve, "results.k_curve")
    return parsed


def read_results(path: str | os.PathLike) -> StudyResults:
    """Reads and validates a results.json file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path}; run the study's report stage "
                                "first")
    with path.open() as file:
        return validate_results(json.load(file))


def write_results(workdir: str | os.PathLike, results: StudyResults) -> Path:
    """Writes validated ``results`` to ``workdir/results.json``, atomically; returns its path."""
    path = Path(workdir) / RESULTS_FILENAME
    write_text_atomically(path, json.dumps(dataclasses.asdict(results), indent=2,
                                           allow_nan=False) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# JSON Schema of the same layout (for external tools; the tests check it agrees).


def _schema_of(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return {"anyOf": [_schema_of(inner), {"type": "null"}]}
    if dataclasses.is_dataclass(annotation):
        hints = typing.get_type_hints(annotation)
        fields = dataclasses.fields(annotation)
        return {
            "type": "object",
            "title": annotation.__name__,
            "properties": {field.name: _schema_of(hints[field.name]) for field in fields},
            "required": [field.name for field in fields
                         if field.default is dataclasses.MISSING
                         and field.default_factory is dataclasses.MISSING],
            "additionalProperties": False,
        }
    if origin is list:
        return {"type": "array", "items": _schema_of(typing.get_args(annotation)[0])}
    if origin is dict:
        inner = typing.get_args(annotation)[1]
        return {"type": "object"} if inner is Any else {
            "type": "object", "additionalProperties": _schema_of(inner)}
    return {"type": {float: "number", int: "integer", str: "string"}[annotation]}


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of results.json."""
    schema = _schema_of(StudyResults)
    schema["properties"]["schema_version"] = {"enum": list(READABLE_VERSIONS)}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"refusal_jax/results/v{SCHEMA_VERSION}", **schema}
