#!/usr/bin/env bash
# Runs stitchalloc-plan on every instance in ../shared/data/planner and prints the raw output
# summarised in docs/results.md (every heuristic and search probe, then 3 timed repeats).
# Usage: bench/plan_instances.sh [BUILD_DIR] > bench/results/host-plan-DATE.txt
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build/default}"
plan="$build/allocator/stitchalloc-plan"
data="${STITCHALLOC_SHARED_DATA:-$root/../shared/data}/planner"
[[ -x "$plan" ]] || { echo "error: $plan not built" >&2; exit 2; }
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
echo "# stitchalloc-plan on ../shared/data/planner, $(nproc) cores, $(date +%F), commit $(git -C "$root" rev-parse --short HEAD)"
run() {  # instance, extra flags...
  local f="$1"; shift
  echo "== $f $* --time-limit 10"
  set +e; "$plan" "$data/$f" "$@" --time-limit 10 --verbose -o "$out"; local rc=$?; set -e
  echo "exit $rc"
}
for x in A B C D E; do run "minimalloc/$x.1048576.csv" --capacity 1048576; done
for x in S_1 G_1 resnet50; do run "idealloc/$x.csv"; done
echo
echo "# repeat timing, 3 runs each: found-at / total seconds"
for f in minimalloc/{A,B,C,D,E}.1048576.csv idealloc/{S_1,G_1,resnet50}.csv; do
  cap=(); [[ $f == minimalloc/* ]] && cap=(--capacity 1048576)
  line="$f:"
  for _ in 1 2 3; do
    r="$("$plan" "$data/$f" "${cap[@]}" --time-limit 10 -o "$out" | sed -n 's/.*peak\/lb \([0-9.]*\).*found at \([0-9.]*\) s  time \([0-9.]*\) s/\1 \2\/\3/p')"
    line="$line $r"
  done
  echo "$line"
done
