#!/usr/bin/env bash
# Converts the eight shared traces of ../shared/data/traces (4 raw snapshots, 4 reference event
# CSVs) with python -m stitchalloc.convert and replays them against every policy with the
# allocator's invariants checked and the peak explained. Arguments go to stitchalloc-replay
# (e.g. --json FILE). Needs a built build/default (scripts/test.sh or scripts/main.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
data=../shared/data/traces
out=$(mktemp -d)
trap 'rm -rf "${out}"' EXIT
py=python3
[[ -x .venv/bin/python ]] && py=.venv/bin/python
for f in "${data}"/raw/*.pickle; do
  PYTHONPATH=python "${py}" -m stitchalloc.convert "${f}" -o "${out}/$(basename "${f}" .pickle).trace.gz" >/dev/null
done
for n in cs336_Wedsonlin_medium_128_inference cs336_Wedsonlin_medium_512_inference \
         cs336_notHanmin_memory_snapshot_forward cs336_notHanmin_memory_snapshot_forward_without_mixed; do
  PYTHONPATH=python "${py}" -m stitchalloc.convert "${data}/converted/${n}.events.csv.gz" -o "${out}/${n}.trace.gz" >/dev/null
done
./build/default/bench/stitchalloc-replay --compare --check --explain_peak "$@" "${out}"/*.trace.gz
