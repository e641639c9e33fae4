// SegmentPool (allocator/segment_pool.h): the caching allocator over a MemPool's own allocator,
// on the host driver. Segments come from a test source that hands out host memory and counts
// what it gave and got back, so every test checks the pool against what the source saw:
// PyTorch's segment sizes and split rules, no_split, merging, record_stream, the cache returned
// (and kept while a graph may replay), out of memory with the other pools asked first, a source
// that breaks its contract, bad pointers, checkpoints, segment events, sharing and threads.
#include "allocator/segment_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "vmm/host_driver.h"

namespace stitchalloc {
namespace {

using ::testing::HasSubstr;
using testing::FillPattern;
using testing::HoldsPattern;
using testing::Pattern;

// Host memory as a MemPool's own allocator would give device memory: 4 KiB-aligned segments of
// the size asked for, up to `capacity` bytes outstanding. Thread-safe.
class TestSource final : public SegmentSource {
 public:
  explicit TestSource(std::size_t capacity = 1 * kGiB) : capacity_(capacity) {}
  ~TestSource() override { EXPECT_TRUE(live_.empty()) << live_.size() << " segments never came back"; }
  absl::StatusOr<Segment> Allocate(std::size_t bytes) override {
    MutexLock l(&mu_);
    asked_.push_back(bytes);
    if (outstanding_ + bytes > capacity_) return absl::ResourceExhaustedError("test source: capacity reached");
    void* p = std::aligned_alloc(4096, bytes);
    if (p == nullptr) return absl::ResourceExhaustedError("test source: aligned_alloc failed");
    outstanding_ += bytes;
    live_[reinterpret_cast<DevicePtr>(p)] = bytes;
    return Segment{reinterpret_cast<DevicePtr>(p), bytes};
  }
  absl::Status Release(const Segment& s) override {
    MutexLock l(&mu_);
    auto it = live_.find(s.ptr);
    EXPECT_NE(it, live_.end()) << "released a segment it never gave";
    if (it == live_.end()) return absl::InvalidArgumentError("unknown segment");
    EXPECT_EQ(it->second, s.size);
    outstanding_ -= it->second;
    live_.erase(it);
    std::free(reinterpret_cast<void*>(s.ptr));
    ++released_;
    return absl::OkStatus();
  }
  std::string name() const override { return "the test source"; }

  std::vector<std::size_t> asked() const {
    MutexLock l(&mu_);
    return asked_;
  }
  std::size_t outstanding() const {
    MutexLock l(&mu_);
    return outstanding_;
  }
  int released() const {
    MutexLock l(&mu_);
    return released_;
  }
  void set_capacity(std::size_t c) {
    MutexLock l(&mu_);
    capacity_ = c;
  }

