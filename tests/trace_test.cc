// Trace format: parsing, writing (plain and gzip), validation and the summary.
#include "bench/trace/trace.h"

#include <unistd.h>

#include <cstdio>
#include <string>

#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace stitchalloc::bench {
namespace {

constexpr char kText[] =
    "# stitchalloc-trace v1\n"
    "# name: tiny\n"
    "# source: hand written\n"
    "action,id,size,stream,time_us,label\n"
    "step,0,0,0,0,\n"
    "layer_begin,3,0,0,1,attention:forward\n"
    "alloc,7,1000,0,2,\n"
    "alloc,8,3000,5,3,\n"
    "free,7,1000,0,4,\n"
    "layer_end,3,0,0,5,attention:forward\n"
    "segment_alloc,0,2097152,0,6,\n"
    "free,8,0,5,7,\n";

std::string TempPath(const char* suffix) {
  return ::testing::TempDir() + "/trace_test_" + std::to_string(getpid()) + suffix;
}

TEST(Trace, ParsesEveryField) {
  SA_ASSIGN_OR_FAIL(t, ParseTrace(kText, "fallback"));
  EXPECT_EQ(t.name, "tiny");
  EXPECT_EQ(t.Meta("source"), "hand written");
  ASSERT_EQ(t.events.size(), 8u);
  EXPECT_EQ(t.events[1].op, TraceOp::kLayerBegin);
  EXPECT_EQ(t.labels[t.events[1].label], "attention:forward");
  EXPECT_EQ(t.events[3].stream, 5u);
  EXPECT_EQ(t.events[3].size, 3000u);
  EXPECT_EQ(t.events[3].time_us, 3);
  SA_ASSERT_OK(Validate(t));
  const TraceSummary s = Summarize(t);
  EXPECT_EQ(s.allocs, 2u);
  EXPECT_EQ(s.frees, 2u);
  EXPECT_EQ(s.live_at_end, 0u);
  EXPECT_EQ(s.streams, 2u);
  EXPECT_EQ(s.peak_requested_bytes, 4000u);
  EXPECT_EQ(s.peak_rounded_bytes, 1024u + 3072u);
  EXPECT_EQ(s.segment_allocs, 1u);
}

TEST(Trace, RoundTripsThroughPlainAndGzipFiles) {
  SA_ASSIGN_OR_FAIL(t, ParseTrace(kText, "x"));
  for (const char* suffix : {".trace", ".trace.gz"}) {
    const std::string path = TempPath(suffix);
    SA_ASSERT_OK(WriteTrace(t, path));
    SA_ASSIGN_OR_FAIL(back, ReadTrace(path));
    EXPECT_EQ(FormatTrace(back), FormatTrace(t)) << suffix;
    std::remove(path.c_str());
  }
  // The gzip file really is compressed.
  const std::string gz = TempPath(".gz");
  SA_ASSERT_OK(WriteTrace(t, gz));
  FILE* f = std::fopen(gz.c_str(), "rb");
  ASSERT_NE(f, nullptr);
  unsigned char magic[2] = {0, 0};
  ASSERT_EQ(std::fread(magic, 1, 2, f), 2u);
  std::fclose(f);
  EXPECT_EQ(magic[0], 0x1f);
  EXPECT_EQ(magic[1], 0x8b);
  std::remove(gz.c_str());
}

TEST(Trace, MalformedInputNamesTheLine) {
  const std::string head = "# stitchalloc-trace v1\naction,id,size,stream,time_us,label\n";
  struct Case {
    std::string text;
    std::string expect;
  } cases[] = {
      {"", "empty"},
      {"action,id\n", "first line"},
      {"# stitchalloc-trace v1\nalloc,1,2,3,4,\n", "line 2: expected the header"},
      {head + "alloc,1,2\n", "line 3: 3 fields"},
      {head + "malloc,1,2,0,0,\n", "line 3: unknown action \"malloc\""},
      {head + "alloc,x,2,0,0,\n", "line 3: id \"x\""},
      {head + "alloc,1,-2,0,0,\n", "line 3: size \"-2\""},
      {head + "alloc,1,2,0,0,,extra\n", "line 3: more than 6 fields"},
      {head + "alloc,1,2,0,0,\nlayer_begin,1,0,0,0,\n", "line 4: layer marks need a label"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<Trace> t = ParseTrace(c.text, "bad");
    ASSERT_FALSE(t.ok()) << c.text;
    EXPECT_TRUE(absl::IsInvalidArgument(t.status()));
    EXPECT_NE(std::string(t.status().message()).find(c.expect), std::string::npos)
        << t.status().message() << " should contain " << c.expect;
  }
  EXPECT_TRUE(absl::IsNotFound(ReadTrace("/nonexistent/trace.gz").status()));
}

TEST(Trace, ValidateRejectsInconsistentStreams) {
  auto check = [](const Trace& t, const char* expect) {
    absl::Status s = Validate(t);
    ASSERT_FALSE(s.ok()) << expect;
    EXPECT_NE(std::string(s.message()).find(expect), std::string::npos) << s.message();
  };
  Trace t;
  t.Alloc(1, 100);
  t.Alloc(1, 100);
  check(t, "allocated twice");
  Trace u;
  u.Free(4, 100);
  check(u, "not live");
  Trace v;
  v.Alloc(1, 100);
  v.Free(1, 200);
  check(v, "allocated with size 100");
  Trace w;
  w.Alloc(1, 0);
  check(w, "size 0");
  Trace x;
  x.Mark(TraceOp::kLayerBegin, 1, "mlp:forward");
  x.Mark(TraceOp::kLayerEnd, 2, "mlp:forward");
  check(x, "does not close");
  Trace y;  // reuse after free is still a second allocation of the id
  y.Alloc(1, 100);
  y.Free(1, 100);
  y.Alloc(1, 100);
  check(y, "allocated twice");
}

}  // namespace
}  // namespace stitchalloc::bench
