// stitchalloc-arena-replay: the plan-guided arena on allocation traces.
//
// For each trace (a file or gen:<name>, see stitchalloc-replay) and each step (kStep marks):
//   plan   the step's requests are recorded (layer marks "<kind>:<phase>" with the layer index)
//          and planned bi-level; printed: arena bytes, the flat lower bound (max live load of the
//          planned requests), their ratio, the flat plan's peak, planning time;
//   serve  the whole trace is replayed through PlannedAllocator over a host-driver caching
//          allocator, one iteration per step with the step's shape signature (a hash of its
//          request sizes, standing in for the sequence length); printed: hits, misses,
//          unplanned, plans built, re-plans, and the caching allocator's peak reserved bytes
//          with and without the arena in front.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/hash/hash.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "allocator/arena/arena.h"
#include "allocator/arena/bilevel.h"
#include "allocator/config.h"
#include "allocator/plan/planner.h"
#include "bench/trace/generators.h"
#include "bench/trace/trace.h"
#include "vmm/host_driver.h"

ABSL_FLAG(int, gen_steps, 6, "steps of generated traces");
ABSL_FLAG(double, flat_time_limit, 2.0, "seconds for the flat plan of each step");
ABSL_FLAG(int, max_steps, 0, "plan at most this many steps per trace (0: all)");
ABSL_FLAG(double, host_capacity_gb, 96, "host driver capacity for the serve replay");

