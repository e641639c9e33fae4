// Generators and replay: determinism, the fragmentation targets on the generated traces,
// out-of-memory accounting, and the replay of a file written by the trace writer.
#include "bench/replay/replay.h"

#include <unistd.h>

#include <cstdio>
#include <string>

#include "bench/trace/generators.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace stitchalloc::bench {
namespace {

TEST(Generators, AreDeterministicAndValid) {
  for (const std::string& name : GeneratedTraceNames()) {
    SA_ASSIGN_OR_FAIL(a, GenerateNamed(name, 7));
    SA_ASSIGN_OR_FAIL(b, GenerateNamed(name, 7));
    EXPECT_EQ(FormatTrace(a), FormatTrace(b)) << name;
    {
      const absl::Status st = Validate(a);
      ASSERT_TRUE(st.ok()) << st << " " << name;
    }
    const TraceSummary s = Summarize(a);
    EXPECT_GT(s.allocs, 40u) << name;
    EXPECT_EQ(s.live_at_end + s.frees, s.allocs) << name;
    if (name != "adversarial" && name != "growing-batch") {
      SA_ASSIGN_OR_FAIL(c, GenerateNamed(name, 8));
      EXPECT_NE(FormatTrace(a), FormatTrace(c)) << name << ": the seed must change the sequence lengths";
    }
  }
  EXPECT_TRUE(absl::IsInvalidArgument(GenerateNamed("nope").status()));
}

TEST(Generators, TrainingTracesCarryLayerAndStepMarks) {
  TrainingOptions o;
  o.shape.layers = 4;
  o.steps = 3;
  Trace t = GenerateTraining(o, "small");
  int begins = 0, steps = 0;
  for (const TraceEvent& e : t.events) {
    begins += e.op == TraceOp::kLayerBegin;
    steps += e.op == TraceOp::kStep;
  }
  EXPECT_EQ(steps, 3);
  EXPECT_EQ(begins, 3 * 4 * 2);  // forward and backward of every layer, every step
  // Checkpointing saves less: its peak is lower for the same shapes.
  TrainingOptions ck = o;
  ck.checkpointing = true;
  EXPECT_LT(Summarize(GenerateTraining(ck, "ck")).peak_requested_bytes, Summarize(t).peak_requested_bytes);
  // LoRA freezes the base weights: no optimizer state for them, a lower peak.
  TrainingOptions lora = o;
  lora.lora = true;
  EXPECT_LT(Summarize(GenerateTraining(lora, "lora")).peak_requested_bytes, Summarize(t).peak_requested_bytes);
}

// The targets on every generated trace: stitchalloc reserves at most 5% above the
// live bytes and never more than the models of PyTorch's allocator.
TEST(Replay, GeneratedTracesMeetTheFragmentationTargets) {
  ReplayOptions o;
  o.progress = false;
  o.check_invariants = true;
  for (const std::string& name : GeneratedTraceNames()) {
    SA_ASSIGN_OR_FAIL(t, GenerateNamed(name));
    std::int64_t ours = 0, peak_allocated = 0;
    for (const PolicySpec& p : AllPolicies()) {
      SA_ASSIGN_OR_FAIL(r, Replay(t, p, o));
      ASSERT_TRUE(r.check_status.ok()) << r.check_status << " " << name << " " << p.name;
      EXPECT_EQ(r.ooms, 0) << name << " " << p.name;
      EXPECT_GE(r.peak_reserved, r.peak_allocated) << name << " " << p.name;
      if (p.kind == PolicyKind::kStitchalloc) {
        ours = r.peak_reserved;
        peak_allocated = r.peak_allocated;
        EXPECT_LE(r.ratio(), 1.05) << name;
      } else if (p.kind != PolicyKind::kStitchallocNoStitch) {
        EXPECT_LE(ours, r.peak_reserved) << name << ": stitchalloc above " << p.name;
      }
      EXPECT_EQ(r.peak_allocated, peak_allocated) << "peak allocated is a property of the trace";
    }
  }
}

TEST(Replay, OutOfMemoryIsCountedAndTheRunCompletes) {
  Trace t;
  t.Alloc(1, 600ull << 20);
  t.Alloc(2, 600ull << 20);  // does not fit in 1 GiB
  t.Free(2, 600ull << 20);   // skipped: its alloc failed
  t.Free(1, 600ull << 20);
  t.Alloc(3, 900ull << 20);  // fits again
  t.Free(3, 900ull << 20);
  ReplayOptions o;
  o.device_memory = 1ull << 30;
  o.progress = false;
  for (const PolicySpec& p : AllPolicies()) {
    SA_ASSIGN_OR_FAIL(r, Replay(t, p, o));
    EXPECT_EQ(r.ooms, 1) << p.name;
    EXPECT_EQ(r.events, 6u) << p.name;
    EXPECT_LE(r.peak_reserved, std::int64_t(1) << 30) << p.name;
    EXPECT_EQ(r.peak_allocated, std::int64_t(900) << 20) << p.name;
  }
}

TEST(Replay, ReplaysAWrittenTraceFileWithSeveralStreams) {
  Trace t;
  for (std::uint64_t i = 0; i < 200; ++i) t.Alloc(i, (i % 7 + 1) * (3ull << 20) + i, i % 3 == 0 ? 0 : 77 + i % 2);
  for (std::uint64_t i = 0; i < 200; i += 2) t.Free(i, 0);
  const std::string path = ::testing::TempDir() + "/replay_test_" + std::to_string(getpid()) + ".trace.gz";
  SA_ASSERT_OK(WriteTrace(t, path));
  SA_ASSIGN_OR_FAIL(back, ReadTrace(path));
  std::remove(path.c_str());
  ReplayOptions o;
  o.progress = false;
  o.check_invariants = true;
  o.timeline_points = 50;
  for (const PolicySpec& p : AllPolicies()) {
    SA_ASSIGN_OR_FAIL(r, Replay(back, p, o));
    {
      const absl::Status st = r.check_status;
      ASSERT_TRUE(st.ok()) << st << " " << p.name;
    }
    EXPECT_EQ(r.events, 300u);
    EXPECT_EQ(r.peak_allocated, static_cast<std::int64_t>(Summarize(back).peak_rounded_bytes));
    ASSERT_FALSE(r.timeline.empty());
    EXPECT_EQ(r.timeline.back().event, back.events.size());
    std::int64_t max_reserved = 0;
    for (const TimelinePoint& pt : r.timeline) max_reserved = std::max(max_reserved, pt.reserved);
    EXPECT_EQ(max_reserved, r.peak_reserved) << p.name;
  }
}

TEST(Replay, UnknownPolicyIsRejected) {
  absl::StatusOr<PolicySpec> p = ParsePolicy("tcmalloc");
  ASSERT_FALSE(p.ok());
  EXPECT_NE(std::string(p.status().message()).find("known: stitchalloc"), std::string::npos);
}


TEST(Replay, RepeatsExactlyAndBackingDoesNotChangeTheFigures) {
  // Several streams, stitching, growing in place: every figure is the same in every run and
  // whether or not memory backs the host driver's chunks (the replay never touches bytes).
  SA_ASSIGN_OR_FAIL(t, GenerateNamed("llama-varlen", 3, 4));
  ReplayOptions o;
  o.progress = false;
  o.check_invariants = true;
  for (const PolicySpec& p : AllPolicies()) {
    std::vector<ReplayResult> runs;
    for (bool backed : {false, false, true}) {
      o.host_backing = backed;
      SA_ASSIGN_OR_FAIL(r, Replay(t, p, o));
      ASSERT_TRUE(r.check_status.ok()) << r.check_status << " " << p.name;
      runs.push_back(r);
    }
    for (const ReplayResult& r : runs) {
      EXPECT_EQ(r.peak_reserved, runs[0].peak_reserved) << p.name;
      EXPECT_EQ(r.peak_allocated, runs[0].peak_allocated) << p.name;
      EXPECT_EQ(r.map_calls, runs[0].map_calls) << p.name;
      EXPECT_EQ(r.unmap_calls, runs[0].unmap_calls) << p.name;
      EXPECT_EQ(r.stitches, runs[0].stitches) << p.name;
      EXPECT_EQ(r.retries, runs[0].retries) << p.name;
    }
    if (p.kind == PolicyKind::kStitchalloc) {
      EXPECT_GT(runs[0].map_calls, 0) << "the trace exercises the driver";
    }
  }
}

}  // namespace
}  // namespace stitchalloc::bench
