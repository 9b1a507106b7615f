"""Packages: refusal_jax and its subpackages, plus the repository's configs/ installed as
refusal_jax.configs (so that `--config=NAME` finds them after `pip install .`); the rest of the
metadata is in setup.cfg."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["refusal_jax", "refusal_jax.*"]) + ["refusal_jax.configs"],
      package_dir={"refusal_jax.configs": "configs"})