 private:
  mutable Mutex mu_;
  std::size_t capacity_ ABSL_GUARDED_BY(mu_);
  std::size_t outstanding_ ABSL_GUARDED_BY(mu_) = 0;
  int released_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::size_t> asked_ ABSL_GUARDED_BY(mu_);
  std::map<DevicePtr, std::size_t> live_ ABSL_GUARDED_BY(mu_);
};

struct Fixture {
  std::unique_ptr<HostDriver> host;
  std::shared_ptr<TestSource> source;
  std::unique_ptr<SegmentPool> pool;
};

Fixture Make(SegmentPool::Options options = {}, Config config = {}, std::size_t capacity = 1 * kGiB) {
  Fixture f;
  HostDriverOptions o;
  o.capacity = 256 * kMiB;
  f.host = *HostDriver::Create(o);
  f.source = std::make_shared<TestSource>(capacity);
  f.pool = *SegmentPool::Create(config, f.host.get(), f.source, std::move(options));
  return f;
}

TEST(SegmentPool, SegmentSizesSplitsAndMergesFollowPyTorch) {
  auto f = Make();
  // Small requests share one 2 MiB segment, split at 512-byte granules.
  SA_ASSIGN_OR_FAIL(a, f.pool->Malloc(1000, kDefaultStream));
  SA_ASSIGN_OR_FAIL(b, f.pool->Malloc(100, kDefaultStream));
  EXPECT_EQ(static_cast<char*>(b) - static_cast<char*>(a), 1024) << "best fit from the front of the remainder";
  // A 5 MiB request gets a 20 MiB segment that a second one shares; 30 MiB gets 30 MiB.
  SA_ASSIGN_OR_FAIL(c, f.pool->Malloc(5 * kMiB, kDefaultStream));
  SA_ASSIGN_OR_FAIL(d, f.pool->Malloc(5 * kMiB, kDefaultStream));
  EXPECT_EQ(static_cast<char*>(d) - static_cast<char*>(c), static_cast<std::ptrdiff_t>(5 * kMiB));
  SA_ASSIGN_OR_FAIL(e, f.pool->Malloc(30 * kMiB - 100, kDefaultStream));
  EXPECT_EQ(f.source->asked(), (std::vector<std::size_t>{2 * kMiB, 20 * kMiB, 30 * kMiB}));
  SA_EXPECT_OK(f.pool->CheckInvariants());

  Stats s = f.pool->GetStats();
  EXPECT_EQ(s.segment.all().current, 3);
  EXPECT_EQ(s.reserved_bytes.all().current, static_cast<std::int64_t>(52 * kMiB));
  EXPECT_EQ(s.reserved_bytes.pools[kPoolSmall].current, static_cast<std::int64_t>(2 * kMiB));
  EXPECT_EQ(s.allocation.all().current, 5);
  EXPECT_EQ(s.allocated_bytes.all().current, static_cast<std::int64_t>(1024 + 512 + 10 * kMiB + 30 * kMiB));
  EXPECT_EQ(s.requested_bytes.all().current, static_cast<std::int64_t>(1100 + 10 * kMiB + 30 * kMiB - 100));
  // The free rest of the small and the 20 MiB segment are inactive splits; the 30 MiB is whole.
  EXPECT_EQ(s.inactive_split.all().current, 2);
  EXPECT_EQ(s.inactive_split_bytes.all().current, static_cast<std::int64_t>(2 * kMiB - 1536 + 10 * kMiB));

  // Bytes stay where they were written.
  FillPattern(a, 1000, 1);
  FillPattern(b, 100, 2);
  FillPattern(c, 5 * kMiB, 3);
  FillPattern(d, 5 * kMiB, 4);
  FillPattern(e, 30 * kMiB - 100, 5);
  EXPECT_TRUE(HoldsPattern(a, 1000, 1) && HoldsPattern(b, 100, 2) && HoldsPattern(c, 5 * kMiB, 3) && HoldsPattern(d, 5 * kMiB, 4) &&
              HoldsPattern(e, 30 * kMiB - 100, 5));

  // Freed blocks merge: the segments are whole again, and cached (nothing returned).
  for (void* p : {b, a, d, c, e}) {
    SA_ASSERT_OK(f.pool->Free(p));
    SA_EXPECT_OK(f.pool->CheckInvariants());
  }
  for (const SegmentInfo& seg : f.pool->Snapshot()) {
    ASSERT_EQ(seg.blocks.size(), 1u);
    EXPECT_EQ(seg.blocks[0].state, BlockState::kFree);
  }
  s = f.pool->GetStats();
  EXPECT_EQ(s.inactive_split.all().current, 0);
  EXPECT_EQ(s.allocated_bytes.all().current, 0);
  EXPECT_EQ(s.segment.all().current, 3);
  EXPECT_EQ(f.source->released(), 0);
  // A cached segment serves the next request of its pool without the source.
  SA_ASSIGN_OR_FAIL(again, f.pool->Malloc(4 * kMiB, kDefaultStream));
  EXPECT_EQ(again, c);
  EXPECT_EQ(f.source->asked().size(), 3u);
  SA_ASSERT_OK(f.pool->Free(again));
  SA_ASSERT_OK(f.pool->EmptyCache());
  EXPECT_EQ(f.source->outstanding(), 0u);
  EXPECT_EQ(f.pool->GetStats().num_device_free, 3);
}

TEST(SegmentPool, NoSplitGivesEachAllocationAWholeSegment) {
  auto f = Make({.no_split = true, .on_source_exhausted = nullptr});
  SA_ASSIGN_OR_FAIL(a, f.pool->Malloc(1000, kDefaultStream));
  SA_ASSIGN_OR_FAIL(b, f.pool->Malloc(1000, kDefaultStream));
  SA_ASSIGN_OR_FAIL(c, f.pool->Malloc(5 * kMiB, kDefaultStream));
  EXPECT_EQ(f.source->asked(), (std::vector<std::size_t>{2 * kMiB, 2 * kMiB, 20 * kMiB}));
  for (void* p : {a, b, c}) {
    SA_ASSIGN_OR_FAIL(info, f.pool->Describe(p));
    EXPECT_EQ(info.ptr, info.mapping_va) << "every allocation starts its segment";
    EXPECT_EQ(info.size, info.mapping_size) << "and holds all of it";
  }
  EXPECT_EQ(f.pool->GetStats().inactive_split.all().current, 0);
  // A freed segment is reused whole.
  SA_ASSERT_OK(f.pool->Free(b));
  SA_ASSIGN_OR_FAIL(d, f.pool->Malloc(600 * kKiB, kDefaultStream));
  EXPECT_EQ(d, b);
  EXPECT_EQ(f.source->asked().size(), 3u);
  SA_EXPECT_OK(f.pool->CheckInvariants());
  for (void* p : {a, c, d}) SA_ASSERT_OK(f.pool->Free(p));
  SA_ASSERT_OK(f.pool->EmptyCache());
  EXPECT_EQ(f.source->released(), 3);
}

TEST(SegmentPool, MaxSplitSizeKeepsOversizeBlocksWhole) {
  Config config;
  config.max_split_size = 40 * kMiB;
  auto f = Make({}, config);
  SA_ASSIGN_OR_FAIL(big, f.pool->Malloc(64 * kMiB, kDefaultStream));
  SA_ASSERT_OK(f.pool->Free(big));
  // Below max_split_size, a request does not take the oversize block.
  SA_ASSIGN_OR_FAIL(small, f.pool->Malloc(12 * kMiB, kDefaultStream));
  EXPECT_NE(small, big);
  // One close to its size takes it whole (not split).
  SA_ASSIGN_OR_FAIL(close, f.pool->Malloc(50 * kMiB, kDefaultStream));
  EXPECT_EQ(close, big);
  SA_ASSIGN_OR_FAIL(info, f.pool->Describe(close));
  EXPECT_EQ(info.size, 64 * kMiB);
  EXPECT_EQ(f.pool->GetStats().oversize_allocations.current, 1);
  EXPECT_EQ(f.pool->GetStats().max_split_size, static_cast<std::int64_t>(40 * kMiB));
  SA_ASSERT_OK(f.pool->Free(small));
  SA_ASSERT_OK(f.pool->Free(close));
  SA_EXPECT_OK(f.pool->CheckInvariants());
}

TEST(SegmentPool, StreamsKeepTheirOwnSegmentsAndRecordStreamDefersReuse) {
  auto f = Make();
  SA_ASSIGN_OR_FAIL(s1, f.host->CreateStream());
  SA_ASSIGN_OR_FAIL(s2, f.host->CreateStream());
  SA_ASSIGN_OR_FAIL(p, f.pool->Malloc(8 * kMiB, s1));
  SA_ASSIGN_OR_FAIL(q, f.pool->Malloc(8 * kMiB, s2));
  EXPECT_EQ(f.source->asked().size(), 2u) << "a stream's segment serves only that stream";
  SA_ASSERT_OK(f.pool->Free(q));

  std::atomic<bool> gate{false};
  SA_ASSERT_OK(f.host->Enqueue(s2, [&]() {
    while (!gate.load()) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }));
  SA_ASSERT_OK(f.pool->RecordStream(p, s2));
  SA_ASSERT_OK(f.pool->RecordStream(p, s1));  // its own stream: nothing to wait for
  SA_ASSERT_OK(f.pool->Free(p));
  Stats s = f.pool->GetStats();
  EXPECT_EQ(s.allocated_bytes.all().current, 0);
  EXPECT_EQ(s.active_bytes.all().current, static_cast<std::int64_t>(8 * kMiB)) << "pending blocks stay active";
  SA_EXPECT_OK(f.pool->CheckInvariants());
  EXPECT_THAT(std::string(f.pool->Free(p).message()), HasSubstr("waits for stream events"));
  SA_ASSIGN_OR_FAIL(r, f.pool->Malloc(8 * kMiB, s1));
  EXPECT_NE(r, p) << "reused while another stream still uses it";
  gate = true;
  SA_ASSERT_OK(f.host->SynchronizeStream(s2));
  SA_ASSIGN_OR_FAIL(t, f.pool->Malloc(8 * kMiB, s1));
  EXPECT_EQ(t, p) << "available again once the event completed";
  for (void* x : {r, t}) SA_ASSERT_OK(f.pool->Free(x));
  EXPECT_EQ(f.pool->GetStats().active_bytes.all().current, 0);
  SA_EXPECT_OK(f.pool->CheckInvariants());
  f.pool.reset();
  SA_ASSERT_OK(f.host->DestroyStream(s1));
  SA_ASSERT_OK(f.host->DestroyStream(s2));
}

TEST(SegmentPool, KeepCachedHoldsTheCacheUntilCleared) {
  auto f = Make();
  f.pool->SetKeepCached(true);
  SA_ASSIGN_OR_FAIL(p, f.pool->Malloc(3 * kMiB, kDefaultStream));
  SA_ASSERT_OK(f.pool->Free(p));
  SA_ASSERT_OK(f.pool->EmptyCache());
  EXPECT_EQ(f.source->outstanding(), 20 * kMiB) << "a graph may replay at these addresses";
  f.pool->SetKeepCached(false);
  SA_ASSERT_OK(f.pool->EmptyCache());
  EXPECT_EQ(f.source->outstanding(), 0u);
  EXPECT_EQ(f.pool->GetStats().reserved_bytes.all().current, 0);
}

TEST(SegmentPool, OutOfMemoryReleasesCachesAsksTheOtherPoolsAndExplains) {
  int asked_others = 0;
  auto f = Make({.no_split = false, .on_source_exhausted = [&] { ++asked_others; }}, {}, 40 * kMiB);
  // Fill the source: a cached 12 MiB segment (free) and a live 16 MiB one.
  SA_ASSIGN_OR_FAIL(cached, f.pool->Malloc(12 * kMiB, kDefaultStream));
  SA_ASSIGN_OR_FAIL(live, f.pool->Malloc(16 * kMiB, kDefaultStream));
  SA_ASSERT_OK(f.pool->Free(cached));
  // 24 MiB fits only once the cached segment goes back.
  SA_ASSIGN_OR_FAIL(big, f.pool->Malloc(24 * kMiB, kDefaultStream));
  EXPECT_EQ(f.pool->GetStats().num_alloc_retries, 1);
  EXPECT_EQ(asked_others, 1) << "the device's other pools are asked before the retry";
  EXPECT_EQ(f.source->released(), 1);
  // Nothing left to release: out of memory, explained.
  auto oom = f.pool->Malloc(10 * kMiB, kDefaultStream);
  ASSERT_TRUE(absl::IsResourceExhausted(oom.status())) << oom.status();
  const std::string msg(oom.status().message());
  EXPECT_THAT(msg, HasSubstr("the test source"));
  EXPECT_THAT(msg, HasSubstr("tried to allocate 10.00 MiB"));
  EXPECT_THAT(msg, HasSubstr("allocated 40.00 MiB"));
  EXPECT_THAT(msg, HasSubstr("reserved 40.00 MiB in 2 segments"));
  EXPECT_THAT(msg, HasSubstr("test source: capacity reached"));
  EXPECT_EQ(f.pool->GetStats().num_ooms, 1);
  EXPECT_EQ(asked_others, 2);
  // Usable after it: memory freed elsewhere is found.
  f.source->set_capacity(1 * kGiB);
  SA_ASSIGN_OR_FAIL(ok, f.pool->Malloc(10 * kMiB, kDefaultStream));
  for (void* p : {live, big, ok}) SA_ASSERT_OK(f.pool->Free(p));
  SA_EXPECT_OK(f.pool->CheckInvariants());
  SA_ASSERT_OK(f.pool->EmptyCache());
}

TEST(SegmentPool, TheMemoryLimitCountsEveryPoolOfTheDevice) {
  Config config;
  config.memory_fraction = 0.25;  // of the host driver's 256 MiB: 64 MiB
  auto f = Make({}, config);
  auto others = std::make_shared<std::atomic<std::int64_t>>(40 * kMiB);  // the device's other pools
  f.pool->ShareMemoryLimit(others);
  SA_ASSIGN_OR_FAIL(p, f.pool->Malloc(20 * kMiB, kDefaultStream));
  EXPECT_EQ(others->load(), static_cast<std::int64_t>(60 * kMiB));
  auto over = f.pool->Malloc(20 * kMiB, kDefaultStream);
  ASSERT_TRUE(absl::IsResourceExhausted(over.status()));
  EXPECT_THAT(std::string(over.status().message()), HasSubstr("would pass the memory limit"));
  EXPECT_EQ(f.source->asked().size(), 1u) << "the source is not asked past the limit";
  SA_ASSERT_OK(f.pool->SetMemoryFraction(0.5));
  SA_ASSIGN_OR_FAIL(q, f.pool->Malloc(20 * kMiB, kDefaultStream));
  EXPECT_FALSE(f.pool->SetMemoryFraction(0).ok());
  SA_ASSERT_OK(f.pool->Free(p));
  SA_ASSERT_OK(f.pool->Free(q));
  SA_ASSERT_OK(f.pool->EmptyCache());
  EXPECT_EQ(others->load(), static_cast<std::int64_t>(40 * kMiB));
}

// A source that breaks its contract in the given way once, then behaves.
class BrokenSource final : public SegmentSource {
 public:
  enum class Fault { kSmaller, kMisaligned, kOverlapping, kNull, kFails };
  explicit BrokenSource(Fault fault) : fault_(fault) {}
  ~BrokenSource() override {
    for (void* p : blocks_) std::free(p);
  }
  absl::StatusOr<Segment> Allocate(std::size_t bytes) override {
    void* p = std::aligned_alloc(4096, bytes + 4096);
    blocks_.push_back(p);
    const auto at = reinterpret_cast<DevicePtr>(p);
    ++calls_;
    if (calls_ == 2) {
      switch (fault_) {
        case Fault::kSmaller: return Segment{at, bytes / 2};
        case Fault::kMisaligned: return Segment{at + 8, bytes};
        case Fault::kOverlapping: return Segment{first_ + 4096, bytes};
        case Fault::kNull: return Segment{0, bytes};
        case Fault::kFails: return absl::UnavailableError("the device fell off the bus");
      }
    }
    if (calls_ == 1) first_ = at;
    return Segment{at, bytes};
  }
  absl::Status Release(const Segment& s) override {
    released_.push_back(s.ptr);
    return absl::OkStatus();
  }
  std::string name() const override { return "a broken source"; }
  std::vector<DevicePtr> released_;

