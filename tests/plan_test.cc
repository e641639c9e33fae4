// Planner tests: the validator, CSV errors, MEMO's toy layer, random instances against brute
// force, and the MiniMalloc / idealloc instances from ../shared/data. Every planner answer is
// checked by CheckSolution, which shares no code with the planners.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "allocator/plan/heuristics.h"
#include "allocator/plan/planner.h"
#include "allocator/plan/problem.h"
#include "allocator/plan/search.h"
#include "gtest/gtest.h"
#include "test_util.h"

namespace stitchalloc::plan {
namespace {

// The instances of ../shared/data are beside a checkout in CI; a machine with the repository
// alone (the lent GPU machine) has none, and their tests skip there, never in CI.
#define SKIP_WITHOUT_SHARED_DATA()                                                               \
  do {                                                                                           \
    if (!std::filesystem::exists(STITCHALLOC_SHARED_DATA)) {                                     \
      if (std::getenv("CI") != nullptr) FAIL() << STITCHALLOC_SHARED_DATA << " is missing in CI"; \
      GTEST_SKIP() << STITCHALLOC_SHARED_DATA << " is not beside the checkout";                   \
    }                                                                                            \
  } while (false)

Problem Make(std::vector<std::vector<std::int64_t>> rows) {
  Problem p;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    p.buffers.push_back({std::to_string(i), rows[i][0], rows[i][1], rows[i][2], rows[i].size() > 3 ? rows[i][3] : 1});
  }
  return p;
}

TEST(PlanValidator, AcceptsDisjointAndRejectsOverlaps) {
  const Problem p = Make({{0, 10, 4}, {5, 15, 4}, {10, 20, 8}});
  SA_EXPECT_OK(CheckSolution(p, std::vector<std::int64_t>{0, 4, 8}));
  // 0 and 1 are live together in [5, 10) and share bytes [2, 4).
  const absl::Status s = CheckSolution(p, std::vector<std::int64_t>{0, 2, 8});
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("overlaps"), absl::string_view::npos) << s;
  // 1 and 2 are live together at 10.
  EXPECT_FALSE(CheckSolution(p, std::vector<std::int64_t>{0, 4, 0}).ok());
  // Half-open lifetimes: one ends at 10 where the other starts; the same bytes are fine.
  SA_EXPECT_OK(CheckSolution(Make({{0, 10, 4}, {10, 20, 4}}), std::vector<std::int64_t>{0, 0}, 4));
  SA_EXPECT_OK(CheckSolution(p, std::vector<std::int64_t>{0, 4, 8}, 16));
  EXPECT_FALSE(CheckSolution(p, std::vector<std::int64_t>{0, 4, 8}, 15).ok());  // beyond capacity
  EXPECT_FALSE(CheckSolution(p, std::vector<std::int64_t>{0, 4}).ok());          // wrong count
  EXPECT_FALSE(CheckSolution(p, std::vector<std::int64_t>{-1, 4, 8}).ok());      // negative
  const Problem aligned = Make({{0, 10, 4, 8}});
  EXPECT_FALSE(CheckSolution(aligned, std::vector<std::int64_t>{4}).ok());  // misaligned
  SA_EXPECT_OK(CheckSolution(aligned, std::vector<std::int64_t>{8}));
}

TEST(PlanCsv, ParsesAndRoundTrips) {
  SA_ASSIGN_OR_FAIL(p, ParseCsv("id,lower,upper,size\n0,0,3,4\n1,3,9,4\n2,0,9,4\n"));
  ASSERT_EQ(p.buffers.size(), 3u);
  EXPECT_EQ(LowerBound(p), 8);
  EXPECT_EQ(FormatCsv(p, std::vector<std::int64_t>{0, 0, 4}),
            "id,lower,upper,size,offset\n0,0,3,4,0\n1,3,9,4,0\n2,0,9,4,4\n");
  SA_ASSIGN_OR_FAIL(q, ParseCsv("size,upper,lower,id,alignment\n8,2,0,a,4\n"));
  EXPECT_EQ(q.buffers[0].id, "a");
  EXPECT_EQ(q.buffers[0].alignment, 4);
  EXPECT_EQ(q.buffers[0].upper, 2);
}

