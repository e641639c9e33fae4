#!/usr/bin/env bash
# Builds and runs every test suite: plain (Release, with the PyTorch plugin built against the
# torch of .venv), ASan+UBSan and TSan, then installs the Python package (pip install .) into
# .venv and runs the Python tests against it. tests/gpu run too and skip without a device.
# Usage: scripts/test.sh [preset...]   (default: default asan-ubsan tsan)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
stamp() { echo "=== $1 ($((SECONDS / 60)) min $((SECONDS % 60)) s since the start) ==="; }
bash scripts/bootstrap.sh
source scripts/env.sh
bash scripts/venv.sh
stamp "setup done"

presets=("$@")
((${#presets[@]})) || presets=(default asan-ubsan tsan)
for preset in "${presets[@]}"; do
  echo "=== ${preset}: configure + build ==="
  cmake --preset "${preset}" -DSTITCHALLOC_PYTHON="${PWD}/.venv/bin/python" >/dev/null
  cmake --build --preset "${preset}" -j "${JOBS}"
  echo "=== ${preset}: test ==="
  ctest --preset "${preset}" -j "${JOBS}" --timeout 900
  stamp "${preset} done"
done

echo "=== python: pip install . into .venv ==="
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall .
echo "=== python: pytest (converter, plugin without a GPU, tests/gpu skip without a device) ==="
replay=build/default/bench/stitchalloc-replay
(cd tests && STITCHALLOC_REPLAY="$([[ -x ../${replay} ]] && echo "${PWD}/../${replay}")" \
  ../.venv/bin/python -m pytest -q python gpu)
stamp "all done"
