#!/usr/bin/env bash
# Creates (or reuses) the project's Python virtual environment in .venv with what the Python
# tests need: pytest, transformers, and PyTorch from the package index (the CUDA build, whose headers and
# libc10_cuda the plugin compiles against; it imports and runs without a GPU).
# TORCH_SPEC overrides the version (default: the newest release this project was tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.15.0}"
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import pytest" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "pytest>=7"
fi
# transformers: the offload tests run its Llama and Qwen2 decoder layers (randomly initialised,
# no downloads). TRANSFORMERS_SPEC overrides the version.
TRANSFORMERS_SPEC="${TRANSFORMERS_SPEC:-transformers==5.23.0}"
if [[ "$(.venv/bin/python -c 'import transformers; print(transformers.__version__)' 2>/dev/null || true)" != \
      "${TRANSFORMERS_SPEC#transformers==}" ]]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${TRANSFORMERS_SPEC}"
fi
want="${TORCH_SPEC#torch==}"
have="$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [[ "${TORCH_SPEC}" != torch==* || "${have}" != "${want}" ]]; then
  echo "venv: installing ${TORCH_SPEC} (a few GB with its CUDA libraries)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC}"
fi