TEST(PlanCsv, MalformedInputNamesTheLine) {
  struct Case {
    const char* text;
    const char* want;
  } cases[] = {
      {"id,lower,size\n0,0,4\n", "lacks the column 'upper'"},
      {"id,lower,upper,size\n0,0,3,4\n1,-2,3,4\n", "in:3: negative lower"},
      {"id,lower,upper,size\n0,5,5,4\n", "in:2: empty lifetime"},
      {"id,lower,upper,size\n0,6,5,4\n", "in:2: empty lifetime"},
      {"id,lower,upper,size\n0,0,x,4\n", "in:2: upper 'x' is not an integer"},
      {"id,lower,upper,size\n0,0,3\n", "in:2: 3 fields"},
      {"id,lower,upper,size\n0,0,3,0\n", "in:2: size 0"},
      {"", "no header"},
  };
  for (const Case& c : cases) {
    auto p = ParseCsv(c.text, "in");
    ASSERT_FALSE(p.ok()) << c.text;
    EXPECT_NE(p.status().message().find(c.want), absl::string_view::npos) << p.status() << " wanted " << c.want;
  }
}

// MEMO, Fig. 3b (design.md): one layer's forward and backward, sizes in MB, time = event index.
Problem MemoToyLayer() {
  const char* events[] = {"m13 128", "m14 128", "f14", "m15 256", "f13", "m16 512", "m17 128", "m18 128",
                          "m19 256", "f17",     "f19", "f18",     "m20 512", "f20", "m21 1024", "m22 256",
                          "f15",     "m23 128", "m24 512", "f21", "f22", "f23", "f24", "f16"};
  Problem p;
  std::vector<int> index(32, -1);
  for (int t = 0; t < static_cast<int>(std::size(events)); ++t) {
    const std::string e = events[t];
    const int id = std::stoi(e.substr(1, 2));
    if (e[0] == 'm') {
      index[id] = static_cast<int>(p.buffers.size());
      p.buffers.push_back({absl::StrCat("m", id), t, 0, std::stoll(e.substr(4)), 1});
    } else {
      p.buffers[index[id]].upper = t;
    }
  }
  return p;
}

TEST(Planner, MemoToyLayerReachesItsLowerBound) {
  const Problem p = MemoToyLayer();
  SA_ASSERT_OK(CheckProblem(p));
  EXPECT_EQ(LowerBound(p), 2432);
  const std::vector<std::int64_t> greedy = PlaceGreedy(p, Heuristic::kGreedyBySize);
  SA_EXPECT_OK(CheckSolution(p, greedy));
  EXPECT_EQ(Peak(p, greedy), 2432);
  SA_ASSIGN_OR_FAIL(r, Plan(p, {}));
  EXPECT_TRUE(r.solved && r.optimal);
  EXPECT_EQ(r.peak, 2432);
  SA_EXPECT_OK(CheckSolution(p, r.offsets, 2432));
}

TEST(Planner, EveryHeuristicIsValid) {
  std::mt19937_64 rng(7);
  for (int round = 0; round < 50; ++round) {
    Problem p;
    const int n = 1 + static_cast<int>(rng() % 60);
    for (int i = 0; i < n; ++i) {
      const std::int64_t lo = static_cast<std::int64_t>(rng() % 40);
      p.buffers.push_back({std::to_string(i), lo, lo + 1 + static_cast<std::int64_t>(rng() % 15),
                           1 + static_cast<std::int64_t>(rng() % 100), std::int64_t{1} << (rng() % 4)});
    }
    for (Heuristic h : kAllHeuristics) {
      const std::vector<std::int64_t> o = PlaceGreedy(p, h);
      SA_ASSERT_OK(CheckSolution(p, o));
      EXPECT_GE(Peak(p, o), LowerBound(p));
    }
  }
}

