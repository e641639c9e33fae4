// stitchalloc-plan: solve an offset-assignment problem given as MiniMalloc CSV.
//
//   stitchalloc-plan IN.csv [--capacity N] [--time-limit SECONDS] [--heuristics-only] -o OUT.csv
//
// Prints the peak, the lower bound, the method and the time. Exit status: 0 solved (within the
// capacity if given), 1 no solution found (infeasible, or not found in time), 2 bad usage or
// malformed input (the message names the line).
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "allocator/plan/planner.h"
#include "allocator/plan/problem.h"

ABSL_FLAG(int64_t, capacity, 0, "fit within this many bytes (0: minimise the peak)");
ABSL_FLAG(double, time_limit, 10.0, "seconds for the whole solve (also --time-limit)");
ABSL_FLAG(std::string, output, "", "write the solution here (also -o)");
ABSL_FLAG(bool, heuristics_only, false, "skip the exact search");
ABSL_FLAG(bool, verbose, false, "print every heuristic run and search probe");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "stitchalloc-plan IN.csv [--capacity N] [--time-limit SECONDS] -o OUT.csv\n"
      "Assigns an offset to every buffer of a MiniMalloc CSV (id,lower,upper,size[,alignment]).");
  // The documented spellings (-o, --time-limit) map onto the Abseil flags.
  std::vector<std::string> args;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-o") a = "--output";
    else if (a.rfind("-o=", 0) == 0) a = "--output=" + a.substr(3);
    else if (a.rfind("--time-limit", 0) == 0) a = "--time_limit" + a.substr(12);
    else if (a.rfind("--heuristics-only", 0) == 0) a = "--heuristics_only" + a.substr(17);
    args.push_back(a);
  }
  std::vector<char*> argp;
  for (std::string& a : args) argp.push_back(a.data());
  std::vector<char*> positional = absl::ParseCommandLine(static_cast<int>(argp.size()), argp.data());
  if (positional.size() != 2) {
    std::fprintf(stderr, "usage: %s\n", absl::ProgramUsageMessage().data());
    return 2;
  }
  const int64_t capacity = absl::GetFlag(FLAGS_capacity);
  const double limit = absl::GetFlag(FLAGS_time_limit);
  if (capacity < 0 || !(limit > 0)) {
    std::fprintf(stderr, "error: --capacity must be >= 0 and --time-limit > 0\n");
    return 2;
  }
  auto problem = stitchalloc::plan::ReadCsv(positional[1]);
  if (!problem.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(problem.status().message()).c_str());
    return 2;
  }
  stitchalloc::plan::PlanOptions options;
  if (capacity > 0) options.capacity = capacity;
  options.time_limit = absl::Seconds(limit);
  options.exact = !absl::GetFlag(FLAGS_heuristics_only);
  auto result = stitchalloc::plan::Plan(*problem, options);
  if (!result.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(result.status().message()).c_str());
    return 2;
  }
  const auto& r = *result;
  if (absl::GetFlag(FLAGS_verbose)) {
    for (const auto& a : r.attempts) {
      std::printf("  %-20s capacity %-12lld peak %-12lld %-12s nodes %-10lld %.3f s\n", a.method.c_str(),
                  static_cast<long long>(a.capacity), static_cast<long long>(a.peak), a.outcome.c_str(),
                  static_cast<long long>(a.nodes), absl::ToDoubleSeconds(a.elapsed));
    }
  }
  const double seconds = absl::ToDoubleSeconds(r.elapsed);
  if (!r.solved) {
    std::printf("buffers %zu  lower_bound %lld  capacity %lld  %s  time %.3f s\n", problem->buffers.size(),
                static_cast<long long>(r.lower_bound), static_cast<long long>(capacity),
                r.infeasible ? "INFEASIBLE (proven)" : "NOT SOLVED within the time limit", seconds);
    return 1;
  }
  std::printf("buffers %zu  peak %lld  lower_bound %lld  peak/lb %.4f  %s  method %s  nodes %lld  found at %.3f s  time %.3f s\n",
              problem->buffers.size(), static_cast<long long>(r.peak), static_cast<long long>(r.lower_bound),
              r.lower_bound > 0 ? static_cast<double>(r.peak) / static_cast<double>(r.lower_bound) : 1.0,
              r.optimal ? "optimal" : "not proven optimal", r.method.c_str(), static_cast<long long>(r.nodes),
              absl::ToDoubleSeconds(r.found_after), seconds);
  const std::string out = absl::GetFlag(FLAGS_output);
  if (!out.empty()) {
    if (auto s = stitchalloc::plan::WriteCsv(out, *problem, r.offsets); !s.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
      return 2;
    }
  }
  return 0;
}
