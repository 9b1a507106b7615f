"""Helpers of scripts/benchmark.py: timing and memory, the PyTorch reference stack, the sections.

Nothing here is part of the refusal_jax library; it depends on torch, transformers and
scikit-learn, which the library itself does not need.
"""
