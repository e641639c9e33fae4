// UncachedAllocations (torch_plugin/uncached.h) on the host driver: one segment per allocation,
// made when asked and released after the device has finished with it, every byte kept; out of
// memory, bad input and a misbehaving source leave it as it was; sharing; threads.
#include "torch_plugin/uncached.h"

#include <atomic>
#include <cstring>
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

constexpr std::size_t kMiB = 1 << 20;

struct Fixture {
  std::unique_ptr<HostDriver> host;
  std::atomic<int> synchronized{0};
  std::atomic<int> made{0};
  std::unique_ptr<UncachedAllocations> uncached;
};

std::unique_ptr<Fixture> Make(std::size_t capacity = 64 * kMiB) {
  auto f = std::make_unique<Fixture>();
  HostDriverOptions o;
  o.capacity = capacity;
  f->host = *HostDriver::Create(o);
  Fixture* raw = f.get();
  f->uncached = std::make_unique<UncachedAllocations>([raw](int) -> absl::StatusOr<UncachedAllocations::DeviceSource> {
    ++raw->made;
    return UncachedAllocations::DeviceSource{
        std::make_unique<DriverSegmentSource>(raw->host.get()),
        [raw] {
          ++raw->synchronized;
          return raw->host->SynchronizeDevice();
        },
        [raw] { return raw->host->GetMemInfo(); }};
  });
  return f;
}

TEST(Uncached, EachAllocationIsItsOwnSegmentAndGoesBackWhenFreed) {
  auto f = Make();
  SA_ASSIGN_OR_FAIL(a, f->uncached->Allocate(0, 1000));
  SA_ASSIGN_OR_FAIL(b, f->uncached->Allocate(0, 3 * kMiB));
  EXPECT_EQ(f->made, 1);  // the device's source, made once
  EXPECT_EQ(f->uncached->live(), 2u);
  EXPECT_EQ(f->host->physical_bytes_in_use(), 2 * kMiB + 4 * kMiB);  // rounded to the 2 MiB granularity
  auto live = f->uncached->Find(b);
  ASSERT_TRUE(live.has_value());
  EXPECT_EQ(live->device, 0);
  EXPECT_EQ(live->segment.ptr, reinterpret_cast<DevicePtr>(b));
  EXPECT_EQ(live->segment.size, 4 * kMiB);
  EXPECT_FALSE(f->uncached->Find(static_cast<char*>(b) + 1).has_value());
  FillPattern(a, 1000, 1);
  FillPattern(b, 3 * kMiB, 2);
  EXPECT_TRUE(HoldsPattern(a, 1000, 1));
  EXPECT_TRUE(HoldsPattern(b, 3 * kMiB, 2));
  SA_ASSERT_OK(f->uncached->Free(a));
  EXPECT_EQ(f->synchronized, 1);  // the device finished with it before it went
  EXPECT_EQ(f->host->physical_bytes_in_use(), 4 * kMiB);
  EXPECT_TRUE(HoldsPattern(b, 3 * kMiB, 2));
  SA_ASSERT_OK(f->uncached->Free(b));
  EXPECT_EQ(f->host->physical_bytes_in_use(), 0u);
  EXPECT_EQ(f->uncached->live(), 0u);
  // Nothing is cached: the whole capacity is there again and again.
  for (int i = 0; i < 3; ++i) {
    SA_ASSIGN_OR_FAIL(all, f->uncached->Allocate(0, 64 * kMiB));
    SA_ASSERT_OK(f->uncached->Free(all));
  }
}