// Brute force: the least peak over every assignment of offsets in [0, bound), by plain
// enumeration with conflict checks against the buffers assigned so far.
std::int64_t BruteForceMinPeak(const Problem& p, std::int64_t bound) {
  const std::size_t n = p.buffers.size();
  std::vector<std::int64_t> off(n, 0);
  std::int64_t best = bound + 1;
  auto overlap_time = [&](std::size_t a, std::size_t b) {
    return p.buffers[a].lower < p.buffers[b].upper && p.buffers[b].lower < p.buffers[a].upper;
  };
  std::function<void(std::size_t, std::int64_t)> go = [&](std::size_t i, std::int64_t peak) {
    if (peak >= best) return;
    if (i == n) {
      best = peak;
      return;
    }
    const Buffer& b = p.buffers[i];
    for (std::int64_t o = 0; o + b.size <= bound; o += b.alignment) {
      bool ok = true;
      for (std::size_t j = 0; j < i && ok; ++j) {
        if (overlap_time(i, j) && o < off[j] + p.buffers[j].size && off[j] < o + b.size) ok = false;
      }
      if (!ok) continue;
      off[i] = o;
      go(i + 1, std::max(peak, o + b.size));
    }
  };
  go(0, 0);
  return best;
}

TEST(Planner, MatchesBruteForceOnSmallInstances) {
  std::mt19937_64 rng(11);
  int nontrivial = 0;
  for (int round = 0; round < 150; ++round) {
    Problem p;
    const int n = 2 + static_cast<int>(rng() % 5);
    for (int i = 0; i < n; ++i) {
      const std::int64_t lo = static_cast<std::int64_t>(rng() % 6);
      p.buffers.push_back({std::to_string(i), lo, lo + 1 + static_cast<std::int64_t>(rng() % 5),
                           1 + static_cast<std::int64_t>(rng() % 5), round % 3 == 0 ? 2 : 1});
    }
    std::int64_t sum = 0;
    for (const Buffer& b : p.buffers) sum += b.size + b.alignment;
    const std::int64_t optimum = BruteForceMinPeak(p, sum);
    if (optimum > LowerBound(p)) ++nontrivial;
    SA_ASSIGN_OR_FAIL(r, Plan(p, {.capacity = std::nullopt, .time_limit = absl::Seconds(30)}));
    ASSERT_TRUE(r.solved && r.optimal) << round;
    EXPECT_EQ(r.peak, optimum) << round;
    SA_EXPECT_OK(CheckSolution(p, r.offsets));
    // Fit mode: the optimum fits, one byte less is proven infeasible.
    SA_ASSIGN_OR_FAIL(fit, Plan(p, {.capacity = optimum}));
    EXPECT_TRUE(fit.solved) << round;
    SA_EXPECT_OK(CheckSolution(p, fit.offsets, optimum));
    if (optimum > 1) {
      SA_ASSIGN_OR_FAIL(tight, Plan(p, {.capacity = optimum - 1}));
      EXPECT_FALSE(tight.solved) << round;
      EXPECT_TRUE(tight.infeasible) << round;
      // The exact search alone agrees (not only the lower bound).
      const SearchResult s = ExactSearch(p, {.capacity = optimum - 1});
      EXPECT_EQ(s.outcome, SearchOutcome::kInfeasible) << round;
    }
  }
  EXPECT_GT(nontrivial, 5);  // the instances exercise more than the lower bound
}

TEST(Planner, TimeLimitReportsNotSolvedWithoutClaimingInfeasible) {
  SKIP_WITHOUT_SHARED_DATA();
  SA_ASSIGN_OR_FAIL(p, ReadCsv(std::string(STITCHALLOC_SHARED_DATA) + "/planner/minimalloc/E.1048576.csv"));
  SA_ASSIGN_OR_FAIL(r, Plan(p, {.capacity = 1048576, .time_limit = absl::Microseconds(1)}));
  EXPECT_FALSE(r.solved);
  EXPECT_FALSE(r.infeasible);
}

TEST(Planner, RejectsBadInput) {
  Problem p = Make({{0, 10, 4}});
  EXPECT_FALSE(Plan(p, {.capacity = 0}).ok());
  p.buffers[0].upper = 0;
  EXPECT_FALSE(Plan(p, {}).ok());
  SA_ASSIGN_OR_FAIL(empty, Plan(Problem{}, {}));
  EXPECT_TRUE(empty.solved);
  EXPECT_EQ(empty.peak, 0);
}

class MiniMallocInstance : public ::testing::TestWithParam<const char*> {};

