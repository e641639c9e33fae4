#!/usr/bin/env bash
# Creates (or reuses) the project's Python virtual environment in .venv with what the Python
# tests need: pytest, transformers, torchtitan's models, and PyTorch from the package index (the
# CUDA build, whose headers and libc10_cuda the plugin compiles against; it imports and runs
# without a GPU).
# TORCH_SPEC overrides the version (default: the newest release this project was tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.15.0}"
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import pytest" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir "pytest>=7"
fi
# transformers: the offload tests run its Llama and Qwen2 decoder layers (randomly initialised,
# no downloads). TRANSFORMERS_SPEC overrides the version.
TRANSFORMERS_SPEC="${TRANSFORMERS_SPEC:-transformers==5.23.0}"
if [[ "$(.venv/bin/python -c 'import transformers; print(transformers.__version__)' 2>/dev/null || true)" != \
      "${TRANSFORMERS_SPEC#transformers==}" ]]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir "${TRANSFORMERS_SPEC}"
fi
want="${TORCH_SPEC#torch==}"
have="$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [[ "${TORCH_SPEC}" != torch==* || "${have}" != "${want}" ]]; then
  # torch's CUDA build installs to about 5.5 GB (torch, triton and the nvidia-* libraries) and pip
  # needs its downloads beside that; the cache is skipped so that they are not kept twice.
  need_gb=9
  free_gb() { df -Pk "$1" | awk 'NR==2 {printf "%d", $4 / 1048576}'; }
  tmp="${TMPDIR:-/tmp}"
  echo "venv: installing ${TORCH_SPEC} (about 5.5 GB with its CUDA libraries; ${need_gb} GB free needed" \
       "while installing, $(free_gb .venv) GB free for .venv, $(free_gb "${tmp}") GB in ${tmp})"
  if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir "${TORCH_SPEC}"; then
    echo "venv: error: installing ${TORCH_SPEC} failed with $(free_gb .venv) GB free for .venv and" \
         "$(free_gb "${tmp}") GB in ${tmp} (about ${need_gb} GB are needed: free disk space or point TMPDIR" \
         "at a larger disk and run again)" >&2
    exit 1
  fi
fi
# torchtitan (after torch): the offload tests run its own Llama 3 and Qwen 3 models (its model
# code only: the package without its training dependencies, which the models do not import).
# TORCHTITAN_SPEC overrides the version.
TORCHTITAN_SPEC="${TORCHTITAN_SPEC:-torchtitan==0.3.0}"
if [[ "$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torchtitan"))' 2>/dev/null || true)" != \
      "${TORCHTITAN_SPEC#torchtitan==}" ]]; then
  # tyro with its dependencies first: an install that resolves dependencies after torchtitan
  # would list torchtitan's training dependencies as missing (harmless, but printed as an ERROR).
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir tyro==1.0.17
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps "${TORCHTITAN_SPEC}" \
    spmd_types==0.2.3 torch_checkpointing==0.1.1
fi
