// Plan(): heuristics, then exact-search probes, each answer validated before it is returned.
#include "allocator/plan/planner.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "allocator/plan/heuristics.h"
#include "allocator/plan/search.h"

namespace stitchalloc::plan {

namespace {

const char* OutcomeName(SearchOutcome o) {
  switch (o) {
    case SearchOutcome::kFound: return "solution";
    case SearchOutcome::kInfeasible: return "infeasible";
    case SearchOutcome::kTimeout: return "timeout";
    case SearchOutcome::kTooLarge: return "skipped (too many overlaps)";
  }
  return "?";
}

SearchResult Probe(const Problem& problem, std::int64_t capacity, absl::Time deadline, PlanResult* result) {
  const absl::Time t0 = absl::Now();
  SearchResult r = ExactSearch(problem, {.capacity = capacity, .deadline = deadline});
  result->nodes += r.nodes;
  result->attempts.push_back({"exact-search", capacity,
                              r.outcome == SearchOutcome::kFound ? Peak(problem, r.offsets) : 0,
                              OutcomeName(r.outcome), r.nodes, absl::Now() - t0});
  return r;
}

}  // namespace

absl::StatusOr<PlanResult> Plan(const Problem& problem, const PlanOptions& options) {
  const absl::Time start = absl::Now();
  const absl::Time deadline = start + options.time_limit;
  if (absl::Status s = CheckProblem(problem); !s.ok()) return s;
  if (options.capacity && *options.capacity <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("capacity ", *options.capacity, " must be positive"));
  }
  PlanResult result;
  result.lower_bound = LowerBound(problem);
  auto finish = [&]() -> absl::StatusOr<PlanResult> {
    if (result.solved) {
      result.peak = Peak(problem, result.offsets);
      if (absl::Status s = CheckSolution(problem, result.offsets, options.capacity); !s.ok()) {
        return absl::InternalError(absl::StrCat("planner produced an invalid solution (", result.method, "): ",
                                                s.message()));
      }
      if (result.peak == result.lower_bound) result.optimal = true;
    }
    result.elapsed = absl::Now() - start;
    return std::move(result);
  };
  if (problem.buffers.empty()) {
    result.solved = result.optimal = true;
    result.method = "empty";
    return finish();
  }

  // Heuristics: keep the lowest peak. The first always runs to the end (a first answer);
  // the others stop at the deadline.
  for (Heuristic h : kAllHeuristics) {
    if (result.solved && absl::Now() >= deadline) break;
    const absl::Time t0 = absl::Now();
    std::vector<std::int64_t> offsets = PlaceGreedy(problem, h, result.solved ? deadline : absl::InfiniteFuture());
    if (offsets.empty()) {
      result.attempts.push_back({std::string(HeuristicName(h)), 0, 0, "timeout", 0, absl::Now() - t0});
      break;
    }
    const std::int64_t peak = Peak(problem, offsets);
    result.attempts.push_back({std::string(HeuristicName(h)), 0, peak, "solution", 0, absl::Now() - t0});
    if (!result.solved || peak < result.peak) {
      result.solved = true;
      result.peak = peak;
      result.offsets = std::move(offsets);
      result.method = std::string(HeuristicName(h));
      result.found_after = absl::Now() - start;
    }
    if (result.peak == result.lower_bound) break;
  }

  if (options.capacity) {
    const std::int64_t cap = *options.capacity;
    if (result.peak <= cap) return finish();
    result.solved = false;
    result.offsets.clear();
    result.method.clear();
    if (result.lower_bound > cap) {
      result.infeasible = true;
      return finish();
    }
    if (!options.exact) return finish();
    SearchResult r = Probe(problem, cap, deadline, &result);
    if (r.outcome == SearchOutcome::kFound) {
      result.solved = true;
      result.offsets = std::move(r.offsets);
      result.method = "exact-search";
      result.found_after = absl::Now() - start;
    } else if (r.outcome == SearchOutcome::kInfeasible) {
      result.infeasible = true;
    }
    return finish();
  }

  // Minimise: probe capacities in [lo, hi); hi is the best peak found so far.
  if (!options.exact || result.peak == result.lower_bound) return finish();
  std::int64_t lo = result.lower_bound;
  bool proven = true;  // every capacity below lo is proven infeasible
  bool first = true;
  while (lo < result.peak) {
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      proven = false;
      break;
    }
    // The lower bound first (often feasible), then bisection.
    const std::int64_t probe = first ? lo : lo + (result.peak - 1 - lo) / 2;
    const absl::Time probe_deadline = first ? now + (deadline - now) / 3 : now + (deadline - now) / 2;
    first = false;
    SearchResult r = Probe(problem, probe, probe_deadline, &result);
    if (r.outcome == SearchOutcome::kFound) {
      result.offsets = std::move(r.offsets);
      result.peak = Peak(problem, result.offsets);
      result.method = "exact-search";
      result.found_after = absl::Now() - start;
    } else {
      if (r.outcome != SearchOutcome::kInfeasible) proven = false;
      lo = probe + 1;
      if (r.outcome == SearchOutcome::kTooLarge) break;
    }
  }
  if (proven && lo >= result.peak) result.optimal = true;
  return finish();
}

}  // namespace stitchalloc::plan