 private:
  const Fault fault_;
  int calls_ = 0;
  DevicePtr first_ = 0;
  std::vector<void*> blocks_;
};

TEST(SegmentPool, ASourceBreakingItsContractCannotCorruptThePool) {
  struct Case {
    BrokenSource::Fault fault;
    const char* says;
  };
  for (const Case& c : {Case{BrokenSource::Fault::kSmaller, "smaller than asked for"},
                        Case{BrokenSource::Fault::kMisaligned, "not aligned"},
                        Case{BrokenSource::Fault::kOverlapping, "overlapping"},
                        Case{BrokenSource::Fault::kNull, "a null segment"},
                        Case{BrokenSource::Fault::kFails, "fell off the bus"}}) {
    SCOPED_TRACE(c.says);
    HostDriverOptions o;
    o.capacity = 256 * kMiB;
    auto host = *HostDriver::Create(o);
    auto source = std::make_shared<BrokenSource>(c.fault);
    auto pool = *SegmentPool::Create({}, host.get(), source, {});
    SA_ASSIGN_OR_FAIL(first, pool->Malloc(20 * kMiB, kDefaultStream));
    auto bad = pool->Malloc(20 * kMiB, kDefaultStream);
    ASSERT_FALSE(bad.ok());
    EXPECT_FALSE(absl::IsResourceExhausted(bad.status())) << "not an out-of-memory to retry: " << bad.status();
    EXPECT_THAT(std::string(bad.status().message()), HasSubstr(c.says));
    // The bad segment went back (except where there was none), the pool is intact and usable.
    const bool returned = c.fault != BrokenSource::Fault::kNull && c.fault != BrokenSource::Fault::kFails;
    EXPECT_EQ(source->released_.size(), returned ? 1u : 0u);
    SA_EXPECT_OK(pool->CheckInvariants());
    EXPECT_EQ(pool->GetStats().segment.all().current, 1);
    SA_ASSIGN_OR_FAIL(next, pool->Malloc(20 * kMiB, kDefaultStream));
    SA_ASSERT_OK(pool->Free(first));
    SA_ASSERT_OK(pool->Free(next));
  }
}

TEST(SegmentPool, BadPointersAreNamedAndChangeNothing) {
  auto f = Make();
  SA_ASSIGN_OR_FAIL(p, f.pool->Malloc(4096, kDefaultStream));
  const Stats before = f.pool->GetStats();
  int local = 0;
  auto message = [](const absl::Status& s) { return std::string(s.message()); };
  EXPECT_THAT(message(f.pool->Free(&local)), HasSubstr("foreign pointer"));
  EXPECT_THAT(message(f.pool->Free(static_cast<char*>(p) + 512)), HasSubstr("interior pointer"));
  EXPECT_THAT(message(f.pool->RecordStream(static_cast<char*>(p) + 8192, 0)), HasSubstr("memory this pool holds free"));
  EXPECT_THAT(message(f.pool->Describe(&local).status()), HasSubstr("foreign pointer"));
  EXPECT_TRUE(absl::IsInvalidArgument(f.pool->Malloc(0, kDefaultStream).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(f.pool->Malloc(std::size_t{1} << 62, kDefaultStream).status()));
  SA_ASSERT_OK(f.pool->Free(nullptr));
  const Stats after = f.pool->GetStats();
  EXPECT_EQ(after.allocated_bytes.all().current, before.allocated_bytes.all().current);
  EXPECT_EQ(after.segment.all().current, before.segment.all().current);
  SA_ASSERT_OK(f.pool->Free(p));
  EXPECT_THAT(message(f.pool->Free(p)), HasSubstr("double free"));
  EXPECT_THAT(message(f.pool->Share(p).status()), HasSubstr("use after free"));
  SA_EXPECT_OK(f.pool->CheckInvariants());
}

TEST(SegmentPool, CheckpointsRestoreAllocationsAtTheirAddresses) {
  auto f = Make();
  SA_ASSIGN_OR_FAIL(a, f.pool->Malloc(2 * kMiB, kDefaultStream));
  SA_ASSIGN_OR_FAIL(b, f.pool->Malloc(3 * kMiB, kDefaultStream));
  SA_ASSIGN_OR_FAIL(c, f.pool->Malloc(4 * kMiB, kDefaultStream));
  const auto live = f.pool->LiveAllocations();
  ASSERT_EQ(live.size(), 3u);
  EXPECT_EQ(live[1].ptr, reinterpret_cast<DevicePtr>(b));
  EXPECT_EQ(live[1].size, 3 * kMiB);
  SA_ASSERT_OK(f.pool->Free(b));
  SA_ASSERT_OK(f.pool->Free(a));
  SA_ASSIGN_OR_FAIL(back, f.pool->AllocateAt(live[1]));
  EXPECT_EQ(back, b);
  auto taken = f.pool->AllocateAt(live[2]);
  EXPECT_TRUE(absl::IsFailedPrecondition(taken.status()));
  EXPECT_THAT(std::string(taken.status().message()), HasSubstr("overlaps a live allocation"));
  EXPECT_TRUE(absl::IsFailedPrecondition(f.pool->AllocateAt({0x1000, 512, 1, kDefaultStream}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(f.pool->AllocateAt({live[0].ptr, 100, 1, kDefaultStream}).status()));
  SA_EXPECT_OK(f.pool->CheckInvariants());
  EXPECT_EQ(f.pool->LiveAllocations(), (std::vector<PoolAllocator::LiveAllocation>{live[1], live[2]}));
  SA_ASSERT_OK(f.pool->Free(back));
  SA_ASSERT_OK(f.pool->Free(c));
}

TEST(SegmentPool, SegmentEventsReplayToTheSnapshot) {
  auto f = Make();
  std::map<DevicePtr, std::size_t> replayed;
  int events = 0;
  f.pool->SetSegmentObserver([&](const std::vector<SegmentEvent>& es) {
    for (const SegmentEvent& e : es) {
      ++events;
      if (e.mapped) {
        EXPECT_TRUE(replayed.emplace(e.ptr, e.size).second);
      } else {
        EXPECT_EQ(replayed.erase(e.ptr), 1u);
      }
    }
  });
  std::mt19937_64 rng(7);
  std::vector<void*> live;
  for (int i = 0; i < 300; ++i) {
    if (!live.empty() && rng() % 2 == 0) {
      const std::size_t k = rng() % live.size();
      SA_ASSERT_OK(f.pool->Free(live[k]));
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(k));
    } else {
      const std::size_t n = rng() % 4 == 0 ? 1 + rng() % (24 * kMiB) : 1 + rng() % kMiB;
      SA_ASSIGN_OR_FAIL(p, f.pool->Malloc(n, kDefaultStream));
      live.push_back(p);
    }
    if (i % 50 == 49) SA_ASSERT_OK(f.pool->EmptyCache());
  }
  std::map<DevicePtr, std::size_t> snap;
  for (const SegmentInfo& s : f.pool->Snapshot()) snap[s.va] = s.size;
  EXPECT_EQ(replayed, snap);
  EXPECT_GT(events, static_cast<int>(snap.size())) << "segments came and went";
  SA_EXPECT_OK(f.pool->CheckInvariants());
  for (void* p : live) SA_ASSERT_OK(f.pool->Free(p));
  f.pool.reset();  // the teardown's segment_free events empty the replay
  EXPECT_TRUE(replayed.empty());
}

TEST(SegmentPool, DriverSegmentsAreOneChunkEachAndShareable) {
  HostDriverOptions o;
  o.capacity = 256 * kMiB;
  auto host = *HostDriver::Create(o);
  auto source = std::make_shared<DriverSegmentSource>(host.get());
  auto pool = *SegmentPool::Create({}, host.get(), source, {.no_split = true, .on_source_exhausted = nullptr});
  SA_ASSIGN_OR_FAIL(p, pool->Malloc(5 * kMiB, kDefaultStream));
  EXPECT_EQ(host->physical_bytes_in_use(), 20 * kMiB);
  FillPattern(p, 5 * kMiB, 9);
  SA_ASSIGN_OR_FAIL(shared, pool->Share(p));
  EXPECT_EQ(shared.offset, 0u);
  EXPECT_EQ(shared.chunk_size, 20 * kMiB);
  ASSERT_EQ(shared.fds.size(), 1u);
  // The exported chunk maps elsewhere with the same bytes.
  SA_ASSIGN_OR_FAIL(imported, host->ImportChunk(shared.fds[0], shared.chunk_size));
  SA_ASSIGN_OR_FAIL(va, host->Reserve(shared.chunk_size));
  SA_ASSERT_OK(host->Map(va, shared.chunk_size, imported));
  SA_ASSERT_OK(host->SetAccess(va, shared.chunk_size));
  EXPECT_TRUE(HoldsPattern(reinterpret_cast<void*>(va), 5 * kMiB, 9));
  SA_ASSERT_OK(host->Unmap(va, shared.chunk_size));
  SA_ASSERT_OK(host->FreeReservation(va, shared.chunk_size));
  SA_ASSERT_OK(host->ReleaseChunk(imported));
  SA_ASSERT_OK(pool->Free(p));
  SA_ASSERT_OK(pool->EmptyCache());
  EXPECT_EQ(host->physical_bytes_in_use(), 0u);
  // A source that does not know how its memory was made refuses to share it, by name.
  auto f = Make();
  SA_ASSIGN_OR_FAIL(q, f.pool->Malloc(4096, kDefaultStream));
  auto refused = f.pool->Share(q);
  EXPECT_TRUE(absl::IsFailedPrecondition(refused.status()));
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("memory from the test source cannot be shared"));
  SA_ASSERT_OK(f.pool->Free(q));
}

TEST(SegmentPool, DestructionReturnsEverySegmentLiveOnesIncluded) {
  auto f = Make();
  SA_ASSIGN_OR_FAIL(p, f.pool->Malloc(3 * kMiB, kDefaultStream));
  SA_ASSIGN_OR_FAIL(q, f.pool->Malloc(100, kDefaultStream));
  (void)p;
  (void)q;
  f.pool.reset();
  EXPECT_EQ(f.source->outstanding(), 0u);
  EXPECT_EQ(f.source->released(), 2);
}

TEST(SegmentPool, ConcurrentThreadsKeepEveryByte) {
  auto f = Make({}, {}, 1 * kGiB);
  constexpr int kThreads = 4;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      std::vector<std::pair<void*, std::pair<std::size_t, std::uint64_t>>> mine;
      for (int i = 0; i < 300; ++i) {
        if (!mine.empty() && rng() % 2 == 0) {
          const std::size_t k = rng() % mine.size();
          auto [p, what] = mine[k];
          if (!HoldsPattern(p, what.first, what.second)) ++failures;
          if (!f.pool->Free(p).ok()) ++failures;
          mine.erase(mine.begin() + static_cast<std::ptrdiff_t>(k));
        } else {
          const std::size_t n = rng() % 4 == 0 ? 1 + rng() % (3 * kMiB) : 1 + rng() % (64 * kKiB);
          auto p = f.pool->Malloc(n, static_cast<Stream>(t % 2));
          if (!p.ok()) {
            ++failures;
            continue;
          }
          const std::uint64_t seed = rng();
          FillPattern(*p, n, seed);
          mine.push_back({*p, {n, seed}});
        }
        if (i % 100 == 99 && t == 0) (void)f.pool->EmptyCache();
      }
      for (auto& [p, what] : mine) {
        if (!HoldsPattern(p, what.first, what.second)) ++failures;
        if (!f.pool->Free(p).ok()) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  SA_EXPECT_OK(f.pool->CheckInvariants());
  EXPECT_EQ(f.pool->GetStats().allocated_bytes.all().current, 0);
}

}  // namespace
}  // namespace stitchalloc
