// Segment events (CachingAllocator::SetSegmentObserver, MappingStore's segment tracking) on the
// host driver: the events, applied to the segments there were when tracking began, give the
// segments a snapshot shows at every step of a workload that stitches, refills, trims and
// dissolves; every unmap names a segment mapped before, exactly; tracking starts from what is
// there, stops cleanly, and the teardown unmaps what is left; cached traffic makes no events.
#include <cmath>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "allocator/caching_allocator.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "vmm/host_driver.h"

namespace stitchalloc::testing {
namespace {

struct Seg {
  std::size_t size = 0;
  Stream stream = kDefaultStream;
  bool operator==(const Seg&) const = default;
};
using Segments = std::map<DevicePtr, Seg>;

// The segments a snapshot shows: each mapping's maximal runs of blocks that are not absent.
Segments FromSnapshot(const CachingAllocator& a) {
  Segments out;
  for (const SegmentInfo& s : a.Snapshot()) {
    DevicePtr start = 0;
    std::size_t size = 0;
    for (const auto& b : s.blocks) {
      if (b.state == BlockState::kAbsent) {
        if (size > 0) out[start] = {size, s.stream};
        size = 0;
        continue;
      }
      if (size == 0) start = b.ptr;
      size += b.size;
    }
    if (size > 0) out[start] = {size, s.stream};
  }
  return out;
}

// Applies events to a model of the segments, checking that each one is possible: a mapped
// segment overlaps none, an unmapped one is exactly a segment of the model.
struct Model {
  Segments segments;
  int mapped = 0, unmapped = 0, calls = 0;
  std::vector<std::string> errors;

