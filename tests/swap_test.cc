// The swap layer on the host driver: the pinned pool (best fit, coalescing, growth by slabs,
// exhaustion, bad frees), the copy engine (chunked copies bit-exact, bandwidth accounting), and
// the swap manager (round trips bit-exact with both directions in flight and from several
// threads, exhaustion keeping tensors on the device, cancel on free, the layer-boundary schedule
// for an 8-layer forward/backward, eviction under memory pressure, the block hooks that keep
// PyTorch's memory history).
#include <atomic>
#include <chrono>
#include <optional>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "swap/copy_engine.h"
#include "swap/pinned_pool.h"
#include "swap/swap_manager.h"
#include "tests/test_util.h"
#include "vmm/host_driver.h"

namespace stitchalloc::swap {
namespace {

using stitchalloc::testing::MakeHostAllocator;
using stitchalloc::testing::Pattern;

constexpr std::size_t kMiB = std::size_t{1} << 20;

// ---- pinned pool -------------------------------------------------------------------------

TEST(PinnedPool, BestFitCoalescesAndGrowsBySlabs) {
  SA_ASSIGN_OR_FAIL(driver, HostDriver::Create({.capacity = 64 * kMiB}));
  SA_ASSIGN_OR_FAIL(pool, PinnedPool::Create(driver.get(), {.slab_bytes = 4 * kMiB, .capacity = 16 * kMiB}));
  SA_ASSIGN_OR_FAIL(a, pool->Allocate(1 * kMiB));
  SA_ASSIGN_OR_FAIL(b, pool->Allocate(1 * kMiB));
  SA_ASSIGN_OR_FAIL(c, pool->Allocate(1 * kMiB));
  EXPECT_EQ(pool->GetStats().pin_calls, 1);  // one slab serves all three
  SA_ASSERT_OK(pool->Free(b));
  SA_ASSIGN_OR_FAIL(small, pool->Allocate(512 * 1024));
  EXPECT_EQ(small, b);  // best fit: the 1 MiB hole, not the 1 MiB tail... lowest address on ties
  SA_ASSERT_OK(pool->Free(small));
  SA_ASSERT_OK(pool->Free(a));
  SA_ASSERT_OK(pool->Free(c));
  SA_ASSERT_OK(pool->CheckInvariants());
  SA_ASSIGN_OR_FAIL(whole, pool->Allocate(4 * kMiB));  // coalesced back into one range
  EXPECT_EQ(pool->GetStats().pin_calls, 1);
  SA_ASSIGN_OR_FAIL(big, pool->Allocate(6 * kMiB));  // larger than a slab: a slab of its own
  PinnedPoolStats s = pool->GetStats();
  EXPECT_EQ(s.pin_calls, 2);
  EXPECT_EQ(s.pinned_bytes, 10 * kMiB);
  EXPECT_EQ(s.in_use_bytes, 10 * kMiB);
  ASSERT_EQ(s.slabs.size(), 2u);
  EXPECT_EQ(s.slabs[0].high_water, 4 * kMiB);
  // Capacity: 10 of 16 MiB pinned; another 8 MiB would exceed it.
  auto refused = pool->Allocate(8 * kMiB);
  EXPECT_TRUE(absl::IsResourceExhausted(refused.status())) << refused.status();
  EXPECT_EQ(pool->GetStats().exhausted, 1);
  SA_ASSERT_OK(pool->Free(whole));
  SA_ASSERT_OK(pool->Free(big));
  EXPECT_EQ(pool->ReleaseEmptySlabs(), 10 * kMiB);
  EXPECT_EQ(driver->pinned_host_bytes(), 0u);
  SA_ASSERT_OK(pool->CheckInvariants());
}

// A capacity below the slab size, or what is left of the capacity, still pins: the last slab is
// what remains (before, a 96 MiB limit with 256 MiB slabs pinned nothing at all).
TEST(PinnedPool, TheLastSlabIsWhatIsLeftOfTheCapacity) {
  SA_ASSIGN_OR_FAIL(driver, HostDriver::Create({.capacity = 64 * kMiB}));
  SA_ASSIGN_OR_FAIL(pool, PinnedPool::Create(driver.get(), {.slab_bytes = 8 * kMiB, .capacity = 5 * kMiB}));
  SA_ASSIGN_OR_FAIL(a, pool->Allocate(3 * kMiB));
  EXPECT_EQ(pool->GetStats().pinned_bytes, 5 * kMiB);
  SA_ASSIGN_OR_FAIL(b, pool->Allocate(2 * kMiB));
  EXPECT_EQ(pool->GetStats().pin_calls, 1);
  EXPECT_TRUE(absl::IsResourceExhausted(pool->Allocate(512).status()));
  SA_ASSERT_OK(pool->Free(a));
  SA_ASSERT_OK(pool->Free(b));
  SA_ASSIGN_OR_FAIL(p2, PinnedPool::Create(driver.get(), {.slab_bytes = 4 * kMiB, .capacity = 6 * kMiB}));
  SA_ASSIGN_OR_FAIL(c, p2->Allocate(3 * kMiB));   // a 4 MiB slab
  SA_ASSIGN_OR_FAIL(d, p2->Allocate(2 * kMiB));   // does not fit its remainder: a 2 MiB last slab
  PinnedPoolStats s = p2->GetStats();
  EXPECT_EQ(s.pinned_bytes, 6 * kMiB);
  EXPECT_EQ(s.pin_calls, 2);
  EXPECT_TRUE(absl::IsResourceExhausted(p2->Allocate(2 * kMiB).status()));  // 1 MiB free, not 2
  SA_ASSERT_OK(p2->CheckInvariants());
  SA_ASSERT_OK(p2->Free(c));
  SA_ASSERT_OK(p2->Free(d));
}

TEST(PinnedPool, RejectsBadInputAndBadFrees) {
  SA_ASSIGN_OR_FAIL(driver, HostDriver::Create({.capacity = 64 * kMiB}));
  EXPECT_FALSE(PinnedPool::Create(driver.get(), {.slab_bytes = 0}).ok());
  EXPECT_FALSE(PinnedPool::Create(driver.get(), {.capacity = 0}).ok());
  EXPECT_FALSE(PinnedPool::Create(driver.get(), {.alignment = 3}).ok());
  EXPECT_FALSE(PinnedPool::Create(nullptr, {}).ok());
  SA_ASSIGN_OR_FAIL(pool, PinnedPool::Create(driver.get(), {.slab_bytes = 2 * kMiB, .capacity = 8 * kMiB}));
  EXPECT_FALSE(pool->Allocate(0).ok());
  EXPECT_TRUE(absl::IsResourceExhausted(pool->Allocate(9 * kMiB).status()));
  SA_ASSIGN_OR_FAIL(p, pool->Allocate(1000));
  int on_stack = 0;
  EXPECT_TRUE(absl::IsInvalidArgument(pool->Free(&on_stack)));
  SA_ASSERT_OK(pool->Free(p));
  const absl::Status twice = pool->Free(p);
  EXPECT_TRUE(absl::IsInvalidArgument(twice));
  EXPECT_NE(twice.message().find("double free"), std::string::npos) << twice;
  SA_ASSERT_OK(pool->CheckInvariants());
}

TEST(PinnedPool, RandomOperationsKeepTheInvariants) {
  SA_ASSIGN_OR_FAIL(driver, HostDriver::Create({.capacity = 64 * kMiB}));
  SA_ASSIGN_OR_FAIL(pool, PinnedPool::Create(driver.get(), {.slab_bytes = 1 * kMiB, .capacity = 6 * kMiB}));
  std::mt19937 rng(11);
  std::vector<std::pair<void*, std::size_t>> live;
  for (int i = 0; i < 3000; ++i) {
    if (live.empty() || rng() % 2 == 0) {
      const std::size_t n = 1 + rng() % (300 * 1024);
      auto p = pool->Allocate(n);
      if (p.ok()) {
        std::memset(*p, static_cast<int>(i), n);
        live.emplace_back(*p, n);
      } else {
        ASSERT_TRUE(absl::IsResourceExhausted(p.status())) << p.status();
      }
    } else {
      const std::size_t k = rng() % live.size();
      SA_ASSERT_OK(pool->Free(live[k].first));
      live[k] = live.back();
      live.pop_back();
    }
    if (i % 250 == 0) SA_ASSERT_OK(pool->CheckInvariants());
  }
  EXPECT_LE(pool->GetStats().pinned_bytes, 6 * kMiB);
  for (auto& [p, n] : live) SA_ASSERT_OK(pool->Free(p));
  EXPECT_EQ(pool->GetStats().in_use_bytes, 0u);
  SA_ASSERT_OK(pool->CheckInvariants());
}

// ---- copy engine -------------------------------------------------------------------------

TEST(CopyEngine, ChunkedCopiesAreBitExactAndAccounted) {
  SA_ASSIGN_OR_FAIL(alloc, MakeHostAllocator("host_capacity_mb:64"));
  Driver& d = alloc->driver();
  SA_ASSIGN_OR_FAIL(engine, CopyEngine::Create(&d, {.chunk_bytes = 64 * 1024}));
  SA_ASSIGN_OR_FAIL(host, d.AllocateHostPinned(3 * kMiB + 77));
  SA_ASSIGN_OR_FAIL(back, d.AllocateHostPinned(3 * kMiB + 77));
  SA_ASSIGN_OR_FAIL(dev, alloc->Malloc(3 * kMiB + 77));
  const std::vector<std::uint8_t> bytes = Pattern(3 * kMiB + 77, 5);
  std::memcpy(host, bytes.data(), bytes.size());
  SA_ASSIGN_OR_FAIL(up, engine->Issue(Direction::kHostToDevice, dev, host, bytes.size(), kDefaultStream));
  SA_ASSERT_OK(engine->StreamWait(engine->stream(Direction::kDeviceToHost), up));
  SA_ASSIGN_OR_FAIL(down, engine->Issue(Direction::kDeviceToHost, back, dev, bytes.size(), kDefaultStream));
  SA_ASSERT_OK(engine->Synchronize(down));
  EXPECT_EQ(std::memcmp(back, bytes.data(), bytes.size()), 0);
  SA_ASSIGN_OR_FAIL(done, engine->Done(up));
  EXPECT_TRUE(done);
  const CopyEngineStats s = engine->GetStats();
  EXPECT_EQ(s.h2d.copies, 1);
  EXPECT_EQ(s.h2d.chunks, 49);  // ceil((3 MiB + 77) / 64 KiB)
  EXPECT_EQ(s.d2h.completed_bytes, static_cast<std::int64_t>(bytes.size()));
  EXPECT_GT(s.d2h.bandwidth(), 0.0);
  EXPECT_FALSE(engine->Issue(Direction::kDeviceToHost, nullptr, dev, 10, kDefaultStream).ok());
  EXPECT_FALSE(engine->Issue(Direction::kDeviceToHost, back, dev, 0, kDefaultStream).ok());
  SA_ASSERT_OK(engine->Release(up));
  SA_ASSERT_OK(engine->Release(down));
  EXPECT_TRUE(absl::IsNotFound(engine->Done(up).status()));
  SA_ASSERT_OK(alloc->Free(dev));
  SA_ASSERT_OK(d.FreeHostPinned(host));
  SA_ASSERT_OK(d.FreeHostPinned(back));
}

// ---- swap manager ------------------------------------------------------------------------

struct Rig {
  std::unique_ptr<CachingAllocator> alloc;
  std::unique_ptr<PinnedPool> pool;
  std::unique_ptr<CopyEngine> engine;
  std::unique_ptr<SwapManager> swap;
  Stream compute = 0;
  HostDriver* host = nullptr;
};

Rig MakeRig(const std::string& config, PinnedPoolOptions pinned, SwapOptions options) {
  Rig r;
  auto alloc = MakeHostAllocator(config);
  EXPECT_TRUE(alloc.ok()) << alloc.status();
  r.alloc = *std::move(alloc);
  r.host = dynamic_cast<HostDriver*>(&r.alloc->driver());
  r.compute = *r.alloc->driver().CreateStream();
  r.pool = *PinnedPool::Create(&r.alloc->driver(), pinned);
  r.engine = *CopyEngine::Create(&r.alloc->driver(), {.chunk_bytes = 256 * 1024});
  auto swap = SwapManager::Create(r.alloc.get(), r.pool.get(), r.engine.get(), r.compute, options);
  EXPECT_TRUE(swap.ok()) << swap.status();
  r.swap = *std::move(swap);
  return r;
}

// Holds the device-to-host stream busy for `ms`, so that copies queue behind it.
void Stall(Rig& r, Direction d, int ms) {
  SA_EXPECT_OK(r.host->Enqueue(r.engine->stream(d), [ms] { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); }));
}

struct Saved {
  SwapManager::Ticket ticket;
  int layer;
  std::size_t bytes;
  std::uint64_t seed;
};

// A device tensor of `n` bytes filled with Pattern(n, seed), handed to the manager as saved by
// `layer` and appended to `saved`.
void SaveFilled(Rig& r, std::size_t n, int layer, std::uint64_t seed, std::vector<Saved>* saved) {
  auto p = r.alloc->Malloc(n, r.compute);
  ASSERT_TRUE(p.ok()) << p.status();
  const std::vector<std::uint8_t> bytes = Pattern(n, seed);
  std::memcpy(*p, bytes.data(), n);  // the host driver's device memory is host-addressable
  auto t = r.swap->Offload(*p, n, layer);
  ASSERT_TRUE(t.ok()) << t.status();
  saved->push_back({*t, layer, n, seed});
}

void ForwardLayer(Rig& r, int layer, int tensors, std::mt19937& rng, std::vector<Saved>* saved) {
  for (int k = 0; k < tensors; ++k) {
    const std::size_t n = 4096 + rng() % (3 * kMiB);
    SaveFilled(r, n, layer, rng(), saved);
  }
  SA_EXPECT_OK(r.swap->ForwardEnd(layer));
}

void CheckAndFree(Rig& r, const Saved& s) {
  auto p = r.swap->Wait(s.ticket);
  ASSERT_TRUE(p.ok()) << p.status();
  SA_ASSERT_OK(r.alloc->driver().SynchronizeStream(r.compute));  // the test reads on the host
  const std::vector<std::uint8_t> bytes = Pattern(s.bytes, s.seed);
  EXPECT_EQ(std::memcmp(*p, bytes.data(), s.bytes), 0) << "layer " << s.layer << " ticket " << s.ticket;
  SA_ASSERT_OK(r.alloc->Free(*p));
}

TEST(SwapManager, RoundTripsAreBitExactWithBothDirectionsInFlight) {
  Rig r = MakeRig("host_capacity_mb:512", {.slab_bytes = 16 * kMiB, .capacity = 256 * kMiB},
                  {.lookahead = 2, .keep_last_layers = 0});
  constexpr int kLayers = 8;
  SA_ASSERT_OK(r.swap->BeginIteration(kLayers));
  std::mt19937 rng(3);
  std::vector<Saved> saved;
  Stall(r, Direction::kDeviceToHost, 50);  // every offload queues behind this
  for (int i = 0; i < kLayers; ++i) ForwardLayer(r, i, 6, rng, &saved);
  // Backward starts while the offloads are still queued: prefetches of layers 6 and 5 must wait
  // for their offloads on the device, not on the host.
  SA_ASSERT_OK(r.swap->BackwardBegin(7));
  SA_ASSIGN_OR_FAIL(state, r.swap->State(saved[6 * 6].ticket));
  EXPECT_EQ(state, TicketState::kPrefetching);
  for (int j = kLayers - 1; j >= 0; --j) {
    SA_ASSERT_OK(r.swap->BackwardBegin(j));
    for (const Saved& s : saved) {
      if (s.layer == j) CheckAndFree(r, s);
    }
  }
  const SwapStats st = r.swap->GetStats();
  EXPECT_EQ(st.offloads, 48);
  EXPECT_EQ(st.prefetches, 48);
  EXPECT_EQ(st.live_tickets, 0);
  SA_ASSERT_OK(r.alloc->driver().SynchronizeStream(r.engine->stream(Direction::kHostToDevice)));
  r.swap->Poll();
  EXPECT_EQ(r.pool->GetStats().in_use_bytes, 0u);
  EXPECT_EQ(r.alloc->GetStats().allocated_bytes.all().current, 0);
  const CopyEngineStats cs = r.engine->GetStats();
  EXPECT_EQ(cs.d2h.copies, 48);
  EXPECT_EQ(cs.h2d.copies, 48);
  EXPECT_GT(r.pool->GetStats().peak_in_use_bytes, 0u);
}

TEST(SwapManager, ConcurrentLayersFromSeveralThreads) {
  Rig r = MakeRig("host_capacity_mb:512", {.slab_bytes = 8 * kMiB, .capacity = 256 * kMiB},
                  {.lookahead = 1, .keep_last_layers = 1});
  constexpr int kThreads = 4, kLayers = 8;
  SA_ASSERT_OK(r.swap->BeginIteration(kLayers));
  std::vector<std::vector<Saved>> saved(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(100 + t);
      for (int layer = 2 * t; layer < 2 * t + 2; ++layer) ForwardLayer(r, layer, 5, rng, &saved[t]);
    });
  }
  for (auto& th : threads) th.join();
  threads.clear();
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int layer = 2 * t + 1; layer >= 2 * t; --layer) {
        SA_EXPECT_OK(r.swap->BackwardBegin(layer));
        for (const Saved& s : saved[t]) {
          if (s.layer == layer) CheckAndFree(r, s);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  const SwapStats st = r.swap->GetStats();
  EXPECT_EQ(st.registered, 40);
  EXPECT_EQ(st.kept_last_layers, 5);  // layer 7
  EXPECT_EQ(st.offloads, 35);
  EXPECT_EQ(st.live_tickets, 0);
  EXPECT_EQ(r.alloc->GetStats().allocated_bytes.all().current, 0);
}

TEST(SwapManager, PinnedPoolExhaustionKeepsTheTensorOnTheDevice) {
  Rig r = MakeRig("host_capacity_mb:64", {.slab_bytes = 1 * kMiB, .capacity = 2 * kMiB},
                  {.lookahead = 1, .keep_last_layers = 0});
  SA_ASSERT_OK(r.swap->BeginIteration(2));
  std::vector<Saved> saved;
  SA_ASSIGN_OR_FAIL(p, r.alloc->Malloc(3 * kMiB, r.compute));
  const std::vector<std::uint8_t> bytes = Pattern(3 * kMiB, 9);
  std::memcpy(p, bytes.data(), bytes.size());
  SA_ASSIGN_OR_FAIL(t, r.swap->Offload(p, 3 * kMiB, 0));
  SA_ASSERT_OK(r.swap->ForwardEnd(0));
  SA_ASSIGN_OR_FAIL(state, r.swap->State(t));
  EXPECT_EQ(state, TicketState::kKept);
  EXPECT_EQ(r.swap->GetStats().kept_no_host_memory, 1);
  EXPECT_EQ(r.swap->GetStats().offloads, 0);
  SA_ASSIGN_OR_FAIL(back, r.swap->Wait(t));
  EXPECT_EQ(back, p);  // never moved
  EXPECT_EQ(std::memcmp(back, bytes.data(), bytes.size()), 0);
  SA_ASSERT_OK(r.alloc->Free(back));
}

TEST(SwapManager, FreedTensorCancelsItsPendingCopy) {
  Rig r = MakeRig("host_capacity_mb:64", {.slab_bytes = 8 * kMiB, .capacity = 32 * kMiB},
                  {.lookahead = 1, .keep_last_layers = 0});
  SA_ASSERT_OK(r.swap->BeginIteration(3));
  Stall(r, Direction::kDeviceToHost, 30);
  SA_ASSIGN_OR_FAIL(p, r.alloc->Malloc(2 * kMiB, r.compute));
  SA_ASSIGN_OR_FAIL(t, r.swap->Offload(p, 2 * kMiB, 0));
  SA_ASSIGN_OR_FAIL(q, r.alloc->Malloc(kMiB, r.compute));
  SA_ASSIGN_OR_FAIL(u, r.swap->Offload(q, kMiB, 1));  // cancelled before its layer ends
  SA_ASSERT_OK(r.swap->ForwardEnd(0));
  SA_ASSIGN_OR_FAIL(state, r.swap->State(t));
  EXPECT_EQ(state, TicketState::kOffloading);
  SA_ASSERT_OK(r.swap->Cancel(t));  // the copy is still queued behind the stall
  SA_ASSERT_OK(r.swap->Cancel(u));
  EXPECT_TRUE(absl::IsNotFound(r.swap->Wait(t).status()));
  EXPECT_TRUE(absl::IsNotFound(r.swap->Cancel(t)));
  EXPECT_GT(r.pool->GetStats().in_use_bytes, 0u);  // held until the copy has completed
  SA_ASSERT_OK(r.alloc->driver().SynchronizeStream(r.engine->stream(Direction::kDeviceToHost)));
  r.swap->Poll();
  EXPECT_EQ(r.pool->GetStats().in_use_bytes, 0u);
  EXPECT_EQ(r.swap->GetStats().cancelled, 2);
  EXPECT_EQ(r.alloc->GetStats().allocated_bytes.all().current, 0);
  SA_ASSERT_OK(r.alloc->CheckInvariants());
}

// The block hooks (PyTorch's memory history, in the torch plugin) see every prefetch block the
// manager allocates, and it frees itself exactly those it never handed out: a cancelled
// prefetch, and one still pending when the manager goes. Claimed blocks stay allocated, the
// caller's, with no freeing call.
TEST(SwapManager, BlockHooksSeeEveryPrefetchBlockAndEveryOneTheManagerFreesItself) {
  absl::flat_hash_map<void*, Stream> own;  // allocated and not yet freed by the manager
  int allocated = 0, freed = 0, bad = 0;
  BlockHooks hooks{.allocated = [&](void* p, Stream s) {
                     ++allocated;
                     if (!own.emplace(p, s).second) ++bad;  // handed out twice
                   },
                   .freeing = [&](void* p, Stream s) {
                     ++freed;
                     auto it = own.find(p);
                     if (it == own.end() || it->second != s) ++bad;  // not one of the manager's
                     else own.erase(it);
                   }};
  Rig r = MakeRig("host_capacity_mb:64", {.slab_bytes = 8 * kMiB, .capacity = 32 * kMiB},
                  {.lookahead = 1, .keep_last_layers = 0, .hooks = hooks});
  const Stream h2d = r.engine->stream(Direction::kHostToDevice);
  SA_ASSERT_OK(r.swap->BeginIteration(3));
  std::mt19937 rng(9);
  std::vector<Saved> saved;
  ForwardLayer(r, 0, 3, rng, &saved);
  ForwardLayer(r, 1, 4, rng, &saved);
  SA_ASSERT_OK(r.swap->ForwardEnd(2));
  EXPECT_EQ(allocated, 0);  // offloads allocate nothing on the device
  SA_ASSERT_OK(r.swap->BackwardBegin(2));  // layer 1 comes back
  EXPECT_EQ(allocated, 4);
  for (const auto& [p, s] : own) EXPECT_EQ(s, h2d);
  // Two of layer 1's tensors die while their prefetch is in flight: the manager frees those.
  for (int k : {3, 4}) {
    SA_ASSIGN_OR_FAIL(state, r.swap->State(saved[k].ticket));
    EXPECT_EQ(state, TicketState::kPrefetching);
    SA_ASSERT_OK(r.swap->Cancel(saved[k].ticket));
  }
  EXPECT_EQ(freed, 2);
  // The other two are claimed: allocated and never freed by the manager, the caller's now.
  auto claim = [&](const Saved& v) {
    SA_ASSIGN_OR_FAIL(c, r.swap->Claim(v.ticket));
    EXPECT_FALSE(c.same_block);
    EXPECT_TRUE(own.contains(c.ptr));
    SA_ASSERT_OK(r.alloc->driver().SynchronizeStream(r.compute));
    const std::vector<std::uint8_t> bytes = Pattern(v.bytes, v.seed);
    EXPECT_EQ(std::memcmp(c.ptr, bytes.data(), v.bytes), 0);
    SA_ASSERT_OK(r.alloc->Free(c.ptr));  // the caller's free: no hook
    own.erase(c.ptr);
  };
  claim(saved[5]);
  claim(saved[6]);
  EXPECT_EQ(freed, 2);
  SA_ASSERT_OK(r.swap->BackwardBegin(1));  // layer 0 comes back; one of it is claimed
  EXPECT_EQ(allocated, 7);
  claim(saved[0]);
  EXPECT_EQ(own.size(), 2u);
  // The manager goes with two prefetches pending: it frees both, through the hook.
  r.swap.reset();
  EXPECT_EQ(freed, 4);
  EXPECT_EQ(bad, 0);
  EXPECT_EQ(r.alloc->GetStats().allocated_bytes.all().current, 0);
  SA_ASSERT_OK(r.alloc->CheckInvariants());
}

// Borrowed blocks (PyTorch storages): the manager never frees them itself. release() comes once,
// with the copy stream while the offload still reads the block, and the owner frees it then; a
// kept block comes back as the same block and is never released; a cancelled registered block
// is released with no stream. The bytes that come back are the bytes that left.
TEST(SwapManager, BorrowedBlocksAreReleasedToTheirOwnerNeverFreed) {
  Rig r = MakeRig("host_capacity_mb:64", {.slab_bytes = 8 * kMiB, .capacity = 32 * kMiB},
                  {.lookahead = 1, .keep_last_layers = 1});
  SA_ASSERT_OK(r.swap->BeginIteration(2));
  struct Owner {
    void* block = nullptr;
    int releases = 0;
    std::optional<Stream> stream;
  };
  Owner a, b, c;
  auto releaser = [&r](Owner* o) {
    return [&r, o](std::optional<Stream> s) {
      ++o->releases;
      o->stream = s;
      if (s.has_value()) SA_EXPECT_OK(r.alloc->RecordStream(o->block, *s));
      SA_EXPECT_OK(r.alloc->Free(o->block));  // the owner's reference was the last one
    };
  };
  const std::vector<std::uint8_t> pattern = Pattern(3 * kMiB, 11);
  SA_ASSIGN_OR_FAIL(pa, r.alloc->Malloc(3 * kMiB, r.compute));
  std::memcpy(pa, pattern.data(), pattern.size());
  a.block = pa;
  SA_ASSIGN_OR_FAIL(ta, r.swap->Offload(pa, 3 * kMiB, 0, releaser(&a)));
  SA_ASSIGN_OR_FAIL(pb, r.alloc->Malloc(kMiB, r.compute));
  b.block = pb;
  SA_ASSIGN_OR_FAIL(tb, r.swap->Offload(pb, kMiB, 1, releaser(&b)));  // last layer: kept
  SA_ASSIGN_OR_FAIL(pc, r.alloc->Malloc(kMiB, r.compute));
  c.block = pc;
  SA_ASSIGN_OR_FAIL(tc, r.swap->Offload(pc, kMiB, 0, releaser(&c)));
  SA_ASSERT_OK(r.swap->Cancel(tc));
  EXPECT_EQ(c.releases, 1);
  EXPECT_FALSE(c.stream.has_value());

  Stall(r, Direction::kDeviceToHost, 20);
  SA_ASSERT_OK(r.swap->ForwardEnd(0));
  EXPECT_EQ(a.releases, 1);
  ASSERT_TRUE(a.stream.has_value());
  EXPECT_EQ(*a.stream, r.engine->stream(Direction::kDeviceToHost));
  SA_ASSERT_OK(r.swap->ForwardEnd(1));
  EXPECT_EQ(b.releases, 0);

  SA_ASSERT_OK(r.swap->BackwardBegin(1));
  SA_ASSIGN_OR_FAIL(cb, r.swap->Claim(tb));
  EXPECT_TRUE(cb.same_block);
  EXPECT_EQ(cb.ptr, pb);
  SA_ASSIGN_OR_FAIL(ca, r.swap->Claim(ta));
  EXPECT_FALSE(ca.same_block);
  SA_ASSERT_OK(r.alloc->driver().SynchronizeStream(r.compute));
  EXPECT_EQ(std::memcmp(ca.ptr, pattern.data(), pattern.size()), 0);
  EXPECT_EQ(a.releases + b.releases + c.releases, 2);  // never twice, never for the kept block
  SA_ASSERT_OK(r.alloc->Free(ca.ptr));
  SA_ASSERT_OK(r.alloc->Free(cb.ptr));
  SA_ASSERT_OK(r.alloc->driver().SynchronizeStream(r.engine->stream(Direction::kHostToDevice)));
  r.swap->Poll();
  EXPECT_EQ(r.alloc->GetStats().allocated_bytes.all().current, 0);
  EXPECT_EQ(r.pool->GetStats().in_use_bytes, 0u);
  SA_ASSERT_OK(r.alloc->CheckInvariants());
}

// An 8-layer forward/backward, one tensor per layer, lookahead 1, the last layer kept: each
// layer's offload is issued at its forward end (not before), and BackwardBegin(j) prefetches
// exactly layer j-1.
TEST(SwapManager, ScheduleIssuesOffloadsAndPrefetchesInOrder) {
  Rig r = MakeRig("host_capacity_mb:128", {.slab_bytes = 8 * kMiB, .capacity = 64 * kMiB},
                  {.lookahead = 1, .keep_last_layers = 1});
  constexpr int kLayers = 8;
  SA_ASSERT_OK(r.swap->BeginIteration(kLayers));
  std::vector<SwapManager::Ticket> t(kLayers);
  std::vector<void*> ptr(kLayers);
  for (int i = 0; i < kLayers; ++i) {
    SA_ASSIGN_OR_FAIL(p, r.alloc->Malloc(kMiB, r.compute));
    std::memset(p, i + 1, kMiB);
    ptr[i] = p;
    SA_ASSIGN_OR_FAIL(ticket, r.swap->Offload(p, kMiB, i));
    t[i] = ticket;
    SA_ASSIGN_OR_FAIL(before, r.swap->State(t[i]));
    EXPECT_EQ(before, TicketState::kRegistered) << i;
    SA_ASSERT_OK(r.swap->ForwardEnd(i));
    SA_ASSIGN_OR_FAIL(after, r.swap->State(t[i]));
    if (i < kLayers - 1) {
      EXPECT_TRUE(after == TicketState::kOffloading || after == TicketState::kOnHost) << i;
      EXPECT_EQ(r.swap->GetStats().offloads, i + 1);
    } else {
      EXPECT_EQ(after, TicketState::kKept);
    }
  }
  for (int j = kLayers - 1; j >= 0; --j) {
    SA_ASSERT_OK(r.swap->BackwardBegin(j));
    for (int i = 0; i < j; ++i) {
      SA_ASSIGN_OR_FAIL(s, r.swap->State(t[i]));
      if (i == j - 1) {
        EXPECT_EQ(s, TicketState::kPrefetching) << "layer " << i << " at backward " << j;
      } else {
        EXPECT_NE(s, TicketState::kPrefetching) << "layer " << i << " too early at backward " << j;
      }
    }
    EXPECT_EQ(r.swap->GetStats().prefetches, j >= 1 ? kLayers - j : kLayers - 1);  // layers j-1 .. 6
    SA_ASSIGN_OR_FAIL(p, r.swap->Wait(t[j]));
    SA_ASSERT_OK(r.alloc->driver().SynchronizeStream(r.compute));
    EXPECT_EQ(static_cast<unsigned char*>(p)[kMiB - 1], j + 1);
    SA_ASSERT_OK(r.alloc->Free(p));
  }
  EXPECT_EQ(r.swap->GetStats().late_prefetches, 0);  // every prefetch came from the schedule
}

// Passes in flight together: a pipeline schedule's micro-batches (pass 1 and pass 3, four
// layers each, both forwards before either backward) and another model of two layers sharing
// the device (pass 2). Each backward brings back its own pass's layers only; each pass keeps its
// own last layer (by its own layer count); every tensor comes back bit-exact.
TEST(SwapManager, EachPassPrefetchesItsOwnLayers) {
  Rig r = MakeRig("host_capacity_mb:128", {.slab_bytes = 8 * kMiB, .capacity = 64 * kMiB},
                  {.lookahead = 1, .keep_last_layers = 1});
  constexpr SwapManager::Pass kA = 1, kOther = 2, kB = 3;
  absl::flat_hash_map<SwapManager::Pass, std::vector<Saved>> saved;
  auto forward = [&](SwapManager::Pass pass, int layers) {
    SA_ASSERT_OK(r.swap->BeginIteration(layers, pass));
    for (int i = 0; i < layers; ++i) {
      const std::uint64_t seed = 100 * pass + i;
      SA_ASSIGN_OR_FAIL(p, r.alloc->Malloc(kMiB, r.compute));
      const std::vector<std::uint8_t> bytes = Pattern(kMiB, seed);
      std::memcpy(p, bytes.data(), kMiB);
      SA_ASSIGN_OR_FAIL(t, r.swap->Offload(p, kMiB, i, nullptr, pass));
      saved[pass].push_back({t, i, kMiB, seed});
      SA_ASSERT_OK(r.swap->ForwardEnd(i, pass));
    }
  };
  auto state = [&](SwapManager::Pass pass, int layer) {
    auto s = r.swap->State(saved[pass][layer].ticket);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.value_or(TicketState::kRegistered);
  };
  auto away = [](TicketState s) { return s == TicketState::kOffloading || s == TicketState::kOnHost; };
  forward(kA, 4);
  forward(kB, 4);
  forward(kOther, 2);
  for (SwapManager::Pass pass : {kA, kB, kOther}) {
    const int last = static_cast<int>(saved[pass].size()) - 1;
    EXPECT_EQ(state(pass, last), TicketState::kKept) << "pass " << pass;  // its own last layer
    for (int i = 0; i < last; ++i) EXPECT_TRUE(away(state(pass, i))) << "pass " << pass << " layer " << i;
  }
  EXPECT_EQ(r.swap->GetStats().kept_last_layers, 3);
  // Pass A's backward: its layers come back one ahead; pass B's and the other model's stay away.
  for (int j = 3; j >= 0; --j) {
    SA_ASSERT_OK(r.swap->BackwardBegin(j, kA));
    if (j > 0) {
      EXPECT_EQ(state(kA, j - 1), TicketState::kPrefetching) << j;
    }
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(away(state(kB, i))) << "pass B layer " << i << " at A's backward " << j;
    EXPECT_TRUE(away(state(kOther, 0)));
    CheckAndFree(r, saved[kA][j]);
  }
  EXPECT_EQ(r.swap->GetStats().prefetches, 3);
  for (SwapManager::Pass pass : {kOther, kB}) {
    for (int j = static_cast<int>(saved[pass].size()) - 1; j >= 0; --j) {
      SA_ASSERT_OK(r.swap->BackwardBegin(j, pass));
      CheckAndFree(r, saved[pass][j]);
    }
  }
  const SwapStats st = r.swap->GetStats();
  EXPECT_EQ(st.prefetches, 3 + 1 + 3);
  EXPECT_EQ(st.late_prefetches, 0);  // every tensor came back by its own pass's schedule
  EXPECT_EQ(st.live_tickets, 0);
  // A layer outside the pass's own count, and a pass never begun, are refused by name.
  auto outside = r.swap->ForwardEnd(2, kOther);
  EXPECT_TRUE(absl::IsInvalidArgument(outside)) << outside;
  EXPECT_THAT(std::string(outside.message()), ::testing::HasSubstr("layer 2 is outside pass 2's 2 layers"));
  auto unknown = r.swap->BackwardBegin(0, 9);
  EXPECT_THAT(std::string(unknown.message()), ::testing::HasSubstr("outside pass 9's 0 layers"));
  SA_ASSERT_OK(r.alloc->driver().SynchronizeStream(r.engine->stream(Direction::kHostToDevice)));
  r.swap->Poll();
  EXPECT_EQ(r.alloc->GetStats().allocated_bytes.all().current, 0);
  EXPECT_EQ(r.pool->GetStats().in_use_bytes, 0u);
}

// The manager remembers the layer counts of the passes begun last, and never forgets a pass
// that still has tickets, however many passes were begun since.
TEST(SwapManager, ForgetsOnlyOldPassesWithoutTickets) {
  Rig r = MakeRig("host_capacity_mb:64", {.slab_bytes = 8 * kMiB, .capacity = 32 * kMiB},
                  {.lookahead = 1, .keep_last_layers = 0});
  SA_ASSERT_OK(r.swap->BeginIteration(2, 1));
  SA_ASSIGN_OR_FAIL(p, r.alloc->Malloc(kMiB, r.compute));
  SA_ASSIGN_OR_FAIL(t, r.swap->Offload(p, kMiB, 0, nullptr, 1));
  SA_ASSERT_OK(r.swap->ForwardEnd(0, 1));
  constexpr SwapManager::Pass kMany = 3 * SwapManager::kMaxPasses;
  for (SwapManager::Pass pass = 2; pass < 2 + kMany; ++pass) SA_ASSERT_OK(r.swap->BeginIteration(3, pass));
  // Pass 1 holds a ticket: still known, its next layer accepted and its backward prefetching.
  SA_ASSIGN_OR_FAIL(q, r.alloc->Malloc(kMiB, r.compute));
  SA_ASSIGN_OR_FAIL(u, r.swap->Offload(q, kMiB, 1, nullptr, 1));
  SA_ASSERT_OK(r.swap->BackwardBegin(1, 1));
  SA_ASSIGN_OR_FAIL(s, r.swap->State(t));
  EXPECT_EQ(s, TicketState::kPrefetching);
  // The oldest passes without tickets are forgotten; the latest are not.
  EXPECT_TRUE(absl::IsInvalidArgument(r.swap->ForwardEnd(0, 2)));
  SA_ASSERT_OK(r.swap->ForwardEnd(2, 1 + kMany));
  SA_ASSIGN_OR_FAIL(back, r.swap->Wait(t));
  SA_ASSERT_OK(r.alloc->Free(back));
  SA_ASSIGN_OR_FAIL(kept, r.swap->Wait(u));
  EXPECT_EQ(kept, q);
  SA_ASSERT_OK(r.alloc->Free(kept));
}

// Under memory pressure the allocator asks the manager to evict tensors waiting for their
// backward before it reports out of memory; they come back intact.
TEST(SwapManager, EvictsWaitingTensorsInsteadOfRunningOutOfMemory) {
  Rig r = MakeRig("host_capacity_mb:64", {.slab_bytes = 16 * kMiB, .capacity = 128 * kMiB},
                  {.lookahead = 1, .keep_last_layers = 0});
  SA_ASSERT_OK(r.swap->BeginIteration(4));
  std::vector<Saved> saved;
  std::mt19937 rng(8);
  for (int layer = 0; layer < 3; ++layer) {
    for (int k = 0; k < 2; ++k) {
      SaveFilled(r, 8 * kMiB, layer, rng(), &saved);
    }
  }
  // 48 of 64 MiB are held by registered tensors (no forward end yet): 40 MiB more cannot fit.
  SA_ASSIGN_OR_FAIL(big, r.alloc->Malloc(40 * kMiB, r.compute));
  const SwapStats st = r.swap->GetStats();
  EXPECT_GE(st.evicted_bytes, 24 * static_cast<std::int64_t>(kMiB));
  EXPECT_EQ(r.alloc->GetStats().num_ooms, 0);
  // The earliest layer went first.
  SA_ASSIGN_OR_FAIL(first, r.swap->State(saved[0].ticket));
  EXPECT_NE(first, TicketState::kRegistered);
  SA_ASSERT_OK(r.alloc->Free(big));
  for (int j = 2; j >= 0; --j) {
    for (const Saved& s : saved) {
      if (s.layer == j) CheckAndFree(r, s);
    }
  }
  // With nothing left to evict, a request that cannot fit is a real out-of-memory error.
  auto too_big = r.alloc->Malloc(80 * kMiB, r.compute);
  EXPECT_TRUE(absl::IsResourceExhausted(too_big.status()));
  EXPECT_EQ(r.alloc->GetStats().num_ooms, 1);
}

// The last layers kept on the device (their backward follows at once) leave too when nothing
// else frees enough, newest pass first: with two micro-batches in flight only the older one's
// backward comes next. They come back intact at their Wait.
TEST(SwapManager, UnderPressureKeptLastLayersLeaveNewestPassFirst) {
  Rig r = MakeRig("host_capacity_mb:64", {.slab_bytes = 16 * kMiB, .capacity = 128 * kMiB},
                  {.lookahead = 1, .keep_last_layers = 1});
  std::vector<Saved> saved;
  std::mt19937 rng(11);
  for (SwapManager::Pass pass : {1, 2}) {
    SA_ASSERT_OK(r.swap->BeginIteration(2, pass));
    for (int layer = 0; layer < 2; ++layer) {
      SA_ASSIGN_OR_FAIL(p, r.alloc->Malloc(8 * kMiB, r.compute));
      const std::uint64_t seed = rng();
      const std::vector<std::uint8_t> bytes = Pattern(8 * kMiB, seed);
      std::memcpy(p, bytes.data(), bytes.size());
      SA_ASSIGN_OR_FAIL(t, r.swap->Offload(p, 8 * kMiB, layer, nullptr, pass));
      saved.push_back({t, layer, 8 * kMiB, seed});
      SA_ASSERT_OK(r.swap->ForwardEnd(layer, pass));
    }
  }
  SA_ASSERT_OK(r.alloc->driver().SynchronizeStream(r.engine->stream(Direction::kDeviceToHost)));
  r.swap->Poll();
  SA_ASSERT_OK(r.alloc->EmptyCache());
  EXPECT_EQ(r.swap->GetStats().kept_last_layers, 2);  // 16 MiB of the 64 held
  SA_ASSIGN_OR_FAIL(filler, r.alloc->Malloc(44 * kMiB, r.compute));
  EXPECT_EQ(r.swap->GetStats().evicted, 0);
  // 60 MiB held: 8 more fit only if one kept tensor leaves (the manager is asked for 8 MiB).
  SA_ASSIGN_OR_FAIL(big, r.alloc->Malloc(8 * kMiB, r.compute));
  EXPECT_EQ(r.alloc->GetStats().num_ooms, 0);
  EXPECT_EQ(r.swap->GetStats().evicted_bytes, static_cast<std::int64_t>(8 * kMiB));
  SA_ASSIGN_OR_FAIL(older, r.swap->State(saved[1].ticket));  // pass 1's last layer
  EXPECT_EQ(older, TicketState::kKept);
  SA_ASSIGN_OR_FAIL(newer, r.swap->State(saved[3].ticket));  // pass 2's
  EXPECT_TRUE(newer == TicketState::kOffloading || newer == TicketState::kOnHost);
  SA_ASSERT_OK(r.alloc->Free(big));
  SA_ASSERT_OK(r.alloc->Free(filler));
  for (const Saved& s : saved) CheckAndFree(r, s);
  EXPECT_EQ(r.swap->GetStats().live_tickets, 0);
}

// A tensor kept on the device for want of pinned memory gets another chance under pressure:
// by then prefetches or cancels may have freed some of the pool.
TEST(SwapManager, KeptForWantOfPinnedMemoryMovesUnderPressureOnceThePoolHasRoom) {
  Rig r = MakeRig("host_capacity_mb:64", {.slab_bytes = 16 * kMiB, .capacity = 16 * kMiB},
                  {.lookahead = 1, .keep_last_layers = 0});
  SA_ASSERT_OK(r.swap->BeginIteration(3));
  std::vector<Saved> saved;
  std::mt19937 rng(5);
  for (int layer = 0; layer < 2; ++layer) {
    for (int k = 0; k < (layer == 0 ? 2 : 1); ++k) {
      SaveFilled(r, 8 * kMiB, layer, rng(), &saved);
    }
    SA_ASSERT_OK(r.swap->ForwardEnd(layer));
  }
  // Layer 0 filled the pool (16 MiB): layer 1's tensor stayed.
  SA_ASSIGN_OR_FAIL(kept, r.swap->State(saved[2].ticket));
  ASSERT_EQ(kept, TicketState::kKept);
  EXPECT_EQ(r.swap->GetStats().kept_no_host_memory, 1);
  // Layer 0's tensors die unused (their host copies go once the copies completed).
  SA_ASSERT_OK(r.swap->Cancel(saved[0].ticket));
  SA_ASSERT_OK(r.swap->Cancel(saved[1].ticket));
  SA_ASSERT_OK(r.alloc->driver().SynchronizeStream(r.engine->stream(Direction::kDeviceToHost)));
  r.swap->Poll();
  // 8 MiB held on a 64 MiB device: 60 MiB fit only if the kept tensor leaves.
  SA_ASSIGN_OR_FAIL(big, r.alloc->Malloc(60 * kMiB, r.compute));
  SA_ASSIGN_OR_FAIL(moved, r.swap->State(saved[2].ticket));
  EXPECT_NE(moved, TicketState::kKept);
  EXPECT_EQ(r.swap->GetStats().evicted_bytes, static_cast<std::int64_t>(8 * kMiB));
  EXPECT_EQ(r.swap->GetStats().kept_no_host_memory, 1);  // counted once
  EXPECT_EQ(r.alloc->GetStats().num_ooms, 0);
  SA_ASSERT_OK(r.alloc->Free(big));
  CheckAndFree(r, saved[2]);
}

// When eviction cannot make room, the out-of-memory report ends with what the swap manager
// still holds on the device, and why, in numbers.
TEST(SwapManager, OutOfMemoryReportSaysWhatTheSwapManagerHolds) {
  Rig r = MakeRig("host_capacity_mb:64", {.slab_bytes = 8 * kMiB, .capacity = 8 * kMiB},
                  {.lookahead = 1, .keep_last_layers = 1, .min_bytes = 1 * kMiB});
  SA_ASSERT_OK(r.swap->BeginIteration(3));
  std::vector<SwapManager::Ticket> held;
  auto save = [&](std::size_t bytes, int layer) {
    auto p = r.alloc->Malloc(bytes, r.compute);
    ASSERT_TRUE(p.ok()) << p.status();
    auto t = r.swap->Offload(*p, bytes, layer);
    ASSERT_TRUE(t.ok()) << t.status();
    held.push_back(*t);
  };
  save(8 * kMiB, 0);    // fills the pool
  save(6 * kMiB, 0);    // no pinned memory left
  save(4 * kMiB, 0);    // no pinned memory left
  save(512 * 1024, 0);  // below min_bytes
  SA_ASSERT_OK(r.swap->ForwardEnd(0));
  save(2 * kMiB, 1);  // no pinned memory left either
  SA_ASSERT_OK(r.swap->ForwardEnd(1));
  save(3 * kMiB, 2);  // the last layer
  SA_ASSERT_OK(r.swap->ForwardEnd(2));
  auto oom = r.alloc->Malloc(60 * kMiB, r.compute);
  ASSERT_TRUE(absl::IsResourceExhausted(oom.status())) << oom.status();
  const std::string message(oom.status().message());
  EXPECT_NE(message.find("out of memory"), std::string::npos) << message;
  EXPECT_NE(message.find("). Swap manager under this pressure:"), std::string::npos) << message;
  EXPECT_NE(message.find("moved 0 saved tensors (0 B)"), std::string::npos) << message;
  EXPECT_NE(message.find("3 (12.00 MiB) for want of pinned memory"), std::string::npos) << message;
  EXPECT_NE(message.find("8.00 MiB of its 8.00 MiB limit in use"), std::string::npos) << message;
  EXPECT_NE(message.find("1 (3.00 MiB) of the last layers"), std::string::npos) << message;
  EXPECT_NE(message.find("1 (512.00 KiB) below swap_min_kb"), std::string::npos) << message;
  EXPECT_NE(message.find("0 (0 B) of layers whose forward has not ended"), std::string::npos) << message;
  EXPECT_EQ(r.alloc->GetStats().num_ooms, 1);
  for (SwapManager::Ticket t : held) {
    SA_ASSIGN_OR_FAIL(back, r.swap->Wait(t));
    SA_ASSERT_OK(r.alloc->Free(back));
  }
}

// Memory the allocator did not make (under PyTorch: a tensor opened from another process, one of
// the uncached mode) is registered and kept where it is: never copied, never evicted, named in
// the out-of-memory report, handed back as it was.
TEST(SwapManager, ForeignMemoryIsKeptNeverCopiedNorEvicted) {
  Rig r = MakeRig("host_capacity_mb:64", {.slab_bytes = 8 * kMiB, .capacity = 32 * kMiB},
                  {.lookahead = 1, .keep_last_layers = 0, .min_bytes = 0});
  SA_ASSERT_OK(r.swap->BeginIteration(2));
  std::vector<std::uint8_t> foreign = Pattern(2 * kMiB, 5);
  int released = 0;
  EXPECT_TRUE(absl::IsInvalidArgument(r.swap->Keep(nullptr, 16, 0).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(r.swap->Keep(foreign.data(), 0, 0).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(r.swap->Keep(foreign.data(), foreign.size(), 2).status()));
  SA_ASSIGN_OR_FAIL(kept, r.swap->Keep(foreign.data(), foreign.size(), 0, [&](std::optional<Stream>) { ++released; }));
  std::vector<Saved> saved;
  SaveFilled(r, 3 * kMiB, 0, 9, &saved);
  SA_ASSERT_OK(r.swap->ForwardEnd(0));
  SA_ASSERT_OK(r.swap->ForwardEnd(1));
  SA_ASSERT_OK(r.alloc->driver().SynchronizeDevice());
  SA_ASSIGN_OR_FAIL(state, r.swap->State(kept));
  EXPECT_EQ(state, TicketState::kKept);
  EXPECT_EQ(r.swap->GetStats().kept_foreign, 1);
  EXPECT_EQ(r.swap->GetStats().offloads, 1);  // the allocator's tensor only
  // Under pressure it is not evicted, and the report says what it is.
  auto oom = r.alloc->Malloc(70 * kMiB, r.compute);  // more than the device
  ASSERT_TRUE(absl::IsResourceExhausted(oom.status())) << oom.status();
  const std::string message(oom.status().message());
  EXPECT_NE(message.find("1 (2.00 MiB) in memory the allocator did not make"), std::string::npos) << message;
  EXPECT_EQ(r.swap->GetStats().evicted, 0);
  SA_ASSIGN_OR_FAIL(back, r.swap->Wait(kept));
  EXPECT_EQ(back, foreign.data());
  EXPECT_EQ(foreign, Pattern(2 * kMiB, 5));
  EXPECT_EQ(released, 0);  // its owner keeps it
  SA_ASSERT_OK(r.swap->BackwardBegin(1));
  CheckAndFree(r, saved[0]);
}

// Training steps as a GPU runs them, on worker-thread streams: the compute stream's "kernels"
// write each saved tensor and read it back in the backward, the copy streams move it, the
// device is too small for one step's activations and the pinned pool too small for all of them
// (some stay on the device), blocks are borrowed as PyTorch storages are, and temporaries come
// and go between the saved tensors. A block unmapped or handed out while queued work still
// uses it faults (the host driver puts PROT_NONE over unmapped ranges) or fails the checks.
TEST(SwapManager, TrainingStepsUnderMemoryPressureKeepEveryByte) {
  Rig r = MakeRig("host_capacity_mb:160", {.slab_bytes = 8 * kMiB, .capacity = 96 * kMiB},
                  {.lookahead = 2, .keep_last_layers = 1, .min_bytes = 64 * 1024});
  constexpr int kLayers = 8, kPerLayer = 5, kSteps = 3;
  std::mt19937 rng(21);
  std::atomic<int> mismatches{0};
  struct Tensor {
    void* block = nullptr;
    std::size_t bytes = 0;
    std::uint64_t seed = 0;
    int layer = 0;
    std::atomic<int> refs{0};
    SwapManager::Ticket ticket = 0;
  };
  auto drop = [&r](Tensor* t) {  // a storage's last reference frees through the allocator
    if (t->refs.fetch_sub(1) == 1) SA_EXPECT_OK(r.alloc->Free(t->block));
  };
  auto kernel_write = [&r](void* p, std::size_t n, std::uint64_t seed) {
    SA_EXPECT_OK(r.host->Enqueue(r.compute, [p, n, seed] {
      const std::vector<std::uint8_t> bytes = Pattern(n, seed);
      std::memcpy(p, bytes.data(), n);
    }));
  };
  auto temporary = [&](std::size_t n) {  // allocated, written and freed in stream order
    auto p = r.alloc->Malloc(n, r.compute);
    ASSERT_TRUE(p.ok()) << p.status();
    kernel_write(*p, n, rng());
    SA_EXPECT_OK(r.alloc->Free(*p));
  };
  std::int64_t kept_before = 0;
  for (int step = 0; step < kSteps; ++step) {
    SA_ASSERT_OK(r.swap->BeginIteration(kLayers));
    std::vector<std::unique_ptr<Tensor>> saved;
    for (int layer = 0; layer < kLayers; ++layer) {
      for (int k = 0; k < kPerLayer; ++k) {
        auto t = std::make_unique<Tensor>();
        t->bytes = 32 * 1024 + rng() % (5 * kMiB);
        t->seed = rng();
        t->layer = layer;
        auto p = r.alloc->Malloc(t->bytes, r.compute);
        ASSERT_TRUE(p.ok()) << "step " << step << " layer " << layer << ": " << p.status();
        t->block = *p;
        kernel_write(t->block, t->bytes, t->seed);
        t->refs = 2;  // the model's reference and the swap manager's holder
        Tensor* raw = t.get();
        auto ticket = r.swap->Offload(t->block, t->bytes, layer, [&r, raw, drop](std::optional<Stream> s) {
          if (s.has_value()) SA_EXPECT_OK(r.alloc->RecordStream(raw->block, *s));
          drop(raw);
        });
        ASSERT_TRUE(ticket.ok()) << ticket.status();
        t->ticket = *ticket;
        temporary(64 * 1024 + rng() % (3 * kMiB));
        saved.push_back(std::move(t));
      }
      if (rng() % 3 == 0) Stall(r, Direction::kDeviceToHost, 2);
      for (auto& t : saved) {
        if (t->layer == layer) drop(t.get());  // the forward ends: the model lets go
      }
      SA_ASSERT_OK(r.swap->ForwardEnd(layer));
    }
    for (int layer = kLayers - 1; layer >= 0; --layer) {
      SA_ASSERT_OK(r.swap->BackwardBegin(layer));
      if (rng() % 3 == 0) Stall(r, Direction::kHostToDevice, 2);
      for (auto& t : saved) {
        if (t->layer != layer) continue;
        auto c = r.swap->Claim(t->ticket);
        ASSERT_TRUE(c.ok()) << "step " << step << " layer " << layer << ": " << c.status();
        void* p = c->ptr;
        const std::size_t n = t->bytes;
        const std::uint64_t seed = t->seed;
        SA_EXPECT_OK(r.host->Enqueue(r.compute, [p, n, seed, &mismatches] {
          const std::vector<std::uint8_t> bytes = Pattern(n, seed);
          if (std::memcmp(p, bytes.data(), n) != 0) mismatches.fetch_add(1);
        }));
        temporary(64 * 1024 + rng() % (2 * kMiB));
        if (c->same_block) {
          drop(t.get());  // the holder's reference, handed back with the block
        } else {
          SA_EXPECT_OK(r.alloc->Free(p));  // the new block is ours; the old one was released
        }
      }
    }
    SA_ASSERT_OK(r.alloc->driver().SynchronizeStream(r.compute));
    EXPECT_EQ(mismatches.load(), 0) << "step " << step;
    const SwapStats st = r.swap->GetStats();
    EXPECT_EQ(st.live_tickets, 0);
    if (step == 0) kept_before = st.kept_no_host_memory;
  }
  const SwapStats st = r.swap->GetStats();
  EXPECT_GT(st.offloads, 0);
  EXPECT_GT(st.kept_no_host_memory, 0);  // the pinned pool was too small for some steps' tensors
  EXPECT_GT(kept_before, 0);
  for (Direction d : {Direction::kDeviceToHost, Direction::kHostToDevice}) {
    SA_ASSERT_OK(r.alloc->driver().SynchronizeStream(r.engine->stream(d)));
  }
  r.swap->Poll();
  EXPECT_EQ(r.alloc->GetStats().allocated_bytes.all().current, 0);
  EXPECT_EQ(r.pool->GetStats().in_use_bytes, 0u);
  SA_ASSERT_OK(r.alloc->CheckInvariants());
}

TEST(SwapManager, RejectsBadInput) {
  Rig r = MakeRig("host_capacity_mb:64", {}, {});
  SA_ASSIGN_OR_FAIL(p, r.alloc->Malloc(kMiB, r.compute));
  EXPECT_TRUE(absl::IsInvalidArgument(r.swap->Offload(p, kMiB, 0).status()));  // no iteration yet
  EXPECT_FALSE(r.swap->BeginIteration(0).ok());
  SA_ASSERT_OK(r.swap->BeginIteration(2));
  EXPECT_FALSE(r.swap->Offload(nullptr, kMiB, 0).ok());
  EXPECT_FALSE(r.swap->Offload(p, 0, 0).ok());
  EXPECT_FALSE(r.swap->Offload(p, kMiB, 2).ok());
  EXPECT_FALSE(r.swap->ForwardEnd(5).ok());
  EXPECT_FALSE(r.swap->BackwardBegin(-1).ok());
  EXPECT_TRUE(absl::IsNotFound(r.swap->Wait(12345).status()));
  EXPECT_FALSE(SwapManager::Create(r.alloc.get(), r.pool.get(), r.engine.get(), r.compute, {.lookahead = 0}).ok());
  EXPECT_FALSE(SwapManager::Create(nullptr, r.pool.get(), r.engine.get(), r.compute, {}).ok());
  SA_ASSERT_OK(r.alloc->Free(p));
}

}  // namespace
}  // namespace stitchalloc::swap
