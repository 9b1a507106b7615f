"""refusal_jax: steering refusal in chat models with JAX.

Submodules: `models` (configs, forward pass, generation, loading), `interventions` (the
steering algebra), `directions` (DiM, INLP, LEACE), `folding` (edited weights and export),
`chat` (templates, EOI tokens), `evaluation`, `pipeline` and `main` (the study), `sharding`
and `distributed` (scale-out).
"""

__version__ = "0.1.0"
