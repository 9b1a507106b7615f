"""The library's common path in a few calls (re-exported as ``import refusal_jax as rj``):

    model = rj.load_model()                          # the refusal-tuned SmolLM2-135M
    acts = rj.capture(model, prompts)                # [n, P, L, D] at the EOI tokens
    r = rj.fit_dim(acts_harmful, acts_harmless)      # [P, L, D]; r[-1, 21]: position -1, layer 21
    rj.generate(model, prompts, rj.directional_ablation(model, r[-1, 21])).texts

Conventions: layer l is the input of block l; position -1 is the last post-instruction token
(``activations``). Fits take (harmful, harmless) activations and return one result per
(position, layer) (``fits``). Builders take the model, act at every layer unless told
``layers=``, normalise what they remove and add what they add as given (``steering``).
Defaults are the study's (``configs/default.py``): 4 INLP directions, 32 new tokens, batches
of 16 prompts padded to multiples of 32 tokens. docs/steering_in_your_own_code.md walks
through it.
"""

from refusal_jax.api.activations import capture
from refusal_jax.api.fits import fit_dim, fit_inlp, fit_leace
from refusal_jax.api.generation import Completions, generate, generate_each
from refusal_jax.api.steering import (
    activation_addition,
    counterfactual_reflection,
    directional_ablation,
    export,
    fold,
    leace_eraser,
    nullspace_projection,
)
from refusal_jax.evaluation.judge import SafetyJudge
from refusal_jax.evaluation.refusal import is_refusal, refusal_rate
from refusal_jax.models.io.weights_cache import clear as clear_weights_cache
from refusal_jax.models.loading import BASE_MODEL, DEFAULT_MODEL, Model, load_model
from refusal_jax.text.prompts import load_instructions

__all__ = [
    "BASE_MODEL",
    "DEFAULT_MODEL",
    "Completions",
    "Model",
    "SafetyJudge",
    "activation_addition",
    "capture",
    "clear_weights_cache",
    "counterfactual_reflection",
    "directional_ablation",
    "export",
    "fit_dim",
    "fit_inlp",
    "fit_leace",
    "fold",
    "generate",
    "generate_each",
    "is_refusal",
    "leace_eraser",
    "load_instructions",
    "load_model",
    "nullspace_projection",
    "refusal_rate",
]
