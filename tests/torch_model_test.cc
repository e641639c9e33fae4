// TorchAllocatorModel: the PyTorch caching allocator rules it models, each checked on a small
// case whose answer follows from PyTorch's source, plus invariants under random operations.
#include "bench/models/torch_model.h"

#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace stitchalloc::bench {
namespace {

constexpr std::size_t MiB = std::size_t{1} << 20;
using Model = TorchAllocatorModel;

TEST(TorchModel, RoundingAndSegmentSizes) {
  EXPECT_EQ(Model::RoundSize(1), 512u);
  EXPECT_EQ(Model::RoundSize(513), 1024u);
  EXPECT_EQ(Model::AllocationSize(512), 2 * MiB);
  EXPECT_EQ(Model::AllocationSize(1 * MiB), 2 * MiB);
  EXPECT_EQ(Model::AllocationSize(1 * MiB + 512), 20 * MiB);
  EXPECT_EQ(Model::AllocationSize(10 * MiB - 512), 20 * MiB);
  EXPECT_EQ(Model::AllocationSize(10 * MiB), 10 * MiB);
  EXPECT_EQ(Model::AllocationSize(11 * MiB), 12 * MiB);
}

TEST(TorchModel, SmallAndMediumRequestsShareSegments) {
  Model m(TorchModelOptions{});
  SA_ASSIGN_OR_FAIL(a, m.Malloc(1000, 0));
  SA_ASSIGN_OR_FAIL(b, m.Malloc(1000, 0));
  EXPECT_EQ(b, a + 1024);  // carved from the same 2 MiB segment
  SA_ASSIGN_OR_FAIL(c, m.Malloc(3 * MiB, 0));
  SA_ASSIGN_OR_FAIL(d, m.Malloc(3 * MiB, 0));
  EXPECT_EQ(d, c + 3 * MiB);  // one 20 MiB segment for both
  EXPECT_EQ(m.counters().reserved, std::int64_t(22 * MiB));
  EXPECT_EQ(m.segment_log(), (std::vector<std::size_t>{2 * MiB, 20 * MiB}));
  SA_ASSERT_OK(m.CheckInvariants());
}

TEST(TorchModel, LargeRemainderUpToOneMiBIsNotSplit) {
  Model m(TorchModelOptions{});
  SA_ASSIGN_OR_FAIL(a, m.Malloc(11 * MiB + 512, 0));  // 12 MiB segment, 1 MiB - 512 left
  (void)a;
  EXPECT_EQ(m.counters().allocated, std::int64_t(12 * MiB));  // the whole block is allocated
  SA_ASSIGN_OR_FAIL(b, m.Malloc(13 * MiB, 0));            // 14 MiB segment, 1 MiB left
  (void)b;
  EXPECT_EQ(m.counters().allocated, std::int64_t(26 * MiB));
  SA_ASSIGN_OR_FAIL(c, m.Malloc(15 * MiB - 512, 0));     // 16 MiB segment, > 1 MiB left: split
  (void)c;
  EXPECT_EQ(m.counters().allocated, std::int64_t(26 * MiB + 15 * MiB - 512));
  SA_ASSERT_OK(m.CheckInvariants());
}

TEST(TorchModel, BestFitPerStreamAndMergeOnFree) {
  Model m(TorchModelOptions{});
  SA_ASSIGN_OR_FAIL(a, m.Malloc(40 * MiB, 0));
  SA_ASSIGN_OR_FAIL(b, m.Malloc(30 * MiB, 0));
  SA_ASSERT_OK(m.Free(a));
  SA_ASSERT_OK(m.Free(b));
  // Another stream cannot use stream 0's cached blocks.
  SA_ASSIGN_OR_FAIL(c, m.Malloc(30 * MiB, 7));
  EXPECT_NE(c, b);
  EXPECT_EQ(m.counters().reserved, std::int64_t(100 * MiB));
  // Best fit on stream 0: the 30 MiB segment, not the 40 MiB one.
  SA_ASSIGN_OR_FAIL(d, m.Malloc(30 * MiB, 0));
  EXPECT_EQ(d, b);
  // Freeing both halves of a split segment merges them back into one block.
  SA_ASSIGN_OR_FAIL(e, m.Malloc(20 * MiB, 0));
  EXPECT_EQ(e, a);
  SA_ASSIGN_OR_FAIL(f, m.Malloc(20 * MiB, 0));
  EXPECT_EQ(f, a + 20 * MiB);
  SA_ASSERT_OK(m.Free(e));
  SA_ASSERT_OK(m.Free(f));
  SA_ASSIGN_OR_FAIL(g, m.Malloc(40 * MiB, 0));
  EXPECT_EQ(g, a);
  SA_ASSERT_OK(m.CheckInvariants());
  EXPECT_TRUE(absl::IsInvalidArgument(m.Free(a + 512)));
  EXPECT_TRUE(absl::IsInvalidArgument(m.Free(b + 4096)));
  SA_ASSERT_OK(m.CheckInvariants());
}

TEST(TorchModel, EmptyCacheFreesOnlyWholeFreeSegments) {
  Model m(TorchModelOptions{});
  SA_ASSIGN_OR_FAIL(a, m.Malloc(30 * MiB, 0));
  SA_ASSIGN_OR_FAIL(b, m.Malloc(3 * MiB, 0));
  SA_ASSIGN_OR_FAIL(c, m.Malloc(3 * MiB, 0));
  SA_ASSERT_OK(m.Free(a));
  SA_ASSERT_OK(m.Free(b));  // c keeps the 20 MiB segment
  m.EmptyCache();
  EXPECT_EQ(m.counters().reserved, std::int64_t(20 * MiB));
  EXPECT_EQ(m.counters().segment_frees, 1);
  SA_ASSERT_OK(m.Free(c));
  m.EmptyCache();
  EXPECT_EQ(m.counters().reserved, 0);
  SA_ASSERT_OK(m.CheckInvariants());
}

TEST(TorchModel, ReleasesCachedBlocksAndRetriesBeforeOutOfMemory) {
  TorchModelOptions o;
  o.device_memory = 100 * MiB;
  Model m(o);
  SA_ASSIGN_OR_FAIL(a, m.Malloc(60 * MiB, 0));
  SA_ASSERT_OK(m.Free(a));
  // 70 MiB does not fit next to the cached 60 MiB segment: release it and retry.
  SA_ASSIGN_OR_FAIL(b, m.Malloc(70 * MiB, 0));
  (void)b;
  EXPECT_EQ(m.counters().retries, 1);
  EXPECT_EQ(m.counters().reserved, std::int64_t(70 * MiB));
  // Nothing cached to release: out of memory, counted, state unchanged.
  absl::StatusOr<std::uint64_t> c = m.Malloc(40 * MiB, 0);
  EXPECT_TRUE(absl::IsResourceExhausted(c.status()));
  EXPECT_EQ(m.counters().ooms, 1);
  EXPECT_EQ(m.counters().reserved, std::int64_t(70 * MiB));
  SA_ASSERT_OK(m.CheckInvariants());
}

TEST(TorchModel, MemoryFractionCapsReserved) {
  TorchModelOptions o;
  o.device_memory = 100 * MiB;
  o.memory_fraction = 0.5;
  Model m(o);
  SA_ASSIGN_OR_FAIL(a, m.Malloc(40 * MiB, 0));
  (void)a;
  EXPECT_TRUE(absl::IsResourceExhausted(m.Malloc(12 * MiB, 0).status()));
  SA_ASSIGN_OR_FAIL(b, m.Malloc(10 * MiB, 0));
  (void)b;
}

TEST(TorchModel, MaxSplitSizeKeepsOversizeBlocksWhole) {
  TorchModelOptions o;
  o.max_split_size = 64 * MiB;
  Model m(o);
  SA_ASSIGN_OR_FAIL(a, m.Malloc(100 * MiB, 0));
  SA_ASSERT_OK(m.Free(a));
  // A smaller request never takes an oversize block...
  SA_ASSIGN_OR_FAIL(b, m.Malloc(30 * MiB, 0));
  EXPECT_NE(b, a);
  // ...nor a large one that would waste kLargeBuffer or more of it.
  SA_ASSIGN_OR_FAIL(c, m.Malloc(70 * MiB, 0));
  EXPECT_NE(c, a);
  SA_ASSIGN_OR_FAIL(d, m.Malloc(90 * MiB, 0));
  EXPECT_EQ(d, a);
  EXPECT_EQ(m.counters().allocated, std::int64_t(100 * MiB + 30 * MiB + 70 * MiB));
  SA_ASSERT_OK(m.CheckInvariants());
}

TEST(TorchModel, GarbageCollectionFreesOldCachedSegments) {
  TorchModelOptions o;
  o.device_memory = 1000 * MiB;
  o.memory_fraction = 1.0;
  o.garbage_collection_threshold = 0.1;  // collect above 100 MiB reserved
  Model m(o);
  SA_ASSIGN_OR_FAIL(a, m.Malloc(80 * MiB, 0));
  SA_ASSIGN_OR_FAIL(b, m.Malloc(60 * MiB, 0));
  SA_ASSERT_OK(m.Free(a));
  SA_ASSERT_OK(m.Free(b));
  SA_ASSIGN_OR_FAIL(c, m.Malloc(200 * MiB, 0));  // miss: 140 MiB > 100 MiB, collect first
  (void)c;
  EXPECT_EQ(m.counters().retries, 0);
  // Both cached segments have the same age; collection stops once 40 MiB (140 - 100) are
  // reclaimed: the first in (size, address) order, the 60 MiB one, is enough.
  EXPECT_EQ(m.counters().segment_frees, 1);
  EXPECT_EQ(m.counters().reserved, std::int64_t(280 * MiB));
  SA_ASSERT_OK(m.CheckInvariants());
}

TEST(TorchModel, ExpandableSegmentsMapPagesAtTheEnd) {
  TorchModelOptions o;
  o.expandable_segments = true;
  Model m(o);
  SA_ASSIGN_OR_FAIL(a, m.Malloc(3 * MiB, 0));
  SA_ASSIGN_OR_FAIL(b, m.Malloc(3 * MiB, 0));
  EXPECT_EQ(b, a + 3 * MiB);
  EXPECT_EQ(m.counters().reserved, std::int64_t(20 * MiB));  // one 20 MiB page
  // 30 MiB: the 14 MiB free tail plus one more page (contiguous with it).
  SA_ASSIGN_OR_FAIL(c, m.Malloc(30 * MiB, 0));
  EXPECT_EQ(c, b + 3 * MiB);
  EXPECT_EQ(m.counters().reserved, std::int64_t(40 * MiB));
  EXPECT_EQ(m.segment_log(), (std::vector<std::size_t>{20 * MiB, 20 * MiB}));
  SA_ASSERT_OK(m.CheckInvariants());
  // Freed, empty_cache unmaps the whole pages inside free blocks only.
  SA_ASSERT_OK(m.Free(c));
  m.EmptyCache();
  EXPECT_EQ(m.counters().reserved, std::int64_t(20 * MiB));
  SA_ASSERT_OK(m.CheckInvariants());
  SA_ASSERT_OK(m.Free(a));
  SA_ASSERT_OK(m.Free(b));
  m.EmptyCache();
  EXPECT_EQ(m.counters().reserved, 0);
  // Small pool pages are 2 MiB.
  SA_ASSIGN_OR_FAIL(d, m.Malloc(4096, 0));
  (void)d;
  EXPECT_EQ(m.counters().reserved, std::int64_t(2 * MiB));
  SA_ASSERT_OK(m.CheckInvariants());
}

TEST(TorchModel, InvariantsHoldUnderRandomOperations) {
  for (bool expandable : {false, true}) {
    TorchModelOptions o;
    o.expandable_segments = expandable;
    o.device_memory = 2048 * MiB;
    Model m(o);
    std::mt19937_64 rng(42);
    std::vector<std::uint64_t> live;
    for (int i = 0; i < 4000; ++i) {
      const int op = int(rng() % 10);
      if (op < 6 || live.empty()) {
        const std::size_t size = rng() % 2 ? rng() % (2 * MiB) + 1 : rng() % (64 * MiB) + 1;
        absl::StatusOr<std::uint64_t> p = m.Malloc(size, rng() % 3);
        if (p.ok()) live.push_back(*p);
      } else if (op < 9) {
        const std::size_t k = rng() % live.size();
        SA_ASSERT_OK(m.Free(live[k]));
        live[k] = live.back();
        live.pop_back();
      } else {
        m.EmptyCache();
      }
      if (i % 50 == 0) {
      const absl::Status st = m.CheckInvariants();
      ASSERT_TRUE(st.ok()) << st << " " << "expandable=" << expandable << " op " << i;
    }
    }
    for (std::uint64_t p : live) SA_ASSERT_OK(m.Free(p));
    m.EmptyCache();
    EXPECT_EQ(m.counters().allocated, 0);
    if (!expandable) {
      EXPECT_EQ(m.counters().reserved, 0);
    }
    SA_ASSERT_OK(m.CheckInvariants());
  }
}

}  // namespace
}  // namespace stitchalloc::bench
