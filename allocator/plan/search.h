// Exact search for the offset-assignment problem within a capacity (after MiniMalloc, ASPLOS
// 2024; our own implementation).
//
// Search space: canonical solutions only. Buffers are placed one at a time in non-decreasing
// (offset, rank) order, each at its minimum offset, the top of the highest placed buffer that
// overlaps it in time (aligned). Every feasible instance has such a solution (push every buffer
// down as far as it goes), so exhausting this space proves infeasibility.
//
// Time is cut into sections: the maximal sets of buffers live together (cliques of the
// interval graph), in time order; a buffer spans a contiguous range of them. Per section the
// search keeps the floor (the top of the placed buffers in it) and the total size of its
// unplaced buffers. Pruning:
//   section inference  floor' + total > capacity in some section: no completion fits. floor' is
//                      the floor raised to the current offset (placement is monotone) and to
//                      the lowest minimum offset of the section's unplaced buffers (memory
//                      below it can no longer be used there);
//   dominance          a candidate whose offset is at or above the top some other unplaced
//                      buffer would have at its own minimum offset leaves a gap that buffer
//                      fits in: the same solution is reached with that buffer first, skip;
//   decomposition      when placing a buffer leaves no unplaced buffer crossing a section
//                      boundary, the two sides are independent and are solved one after the
//                      other (a failure on one side no longer backtracks through the other).
// Candidates are tried in (minimum offset, static rank) order; ranks come from one of several
// static orders (by section total, size, area), tried round-robin under a node limit that
// doubles each round, so one unlucky order does not stall the search.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/time/time.h"
#include "allocator/plan/problem.h"

namespace stitchalloc::plan {

enum class SearchOutcome { kFound, kInfeasible, kTimeout, kTooLarge };

struct SearchOptions {
  std::int64_t capacity = 0;
  absl::Time deadline = absl::InfiniteFuture();
  // Problems with more pairwise lifetime overlaps than this are not searched (memory).
  std::int64_t max_overlaps = std::int64_t{1} << 27;
};

struct SearchResult {
  SearchOutcome outcome = SearchOutcome::kTimeout;
  std::vector<std::int64_t> offsets;  // kFound: a valid solution within the capacity
  std::int64_t nodes = 0;             // search nodes visited
  std::int64_t backtracks = 0;
};

// The problem must pass CheckProblem. Runs on the calling thread's stack budget for problems
// of up to a few thousand buffers per partition; deeper searches run on a helper thread with a
// large stack.
SearchResult ExactSearch(const Problem& problem, const SearchOptions& options);

}  // namespace stitchalloc::plan
