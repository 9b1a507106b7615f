"""A linear probe on the base model's activations as the teacher of the refusal decision.

A linear read-out of the released model's residual stream separates harmful requests from benign
look-alikes about as well as a tuned model's refusal decision does (`scripts/probe_lookalikes.py`),
with a simpler, strongly regularised rule. To teach the decision that rule, a logistic probe
(`refusal_jax.training.evaluation.fit_probe`) is fitted at one layer, at the last
post-instruction token, to the training requests (the refusal group as harmful, every other group
as benign), and its probability that each request is harmful, sigmoid(logit + offset), becomes that
example's target for the refusal decision (`train_adapter(..., decision_targets=...)`). The
probe's logits are cached on disk per instruction, so a resumed run does not recompute them.
On SmolLM2-135M it did not separate better than the 0/1 labels (docs/organism.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from absl import logging

from refusal_jax.evaluation.activations import capture
from refusal_jax.models.loading import Model
from refusal_jax.training.completions import LENGTH_BUCKET
from refusal_jax.training.evaluation import fit_probe
from refusal_jax.training.examples import Example


def probe_teacher_logits(model: Model, groups: Mapping[str, Sequence[Example]], *,
                         harmful_group: str, layer: int, inverse_regularization: float,
                         batch_size: int = 64) -> dict[str, np.ndarray]:
    """The probe's logits [n] for the examples of each group (harmful = positive)."""
    if harmful_group not in groups or len(groups) < 2:
        raise ValueError(f"the probe teacher needs the harmful group {harmful_group!r} and at "
                         f"least one benign group; got {sorted(groups)}")
    if not 0 <= layer < model.config.n_layers:
        raise ValueError(f"the probe layer must lie in [0, {model.config.n_layers}), got {layer}")
    features = {}
    for name, examples in groups.items():
        captured, _ = capture(model, [e.instruction for e in examples], batch_size=batch_size,
                              length_bucket=LENGTH_BUCKET, name=f"probe teacher: {name}")
        # last post-instruction token; a copy, so the [n, P, L, D] capture is freed
        features[name] = captured[:, -1, layer].copy()
    benign = np.concatenate([f for name, f in features.items() if name != harmful_group])
    probe = fit_probe(features[harmful_group], benign,
                      inverse_regularization=inverse_regularization)
    return {name: probe.logits(f) for name, f in features.items()}


def cached_probe_teacher_logits(path: str | os.PathLike[str], model: Model,
                                groups: Mapping[str, Sequence[Example]], *, harmful_group: str,
                                layer: int, inverse_regularization: float
                                ) -> dict[str, np.ndarray]:
    """`probe_teacher_logits`, read from `path` when it holds them for the same model (source,
    adapter, system prompt), settings and instructions, else computed and written there. The
    values read back equal those computed (float32 logits round-trip exactly through JSON), so a
    resumed run trains on the same targets."""
    path = Path(path)
    request = {"source": model.source, "adapter": model.adapter,
               "system_prompt": model.chat.system_prompt, "harmful_group": harmful_group,
               "layer": int(layer), "inverse_regularization": float(inverse_regularization),
               "instructions": {name: [e.instruction for e in examples]
                                for name, examples in groups.items()}}
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("request") == request:
            return {name: np.asarray(logits, np.float32)
                    for name, logits in cached["logits"].items()}
        logging.info("cache %s holds another model, setting or data; recomputing", path)
    logits = probe_teacher_logits(model, groups, harmful_group=harmful_group, layer=layer,
                                  inverse_regularization=inverse_regularization)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    logits = {name: np.asarray(values, np.float32) for name, values in logits.items()}
    staging.write_text(json.dumps({"request": request, "logits": {
        name: [float(x) for x in values] for name, values in logits.items()}}))
    staging.replace(path)
    return logits


def decision_targets(logits: Mapping[str, np.ndarray], offset: float) -> dict[str, np.ndarray]:
    """sigmoid(logit + offset) per example: the probability of refusing each request taught to
    the model (a positive offset refuses more of the requests the probe finds uncertain)."""
    return {name: (1.0 / (1.0 + np.exp(-(np.asarray(x, np.float64) + offset)))).astype(np.float32)
            for name, x in logits.items()}
