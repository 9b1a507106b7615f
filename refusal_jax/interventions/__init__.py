"""Interventions on the residual stream (see ``kinds`` for the conventions)."""

from refusal_jax.interventions.kinds import *  # noqa: F401,F403