namespace {

using stitchalloc::bench::Trace;
using stitchalloc::bench::TraceEvent;
using stitchalloc::bench::TraceOp;
namespace arena = stitchalloc::arena;

struct Step {
  std::size_t begin, end;  // event range
  std::uint64_t signature;
};

std::vector<Step> Steps(const Trace& t) {
  std::vector<Step> steps;
  for (std::size_t i = 0; i < t.events.size(); ++i) {
    if (t.events[i].op != TraceOp::kStep) continue;
    if (!steps.empty()) steps.back().end = i;
    steps.push_back({i + 1, t.events.size(), 0});
  }
  for (Step& s : steps) {
    std::vector<std::uint64_t> sizes;
    for (std::size_t i = s.begin; i < s.end; ++i) {
      if (t.events[i].op == TraceOp::kAlloc) sizes.push_back(t.events[i].size);
    }
    s.signature = absl::HashOf(sizes);
  }
  return steps;
}

// Forwards the outermost layer marks of a trace to `target` (a Recorder or a PlannedAllocator);
// nested marks, such as a recompute inside backward, belong to the enclosing layer. Labels are
// "<kind>:<phase>".
template <typename Target>
void ForwardMark(const Trace& t, const TraceEvent& e, int* depth, Target* target) {
  if (e.op == TraceOp::kLayerBegin) {
    if ((*depth)++ > 0) return;
    std::vector<absl::string_view> parts = absl::StrSplit(t.labels[e.label], ':');
    const arena::Phase phase =
        parts.size() > 1 && parts[1] == "backward" ? arena::Phase::kBackward : arena::Phase::kForward;
    (void)target->LayerBegin(parts[0], static_cast<int>(e.id), phase);
  } else if (e.op == TraceOp::kLayerEnd) {
    if (--*depth == 0) (void)target->LayerEnd();
  }
}

int PlanSteps(const Trace& t, const std::vector<Step>& steps) {
  const int max_steps = absl::GetFlag(FLAGS_max_steps);
  for (std::size_t k = 0; k < steps.size() && (max_steps == 0 || static_cast<int>(k) < max_steps); ++k) {
    const Step& s = steps[k];
    arena::Recorder rec;
    rec.Begin();
    int depth = 0;
    for (std::size_t i = s.begin; i < s.end; ++i) {
      const TraceEvent& e = t.events[i];
      if (e.op == TraceOp::kAlloc) rec.OnAlloc(e.id + 1, e.size, e.stream);
      else if (e.op == TraceOp::kFree) rec.OnFree(e.id + 1);
      else ForwardMark(t, e, &depth, &rec);
    }
    arena::IterationRecording r;
    if (auto st = rec.Finish(&r); !st.ok()) {
      std::fprintf(stderr, "%s step %zu: %s\n", t.name.c_str(), k, std::string(st.message()).c_str());
      return 1;
    }
    auto plan = arena::PlanIteration(r);
    if (!plan.ok()) {
      std::fprintf(stderr, "%s step %zu: %s\n", t.name.c_str(), k, std::string(plan.status().message()).c_str());
      return 1;
    }
    const stitchalloc::plan::Problem flat = arena::FlatProblem(r);
    auto flat_plan = stitchalloc::plan::Plan(
        flat, {.capacity = std::nullopt, .time_limit = absl::Seconds(absl::GetFlag(FLAGS_flat_time_limit))});
    if (!flat_plan.ok()) return 1;
    std::printf("plan  %-28s step %2zu  requests %6lld planned %6lld  layer_plans %3d shared %4d  arena %9.1f MiB"
                "  lower_bound %9.1f MiB  arena/lb %.4f  flat %.4f  time %.3f s (flat %.3f s)\n",
                t.name.c_str(), k, static_cast<long long>(plan->planned_requests + plan->unplanned_requests),
                static_cast<long long>(plan->planned_requests), plan->layer_plans, plan->layers_sharing,
                plan->arena_bytes / 1048576.0, plan->lower_bound / 1048576.0,
                plan->lower_bound > 0 ? static_cast<double>(plan->arena_bytes) / plan->lower_bound : 1.0,
                flat_plan->lower_bound > 0 ? static_cast<double>(flat_plan->peak) / flat_plan->lower_bound : 1.0,
                absl::ToDoubleSeconds(plan->plan_time), absl::ToDoubleSeconds(flat_plan->elapsed));
  }
  return 0;
}

// Replays the trace through a caching allocator, with or without the arena in front.
int Serve(const Trace& t, const std::vector<Step>& steps, bool with_arena) {
  stitchalloc::HostDriverOptions ho;
  ho.capacity = static_cast<std::size_t>(absl::GetFlag(FLAGS_host_capacity_gb) * (1ull << 30));
  // No bytes are written (bookkeeping only), and stream work runs at submission, as on an idle
  // GPU: fences then complete when recorded, so peaks do not depend on when the host driver's
  // stream threads get to run (they varied by tens of MiB from run to run before).
  ho.backed = false;
  ho.inline_streams = true;
  auto driver = stitchalloc::HostDriver::Create(ho);
  if (!driver.ok()) return 1;
  auto cfg = stitchalloc::ParseConfig("");
  auto backing = stitchalloc::CachingAllocator::Create(*cfg, *std::move(driver));
  if (!backing.ok()) {
    std::fprintf(stderr, "%s\n", std::string(backing.status().message()).c_str());
    return 1;
  }
  arena::PlannedAllocator a(backing->get());
  std::vector<void*> ptr;
  std::size_t step = 0;
  bool open = false;
  int depth = 0;
  for (std::size_t i = 0; i < t.events.size(); ++i) {
    const TraceEvent& e = t.events[i];
    if (with_arena && step < steps.size() && i + 1 == steps[step].begin) {
      if (open) (void)a.EndIteration();
      (void)a.BeginIteration(steps[step].signature);
      open = true;
      ++step;
    }
    switch (e.op) {
      case TraceOp::kAlloc: {
        if (ptr.size() <= e.id) ptr.resize(e.id + 1, nullptr);
        auto p = a.Malloc(e.size, 0);
        if (!p.ok()) {
          std::fprintf(stderr, "%s: %s\n", t.name.c_str(), std::string(p.status().message()).c_str());
          return 1;
        }
        ptr[e.id] = *p;
        break;
      }
      case TraceOp::kFree:
        if (e.id < ptr.size() && ptr[e.id] != nullptr) {
          (void)a.Free(ptr[e.id]);
          ptr[e.id] = nullptr;
        }
        break;
      default: ForwardMark(t, e, &depth, &a); break;
    }
  }
  if (open) (void)a.EndIteration();
  const arena::ArenaStats s = a.GetStats();
  const auto bs = (*backing)->GetStats();
  std::printf("serve %-28s %-8s steps %2zu  hits %8lld misses %6lld unplanned %7lld  plans %2lld replans %2lld"
              "  peak_reserved %9.1f MiB  peak_allocated %9.1f MiB\n",
              t.name.c_str(), with_arena ? "arena" : "caching", steps.size(), static_cast<long long>(s.hits),
              static_cast<long long>(s.misses), static_cast<long long>(s.unplanned),
              static_cast<long long>(s.plans_built), static_cast<long long>(s.replans),
              bs.reserved_bytes.all().peak / 1048576.0, bs.allocated_bytes.all().peak / 1048576.0);
  for (void* p : ptr) {
    if (p != nullptr) (void)a.Free(p);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("stitchalloc-arena-replay TRACE|gen:NAME|gen:all ...");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  std::vector<std::string> inputs(args.begin() + 1, args.end());
  if (inputs.empty()) inputs = {"gen:all"};
  std::vector<Trace> traces;
  for (const std::string& in : inputs) {
    if (in == "gen:all") {
      for (const char* n : {"llama-varlen", "llama-varlen-ckpt", "lora-varlen", "growing-batch"}) {
        auto t = stitchalloc::bench::GenerateNamed(n, 1, absl::GetFlag(FLAGS_gen_steps));
        if (!t.ok()) return 2;
        traces.push_back(*std::move(t));
      }
    } else if (absl::StartsWith(in, "gen:")) {
      auto t = stitchalloc::bench::GenerateNamed(in.substr(4), 1, absl::GetFlag(FLAGS_gen_steps));
      if (!t.ok()) {
        std::fprintf(stderr, "%s\n", std::string(t.status().message()).c_str());
        return 2;
      }
      traces.push_back(*std::move(t));
    } else {
      auto t = stitchalloc::bench::ReadTrace(in);
      if (!t.ok()) {
        std::fprintf(stderr, "%s\n", std::string(t.status().message()).c_str());
        return 2;
      }
      traces.push_back(*std::move(t));
    }
  }
  int rc = 0;
  for (const Trace& t : traces) {
    const std::vector<Step> steps = Steps(t);
    if (steps.empty()) {
      std::printf("skip  %s: no step marks\n", t.name.c_str());
      continue;
    }
    rc |= PlanSteps(t, steps);
    rc |= Serve(t, steps, false);
    rc |= Serve(t, steps, true);
  }
  return rc;
}
