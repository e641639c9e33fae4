// The torch-free parts of the PyTorch plugin on the host driver: the PYTORCH_CUDA_ALLOC_CONF
// splitter (kept, moved, honoured, reported and rejected tokens) and the PoolSet (private pools
// as CUDA graphs and torch.cuda.MemPool use them: routing by stream filter, isolation from the
// default pool, release semantics, statistics, byte-exact contents, concurrency).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <optional>
#include <set>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "torch_plugin/alloc_conf.h"
#include "torch_plugin/pool_set.h"
#include "swap/copy_engine.h"
#include "swap/pinned_pool.h"
#include "swap/swap_manager.h"

namespace stitchalloc {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::Download;
using testing::Pattern;
using testing::Upload;

TEST(AllocConf, WithoutBackendNothingChanges) {
  SA_ASSIGN_OR_FAIL(s, SplitTorchAllocConf("expandable_segments:True,max_split_size_mb:128"));
  EXPECT_FALSE(s.enabled);
  EXPECT_EQ(s.torch, "expandable_segments:True,max_split_size_mb:128");
  EXPECT_EQ(s.stitchalloc, "");
  EXPECT_TRUE(s.notes.empty());
  SA_ASSIGN_OR_FAIL(empty, SplitTorchAllocConf(""));
  EXPECT_FALSE(empty.enabled);
  EXPECT_EQ(empty.torch, "");
}

TEST(AllocConf, SplitsEveryClassOfToken) {
  SA_ASSIGN_OR_FAIL(
      s, SplitTorchAllocConf(" backend : stitchalloc , stitching:false,chunk_size_mb:4, expandable_segments:True,"
                             "pinned_num_register_threads:8,max_split_size_mb:256,"
                             "roundup_power2_divisions:[256:1,512:2,>:8],per_process_memory_fraction:0.5"));
  EXPECT_TRUE(s.enabled);
  EXPECT_EQ(s.stitchalloc, "stitching:false,chunk_size_mb:4,max_split_size_mb:256,memory_fraction:0.5");
  EXPECT_EQ(s.torch, "pinned_num_register_threads:8");
  ASSERT_EQ(s.notes.size(), 4u);
  EXPECT_THAT(s.notes[0], HasSubstr("expandable_segments:True has no effect"));
  EXPECT_THAT(s.notes[1], HasSubstr("max_split_size_mb:256 honoured"));
  EXPECT_THAT(s.notes[2], HasSubstr("roundup_power2_divisions:[256:1,512:2,>:8] has no effect"));
  EXPECT_THAT(s.notes[3], HasSubstr("per_process_memory_fraction:0.5 honoured as stitchalloc's memory_fraction"));
  // What stitchalloc receives parses.
  SA_ASSIGN_OR_FAIL(config, ParseConfig(s.stitchalloc));
  EXPECT_FALSE(config.stitching);
  EXPECT_EQ(config.memory_fraction, 0.5);
}

TEST(AllocConf, BackendAloneLeavesNothingForTorch) {
  SA_ASSIGN_OR_FAIL(s, SplitTorchAllocConf("backend:stitchalloc"));
  EXPECT_TRUE(s.enabled);
  EXPECT_EQ(s.torch, "");
  EXPECT_EQ(s.stitchalloc, "");
}

TEST(AllocConf, RejectsWithAMessageNamingTheProblem) {
  struct Case {
    const char* text;
    const char* message;
  } cases[] = {
      {"backend:stitchalloc,foo:1", "unknown key 'foo'"},
      {"backend:stitchalloc,stitching", "malformed entry 'stitching'"},
      {"backend:stitchalloc,:1", "key and value must both be non-empty"},
      {"backend:stitchalloc,stitching:", "key and value must both be non-empty"},
      {"backend:stitchalloc,backend:native", "'backend' is given more than once"},
      {"backend:stitchalloc,backend:stitchalloc", "'backend' is given more than once"},
      {"backend:stitchalloc,stitching:maybe", "key 'stitching': invalid value 'maybe'"},
      {"backend:stitchalloc,per_process_memory_fraction:2", "key 'memory_fraction'"},
      {"backend:stitchalloc,device:1", "'device' is not accepted"},
      {"backend:stitchalloc,stitching:true,stitching:false", "stitching"},
  };
  for (const Case& c : cases) {
    auto s = SplitTorchAllocConf(c.text);
    ASSERT_FALSE(s.ok()) << c.text;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << c.text;
    EXPECT_THAT(std::string(s.status().message()), HasSubstr(c.message)) << c.text;
  }
}

TEST(AllocConf, RunTimeSettingsThatDoNotReachStitchallocAreNamed) {
  Config installed;  // max_split_size unlimited
  EXPECT_THAT(RunTimeSettingNotes("", installed), ::testing::IsEmpty());
  // PyTorch's pinned host allocator applies these; nothing to say.
  EXPECT_THAT(RunTimeSettingNotes("pinned_use_background_threads:True,pinned_num_register_threads:8", installed),
              ::testing::IsEmpty());
  std::vector<std::string> notes = RunTimeSettingNotes(
      "expandable_segments:False, max_split_size_mb:128,per_process_memory_fraction:0.5,"
      "roundup_power2_divisions:[256:1,>:8],pinned_use_cuda_host_register:True",
      installed);
  ASSERT_EQ(notes.size(), 4u);
  EXPECT_EQ(notes[0],
            "expandable_segments:False set at run time has no effect under stitchalloc: stitchalloc always maps "
            "memory with the VMM API (it never fragments into segments)");
  EXPECT_EQ(notes[1],
            "max_split_size_mb:128 set at run time does not reach stitchalloc: its max_split_size_mb is fixed when it "
            "is installed (unlimited); give it in PYTORCH_CUDA_ALLOC_CONF or stitchalloc.install()");
  EXPECT_EQ(notes[2],
            "per_process_memory_fraction:0.5 set at run time does not reach stitchalloc; "
            "torch.cuda.set_per_process_memory_fraction(0.5) does");
  EXPECT_THAT(notes[3], HasSubstr("roundup_power2_divisions:[256:1,>:8] set at run time has no effect"));
  // The value stitchalloc was installed with: nothing differs, nothing to say; another one is named.
  installed.max_split_size = 128 * kMiB;
  EXPECT_THAT(RunTimeSettingNotes("max_split_size_mb:128", installed), ::testing::IsEmpty());
  notes = RunTimeSettingNotes("max_split_size_mb:64", installed);
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_THAT(notes[0], HasSubstr("is fixed when it is installed (128 MiB)"));
  // What PyTorch rejects before an allocator hears of it (malformed, unknown) gets no note here.
  EXPECT_THAT(RunTimeSettingNotes("expandable_segments,bogus:1,max_split_size_mb:99999999999999999999", installed),
              ElementsAre(HasSubstr("max_split_size_mb:99999999999999999999 set at run time does not reach")));
}

Config HostConfig() {
  Config c;
  c.driver.choice = DriverChoice::kHost;
  c.driver.host.capacity = 256ull << 20;
  return c;
}

std::unique_ptr<PoolSet> MakePoolSet() {
  auto set = PoolSet::Create(HostConfig());
  EXPECT_TRUE(set.ok()) << set.status();
  return set.ok() ? *std::move(set) : nullptr;
}

constexpr Stream kCapture = 7;

TEST(PoolSet, CaptureStreamAllocatesFromThePrivatePoolOnly) {
  auto set = MakePoolSet();
  ASSERT_NE(set, nullptr);
  const PoolId pool{1, 0};
  SA_ASSERT_OK(set->BeginAllocateToPool(pool, [](Stream s) { return s == kCapture; }));
  EXPECT_EQ(set->PoolUseCount(pool), 1);
  SA_ASSIGN_OR_FAIL(in_pool, set->Malloc(4 << 20, kCapture));
  SA_ASSIGN_OR_FAIL(outside, set->Malloc(4 << 20, kDefaultStream));
  SA_ASSERT_OK(set->EndAllocateToPool(pool));

  std::set<PoolId> owners;
  for (const auto& seg : set->Snapshot()) {
    for (const auto& b : seg.info.blocks) {
      if (b.state != BlockState::kAllocated) continue;
      if (reinterpret_cast<void*>(b.ptr) == in_pool) {
        EXPECT_EQ(seg.pool, pool);
      }
      if (reinterpret_cast<void*>(b.ptr) == outside) {
        EXPECT_EQ(seg.pool, kDefaultPool);
      }
      owners.insert(seg.pool);
    }
  }
  EXPECT_EQ(owners.size(), 2u);
  // Only the pool's segments when asked for the pool.
  for (const auto& seg : set->Snapshot(pool)) EXPECT_EQ(seg.pool, pool);

  // A block freed into the private pool is not reused by the default pool.
  SA_ASSERT_OK(set->Free(in_pool));
  SA_ASSIGN_OR_FAIL(again, set->Malloc(4 << 20, kCapture));
  EXPECT_NE(again, in_pool);
  SA_ASSERT_OK(set->Free(again));
  SA_ASSERT_OK(set->Free(outside));
  SA_ASSERT_OK(set->ReleasePool(pool));
  EXPECT_EQ(set->PoolUseCount(pool), 0);
  EXPECT_TRUE(set->PrivatePools().empty());
}

// A captured CUDA graph replays at the addresses it was captured with, also those of blocks
// allocated and freed during the capture: a private pool's memory must stay mapped, at the same
// addresses, while the pool has users (PyTorch's allocator keeps its segments). Here a "capture"
// frees two 12 MiB intermediates and then asks for 24 MiB; afterwards the user empties the cache
// before replaying. Only the last user's release returns the pool's memory.
TEST(PoolSet, PrivatePoolMemoryStaysMappedWhileThePoolHasUsers) {
  auto set = MakePoolSet();
  ASSERT_NE(set, nullptr);
  const PoolId pool{5, 0};
  // Whether [p, p + n) lies in memory the pool maps (blocks other than absent ones).
  auto mapped = [&](void* p, std::size_t n) {
    const auto lo = reinterpret_cast<DevicePtr>(p);
    std::size_t covered = 0;
    for (const auto& seg : set->Snapshot(pool)) {
      for (const auto& b : seg.info.blocks) {
        if (b.state == BlockState::kAbsent) continue;
        const DevicePtr from = std::max(lo, b.ptr), to = std::min(lo + n, b.ptr + b.size);
        if (from < to) covered += to - from;
      }
    }
    return covered == n;
  };
  SA_ASSERT_OK(set->BeginAllocateToPool(pool, [](Stream s) { return s == kCapture; }));
  SA_ASSIGN_OR_FAIL(a, set->Malloc(12 << 20, kCapture));
  SA_ASSIGN_OR_FAIL(b, set->Malloc(12 << 20, kCapture));
  SA_ASSERT_OK(set->Free(a));
  SA_ASSERT_OK(set->Free(b));
  SA_ASSIGN_OR_FAIL(c, set->Malloc(24 << 20, kCapture));
  SA_ASSERT_OK(set->EndAllocateToPool(pool));
  EXPECT_TRUE(mapped(a, 12 << 20));
  EXPECT_TRUE(mapped(b, 12 << 20));
  SA_ASSERT_OK(set->EmptyCache());      // torch.cuda.empty_cache() before the replay
  SA_ASSERT_OK(set->EmptyCache(pool));  // the pool's own: it has a user, nothing goes
  EXPECT_TRUE(mapped(a, 12 << 20));
  EXPECT_TRUE(mapped(b, 12 << 20));
  EXPECT_TRUE(mapped(c, 24 << 20));
  SA_ASSERT_OK(set->Free(c));
  SA_ASSERT_OK(set->EmptyCache());
  EXPECT_TRUE(mapped(a, 12 << 20));
  EXPECT_TRUE(mapped(b, 12 << 20));
  EXPECT_TRUE(mapped(c, 24 << 20));
  SA_ASSERT_OK(set->ReleasePool(pool));  // the graph is gone: so is its memory
  EXPECT_TRUE(set->PrivatePools().empty());
  EXPECT_EQ(set->GetStats().reserved_bytes.all().current, 0);
}

// CUDA graph trees' checkpoints: the pool's live allocations after a recording, then later
// allocations and frees, then the pool made to hold exactly the checkpoint again (PyTorch's
// setCheckpointPoolState): what is not in it is freed, what died is allocated again at its
// address, what stayed is untouched (its bytes too). A checkpoint that cannot be restored
// fails with the reason and changes nothing.
TEST(PoolSet, PrivatePoolCheckpointsAreRestoredExactly) {
  using Live = CachingAllocator::LiveAllocation;
  auto set = MakePoolSet();
  ASSERT_NE(set, nullptr);
  const PoolId pool{6, 0};
  auto capture = [&](std::size_t n) -> void* {
    EXPECT_TRUE(set->BeginAllocateToPool(pool, [](Stream s) { return s == kCapture; }).ok());
    auto p = set->Malloc(n, kCapture);
    EXPECT_TRUE(set->EndAllocateToPool(pool).ok());
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() ? *p : nullptr;
  };
  void* x = capture(4 << 20);
  void* y = capture(1 << 20);
  void* z = capture(8 << 20);
  std::memset(z, 0x3c, 8 << 20);
  SA_ASSIGN_OR_FAIL(state, set->PoolAllocations(pool));
  ASSERT_EQ(state.size(), 3u);
  for (const Live& l : state) EXPECT_EQ(l.stream, kCapture);
  // Later: x and y die, another recording allocates w.
  SA_ASSERT_OK(set->Free(x));
  SA_ASSERT_OK(set->Free(y));
  void* w = capture(6 << 20);
  SA_ASSIGN_OR_FAIL(before, set->PoolAllocations(pool));

  // Unrestorable: a block no mapping of the pool holds. Nothing changes.
  std::vector<Live> bad = state;
  bad.push_back({0x1000, 4096, 4096, kCapture});
  const absl::Status s = set->RestorePool(pool, bad).status();
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("no mapping of this allocator holds it"));
  SA_ASSIGN_OR_FAIL(unchanged, set->PoolAllocations(pool));
  EXPECT_EQ(unchanged, before);
  std::vector<Live> twice = {state[0], state[0]};
  EXPECT_TRUE(absl::IsInvalidArgument(set->RestorePool(pool, twice).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(set->RestorePool(kDefaultPool, state).status()));
  EXPECT_TRUE(absl::IsNotFound(set->RestorePool({99, 0}, state).status()));

  SA_ASSIGN_OR_FAIL(restored, set->RestorePool(pool, state));
  SA_ASSIGN_OR_FAIL(after, set->PoolAllocations(pool));
  EXPECT_EQ(after, state);
  EXPECT_THAT(restored.freed, ::testing::UnorderedElementsAre(z, w));  // every allocation live before
  ASSERT_EQ(restored.dropped.size(), 1u);
  EXPECT_EQ(restored.dropped[0].ptr, reinterpret_cast<DevicePtr>(w));
  std::vector<void*> made;  // x and y again; z stayed
  for (const Live& l : restored.made) made.push_back(reinterpret_cast<void*>(l.ptr));
  EXPECT_THAT(made, ::testing::UnorderedElementsAre(x, y));
  const auto* bytes = static_cast<const unsigned char*>(z);
  EXPECT_EQ(std::count(bytes, bytes + (8 << 20), 0x3c), 8 << 20);  // z never left
  SA_ASSIGN_OR_FAIL(info, set->Describe(x));  // x and y are the pool's again
  EXPECT_EQ(info.size, 4u << 20);
  for (void* p : {x, y, z}) SA_ASSERT_OK(set->Free(p));
  EXPECT_TRUE(absl::IsInvalidArgument(set->Free(w)));  // w went with the restore
  EXPECT_EQ(set->PoolUseCount(pool), 4);  // one use per capture, as PyTorch's graphs hold
  for (int i = 0; i < 4; ++i) SA_ASSERT_OK(set->ReleasePool(pool));
  EXPECT_TRUE(set->PrivatePools().empty());
  EXPECT_EQ(set->GetStats().allocated_bytes.all().current, 0);
}

// Offload under memory pressure while the arena records an iteration: the caching allocator
// asks the swap manager to evict in the middle of a request the arena passed on, and the manager
// hands each block back to its owner, which frees it (as PyTorch does) through the PoolSet and so
// through the arena. The arena must hold no lock across the caching allocator's call, or the
// thread waits for itself.
TEST(PoolSet, OffloadUnderPressureWhileTheArenaRecords) {
  Config c = HostConfig();
  c.driver.host.capacity = 64ull << 20;
  SA_ASSIGN_OR_FAIL(set, PoolSet::Create(c));
  Driver& d = set->main().driver();
  SA_ASSIGN_OR_FAIL(pinned, swap::PinnedPool::Create(&d, {.slab_bytes = 8ull << 20, .capacity = 64ull << 20}));
  SA_ASSIGN_OR_FAIL(engine, swap::CopyEngine::Create(&d, {.chunk_bytes = 1ull << 20}));
  SA_ASSIGN_OR_FAIL(manager, swap::SwapManager::Create(&set->main(), pinned.get(), engine.get(), kDefaultStream,
                                                       {.lookahead = 1, .keep_last_layers = 0}));
  SA_ASSERT_OK(manager->BeginIteration(2));
  SA_ASSERT_OK(set->arena().BeginIteration(11));  // recording: requests pass to the caching allocator
  constexpr std::size_t kSaved = 8ull << 20;
  std::vector<swap::SwapManager::Ticket> tickets;
  for (int i = 0; i < 5; ++i) {  // layer 0 saves 40 MiB, still registered (its forward goes on)
    SA_ASSIGN_OR_FAIL(p, set->Malloc(kSaved, kDefaultStream));
    std::memset(p, 0x40 + i, kSaved);
    PoolSet* owner = set.get();
    SA_ASSIGN_OR_FAIL(t, manager->Offload(p, kSaved, 0, [owner, p](std::optional<Stream> in_use_by) {
      if (in_use_by.has_value()) {
        EXPECT_TRUE(owner->RecordStream(p, *in_use_by).ok());
      }
      EXPECT_TRUE(owner->Free(p).ok());
    }));
    tickets.push_back(t);
  }
  // 32 MiB more does not fit beside them: the manager evicts layer 0's tensors.
  auto request = std::async(std::launch::async, [&] { return set->Malloc(32ull << 20, kDefaultStream); });
  if (request.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
    std::fprintf(stderr, "the request under pressure never returned: deadlock\n");
    std::_Exit(1);  // the stuck thread holds locks: no orderly exit
  }
  SA_ASSIGN_OR_FAIL(q, request.get());
  EXPECT_GT(manager->GetStats().evicted, 0);
  SA_ASSERT_OK(set->Free(q));
  SA_ASSERT_OK(set->arena().EndIteration());
  for (int i = 0; i < 5; ++i) {  // the bytes come back
    SA_ASSIGN_OR_FAIL(p, manager->Wait(tickets[i]));
    SA_ASSERT_OK(d.SynchronizeStream(kDefaultStream));
    const auto* bytes = static_cast<const unsigned char*>(p);
    EXPECT_EQ(std::count(bytes, bytes + kSaved, 0x40 + i), static_cast<std::ptrdiff_t>(kSaved)) << i;
    SA_ASSERT_OK(set->Free(p));
  }
}

// set_per_process_memory_fraction caps a device's pools together, as PyTorch's fraction does (it
// capped each pool on its own, so a captured graph could take the device past the fraction).
TEST(PoolSet, MemoryFractionCapsEveryPoolTogether) {
  Config c = HostConfig();  // 256 MiB
  c.memory_fraction = 0.25;  // 64 MiB for all pools together
  SA_ASSIGN_OR_FAIL(set, PoolSet::Create(c));
  const PoolId pool{8, 0};
  SA_ASSIGN_OR_FAIL(big, set->Malloc(48ull << 20, kDefaultStream));
  SA_ASSERT_OK(set->BeginAllocateToPool(pool, [](Stream s) { return s == kCapture; }));
  const auto over = set->Malloc(32ull << 20, kCapture);  // 48 + 32 > 64
  EXPECT_TRUE(absl::IsResourceExhausted(over.status())) << over.status();
  EXPECT_THAT(std::string(over.status().message()), ::testing::HasSubstr("with the device's other pools"));
  SA_ASSIGN_OR_FAIL(fits, set->Malloc(8ull << 20, kCapture));  // 48 + 8 <= 64
  SA_ASSERT_OK(set->Free(big));
  SA_ASSERT_OK(set->EmptyCache());  // the default pool's 48 MiB go back to the device
  SA_ASSIGN_OR_FAIL(now, set->Malloc(32ull << 20, kCapture));
  SA_ASSERT_OK(set->EndAllocateToPool(pool));
  EXPECT_LE(set->GetStats().reserved_bytes.all().current, 64ll << 20);
  SA_ASSERT_OK(set->Free(fits));
  SA_ASSERT_OK(set->Free(now));
  SA_ASSERT_OK(set->ReleasePool(pool));  // the pool goes: its bytes leave the shared count
  EXPECT_TRUE(set->PrivatePools().empty());
  SA_ASSIGN_OR_FAIL(again, set->Malloc(60ull << 20, kDefaultStream));
  SA_ASSERT_OK(set->Free(again));
}

// torch.cuda.MemPool(use_on_oom=True): a default-pool request the device cannot serve is served
// from the pool's cache, and belongs to the pool; turned off (PyTorch's MemPool destructor does
// this while a graph holds the pool), or released, the pool serves no one else.
TEST(PoolSet, UseOnOomPoolServesTheDefaultPoolOnlyWhenItWouldRunOut) {
  Config c = HostConfig();  // 256 MiB
  c.memory_fraction = 0.25;  // 64 MiB for all pools together
  SA_ASSIGN_OR_FAIL(set, PoolSet::Create(c));
  const PoolId pool{5, 0};
  SA_ASSERT_OK(set->CreateOrIncrefPool(pool));
  // torch.cuda.use_mem_pool: the pool serves the current stream's requests for a while.
  SA_ASSERT_OK(set->BeginAllocateToPool(pool, [](Stream) { return true; }));
  SA_ASSIGN_OR_FAIL(cached, set->Malloc(32ull << 20, kDefaultStream));
  SA_ASSERT_OK(set->EndAllocateToPool(pool));
  SA_ASSERT_OK(set->ReleasePool(pool));  // use_mem_pool's exit: the MemPool is the one user left
  ASSERT_EQ(set->PoolUseCount(pool), 1);
  SA_ASSERT_OK(set->Free(cached));  // 32 MiB cached in the pool, kept while it has users
  SA_ASSIGN_OR_FAIL(big, set->Malloc(24ull << 20, kDefaultStream));  // 32 + 24 of 64

  // Off (the default): 24 MiB more does not fit beside the pool's cache.
  const auto refused = set->Malloc(24ull << 20, kDefaultStream);
  ASSERT_TRUE(absl::IsResourceExhausted(refused.status())) << refused.status();
  SA_ASSERT_OK(set->SetUseOnOom(pool, true));
  SA_ASSIGN_OR_FAIL(served, set->Malloc(24ull << 20, kDefaultStream));
  SA_ASSIGN_OR_FAIL(info, set->Describe(served));
  EXPECT_EQ(info.size, 24ull << 20);
  EXPECT_EQ(set->PrivatePoolStats().at(pool).allocated_bytes.all().current, 24ll << 20);
  EXPECT_LE(set->GetStats().reserved_bytes.all().current, 64ll << 20);
  // Requests the default pool can serve never go to the pool.
  SA_ASSIGN_OR_FAIL(small, set->Malloc(1 << 20, kDefaultStream));
  EXPECT_EQ(set->PrivatePoolStats().at(pool).allocated_bytes.all().current, 24ll << 20);
  SA_ASSERT_OK(set->Free(small));
  SA_ASSERT_OK(set->Free(served));  // routed to the pool
  EXPECT_EQ(set->PrivatePoolStats().at(pool).allocated_bytes.all().current, 0);

  SA_ASSERT_OK(set->SetUseOnOom(pool, false));
  EXPECT_TRUE(absl::IsResourceExhausted(set->Malloc(24ull << 20, kDefaultStream).status()));
  SA_ASSERT_OK(set->SetUseOnOom(pool, true));
  SA_ASSERT_OK(set->ReleasePool(pool));  // no users: its cache goes back, it serves no one
  EXPECT_TRUE(set->PrivatePools().empty());
  SA_ASSIGN_OR_FAIL(fits, set->Malloc(24ull << 20, kDefaultStream));  // the default pool has room now
  SA_ASSERT_OK(set->Free(fits));
  SA_ASSERT_OK(set->Free(big));

  EXPECT_EQ(set->SetUseOnOom(kDefaultPool, true).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(set->SetUseOnOom(PoolId{77, 0}, true).code(), absl::StatusCode::kFailedPrecondition);
  SA_ASSERT_OK(set->main().CheckInvariants());
}

// torch.cuda.MemPool(allocator): the pool's segments come from its own allocator (here
// functions over the host driver's memory, as a CUDAPluggableAllocator over cuMem would give
// device memory), sub-allocated as PyTorch's allocator does; everything else about a private pool
// holds: routing, isolation, statistics, snapshots, release. The allocator sees every segment
// come back.
TEST(PoolSet, MemPoolWithItsOwnAllocatorServesItsSegments) {
  auto set = MakePoolSet();
  ASSERT_NE(set, nullptr);
  Driver& driver = set->main().driver();
  std::vector<std::size_t> asked;
  std::vector<void*> freed;
  absl::flat_hash_map<void*, std::pair<PhysHandle, std::size_t>> made;
  auto source = SegmentSource::FromFunctions(
      [&](std::size_t bytes) -> void* {
        asked.push_back(bytes);
        auto chunk = driver.CreateChunk(RoundUp(bytes, driver.granularity()));
        auto va = driver.Reserve(RoundUp(bytes, driver.granularity()));
        if (!chunk.ok() || !va.ok()) return nullptr;
        if (!driver.Map(*va, RoundUp(bytes, driver.granularity()), *chunk).ok()) return nullptr;
        if (!driver.SetAccess(*va, RoundUp(bytes, driver.granularity())).ok()) return nullptr;
        made[reinterpret_cast<void*>(*va)] = {*chunk, RoundUp(bytes, driver.granularity())};
        return reinterpret_cast<void*>(*va);
      },
      [&](void* p) {
        freed.push_back(p);
        auto [chunk, bytes] = made.at(p);
        EXPECT_TRUE(driver.Unmap(reinterpret_cast<DevicePtr>(p), bytes).ok());
        EXPECT_TRUE(driver.FreeReservation(reinterpret_cast<DevicePtr>(p), bytes).ok());
        EXPECT_TRUE(driver.ReleaseChunk(chunk).ok());
        made.erase(p);
      },
      "the test's allocator");
  const PoolId pool{9, 0};
  SA_ASSERT_OK(set->CreateOrIncrefPool(pool, std::move(source)));
  // A pool's allocator is fixed when it is made.
  auto again = set->CreateOrIncrefPool(pool, SegmentSource::FromFunctions([](std::size_t) { return nullptr; },
                                                                           [](void*) {}, "another"));
  EXPECT_TRUE(absl::IsFailedPrecondition(again)) << again;
  EXPECT_EQ(set->PoolUseCount(pool), 1);

  SA_ASSERT_OK(set->BeginAllocateToPool(pool, [](Stream s) { return s == kCapture; }));
  SA_ASSIGN_OR_FAIL(a, set->Malloc(3 << 20, kCapture));
  SA_ASSIGN_OR_FAIL(b, set->Malloc(5 << 20, kCapture));
  SA_ASSIGN_OR_FAIL(c, set->Malloc(1000, kCapture));
  SA_ASSIGN_OR_FAIL(outside, set->Malloc(3 << 20, kDefaultStream));  // the default pool's
  SA_ASSERT_OK(set->EndAllocateToPool(pool));
  SA_ASSERT_OK(set->ReleasePool(pool));  // use_mem_pool's exit: the MemPool is the one user left
  EXPECT_EQ(set->PoolUseCount(pool), 1);
  EXPECT_EQ(asked, (std::vector<std::size_t>{20 << 20, 2 << 20})) << "PyTorch's segment sizes, shared";
  EXPECT_EQ(set->PoolOf(a), pool);
  EXPECT_EQ(set->PoolOf(outside), kDefaultPool);
  EXPECT_EQ(static_cast<char*>(b) - static_cast<char*>(a), 3 << 20);
  // Bytes through the driver, as kernels would write them.
  auto bytes = Pattern(5 << 20, 4);
  SA_ASSERT_OK(Upload(driver, b, bytes.data(), bytes.size()));
  std::vector<std::uint8_t> back(bytes.size());
  SA_ASSERT_OK(Download(driver, back.data(), b, back.size()));
  EXPECT_EQ(back, bytes);

  EXPECT_EQ(set->PrivatePoolStats().at(pool).reserved_bytes.all().current, 22 << 20);
  EXPECT_EQ(set->GetStats().reserved_bytes.all().current, (22 << 20) + set->main().GetStats().reserved_bytes.all().current);
  int in_pool = 0;
  for (const PoolSet::Segment& seg : set->Snapshot(pool)) {
    EXPECT_EQ(seg.pool, pool);
    ++in_pool;
  }
  EXPECT_EQ(in_pool, 2);
  SA_ASSIGN_OR_FAIL(info, set->Describe(b));
  EXPECT_EQ(info.mapping_size, 20u << 20);
  auto shared = set->Share(b);
  EXPECT_TRUE(absl::IsFailedPrecondition(shared.status())) << shared.status();
  EXPECT_THAT(std::string(shared.status().message()), HasSubstr("the test's allocator"));

  // Freed, the blocks stay in the pool's cache while it has a user (a graph may replay there).
  for (void* p : {a, b, c}) SA_ASSERT_OK(set->Free(p));
  SA_ASSERT_OK(set->EmptyCache());
  EXPECT_TRUE(freed.empty());
  // The MemPool goes: its cache returns to its allocator and the pool disappears.
  SA_ASSERT_OK(set->ReleasePool(pool));
  EXPECT_TRUE(set->PrivatePools().empty());
  EXPECT_EQ(freed.size(), 2u);
  EXPECT_TRUE(made.empty());
  SA_ASSERT_OK(set->Free(outside));
  SA_ASSERT_OK(set->main().CheckInvariants());
}

// torch.cuda.MemPool(no_split=True): set right after the pool is made, every allocation of it
// holds a whole segment (of the driver's memory here, one chunk each); once the pool holds
// memory it cannot change.
TEST(PoolSet, NoSplitPoolGivesEveryAllocationItsOwnSegment) {
  auto set = MakePoolSet();
  ASSERT_NE(set, nullptr);
  const PoolId pool{10, 0};
  SA_ASSERT_OK(set->CreateOrIncrefPool(pool));
  SA_ASSERT_OK(set->SetNoSplit(pool));
  SA_ASSERT_OK(set->SetNoSplit(pool));  // idempotent
  SA_ASSERT_OK(set->BeginAllocateToPool(pool, [](Stream) { return true; }));
  std::vector<void*> live;
  for (std::size_t n : {std::size_t{4096}, std::size_t{4096}, std::size_t{3} << 20, std::size_t{3} << 20}) {
    SA_ASSIGN_OR_FAIL(p, set->Malloc(n, kDefaultStream));
    SA_ASSIGN_OR_FAIL(info, set->Describe(p));
    EXPECT_EQ(info.ptr, info.mapping_va);
    EXPECT_EQ(info.size, info.mapping_size);
    live.push_back(p);
  }
  SA_ASSERT_OK(set->EndAllocateToPool(pool));
  SA_ASSERT_OK(set->ReleasePool(pool));  // use_mem_pool's exit
  EXPECT_EQ(set->Snapshot(pool).size(), 4u);
  EXPECT_EQ(set->PrivatePoolStats().at(pool).reserved_bytes.all().current, (2 << 20) * 2 + (20 << 20) * 2);
  // Whole driver segments share like the default pool's chunks.
  SA_ASSIGN_OR_FAIL(shared, set->Share(live[2]));
  EXPECT_EQ(shared.fds.size(), 1u);
  EXPECT_EQ(shared.offset, 0u);
  for (void* p : live) SA_ASSERT_OK(set->Free(p));

  // A pool that holds memory keeps how it splits.
  const PoolId used{11, 0};
  SA_ASSERT_OK(set->CreateOrIncrefPool(used));
  SA_ASSERT_OK(set->BeginAllocateToPool(used, [](Stream) { return true; }));
  SA_ASSIGN_OR_FAIL(q, set->Malloc(4096, kDefaultStream));
  SA_ASSERT_OK(set->EndAllocateToPool(used));
  SA_ASSERT_OK(set->ReleasePool(used));
  const absl::Status late = set->SetNoSplit(used);
  EXPECT_TRUE(absl::IsFailedPrecondition(late)) << late;
  EXPECT_THAT(std::string(late.message()), HasSubstr("holds memory already"));
  EXPECT_TRUE(absl::IsFailedPrecondition(set->SetNoSplit(PoolId{99, 0})));
  EXPECT_TRUE(absl::IsInvalidArgument(set->SetNoSplit(kDefaultPool)));
  SA_ASSERT_OK(set->Free(q));
  SA_ASSERT_OK(set->ReleasePool(used));
  SA_ASSERT_OK(set->ReleasePool(pool));
  EXPECT_TRUE(set->PrivatePools().empty());
  EXPECT_EQ(set->GetStats().reserved_bytes.all().current, set->main().GetStats().reserved_bytes.all().current);
}

// When a pool's own allocator runs out, the default pool's cache goes back to the device first,
// as PyTorch's allocator releases its cached blocks before reporting out of memory.
TEST(PoolSet, OwnAllocatorOutOfMemoryReleasesTheDefaultPoolsCacheFirst) {
  Config c = HostConfig();  // 256 MiB
  SA_ASSIGN_OR_FAIL(set, PoolSet::Create(c));
  std::atomic<bool> capturing{true};
  set->SetCaptureProbe([&] { return capturing.load(); });
  SA_ASSIGN_OR_FAIL(big, set->Malloc(200ull << 20, kDefaultStream));
  SA_ASSERT_OK(set->Free(big));  // 200 MiB cached in the default pool
  const PoolId pool{12, 0};
  SA_ASSERT_OK(set->CreateOrIncrefPool(pool));
  SA_ASSERT_OK(set->SetNoSplit(pool));  // whole driver segments: they need the device's memory
  SA_ASSERT_OK(set->BeginAllocateToPool(pool, [](Stream) { return true; }));
  // While a graph is being captured, the default pool keeps its cache: out of memory.
  auto during_capture = set->Malloc(100ull << 20, kDefaultStream);
  EXPECT_TRUE(absl::IsResourceExhausted(during_capture.status())) << during_capture.status();
  EXPECT_EQ(set->main().GetStats().reserved_bytes.all().current, 200ll << 20);
  capturing = false;
  SA_ASSIGN_OR_FAIL(p, set->Malloc(100ull << 20, kDefaultStream));
  SA_ASSERT_OK(set->EndAllocateToPool(pool));
  SA_ASSERT_OK(set->ReleasePool(pool));  // use_mem_pool's exit
  EXPECT_EQ(set->main().GetStats().reserved_bytes.all().current, 0) << "the default pool's cache went back";
  EXPECT_EQ(set->PrivatePoolStats().at(pool).num_alloc_retries, 2);
  // Past the device: out of memory, explained, and the set stays usable.
  SA_ASSERT_OK(set->BeginAllocateToPool(pool, [](Stream) { return true; }));
  auto oom = set->Malloc(200ull << 20, kDefaultStream);
  SA_ASSERT_OK(set->EndAllocateToPool(pool));
  SA_ASSERT_OK(set->ReleasePool(pool));
  ASSERT_TRUE(absl::IsResourceExhausted(oom.status())) << oom.status();
  EXPECT_THAT(std::string(oom.status().message()), HasSubstr("no_split"));
  SA_ASSERT_OK(set->Free(p));
  SA_ASSERT_OK(set->ReleasePool(pool));
  SA_ASSIGN_OR_FAIL(again, set->Malloc(200ull << 20, kDefaultStream));
  SA_ASSERT_OK(set->Free(again));
}

TEST(PoolSet, ReleasedPoolLivesUntilItsLastAllocationIsFreed) {
  auto set = MakePoolSet();
  ASSERT_NE(set, nullptr);
  const PoolId pool{3, 1};
  SA_ASSERT_OK(set->BeginAllocateToPool(pool, [](Stream) { return true; }));
  SA_ASSIGN_OR_FAIL(p, set->Malloc(1 << 20, kDefaultStream));
  SA_ASSERT_OK(set->EndAllocateToPool(pool));
  SA_ASSERT_OK(set->ReleasePool(pool));
  EXPECT_THAT(set->PrivatePools(), ElementsAre(pool));  // still holds p
  EXPECT_GT(set->GetStats().reserved_bytes.all().current, 0);
  SA_ASSERT_OK(set->Free(p));
  EXPECT_TRUE(set->PrivatePools().empty());
  const Stats s = set->GetStats();
  EXPECT_EQ(s.allocated_bytes.all().current, 0);
  EXPECT_EQ(s.reserved_bytes.all().current, 0);
  EXPECT_GE(s.allocated_bytes.all().peak, 1 << 20);  // the erased pool's history is kept
  EXPECT_GE(s.allocation.all().allocated, 1);
}

TEST(PoolSet, ContentsAreByteExactAcrossPools) {
  auto set = MakePoolSet();
  ASSERT_NE(set, nullptr);
  Driver& driver = set->main().driver();
  const PoolId pool{2, 0};
  SA_ASSERT_OK(set->CreateOrIncrefPool(pool));
  SA_ASSERT_OK(set->BeginAllocateToPool(pool, [](Stream s) { return s == kCapture; }));
  std::vector<std::pair<void*, std::vector<std::uint8_t>>> live;
  for (int i = 0; i < 24; ++i) {
    const std::size_t n = (static_cast<std::size_t>(i) * 37 + 1) << 14;
    SA_ASSIGN_OR_FAIL(p, set->Malloc(n, i % 2 ? kCapture : kDefaultStream));
    auto bytes = Pattern(n, static_cast<std::uint64_t>(i));
    SA_ASSERT_OK(Upload(driver, p, bytes.data(), n));
    live.emplace_back(p, std::move(bytes));
  }
  SA_ASSERT_OK(set->EndAllocateToPool(pool));
  for (auto& [p, bytes] : live) {
    std::vector<std::uint8_t> back(bytes.size());
    SA_ASSERT_OK(Download(driver, back.data(), p, back.size()));
    EXPECT_EQ(back, bytes);
    SA_ASSERT_OK(set->Free(p));
  }
  EXPECT_EQ(set->PoolUseCount(pool), 2);
  SA_ASSERT_OK(set->ReleasePool(pool));
  SA_ASSERT_OK(set->ReleasePool(pool));
  EXPECT_TRUE(set->PrivatePools().empty());
}

TEST(PoolSet, StatisticsSumAllPools) {
  auto set = MakePoolSet();
  ASSERT_NE(set, nullptr);
  const PoolId pool{5, 0};
  SA_ASSIGN_OR_FAIL(a, set->Malloc(3 << 20, kDefaultStream));
  SA_ASSERT_OK(set->BeginAllocateToPool(pool, [](Stream s) { return s == kCapture; }));
  SA_ASSIGN_OR_FAIL(b, set->Malloc(5 << 20, kCapture));
  const Stats s = set->GetStats();
  EXPECT_EQ(s.allocated_bytes.all().current, (3 << 20) + (5 << 20));
  EXPECT_EQ(s.allocation.all().current, 2);
  auto per_pool = set->PrivatePoolStats();
  ASSERT_EQ(per_pool.size(), 1u);
  EXPECT_EQ(per_pool.at(pool).allocated_bytes.all().current, 5 << 20);
  set->ResetPeakStats();
  SA_ASSERT_OK(set->Free(b));
  SA_ASSERT_OK(set->EndAllocateToPool(pool));
  SA_ASSERT_OK(set->ReleasePool(pool));
  SA_ASSERT_OK(set->Free(a));
  EXPECT_EQ(set->GetStats().allocated_bytes.all().current, 0);
  EXPECT_EQ(set->GetStats().allocated_bytes.all().peak, (3 << 20) + (5 << 20));
}

// Arena allocations through the PoolSet (what the torch plugin calls): described with their own
// range (PyTorch's memory history sizes, getBaseAllocation, the swap entry points and frees on a
// multi-device process use Describe), and record_stream defers their free instead of failing.
TEST(PoolSet, ArenaAllocationsAreDescribedAndTakeRecordStream) {
  auto set = MakePoolSet();
  ASSERT_NE(set, nullptr);
  SA_ASSIGN_OR_FAIL(side, set->main().driver().CreateStream());
  auto iteration = [&](std::vector<void*>* seen) {
    SA_ASSERT_OK(set->arena().BeginIteration(9));
    SA_ASSIGN_OR_FAIL(x, set->Malloc(3 << 20, 0));
    SA_ASSIGN_OR_FAIL(y, set->Malloc(1 << 20, 0));
    seen->insert(seen->end(), {x, y});
    if (set->arena().IsArenaPointer(y)) {
      SA_ASSIGN_OR_FAIL(info, set->Describe(y));
      EXPECT_EQ(info.ptr, reinterpret_cast<DevicePtr>(y));
      EXPECT_EQ(info.size, 1u << 20);
      ASSERT_FALSE(info.chunks.empty());
      EXPECT_LE(info.chunks.front().address, info.ptr);
      EXPECT_GE(info.chunks.back().address + info.chunks.back().size, info.ptr + info.size);
      SA_EXPECT_OK(set->RecordStream(y, side));
    }
    SA_ASSERT_OK(set->Free(y));
    SA_ASSERT_OK(set->Free(x));
    SA_ASSERT_OK(set->arena().EndIteration());
  };
  std::vector<void*> recorded, served;
  iteration(&recorded);
  iteration(&served);
  ASSERT_TRUE(set->arena().FindPlan(9) != nullptr);
  EXPECT_EQ(set->arena().GetStats().hits, 2);
  EXPECT_EQ(set->arena().GetStats().deferred_frees, 1);
  EXPECT_FALSE(set->Describe(served[1]).ok());  // freed
  SA_ASSERT_OK(set->main().driver().SynchronizeStream(side));
  SA_ASSERT_OK(set->arena().DropAllPlans());
  EXPECT_EQ(set->GetStats().allocated_bytes.all().current, 0);
}

TEST(PoolSet, BadUseIsRejectedAndChangesNothing) {
  auto set = MakePoolSet();
  ASSERT_NE(set, nullptr);
  const PoolId pool{9, 0};
  EXPECT_EQ(set->ReleasePool(pool).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(set->EndAllocateToPool(pool).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(set->ReleasePool(kDefaultPool).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(set->BeginAllocateToPool(kDefaultPool, [](Stream) { return true; }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(set->BeginAllocateToPool(pool, nullptr).code(), absl::StatusCode::kInvalidArgument);
  SA_ASSERT_OK(set->BeginAllocateToPool(pool, [](Stream) { return true; }));
  EXPECT_EQ(set->BeginAllocateToPool(pool, [](Stream) { return true; }).code(),
            absl::StatusCode::kFailedPrecondition);
  SA_ASSIGN_OR_FAIL(p, set->Malloc(1024, kDefaultStream));
  SA_ASSERT_OK(set->Free(p));
  EXPECT_EQ(set->Free(p).code(), absl::StatusCode::kInvalidArgument);  // double free
  int foreign = 0;
  EXPECT_EQ(set->Free(&foreign).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(set->SetMemoryFraction(0).code(), absl::StatusCode::kInvalidArgument);
  SA_ASSERT_OK(set->EndAllocateToPool(pool));
  SA_ASSERT_OK(set->ReleasePool(pool));
  // Still usable.
  SA_ASSIGN_OR_FAIL(q, set->Malloc(1024, kDefaultStream));
  SA_ASSERT_OK(set->Free(q));
  SA_ASSERT_OK(set->main().CheckInvariants());
}

TEST(PoolSet, ConcurrentCapturesAndDefaultTraffic) {
  auto set = MakePoolSet();
  ASSERT_NE(set, nullptr);
  constexpr int kThreads = 4;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const Stream mine = 100 + static_cast<Stream>(t);
      const PoolId pool{static_cast<std::uint64_t>(t + 1), 0};
      for (int round = 0; round < 20; ++round) {
        const bool capture = t % 2 == 0;
        if (capture && !set->BeginAllocateToPool(pool, [mine](Stream s) { return s == mine; }).ok()) ++failures;
        std::vector<void*> ptrs;
        for (int i = 0; i < 16; ++i) {
          auto p = set->Malloc(static_cast<std::size_t>(1 + (i * 7 + round) % 13) << 16, mine);
          if (!p.ok()) {
            ++failures;
            continue;
          }
          ptrs.push_back(*p);
        }
        for (void* p : ptrs) {
          if (!set->Free(p).ok()) ++failures;
        }
        if (capture && (!set->EndAllocateToPool(pool).ok() || !set->ReleasePool(pool).ok())) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_TRUE(set->PrivatePools().empty());
  EXPECT_EQ(set->GetStats().allocated_bytes.all().current, 0);
  SA_ASSERT_OK(set->main().CheckInvariants());
}

}  // namespace
}  // namespace stitchalloc
