#!/usr/bin/env bash
# Creates (or reuses) the project's Python virtual environment in .venv with what the Python
# tests need (pytest). The trace converter itself needs nothing beyond the standard library.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import pytest" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "pytest>=7"
fi
