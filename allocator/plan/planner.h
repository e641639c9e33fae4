// The planner: heuristics for a first answer, then the exact search under a time budget.
//
// Fit mode (capacity given): the first heuristic solution within the capacity is returned; if
// none fits, the exact search runs until it finds one, proves the capacity infeasible, or the
// time runs out. Minimise mode (no capacity): the best heuristic peak is an upper bound; the
// exact search then probes capacities between the lower bound and it (the lower bound first,
// then bisection), keeping the best solution found. A solution is proven optimal when its peak
// equals the lower bound or every smaller capacity was proven infeasible.
//
// Every returned solution has passed CheckSolution (the independent validator).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "allocator/plan/problem.h"

namespace stitchalloc::plan {

struct PlanOptions {
  std::optional<std::int64_t> capacity;  // fit mode when set; minimise the peak otherwise
  absl::Duration time_limit = absl::Seconds(10);
  bool exact = true;  // false: heuristics only
};

// One step of the planner: a heuristic run or an exact-search probe.
struct PlanAttempt {
  std::string method;
  std::int64_t capacity = 0;  // exact-search probes: the capacity tried
  std::int64_t peak = 0;      // 0 when the step found no solution
  std::string outcome;        // "solution", "infeasible", "timeout", "skipped"
  std::int64_t nodes = 0;
  absl::Duration elapsed;
};

struct PlanResult {
  bool solved = false;      // offsets hold a valid solution (within the capacity, if given)
  bool optimal = false;     // no solution has a lower peak (proven)
  bool infeasible = false;  // fit mode: proven that no solution fits the capacity
  std::vector<std::int64_t> offsets;
  std::int64_t peak = 0;
  std::int64_t lower_bound = 0;
  std::string method;  // the heuristic or "exact-search" that produced the offsets
  std::int64_t nodes = 0;  // exact-search nodes visited
  absl::Duration elapsed;
  absl::Duration found_after;  // when the returned offsets were found (<= elapsed)
  std::vector<PlanAttempt> attempts;  // in the order they ran
};

// InvalidArgument for a malformed problem or capacity; otherwise a result (solved or not).
absl::StatusOr<PlanResult> Plan(const Problem& problem, const PlanOptions& options);

}  // namespace stitchalloc::plan
