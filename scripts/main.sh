#!/usr/bin/env bash
# The main job: builds stitchalloc (Release) and runs the stitching demo on the host driver,
# which prints reserved/allocated for the adversarial fragmentation pattern with and without
# stitching. Extra arguments go to stitchalloc-demo (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/env.sh
cmake --preset default >/dev/null
cmake --build --preset default -j "${JOBS}" --target stitchalloc-demo
exec ./build/default/bench/stitchalloc-demo "$@"