TEST(Uncached, OutOfMemoryNamesTheModeAndHoldsNothing) {
  auto f = Make();
  SA_ASSIGN_OR_FAIL(a, f->uncached->Allocate(0, 40 * kMiB));
  auto too_much = f->uncached->Allocate(0, 40 * kMiB);
  ASSERT_TRUE(absl::IsResourceExhausted(too_much.status())) << too_much.status();
  EXPECT_THAT(std::string(too_much.status().message()), HasSubstr("PYTORCH_NO_CUDA_MEMORY_CACHING"));
  // Explained in numbers: the request, the device's memory, what the mode holds.
  EXPECT_THAT(std::string(too_much.status().message()), HasSubstr("41943040 bytes (40.00 MiB) on device 0"));
  EXPECT_THAT(std::string(too_much.status().message()), HasSubstr("the device has 24.00 MiB free of 64.00 MiB"));
  EXPECT_THAT(std::string(too_much.status().message()),
              HasSubstr("the mode's 1 live allocations there hold 40.00 MiB"));
  EXPECT_EQ(f->uncached->live(), 1u);
  EXPECT_EQ(f->host->physical_bytes_in_use(), 40 * kMiB);
  SA_ASSERT_OK(f->uncached->Free(a));
  SA_ASSIGN_OR_FAIL(b, f->uncached->Allocate(0, 40 * kMiB));  // usable again
  SA_ASSERT_OK(f->uncached->Free(b));
}