TEST_P(MiniMallocInstance, SolvedAtCapacity) {
  SKIP_WITHOUT_SHARED_DATA();
  SA_ASSIGN_OR_FAIL(p, ReadCsv(std::string(STITCHALLOC_SHARED_DATA) + "/planner/minimalloc/" + GetParam() +
                               ".1048576.csv"));
  SA_ASSIGN_OR_FAIL(r, Plan(p, {.capacity = 1048576, .time_limit = absl::Seconds(120)}));
  ASSERT_TRUE(r.solved) << GetParam();
  EXPECT_LE(r.peak, 1048576);
  SA_EXPECT_OK(CheckSolution(p, r.offsets, 1048576));
}
INSTANTIATE_TEST_SUITE_P(Challenging, MiniMallocInstance, ::testing::Values("A", "B", "C", "D", "E"));

TEST(Planner, MiniMallocExample) {
  SKIP_WITHOUT_SHARED_DATA();
  SA_ASSIGN_OR_FAIL(p, ReadCsv(std::string(STITCHALLOC_SHARED_DATA) + "/planner/minimalloc/input.12.csv"));
  SA_ASSIGN_OR_FAIL(r, Plan(p, {.capacity = 12}));
  ASSERT_TRUE(r.solved);
  SA_EXPECT_OK(CheckSolution(p, r.offsets, 12));
}

TEST(Planner, IdeallocSmallInstancesOptimal) {
  SKIP_WITHOUT_SHARED_DATA();
  for (const char* name : {"G_1", "resnet50"}) {
    SA_ASSIGN_OR_FAIL(p, ReadCsv(std::string(STITCHALLOC_SHARED_DATA) + "/planner/idealloc/" + name + ".csv"));
    SA_ASSIGN_OR_FAIL(r, Plan(p, {.capacity = std::nullopt, .time_limit = absl::Seconds(60)}));
    ASSERT_TRUE(r.solved) << name;
    SA_EXPECT_OK(CheckSolution(p, r.offsets));
    EXPECT_LE(static_cast<double>(r.peak), 1.01 * static_cast<double>(r.lower_bound)) << name;
  }
}

// S_1 (28,526 buffers) is the instance the 1% target is hard on: greedy by size ends 2.5% above
// the bound; the lowest-first dive with order TAW reaches it within 0.3%. Deterministic (no time
// limit), so this checks the answer, never the speed.
TEST(Planner, IdeallocS1LowestFirstWithinOnePercent) {
  SKIP_WITHOUT_SHARED_DATA();
  SA_ASSIGN_OR_FAIL(p, ReadCsv(std::string(STITCHALLOC_SHARED_DATA) + "/planner/idealloc/S_1.csv"));
  const std::vector<std::int64_t> o = PlaceGreedy(p, Heuristic::kLowestFirstTAW);
  ASSERT_EQ(o.size(), p.buffers.size());
  SA_EXPECT_OK(CheckSolution(p, o));
  EXPECT_LE(static_cast<double>(Peak(p, o)), 1.01 * static_cast<double>(LowerBound(p)));
}

// A heuristic past its deadline stops and says so (an empty answer); the planner still returns
// the first heuristic's complete answer.
TEST(Planner, HeuristicsStopAtTheirDeadline) {
  std::mt19937 rng(7);
  std::vector<std::vector<std::int64_t>> rows;
  for (int i = 0; i < 6000; ++i) {
    const std::int64_t lo = static_cast<std::int64_t>(rng() % 5000);
    rows.push_back({lo, lo + 1 + static_cast<std::int64_t>(rng() % 400), 1 + static_cast<std::int64_t>(rng() % 1000)});
  }
  const Problem p = Make(rows);
  for (Heuristic h : kAllHeuristics) {
    EXPECT_TRUE(PlaceGreedy(p, h, absl::InfinitePast()).empty()) << HeuristicName(h);
    const std::vector<std::int64_t> o = PlaceGreedy(p, h, absl::InfiniteFuture());
    ASSERT_EQ(o.size(), p.buffers.size()) << HeuristicName(h);
    SA_EXPECT_OK(CheckSolution(p, o));
  }
  SA_ASSIGN_OR_FAIL(r, Plan(p, {.capacity = std::nullopt, .time_limit = absl::ZeroDuration()}));
  ASSERT_TRUE(r.solved);
  SA_EXPECT_OK(CheckSolution(p, r.offsets));
  EXPECT_EQ(r.attempts.front().method, HeuristicName(kAllHeuristics[0]));
  EXPECT_EQ(r.attempts.front().outcome, "solution");
}

}  // namespace
}  // namespace stitchalloc::plan
