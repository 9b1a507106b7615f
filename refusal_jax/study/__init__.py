"""The study as resumable stages: extract, select, infer, evaluate, report.

Entry point: ``python -m refusal_jax.main`` (see ``refusal_jax/main.py``); the stages and the
work-directory layout are in :mod:`refusal_jax.study.runner`, the config keys in
:mod:`refusal_jax.study.config`.
"""
