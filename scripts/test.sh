#!/usr/bin/env bash
# Builds and runs every test suite: plain (Release), ASan+UBSan and TSan, then the Python tests.
# Usage: scripts/test.sh [preset...]   (default: default asan-ubsan tsan)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/env.sh

presets=("$@")
((${#presets[@]})) || presets=(default asan-ubsan tsan)
for preset in "${presets[@]}"; do
  echo "=== ${preset}: configure + build ==="
  cmake --preset "${preset}" >/dev/null
  cmake --build --preset "${preset}" -j "${JOBS}"
  echo "=== ${preset}: test ==="
  ctest --preset "${preset}" -j "${JOBS}" --timeout 900
done

echo "=== python: converter tests (pytest in .venv) ==="
bash scripts/venv.sh
replay=build/default/bench/stitchalloc-replay
PYTHONPATH=python STITCHALLOC_REPLAY="$([[ -x ${replay} ]] && echo "${PWD}/${replay}")" \
  .venv/bin/python -m pytest -q tests/python