TEST(Uncached, BadInputIsRefusedAndChangesNothing) {
  auto f = Make();
  SA_ASSIGN_OR_FAIL(a, f->uncached->Allocate(0, 4096));
  EXPECT_TRUE(absl::IsInvalidArgument(f->uncached->Allocate(0, 0).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(f->uncached->Allocate(0, std::size_t{1} << 62).status()));
  auto bad_device = f->uncached->Allocate(64, 4096);
  EXPECT_TRUE(absl::IsInvalidArgument(bad_device.status()));
  EXPECT_THAT(std::string(bad_device.status().message()), HasSubstr("device 64 is out of range"));
  EXPECT_TRUE(absl::IsInvalidArgument(f->uncached->Allocate(-1, 4096).status()));
  int on_the_stack = 0;
  auto foreign = f->uncached->Free(&on_the_stack);
  EXPECT_TRUE(absl::IsNotFound(foreign)) << foreign;
  EXPECT_THAT(std::string(foreign.message()), HasSubstr("is not a live allocation"));
  EXPECT_TRUE(absl::IsNotFound(f->uncached->Free(static_cast<char*>(a) + 512)));  // inside, not the base
  EXPECT_TRUE(absl::IsNotFound(f->uncached->Share(&on_the_stack).status()));
  EXPECT_EQ(f->uncached->live(), 1u);
  EXPECT_EQ(f->synchronized, 0);
  SA_ASSERT_OK(f->uncached->Free(a));
  EXPECT_TRUE(absl::IsNotFound(f->uncached->Free(a)));  // a double free
  EXPECT_EQ(f->host->physical_bytes_in_use(), 0u);
}

// A source that gives half of what is asked for (or, with `full`, the same whole buffer every
// time), and counts what comes back.
class ShortSource final : public SegmentSource {
 public:
  absl::StatusOr<Segment> Allocate(std::size_t bytes) override {
    ++allocated;
    return Segment{reinterpret_cast<DevicePtr>(buffer.data()), full ? buffer.size() : bytes / 2};
  }
  absl::Status Release(const Segment&) override {
    ++released;
    return absl::OkStatus();
  }
  std::string name() const override { return "a short source"; }
  std::vector<char> buffer = std::vector<char>(1 << 20);
  bool full = false;
  int allocated = 0;
  int released = 0;
};

TEST(Uncached, AFailedFactoryOrASourceBreakingItsContractLeavesNothingBehind) {
  int calls = 0;
  ShortSource* source = nullptr;
  UncachedAllocations uncached([&](int) -> absl::StatusOr<UncachedAllocations::DeviceSource> {
    if (++calls == 1) return absl::UnavailableError("no context yet");
    auto s = std::make_unique<ShortSource>();
    source = s.get();
    return UncachedAllocations::DeviceSource{std::move(s), nullptr, nullptr};
  });
  // The factory's error reaches the caller; the next request asks it again.
  auto first = uncached.Allocate(0, 4096);
  EXPECT_TRUE(absl::IsUnavailable(first.status())) << first.status();
  auto short_segment = uncached.Allocate(0, 4096);
  EXPECT_EQ(calls, 2);
  ASSERT_NE(source, nullptr);
  EXPECT_TRUE(absl::IsInternal(short_segment.status())) << short_segment.status();
  EXPECT_THAT(std::string(short_segment.status().message()), HasSubstr("a short source gave 2048 bytes"));
  EXPECT_EQ(source->allocated, 1);
  EXPECT_EQ(source->released, 1);  // handed back
  EXPECT_EQ(uncached.live(), 0u);
  // Memory that is still live, handed out again: refused, and the first allocation stays.
  source->full = true;
  SA_ASSIGN_OR_FAIL(first_live, uncached.Allocate(0, 4096));
  auto again = uncached.Allocate(0, 4096);
  EXPECT_TRUE(absl::IsInternal(again.status())) << again.status();
  EXPECT_THAT(std::string(again.status().message()), HasSubstr("which is still live"));
  EXPECT_EQ(uncached.live(), 1u);
  ASSERT_TRUE(uncached.Find(first_live).has_value());
  SA_ASSERT_OK(uncached.Free(first_live));
  EXPECT_EQ(source->released, 3);
}

TEST(Uncached, SharedSegmentOpensElsewhereWithTheSameBytes) {
  auto f = Make();
  SA_ASSIGN_OR_FAIL(p, f->uncached->Allocate(0, 3 * kMiB));
  FillPattern(p, 3 * kMiB, 7);
  SA_ASSIGN_OR_FAIL(shared, f->uncached->Share(p));
  EXPECT_EQ(shared.offset, 0u);
  EXPECT_EQ(shared.chunk_size, 4 * kMiB);
  ASSERT_EQ(shared.fds.size(), 1u);
  SA_ASSIGN_OR_FAIL(imported, f->host->ImportChunk(shared.fds[0], shared.chunk_size));
  SA_ASSIGN_OR_FAIL(va, f->host->Reserve(shared.chunk_size));
  SA_ASSERT_OK(f->host->Map(va, shared.chunk_size, imported));
  SA_ASSERT_OK(f->host->SetAccess(va, shared.chunk_size));
  EXPECT_TRUE(HoldsPattern(reinterpret_cast<void*>(va), 3 * kMiB, 7));
  SA_ASSERT_OK(f->host->Unmap(va, shared.chunk_size));
  SA_ASSERT_OK(f->host->FreeReservation(va, shared.chunk_size));
  SA_ASSERT_OK(f->host->ReleaseChunk(imported));
  SA_ASSERT_OK(f->uncached->Free(p));
}

TEST(Uncached, ThreadsKeepEveryByte) {
  auto f = Make(256 * kMiB);
  constexpr int kThreads = 4;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(7 + t);
      std::vector<std::pair<void*, std::pair<std::size_t, std::uint64_t>>> held;
      for (int i = 0; i < 200; ++i) {
        if (held.size() < 6 && (held.empty() || rng() % 2 == 0)) {
          const std::size_t n = 1 + rng() % (5 * kMiB);
          auto p = f->uncached->Allocate(0, n);
          if (!p.ok()) {
            ++failures;
            continue;
          }
          const std::uint64_t seed = i * 31 + t;
          FillPattern(*p, n, seed);
          held.push_back({*p, {n, seed}});
        } else {
          const std::size_t k = rng() % held.size();
          auto [p, meta] = held[k];
          if (!HoldsPattern(p, meta.first, meta.second)) ++failures;
          if (!f->uncached->Free(p).ok()) ++failures;
          held.erase(held.begin() + static_cast<std::ptrdiff_t>(k));
        }
      }
      for (auto& [p, meta] : held) {
        if (!HoldsPattern(p, meta.first, meta.second) || !f->uncached->Free(p).ok()) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures, 0);
  EXPECT_EQ(f->uncached->live(), 0u);
  EXPECT_EQ(f->host->physical_bytes_in_use(), 0u);
}

}  // namespace
}  // namespace stitchalloc
