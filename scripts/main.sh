#!/usr/bin/env bash
# The main job: the fragmentation comparison. Builds stitchalloc-replay (Release), replays the
# built-in generated training traces (bench/trace/generators.h) against stitchalloc, stitchalloc
# without stitching, and models of PyTorch's native and expandable_segments allocators on the
# host driver, prints the table, and writes to build/main/:
#   replay.json        every figure of the table (format: docs/trace-format.md)
#   timeline.csv       allocated/reserved over time for the plotted trace
#   fragmentation.png  the plot of that trace
# Arguments go to stitchalloc-replay (e.g. a trace file converted from your own snapshot,
# see README); PLOT_TRACE names the trace to plot (default llama-varlen-ckpt, or the first of
# your own traces).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/env.sh
cmake --preset default >/dev/null
cmake --build --preset default -j "${JOBS}" --target stitchalloc-replay >/dev/null
out=build/main
mkdir -p "${out}"
inputs=("$@")
plot_trace="${PLOT_TRACE:-}"
if ((${#inputs[@]} == 0)); then
  inputs=(gen:all)
  plot_trace="${plot_trace:-llama-varlen-ckpt}"
fi
./build/default/bench/stitchalloc-replay --compare --json "${out}/replay.json" \
  --timeline "${out}/timeline.csv" --timeline_trace "${plot_trace}" "${inputs[@]}"
# Without PLOT_TRACE, your own traces: plot the first one.
[[ -n "${plot_trace}" ]] || plot_trace="$(awk -F, 'NR == 2 { print $1 }' "${out}/timeline.csv")"
rm -rf "${out}/timeline" && mkdir -p "${out}/timeline"
awk -F, -v dir="${out}/timeline" -v t="${plot_trace}" 'NR > 1 && $1 == t { print $3, $4, $5 > (dir "/" $2 ".dat") }' \
  "${out}/timeline.csv"
if [[ -s "${out}/timeline/stitchalloc.dat" ]]; then
  gnuplot -e "dir='${out}/timeline'; trace='${plot_trace}'; out='${out}/fragmentation.png'" bench/plot_timeline.gp
  echo
  echo "wrote ${out}/replay.json, ${out}/timeline.csv and the plot ${out}/fragmentation.png (trace ${plot_trace})"
else
  echo "no timeline for trace ${plot_trace} (PLOT_TRACE names a trace of this run); wrote ${out}/replay.json"
fi
