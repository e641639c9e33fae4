// Fast placement heuristics for the offset-assignment problem: the planner's first answer.
//
// Each heuristic fixes an order of buffers and places each one, in that order, at the best gap
// left by the already placed buffers whose lifetimes intersect its own (the smallest gap that
// fits, lowest offset on ties; on top of them when no gap fits):
//   kGreedyBySize      largest size first (TFLite/MEMO "greedy by size")
//   kGreedyByConflict  largest live load over the buffer's lifetime first, then size
//   kGreedyByArea      largest size x lifetime first
//   kBestFitInTime     in order of lower (an online best-fit allocator with perfect knowledge
//                      of sizes)
// These run in O(n * k log k) with k the number of lifetime-overlapping buffers.
//
// The lowest-first dives build a canonical solution bottom-up instead, the first descent of
// the exact search without backtracking: repeatedly the buffer that can sit lowest (the top of
// the placed buffers under its lifetime), ties broken by a static order (W lifetime width,
// A area, T the largest live load over its lifetime, Z size; each descending). A segment tree
// over time answers "highest top under this lifetime" and a lazy min-heap keyed by the (only
// ever rising) minimum offsets picks the next buffer: O(log n) per heap step, but a
// long-lived buffer may be re-queued once per buffer placed under it.
#pragma once

#include <cstdint>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/time/time.h"
#include "allocator/plan/problem.h"

namespace stitchalloc::plan {

enum class Heuristic {
  kGreedyBySize,
  kGreedyByConflict,
  kGreedyByArea,
  kBestFitInTime,
  kLowestFirstWAT,
  kLowestFirstTAW,
  kLowestFirstZTW,
};

// The planner runs them in this order while time remains: greedy by size (fast everywhere)
// first, then the dives, the one that re-queues long-lived buffers least (TAW, the best on
// idealloc S_1) first and WAT (slowest on many long lifetimes) last of them.
inline constexpr Heuristic kAllHeuristics[] = {Heuristic::kGreedyBySize,   Heuristic::kLowestFirstTAW,
                                               Heuristic::kLowestFirstZTW, Heuristic::kLowestFirstWAT,
                                               Heuristic::kGreedyByConflict, Heuristic::kGreedyByArea,
                                               Heuristic::kBestFitInTime};

absl::string_view HeuristicName(Heuristic h);

// Offsets for every buffer (a valid solution with no capacity bound), or an empty vector when
// `deadline` passed first (checked every few thousand placements). The problem must pass
// CheckProblem.
std::vector<std::int64_t> PlaceGreedy(const Problem& problem, Heuristic heuristic,
                                      absl::Time deadline = absl::InfiniteFuture());

}  // namespace stitchalloc::plan