  void Apply(const std::vector<SegmentEvent>& events) {
    ++calls;
    if (events.empty()) errors.push_back("the observer was called with no event");
    for (const SegmentEvent& e : events) {
      if (e.size == 0) errors.push_back("an event of size 0");
      if (e.mapped) {
        ++mapped;
        auto next = segments.lower_bound(e.ptr);
        const bool overlaps_next = next != segments.end() && next->first < e.ptr + e.size;
        const bool overlaps_prev = next != segments.begin() && std::prev(next)->first + std::prev(next)->second.size > e.ptr;
        if (overlaps_next || overlaps_prev) errors.push_back("a mapped segment overlaps a live one");
        segments[e.ptr] = {e.size, e.stream};
      } else {
        ++unmapped;
        auto it = segments.find(e.ptr);
        if (it == segments.end() || !(it->second == Seg{e.size, e.stream})) {
          errors.push_back("an unmapped segment was not mapped with that address, size and stream");
        } else {
          segments.erase(it);
        }
      }
    }
  }
};

std::unique_ptr<CachingAllocator> MakeAllocator(const std::string& config, std::size_t capacity, HostDriver** host) {
  auto cfg = ParseConfig(config);
  EXPECT_TRUE(cfg.ok()) << cfg.status();
  HostDriverOptions options{.capacity = capacity, .granularity = 2 * kMiB, .backed = false, .inline_streams = true};
  auto driver = HostDriver::Create(options);
  EXPECT_TRUE(driver.ok()) << driver.status();
  *host = driver->get();
  auto a = CachingAllocator::Create(*cfg, *std::move(driver));
  EXPECT_TRUE(a.ok()) << a.status();
  return *std::move(a);
}

// A workload of 4 streams, 64 live blocks of 512 B to 64 MiB in 1.25 GiB, a small stitch cache
// and an empty_cache every 1,500 operations: after every call, the events so far describe the
// segments the snapshot shows.
TEST(SegmentEvents, ReplayedTheyGiveTheSegmentsOfEverySnapshot) {
  HostDriver* host = nullptr;
  auto alloc = MakeAllocator("stitch_cache_mb:64", 1280 * kMiB, &host);
  Model model;
  alloc->SetSegmentObserver([&model](const std::vector<SegmentEvent>& e) { model.Apply(e); });
  std::vector<Stream> streams{kDefaultStream};
  for (int i = 0; i < 3; ++i) {
    SA_ASSIGN_OR_FAIL(s, host->CreateStream());
    streams.push_back(s);
  }
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> log_size(0, 17);
  std::vector<void*> live(64, nullptr);
  int failed = 0, mismatches = 0;
  constexpr int kOps = 12000;
  for (int k = 0; k < kOps; ++k) {
    const std::size_t i = rng() % live.size();
    if (live[i] != nullptr) {
      SA_ASSERT_OK(alloc->Free(live[i]));
      live[i] = nullptr;
    }
    const auto size = static_cast<std::size_t>(512.0 * std::pow(2.0, log_size(rng)));
    auto p = alloc->Malloc(size, streams[i % streams.size()]);
    if (p.ok()) {
      live[i] = *p;
    } else {
      ASSERT_TRUE(absl::IsResourceExhausted(p.status())) << p.status();
      ++failed;
    }
    if (k % 1500 == 1499) SA_ASSERT_OK(alloc->EmptyCache());
    if (model.segments != FromSnapshot(*alloc) && ++mismatches == 1) ADD_FAILURE() << "segments differ after operation " << k;
    if (k % 1000 == 0) SA_ASSERT_OK(alloc->CheckInvariants());
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_TRUE(model.errors.empty()) << model.errors.front();
  EXPECT_LT(failed, kOps / 100);
  // The workload did what the events must describe.
  const Stats st = alloc->GetStats();
  EXPECT_GT(st.num_stitches, 100);
  EXPECT_GT(st.num_refills, 10);
  EXPECT_GT(st.num_dissolves, 100);
  EXPECT_GT(model.unmapped, 1000);
  SA_ASSERT_OK(alloc->CheckInvariants());
  for (void* p : live) SA_ASSERT_OK(alloc->Free(p));
  SA_ASSERT_OK(alloc->EmptyCache());
  EXPECT_TRUE(model.segments.empty());
  EXPECT_TRUE(FromSnapshot(*alloc).empty());
}

// Tracking starts from the segments there are (no events for them), later events name them
// exactly, and without an observer nothing more is reported.
TEST(SegmentEvents, TrackingStartsFromWhatIsThereAndStops) {
  HostDriver* host = nullptr;
  auto alloc = MakeAllocator("mapping_headroom_mb:0", kGiB, &host);
  SA_ASSIGN_OR_FAIL(a, alloc->Malloc(40 * kMiB));
  SA_ASSIGN_OR_FAIL(b, alloc->Malloc(100 * 1024));
  Model model;
  alloc->SetSegmentObserver([&model](const std::vector<SegmentEvent>& e) { model.Apply(e); });
  EXPECT_EQ(model.calls, 0);
  model.segments = FromSnapshot(*alloc);  // what a snapshot taken now shows
  ASSERT_EQ(model.segments.size(), 2u);

  // Cached traffic: no call.
  SA_ASSERT_OK(alloc->Free(a));
  SA_ASSIGN_OR_FAIL(a2, alloc->Malloc(40 * kMiB));
  EXPECT_EQ(a2, a);
  EXPECT_EQ(model.calls, 0);

  // A new mapping, then everything released: one map, then three unmaps, in address order.
  SA_ASSIGN_OR_FAIL(c, alloc->Malloc(64 * kMiB));
  EXPECT_EQ(model.calls, 1);
  EXPECT_EQ(model.mapped, 1);
  for (void* p : {a2, b, c}) SA_ASSERT_OK(alloc->Free(p));
  SA_ASSERT_OK(alloc->EmptyCache());
  EXPECT_EQ(model.calls, 2);
  EXPECT_EQ(model.unmapped, 3);
  EXPECT_TRUE(model.errors.empty()) << model.errors.front();
  EXPECT_TRUE(model.segments.empty());

  alloc->SetSegmentObserver(nullptr);
  SA_ASSIGN_OR_FAIL(d, alloc->Malloc(8 * kMiB));
  SA_ASSERT_OK(alloc->Free(d));
  SA_ASSERT_OK(alloc->EmptyCache());
  EXPECT_EQ(model.calls, 2);
  SA_ASSERT_OK(alloc->CheckInvariants());
}

// A chunk lent to a stitched mapping leaves its home's segment, which splits around it; its
// return joins it again.
TEST(SegmentEvents, LendingSplitsTheLendersSegment) {
  HostDriver* host = nullptr;
  auto alloc = MakeAllocator("mapping_headroom_mb:0,stitch_cache_mb:1024", kGiB, &host);
  SA_ASSIGN_OR_FAIL(x, alloc->Malloc(60 * kMiB));
  SA_ASSERT_OK(alloc->Free(x));
  // [0, 20) live, [20, 40) free, [40, 60) live: a 30 MiB request borrows the free 20 MiB.
  SA_ASSIGN_OR_FAIL(p, alloc->Malloc(20 * kMiB));
  SA_ASSIGN_OR_FAIL(h, alloc->Malloc(20 * kMiB));
  SA_ASSIGN_OR_FAIL(q, alloc->Malloc(20 * kMiB));
  ASSERT_EQ(p, x);
  SA_ASSERT_OK(alloc->Free(h));
  Model model;
  model.segments = FromSnapshot(*alloc);
  alloc->SetSegmentObserver([&model](const std::vector<SegmentEvent>& e) { model.Apply(e); });
  SA_ASSIGN_OR_FAIL(s, alloc->Malloc(30 * kMiB));
  ASSERT_EQ(alloc->GetStats().num_stitches, 1);
  const auto base = reinterpret_cast<DevicePtr>(x);
  const Segments split{{base, {20 * kMiB, kDefaultStream}},
                       {base + 40 * kMiB, {20 * kMiB, kDefaultStream}},
                       {reinterpret_cast<DevicePtr>(s), {30 * kMiB, kDefaultStream}}};
  EXPECT_EQ(model.segments, split);
  EXPECT_EQ(model.unmapped, 1);  // the 60 MiB segment
  EXPECT_EQ(model.mapped, 3);    // its two pieces and the stitched range
  EXPECT_EQ(model.segments, FromSnapshot(*alloc));
  for (void* ptr : {p, q, s}) SA_ASSERT_OK(alloc->Free(ptr));
  SA_ASSERT_OK(alloc->EmptyCache());
  EXPECT_TRUE(model.segments.empty());
  EXPECT_TRUE(model.errors.empty()) << model.errors.front();
}

// Threads on their own streams allocate and free at once: the observer hears every change in
// the order it happened (it runs under the allocator's lock), so the model still matches.
TEST(SegmentEvents, ConcurrentTrafficKeepsTheirOrder) {
  HostDriver* host = nullptr;
  auto alloc = MakeAllocator("stitch_cache_mb:32", 1024 * kMiB, &host);
  Model model;
  alloc->SetSegmentObserver([&model](const std::vector<SegmentEvent>& e) { model.Apply(e); });
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    SA_ASSIGN_OR_FAIL(stream, host->CreateStream());
    threads.emplace_back([&alloc, stream, t] {
      std::mt19937_64 rng(100 + t);
      std::uniform_real_distribution<double> log_size(0, 16);
      std::vector<void*> live(12, nullptr);
      for (int k = 0; k < 2000; ++k) {
        const std::size_t i = rng() % live.size();
        if (live[i] != nullptr) {
          EXPECT_TRUE(alloc->Free(live[i]).ok());
        }
        auto p = alloc->Malloc(static_cast<std::size_t>(512.0 * std::pow(2.0, log_size(rng))), stream);
        live[i] = p.ok() ? *p : nullptr;
        if (k % 500 == 499) {
          EXPECT_TRUE(alloc->EmptyCache().ok());
        }
      }
      for (void* p : live) EXPECT_TRUE(alloc->Free(p).ok());
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_TRUE(model.errors.empty()) << model.errors.front();
  EXPECT_GT(model.calls, 100);
  EXPECT_EQ(model.segments, FromSnapshot(*alloc));
  SA_ASSERT_OK(alloc->CheckInvariants());
  SA_ASSERT_OK(alloc->EmptyCache());
  EXPECT_TRUE(model.segments.empty());
}

// Destroying the allocator unmaps every segment it still holds, live allocations included.
TEST(SegmentEvents, TeardownUnmapsWhatIsLeft) {
  HostDriver* host = nullptr;
  auto alloc = MakeAllocator("", kGiB, &host);
  Model model;
  alloc->SetSegmentObserver([&model](const std::vector<SegmentEvent>& e) { model.Apply(e); });
  SA_ASSIGN_OR_FAIL(a, alloc->Malloc(24 * kMiB));
  SA_ASSIGN_OR_FAIL(b, alloc->Malloc(4096));
  (void)a;
  (void)b;
  EXPECT_EQ(model.segments.size(), 2u);
  alloc.reset();
  EXPECT_TRUE(model.segments.empty());
  EXPECT_EQ(model.unmapped, 2);
  EXPECT_TRUE(model.errors.empty()) << model.errors.front();
}

}  // namespace
}  // namespace stitchalloc::testing
