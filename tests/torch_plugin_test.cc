// The PyTorch allocator (libstitchalloc_torch.so) through c10's own interface, on the host
// driver, without a GPU: installation where torch looks the allocator up, refusal after the
// native allocator is initialised, statistics in torch's types, errors as torch exceptions
// (torch.OutOfMemoryError with stitchalloc's report), memory history and snapshots, private
// pools (MemPool with its own allocator, no_split), cacheInfo, getBaseAllocation, CUDA IPC
// handles and the swap entry points. Each test runs in its own
// process (ctest), since an installation lasts for the process. Built only when a CUDA-enabled
// torch was found.
#include <c10/core/Allocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/util/Exception.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>
#include <torch/headeronly/version.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>
#include <unordered_set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "stitchalloc/torch.h"

namespace {

namespace cca = c10::cuda::CUDACachingAllocator;
namespace cda = c10::CachingDeviceAllocator;
using ::testing::HasSubstr;

constexpr const char* kHost = "driver:host,host_capacity_mb:256";

cudaStream_t StreamId(std::uintptr_t id) { return reinterpret_cast<cudaStream_t>(id); }

void Install() {
  ASSERT_EQ(stitchalloc_torch_install(kHost), 0) << stitchalloc_torch_last_error();
  ASSERT_EQ(cca::get()->name(), "stitchalloc");
}

TEST(TorchPlugin, InstallsWhereTorchLooksForTheCudaAllocator) {
  EXPECT_EQ(stitchalloc_torch_installed(), 0);
  EXPECT_NE(cca::get()->name(), "stitchalloc");
  Install();
  EXPECT_EQ(stitchalloc_torch_installed(), 1);
  EXPECT_EQ(c10::GetAllocator(c10::DeviceType::CUDA), cca::get());
  EXPECT_EQ(c10::getDeviceAllocator(c10::DeviceType::CUDA), cca::get());
  EXPECT_EQ(stitchalloc_torch_install(kHost), 0);  // same configuration: a no-op
  EXPECT_EQ(stitchalloc_torch_install("driver:host,stitching:false"), -1);
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("already installed"));
  EXPECT_EQ(stitchalloc_torch_install("driver:host,bogus:1"), -1);
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("unknown key 'bogus'"));
  EXPECT_EQ(stitchalloc_torch_installed(), 1);
}

TEST(TorchPlugin, RefusesOnceTheCurrentAllocatorIsInitialised) {
  // PyTorch's native allocator cannot be initialised without a GPU; torch's pluggable
  // allocator stands in for it (its init is what torch.cuda's lazy initialisation calls).
  auto other = torch::cuda::CUDAPluggableAllocator::createCustomAllocator(
      [](size_t, int, cudaStream_t) -> void* { return nullptr; }, [](void*, size_t, int, cudaStream_t) {});
  torch::cuda::CUDAPluggableAllocator::changeCurrentAllocator(other);  // initialises it, as CUDA use would
  ASSERT_EQ(cca::get(), other.get());
  ASSERT_TRUE(other->initialized());
  EXPECT_EQ(stitchalloc_torch_install(kHost), -1);
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("too late"));
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("Nothing was changed"));
  EXPECT_EQ(cca::get(), other.get());
  EXPECT_EQ(stitchalloc_torch_installed(), 0);
}

TEST(TorchPlugin, StatisticsInTorchsTypes) {
  Install();
  cca::CUDAAllocator* a = cca::get();
  a->init(1);
  void* p = a->raw_alloc_with_stream(3 << 20, StreamId(0));
  void* q = a->raw_alloc_with_stream(1000, StreamId(0));
  cda::DeviceStats s = a->getDeviceStats(0);
  const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  const auto small = static_cast<size_t>(c10::CachingAllocator::StatType::SMALL_POOL);
  EXPECT_EQ(s.allocation[all].current, 2);
  EXPECT_EQ(s.allocation[small].current, 1);
  EXPECT_EQ(s.allocated_bytes[all].current, (3 << 20) + 1024);  // 512-byte rounding
  EXPECT_EQ(s.requested_bytes[all].current, (3 << 20) + 1000);
  EXPECT_GE(s.reserved_bytes[all].current, s.allocated_bytes[all].current);
  EXPECT_EQ(s.max_split_size, -1);
  a->raw_delete(q);
  a->resetPeakStats(0);
  s = a->getDeviceStats(0);
  EXPECT_EQ(s.allocated_bytes[all].peak, 3 << 20);
  a->raw_delete(p);
  a->emptyCache({0, 0});
  s = a->getDeviceStats(0);
  EXPECT_EQ(s.allocated_bytes[all].current, 0);
  EXPECT_EQ(s.reserved_bytes[all].current, 0);
  a->resetAccumulatedStats(0);
  EXPECT_EQ(a->getDeviceStats(0).allocation[all].allocated, 0);

  a->setMemoryFraction(0.5, 0);
  EXPECT_EQ(a->getMemoryFraction(0), 0.5);
  EXPECT_THROW(a->setMemoryFraction(1.5, 0), c10::Error);
  EXPECT_EQ(a->getMemoryFraction(0), 0.5);
}

TEST(TorchPlugin, OutOfMemoryRaisesTorchsErrorWithTheReport) {
  Install();
  cca::CUDAAllocator* a = cca::get();
  int observed = 0;
  a->attachOutOfMemoryObserver([&](int64_t device, size_t, size_t total, size_t) {
    EXPECT_EQ(device, 0);
    EXPECT_EQ(total, 256u << 20);
    ++observed;
  });
  void* keep = a->raw_alloc_with_stream(200 << 20, StreamId(0));
  try {
    a->raw_alloc_with_stream(100 << 20, StreamId(0));
    FAIL() << "expected an out-of-memory error";
  } catch (const c10::OutOfMemoryError& e) {
    const std::string msg = e.what();
    EXPECT_THAT(msg, HasSubstr("CUDA out of memory. stitchalloc:"));
    EXPECT_THAT(msg, HasSubstr("requested"));
  }
  EXPECT_EQ(observed, 1);
  EXPECT_EQ(a->getDeviceStats(0).num_ooms, 1);
  // Still usable.
  void* small = a->raw_alloc_with_stream(1 << 20, StreamId(0));
  a->raw_delete(small);
  a->raw_delete(keep);
  int foreign = 0;
  try {
    a->raw_delete(&foreign);
    FAIL() << "expected an error for a foreign pointer";
  } catch (const c10::Error& e) {
    EXPECT_THAT(std::string(e.what()), HasSubstr("stitchalloc free"));
  }
}

TEST(TorchPlugin, HistoryAndSnapshot) {
  Install();
  cca::CUDAAllocator* a = cca::get();
  std::vector<cda::TraceEntry::Action> tracked;
  a->attachAllocatorTraceTracker([&](const cda::TraceEntry& e) { tracked.push_back(e.action_); });
  EXPECT_FALSE(a->isHistoryEnabled());
  a->recordHistory(true, nullptr, 100, cda::RecordContext::ALL, false, {});
  EXPECT_TRUE(a->isHistoryEnabled());
  void* p = a->raw_alloc_with_stream(5 << 20, StreamId(0));
  void* q = a->raw_alloc_with_stream(4096, StreamId(0));
  a->raw_delete(p);

  cca::SnapshotInfo snap = a->snapshot({0, 0}, true);
  ASSERT_EQ(snap.device_traces.size(), 1u);
  // The allocations and frees, in order (segment entries have their own test below).
  std::vector<cda::TraceEntry> trace;
  for (const auto& e : snap.device_traces[0]) {
    if (e.action_ != cda::TraceEntry::SEGMENT_ALLOC && e.action_ != cda::TraceEntry::SEGMENT_FREE) trace.push_back(e);
  }
  ASSERT_EQ(trace.size(), 4u);
  EXPECT_EQ(trace[0].action_, cda::TraceEntry::ALLOC);
  EXPECT_EQ(trace[0].addr_, reinterpret_cast<size_t>(p));
  EXPECT_EQ(trace[0].size_, 5u << 20);
  EXPECT_EQ(trace[1].action_, cda::TraceEntry::ALLOC);
  EXPECT_EQ(trace[1].size_, 4096u);
  EXPECT_EQ(trace[2].action_, cda::TraceEntry::FREE_REQUESTED);
  EXPECT_EQ(trace[3].action_, cda::TraceEntry::FREE_COMPLETED);
  EXPECT_EQ(trace[3].addr_, reinterpret_cast<size_t>(p));
  EXPECT_LE(trace[0].time_.t_, trace[3].time_.t_);
  // The first allocation mapped memory: a segment entry comes first, as in PyTorch's history.
  EXPECT_EQ(snap.device_traces[0][0].action_, cda::TraceEntry::SEGMENT_ALLOC);
  EXPECT_EQ(tracked.size(), snap.device_traces[0].size());

  size_t allocated = 0, total = 0;
  for (const auto& seg : snap.segments) {
    total += seg.total_size;
    allocated += seg.allocated_size;
    size_t blocks = 0;
    for (const auto& b : seg.blocks) blocks += b.size;
    EXPECT_EQ(blocks, seg.total_size);  // blocks tile their segment
  }
  EXPECT_EQ(allocated, 4096u);
  EXPECT_GE(total, 5u << 20);

  // max_entries keeps the newest; skip_actions drops an action; clear_history empties.
  a->recordHistory(true, nullptr, 2, cda::RecordContext::ALLOC, false, {"free_requested"});
  a->raw_delete(q);
  const cca::SnapshotInfo after = a->snapshot({0, 0}, true);
  const auto& kept = after.device_traces[0];
  ASSERT_EQ(kept.size(), 2u);
  EXPECT_EQ(kept[1].action_, cda::TraceEntry::FREE_COMPLETED);
  EXPECT_EQ(kept[1].addr_, reinterpret_cast<size_t>(q));
  a->recordHistory(true, nullptr, 10, cda::RecordContext::ALLOC, true, {});
  EXPECT_TRUE(a->snapshot({0, 0}, true).device_traces[0].empty());
  a->recordHistory(false, nullptr, 10, cda::RecordContext::NEVER, false, {});
  void* r = a->raw_alloc_with_stream(1024, StreamId(0));
  a->raw_delete(r);
  EXPECT_TRUE(a->snapshot({0, 0}, true).device_traces[0].empty());
}

// torch.cuda.memory._set_memory_metadata, _record_memory_history(compile_context=True) and
// (torch 2.14 on) _annotate_tensor: what the entries of the memory history carry.
TEST(TorchPlugin, HistoryEntriesCarryUserMetadataCompileContextAndAnnotations) {
  Install();
  cca::CUDAAllocator* a = cca::get();
  std::vector<cda::TraceEntry> tracked;
  a->attachAllocatorTraceTracker([&](const cda::TraceEntry& e) { tracked.push_back(e); });
  a->recordHistory(true, nullptr, 1000, cda::RecordContext::ALL, false, {});
  auto entries = [&] { return a->snapshot({0, 0}, true).device_traces[0]; };

  // The metadata is the calling thread's: another thread neither sees it nor stamps it. Every
  // entry a call makes carries it, those of the segments it maps included.
  EXPECT_EQ(a->getUserMetadata(), "");
  a->setUserMetadata("{\"phase\":\"forward\"}");
  EXPECT_EQ(a->getUserMetadata(), "{\"phase\":\"forward\"}");
  void* p = a->raw_alloc_with_stream(5 << 20, StreamId(0));
  const size_t by_this_thread = entries().size();
  std::string other_thread_sees = "unset";
  void* q = nullptr;
  std::thread([&] {
    other_thread_sees = a->getUserMetadata();
    q = a->raw_alloc_with_stream(4096, StreamId(0));
  }).join();
  EXPECT_EQ(other_thread_sees, "");
  const size_t by_the_other = entries().size();
  a->setUserMetadata("");
  a->raw_delete(q);
  std::vector<cda::TraceEntry> trace = entries();
  ASSERT_EQ(by_this_thread, 2u);  // p's segment, then p
  EXPECT_EQ(trace[0].action_, cda::TraceEntry::SEGMENT_ALLOC);
  EXPECT_EQ(trace[1].action_, cda::TraceEntry::ALLOC);
  ASSERT_GT(by_the_other, by_this_thread);
  ASSERT_EQ(trace.size(), by_the_other + 2);  // q's two free entries
  for (size_t i = 0; i < trace.size(); ++i) {
    EXPECT_EQ(trace[i].user_metadata_, i < by_this_thread ? "{\"phase\":\"forward\"}" : "") << "entry " << i;
    EXPECT_EQ(trace[i].compile_context_, "N/A");  // PyTorch's word for outside any compiled region
  }
  EXPECT_EQ(tracked.size(), trace.size());
  EXPECT_EQ(tracked[1].user_metadata_, "{\"phase\":\"forward\"}");  // trackers hear the same

  // Compiled regions nest; entries carry the innermost; an unmatched pop is harmless.
  std::string outer = "Torch-Compiled Region: 0/0", inner = "Torch-Compiled Region: 1/0";
  const size_t mark = trace.size();
  a->pushCompileContext(outer);
  void* r = a->raw_alloc_with_stream(4096, StreamId(0));  // q's cached block: no segment entry
  a->pushCompileContext(inner);
  a->raw_delete(r);
  a->popCompileContext();
  void* t = a->raw_alloc_with_stream(4096, StreamId(0));
  a->popCompileContext();
  a->popCompileContext();
  a->raw_delete(t);
  trace = entries();
  std::vector<std::pair<int, std::string>> regions;
  for (size_t i = mark; i < trace.size(); ++i) regions.emplace_back(trace[i].action_, trace[i].compile_context_);
  const std::vector<std::pair<int, std::string>> want = {
      {cda::TraceEntry::ALLOC, outer},          {cda::TraceEntry::FREE_REQUESTED, inner},
      {cda::TraceEntry::FREE_COMPLETED, inner}, {cda::TraceEntry::ALLOC, outer},
      {cda::TraceEntry::FREE_REQUESTED, "N/A"}, {cda::TraceEntry::FREE_COMPLETED, "N/A"}};
  EXPECT_EQ(regions, want);

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 14)
  EXPECT_TRUE(a->supportsUserMetadata());
  // An annotation: its own entry at the allocation's base, with the allocation's size and pool,
  // the annotation as its metadata; the allocation's own entries are unchanged.
  const size_t before = entries().size();
  a->setUserMetadata("ignored by the annotation");
  a->annotateMemory(p, "packed for backward");
  a->setUserMetadata("");
  trace = entries();
  ASSERT_EQ(trace.size(), before + 1);
  const cda::TraceEntry& note = trace.back();
  EXPECT_EQ(note.action_, cda::TraceEntry::ANNOTATE);
  EXPECT_EQ(note.addr_, reinterpret_cast<size_t>(p));
  EXPECT_EQ(note.size_, 5u << 20);
  EXPECT_EQ(note.user_metadata_, "packed for backward");
  EXPECT_EQ(note.mempool_, (c10::MempoolId_t{0, 0}));
  EXPECT_EQ(tracked.back().action_, cda::TraceEntry::ANNOTATE);
  // Not the base of a live allocation: torch's error naming the pointer, and nothing recorded.
  void* inside = static_cast<char*>(p) + 512;
  try {
    a->annotateMemory(inside, "x");
    ADD_FAILURE() << "an interior pointer was annotated";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("no live allocation found at pointer"));
  }
  a->raw_delete(p);
  EXPECT_THROW(a->annotateMemory(p, "after free"), c10::Error);
  EXPECT_EQ(entries().size(), before + 1 + 2);  // p's two free entries only (its segment is cached)
  a->recordHistory(false, nullptr, 1000, cda::RecordContext::NEVER, false, {});
#else
  a->raw_delete(p);
  a->recordHistory(false, nullptr, 1000, cda::RecordContext::NEVER, false, {});
#endif
}

TEST(TorchPlugin, PrivatePoolsThroughTorchsInterface) {
  Install();
  cca::CUDAAllocator* a = cca::get();
  const c10::MempoolId_t pool{1, 0};
  a->beginAllocateToPool(0, pool, [](cudaStream_t s) { return s == StreamId(7); });
  void* in_pool = a->raw_alloc_with_stream(2 << 20, StreamId(7));
  void* outside = a->raw_alloc_with_stream(2 << 20, StreamId(0));
  a->endAllocateToPool(0, pool);
  EXPECT_EQ(a->getPoolUseCount(0, pool), 1);
  EXPECT_TRUE(a->checkPoolLiveAllocations(0, pool, {in_pool}));
  EXPECT_FALSE(a->checkPoolLiveAllocations(0, pool, {outside}));

  bool seen = false;
  for (const auto& seg : a->snapshot(pool, false).segments) {
    EXPECT_EQ(seg.owner_private_pool_id, pool);
    seen = seen || (seg.address <= reinterpret_cast<size_t>(in_pool) &&
                    reinterpret_cast<size_t>(in_pool) < seg.address + seg.total_size);
  }
  EXPECT_TRUE(seen);
#if TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 13
  EXPECT_GT(a->getDeviceStats(0).reserved_bytes_by_private_pools.at(pool)[0].current, 0);
#endif
  a->releasePool(0, pool);
  EXPECT_EQ(a->getPoolUseCount(0, pool), 0);
  a->raw_delete(in_pool);  // the released pool goes with its last allocation
  EXPECT_TRUE(a->snapshot(pool, false).segments.empty() || a->snapshot(pool, false).segments[0].owner_private_pool_id != pool);
  a->raw_delete(outside);
  EXPECT_THROW(a->releasePool(0, pool), c10::Error);
}

// torch.cuda.MemPool(no_split=True) through c10: every allocation of the pool is a segment of
// its own in the snapshot; once the pool holds memory, setNoSplit is refused.
TEST(TorchPlugin, NoSplitMemPoolThroughTorchsInterface) {
  Install();
  cca::CUDAAllocator* a = cca::get();
  const c10::MempoolId_t pool{5, 0};
  a->createOrIncrefPool(0, pool, nullptr);  // torch.cuda.MemPool(no_split=True)'s constructor
  a->setNoSplit(0, pool);
  a->beginAllocateToPool(0, pool, [](cudaStream_t s) { return s == StreamId(7); });
  void* x = a->raw_alloc_with_stream(4096, StreamId(7));
  void* y = a->raw_alloc_with_stream(4096, StreamId(7));
  a->endAllocateToPool(0, pool);
  a->releasePool(0, pool);  // use_mem_pool's exit
  std::vector<const void*> starts;
  for (const auto& seg : a->snapshot(pool, false).segments) {
    if (seg.owner_private_pool_id != pool) continue;
    ASSERT_EQ(seg.blocks.size(), 1u) << "a no_split segment holds one block";
    EXPECT_TRUE(seg.blocks[0].allocated);
    starts.push_back(reinterpret_cast<const void*>(seg.address));
  }
  EXPECT_THAT(starts, ::testing::UnorderedElementsAre(x, y));
  try {
    a->setNoSplit(0, pool);  // already set: nothing to do
  } catch (const c10::Error& e) {
    ADD_FAILURE() << e.what();
  }
  const c10::MempoolId_t used{6, 0};
  a->beginAllocateToPool(0, used, [](cudaStream_t s) { return s == StreamId(7); });
  void* z = a->raw_alloc_with_stream(4096, StreamId(7));
  a->endAllocateToPool(0, used);
  try {
    a->setNoSplit(0, used);
    ADD_FAILURE() << "setNoSplit on a pool that holds memory";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("holds memory already"));
  }
  for (void* p : {x, y, z}) a->raw_delete(p);
  a->releasePool(0, used);
  a->releasePool(0, pool);
  EXPECT_EQ(a->getPoolUseCount(0, pool), 0);
}

// torch.cuda.MemPool(allocator): the pool's segments come from the given allocator's raw_alloc
// and go back through its raw_delete. Where CUDA is present, the pluggable allocator's functions
// (host memory here, which the host driver uses as device memory) serve the pool; without CUDA
// the pluggable allocator itself cannot tell its device, and that failure must reach the caller
// as torch's error naming the pool's allocator, with nothing else disturbed.
std::vector<std::size_t> g_pluggable_sizes;
int g_pluggable_frees = 0;

TEST(TorchPlugin, MemPoolWithItsOwnAllocatorThroughTorchsInterface) {
  Install();
  cca::CUDAAllocator* a = cca::get();
  auto pluggable = torch::cuda::CUDAPluggableAllocator::createCustomAllocator(
      [](size_t size, int, cudaStream_t) -> void* {
        g_pluggable_sizes.push_back(size);
        return std::aligned_alloc(4096, size);
      },
      [](void* p, size_t, int, cudaStream_t) {
        ++g_pluggable_frees;
        std::free(p);
      });
  const c10::MempoolId_t pool{8, 0};
  a->createOrIncrefPool(0, pool, pluggable);
  EXPECT_EQ(a->getPoolUseCount(0, pool), 1);
  a->beginAllocateToPool(0, pool, [](cudaStream_t s) { return s == StreamId(7); });
  void* p = nullptr;
  std::string error;
  try {
    p = a->raw_alloc_with_stream(3 << 20, StreamId(7));
  } catch (const c10::Error& e) {
    error = e.what();
  }
  a->endAllocateToPool(0, pool);
  a->releasePool(0, pool);
  void* outside = a->raw_alloc_with_stream(1 << 20, StreamId(0));  // the default pool is unaffected
  ASSERT_NE(outside, nullptr);
  if (p != nullptr) {
    EXPECT_EQ(g_pluggable_sizes, std::vector<std::size_t>{20 << 20});
    std::memset(p, 0x5a, 3 << 20);
    bool found = false;
    for (const auto& seg : a->snapshot(pool, false).segments) {
      found = found || (seg.owner_private_pool_id == pool && seg.address == reinterpret_cast<size_t>(p) &&
                        seg.total_size == (20u << 20));
    }
    EXPECT_TRUE(found) << "the pluggable allocator's segment, in the pool";
    a->raw_delete(p);
  } else {
    EXPECT_THAT(error, HasSubstr("the MemPool's own allocator (pluggable) failed"));
    EXPECT_TRUE(g_pluggable_sizes.empty());
  }
  a->raw_delete(outside);
  a->releasePool(0, pool);  // the MemPool goes: its segments go back through raw_delete
  EXPECT_EQ(g_pluggable_frees, static_cast<int>(g_pluggable_sizes.size()));
  for (const auto& seg : a->snapshot({0, 0}, false).segments) EXPECT_NE(seg.owner_private_pool_id, pool);
}

// What the memory history says of pools and segments, as PyTorch's allocator says it: every
// entry names the pool it concerns (NCCL's allocator hook registers a MemPool's memory by it);
// segment_alloc / segment_free entries follow the segments (so that _memory_viz draws reserved
// memory over time), carry the pool and the stacks of the allocation that mapped them, and
// replayed, give the segments of the snapshot; a tracker hears the same entries.
TEST(TorchPlugin, MemoryHistoryNamesPoolsAndSegments) {
  Install();
  cca::CUDAAllocator* a = cca::get();
  a->init(1);
  std::vector<cda::TraceEntry> tracked;
  a->attachAllocatorTraceTracker([&](const cda::TraceEntry& e) { tracked.push_back(e); });
  static int contexts = 0;
  a->recordHistory(true, [] { ++contexts; return std::make_shared<c10::GatheredContext>(); }, 1000,
                   cda::RecordContext::ALL, false, {});
  const c10::MempoolId_t def{0, 0}, pool{3, 0};
  void* big = a->raw_alloc_with_stream(20 << 20, StreamId(0));
  a->beginAllocateToPool(0, pool, [](cudaStream_t s) { return s == StreamId(7); });
  void* in_pool = a->raw_alloc_with_stream(4 << 20, StreamId(7));
  a->endAllocateToPool(0, pool);

  // Replays the segment entries up to now and compares them with the snapshot's segments.
  auto replayed_matches_snapshot = [&] {
    const cca::SnapshotInfo snap = a->snapshot(def, true);
    std::map<size_t, std::pair<size_t, c10::MempoolId_t>> live, shown;
    bool consistent = true;
    for (const auto& e : snap.device_traces[0]) {
      if (e.action_ == cda::TraceEntry::SEGMENT_ALLOC) {
        consistent = live.emplace(e.addr_, std::make_pair(e.size_, e.mempool_)).second && consistent;
      } else if (e.action_ == cda::TraceEntry::SEGMENT_FREE) {
        auto it = live.find(e.addr_);
        consistent = it != live.end() && it->second == std::make_pair(e.size_, e.mempool_) && consistent;
        if (it != live.end()) live.erase(it);
      }
    }
    for (const auto& seg : snap.segments) shown[seg.address] = {seg.total_size, seg.owner_private_pool_id};
    return consistent && live == shown;
  };
  EXPECT_TRUE(replayed_matches_snapshot());

  std::vector<cda::TraceEntry> trace = a->snapshot(def, true).device_traces[0];
  ASSERT_EQ(trace.size(), 4u);
  EXPECT_EQ(trace[0].action_, cda::TraceEntry::SEGMENT_ALLOC);
  EXPECT_EQ(trace[0].mempool_, def);
  EXPECT_EQ(trace[1].action_, cda::TraceEntry::ALLOC);
  EXPECT_EQ(trace[1].mempool_, def);
  EXPECT_EQ(trace[2].action_, cda::TraceEntry::SEGMENT_ALLOC);
  EXPECT_EQ(trace[2].mempool_, pool);
  EXPECT_EQ(trace[2].stream_, StreamId(7));
  EXPECT_EQ(trace[3].action_, cda::TraceEntry::ALLOC);
  EXPECT_EQ(trace[3].addr_, reinterpret_cast<size_t>(in_pool));
  EXPECT_EQ(trace[3].mempool_, pool);
  // One context per allocation, shared by the segment it mapped.
  EXPECT_EQ(contexts, 2);
  ASSERT_NE(trace[1].context_, nullptr);
  EXPECT_EQ(trace[0].context_, trace[1].context_);
  EXPECT_EQ(trace[2].context_, trace[3].context_);

  // Freed, released and emptied: frees name the pool, and every segment goes.
  a->raw_delete(in_pool);
  a->releasePool(0, pool);
  a->raw_delete(big);
  a->emptyCache(def);
  trace = a->snapshot(def, true).device_traces[0];
  ASSERT_EQ(trace.size(), 10u);
  EXPECT_EQ(trace[4].action_, cda::TraceEntry::FREE_REQUESTED);
  EXPECT_EQ(trace[4].mempool_, pool);
  EXPECT_EQ(trace[5].action_, cda::TraceEntry::FREE_COMPLETED);
  EXPECT_EQ(trace[5].mempool_, pool);
  EXPECT_EQ(trace[6].action_, cda::TraceEntry::SEGMENT_FREE);  // the released pool's memory
  EXPECT_EQ(trace[6].addr_, trace[2].addr_);
  EXPECT_EQ(trace[6].size_, trace[2].size_);
  EXPECT_EQ(trace[6].mempool_, pool);
  EXPECT_EQ(trace[7].mempool_, def);
  EXPECT_EQ(trace[8].mempool_, def);
  EXPECT_EQ(trace[9].action_, cda::TraceEntry::SEGMENT_FREE);
  EXPECT_EQ(trace[9].addr_, trace[0].addr_);
  // Stacks of frees (RecordContext::ALL), as PyTorch records them: one per free, shared by its
  // two entries; emptyCache's segment frees carry emptyCache's; releasePool gathers none.
  ASSERT_NE(trace[4].context_, nullptr);
  EXPECT_EQ(trace[4].context_, trace[5].context_);
  EXPECT_EQ(trace[6].context_, nullptr);
  ASSERT_NE(trace[7].context_, nullptr);
  EXPECT_EQ(trace[7].context_, trace[8].context_);
  ASSERT_NE(trace[9].context_, nullptr);
  EXPECT_NE(trace[9].context_, trace[7].context_);
  EXPECT_TRUE(a->snapshot(def, false).segments.empty());
  EXPECT_TRUE(replayed_matches_snapshot());

  ASSERT_EQ(tracked.size(), trace.size());
  for (size_t i = 0; i < trace.size(); ++i) {
    EXPECT_EQ(tracked[i].action_, trace[i].action_);
    EXPECT_EQ(tracked[i].addr_, trace[i].addr_);
    EXPECT_EQ(tracked[i].mempool_, trace[i].mempool_);
  }

  // With the history off, a tracker still hears segments and allocations; the history nothing.
  const int contexts_before = contexts;
  a->recordHistory(false, nullptr, 1000, cda::RecordContext::NEVER, false, {});
  void* quiet = a->raw_alloc_with_stream(30 << 20, StreamId(0));
  ASSERT_EQ(tracked.size(), trace.size() + 2);
  EXPECT_EQ(tracked[trace.size()].action_, cda::TraceEntry::SEGMENT_ALLOC);
  EXPECT_EQ(tracked.back().action_, cda::TraceEntry::ALLOC);
  EXPECT_EQ(tracked.back().context_, nullptr);
  EXPECT_EQ(contexts, contexts_before);
  EXPECT_EQ(a->snapshot(def, true).device_traces[0].size(), trace.size());
  a->raw_delete(quiet);
}

// CUDA graph trees (torch.compile mode="reduce-overhead") through torch's interface: a private
// pool's checkpoint after a recording, and its restore as torch._C._cuda_setCheckpointPoolState
// uses it after a later recording: the pointers freed, DataPtrs with stitchalloc's deleter for
// the checkpoint's allocations, and a memory history in which every free has its alloc.
TEST(TorchPlugin, GraphTreesCheckpointAndRestoreAPrivatePool) {
  Install();
  cca::CUDAAllocator* a = cca::get();
  a->init(1);
  a->recordHistory(true, nullptr, 1000, cda::RecordContext::ALL, false, {});
  const c10::MempoolId_t pool{2, 0};
  auto filter = [](cudaStream_t s) { return s == StreamId(7); };
  a->beginAllocateToPool(0, pool, filter);
  void* out1 = a->raw_alloc_with_stream(3 << 20, StreamId(7));
  a->raw_delete(a->raw_alloc_with_stream(1 << 20, StreamId(7)));  // an intermediate
  a->endAllocateToPool(0, pool);
  const std::shared_ptr<cca::AllocatorState> state = a->getCheckpointState(0, pool);
  ASSERT_NE(state, nullptr);
  a->raw_delete(out1);  // the recorded output dies; a later recording allocates another
  a->beginAllocateToPool(0, pool, filter);
  void* out2 = a->raw_alloc_with_stream(5 << 20, StreamId(7));
  a->endAllocateToPool(0, pool);

  cca::CheckpointDelta delta = a->setCheckpointPoolState(0, state);
  ASSERT_EQ(delta.ptrs_freed.size(), 1u);
  EXPECT_EQ(delta.ptrs_freed[0], out2);
  ASSERT_EQ(delta.dataptrs_allocd.size(), 1u);
  EXPECT_EQ(delta.dataptrs_allocd[0].get(), out1);
  EXPECT_EQ(delta.dataptrs_allocd[0].get_deleter(), a->raw_deleter());
  EXPECT_TRUE(a->checkPoolLiveAllocations(0, pool, {out1}));
  // What torch does with an allocation no live storage takes: it releases the context and
  // frees the pointer itself.
  (void)delta.dataptrs_allocd[0].release_context();
  a->raw_delete(out1);
  EXPECT_TRUE(a->checkPoolLiveAllocations(0, pool, {}));

  std::unordered_set<size_t> live;
  int unpaired = 0, allocs = 0;
  const cca::SnapshotInfo snap = a->snapshot({0, 0}, true);
  for (const auto& e : snap.device_traces[0]) {
    if (e.action_ == cda::TraceEntry::ALLOC) {
      ++allocs;
      unpaired += live.insert(e.addr_).second ? 0 : 1;
    } else if (e.action_ == cda::TraceEntry::FREE_COMPLETED) {
      unpaired += live.erase(e.addr_) == 1 ? 0 : 1;
    }
  }
  EXPECT_EQ(allocs, 4);  // out1, the intermediate, out2, out1 again
  EXPECT_EQ(unpaired, 0);
  EXPECT_TRUE(live.empty());

  struct Foreign : cca::AllocatorState {};
  EXPECT_THROW(a->setCheckpointPoolState(0, std::make_shared<Foreign>()), c10::Error);
  EXPECT_THROW(a->getCheckpointState(0, {0, 0}), c10::Error);   // the default pool
  EXPECT_THROW(a->getCheckpointState(0, {77, 0}), c10::Error);  // no such pool
  a->releasePool(0, pool);
  a->releasePool(0, pool);
  EXPECT_EQ(a->getPoolUseCount(0, pool), 0);
}

TEST(TorchPlugin, CacheInfoAndBaseAllocation) {
  Install();
  cca::CUDAAllocator* a = cca::get();
  void* p = a->raw_alloc_with_stream(6 << 20, StreamId(0));
  size_t base_size = 0;
  void* base = a->getBaseAllocation(p, &base_size);
  EXPECT_LE(reinterpret_cast<size_t>(base), reinterpret_cast<size_t>(p));
  EXPECT_GE(reinterpret_cast<size_t>(base) + base_size, reinterpret_cast<size_t>(p) + (6 << 20));
  a->raw_delete(p);
  size_t largest = 0;
  a->cacheInfo(0, &largest);
  EXPECT_GE(largest, 6u << 20);
  EXPECT_LE(largest, 256u << 20);
  int foreign = 0;
  EXPECT_THROW(a->getBaseAllocation(&foreign, &base_size), c10::Error);
}

// CUDA IPC (what torch.multiprocessing calls): shareIpcHandle gives a handle in PyTorch's
// expandable-segment format whose offset locates the tensor; getIpcDevPtr maps it (here in the
// same process; ipc_test does two) and caches it while in use, as PyTorch does; bad input
// raises c10::Error naming the problem.
// torch.cuda.memory.caching_allocator_enable(False): PyTorch's uncached mode, each allocation
// its own segment, given back when freed, outside the statistics and the history.
TEST(TorchPlugin, UncachedModeWhileTheCachingAllocatorIsDisabled) {
  Install();
  cca::CUDAAllocator* a = cca::get();
  auto allocated = [&] { return a->getDeviceStats(0).allocated_bytes[0].current; };
  auto reserved = [&] { return a->getDeviceStats(0).reserved_bytes[0].current; };
  a->recordHistory(true, nullptr, 1000, cda::RecordContext::ALL, false, {});
  void* cached = a->raw_alloc_with_stream(1 << 20, StreamId(0));  // made while caching
  const auto allocated0 = allocated(), reserved0 = reserved();
  const size_t entries0 = a->snapshot({0, 0}, true).device_traces[0].size();

  EXPECT_TRUE(a->isEnabled());
  a->enable(false);
  EXPECT_FALSE(a->isEnabled());
  EXPECT_NE(a->raw_deleter(), nullptr);
  const std::size_t n = 3 << 20;
  void* p = a->raw_alloc_with_stream(n, StreamId(0));
  std::vector<unsigned char> bytes(n);
  for (std::size_t i = 0; i < n; ++i) bytes[i] = static_cast<unsigned char>(i * 7 + 1);
  std::memcpy(p, bytes.data(), n);
  c10::DataPtr t = a->allocate(1000);
  EXPECT_EQ(t.get_deleter(), a->raw_deleter());
  std::memset(t.get(), 0x5a, 1000);
  EXPECT_EQ(allocated(), allocated0);  // outside the statistics and the history, as in PyTorch
  EXPECT_EQ(reserved(), reserved0);
  EXPECT_EQ(a->snapshot({0, 0}, true).device_traces[0].size(), entries0);
  size_t base_size = 0;
  EXPECT_EQ(a->getBaseAllocation(p, &base_size), p);
  EXPECT_EQ(base_size, 4u << 20);  // its own segment, rounded to the host driver's 2 MiB
  // Another process's view of it (here: this one's): the same bytes.
  const cca::ShareableHandle shared = a->shareIpcHandle(p);
  EXPECT_EQ(shared.offset, 0);
  std::shared_ptr<void> opened = a->getIpcDevPtr(shared.handle);
  EXPECT_EQ(0, std::memcmp(opened.get(), bytes.data(), n));
  opened.reset();

  // Nothing is kept: most of the device in turns of different sizes (256 MiB, of which 2 MiB is
  // the default pool's for `cached` and 8 MiB the two above), each fitting only if the one before
  // went back.
  for (std::size_t mib : {200, 240, 180, 240}) {
    void* big = a->raw_alloc(mib << 20);
    a->raw_delete(big);
  }
  // Out of memory: torch's error, naming the mode; the allocator goes on.
  try {
    a->raw_alloc(300 << 20);
    ADD_FAILURE() << "300 MiB on a 256 MiB device";
  } catch (const c10::OutOfMemoryError& e) {
    EXPECT_THAT(e.what(), HasSubstr("PYTORCH_NO_CUDA_MEMORY_CACHING"));
  }
  int foreign = 0;
  EXPECT_THROW(a->raw_delete(&foreign), c10::Error);

  // Memory is freed the way it was made, whatever the mode is by then.
  a->raw_deleter()(cached);                   // made cached, freed with the uncached deleter
  EXPECT_EQ(allocated(), allocated0 - (1 << 20));
  a->enable(true);
  EXPECT_EQ(0, std::memcmp(p, bytes.data(), n));
  a->raw_delete(p);                           // made uncached, freed while caching
  t.clear();                                  // its own deleter
  void* again = a->raw_alloc_with_stream(1 << 20, StreamId(0));
  EXPECT_EQ(allocated(), allocated0);         // cached again
  a->raw_delete(again);
  a->recordHistory(false, nullptr, 1000, cda::RecordContext::NEVER, false, {});
}

TEST(TorchPlugin, CudaIpcHandlesShareAndOpen) {
  Install();
  cca::CUDAAllocator* a = cca::get();
  const std::size_t n = 5 << 20;
  void* p = a->raw_alloc_with_stream(n, StreamId(0));
  std::vector<unsigned char> bytes(n);
  for (std::size_t i = 0; i < n; ++i) bytes[i] = static_cast<unsigned char>(i * 131 + 7);
  std::memcpy(p, bytes.data(), n);  // the host driver's memory is host-addressable

  const cca::ShareableHandle shared = a->shareIpcHandle(p);
  ASSERT_GE(shared.handle.size(), 2u);
  EXPECT_EQ(shared.handle[0], 2);
  EXPECT_EQ(shared.handle[1], 'e');
  EXPECT_LT(shared.offset, 2 << 20) << "offset from the first chunk under the tensor";
  std::shared_ptr<void> opened = a->getIpcDevPtr(shared.handle);
  ASSERT_NE(opened, nullptr);
  EXPECT_NE(opened.get(), p);
  auto* view = static_cast<unsigned char*>(opened.get()) + shared.offset;
  EXPECT_EQ(0, std::memcmp(view, bytes.data(), n));
  view[n - 1] = 0x42;
  EXPECT_EQ(static_cast<unsigned char*>(p)[n - 1], 0x42);
  EXPECT_EQ(a->getIpcDevPtr(shared.handle).get(), opened.get()) << "opened once while in use";
  opened.reset();
  std::shared_ptr<void> reopened = a->getIpcDevPtr(shared.handle);  // after the last user let go
  EXPECT_EQ(static_cast<unsigned char*>(reopened.get())[shared.offset + n - 1], 0x42);
  reopened.reset();
  a->raw_delete(p);

  int foreign = 0;
  try {
    a->shareIpcHandle(&foreign);
    ADD_FAILURE() << "shared a foreign pointer";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("is not an allocation of stitchalloc"));
  }
  try {
    a->getIpcDevPtr("not a handle");
    ADD_FAILURE() << "opened garbage";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("IPC handle"));
  }
  try {
    a->getIpcDevPtr(std::string("\x02" "c", 2) + std::string(64, '\0'));
    ADD_FAILURE() << "opened a cudaMalloc handle without a GPU";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("needs a GPU"));
  }
}

// The arena marks reach the installed allocator: the first iteration of a signature is
// recorded, the second is served at planned offsets (the same addresses, counted as hits), a
// mismatch is counted, and misuse fails with a reason instead of throwing across the C API.
namespace arena_marks {

std::int64_t Stat(const std::string& name) {
  const char* text = stitchalloc_torch_arena_stats(-1);
  EXPECT_NE(text, nullptr) << stitchalloc_torch_last_error();
  if (text == nullptr) return -1;
  const std::string all = text;
  const std::size_t at = all.find(name + " ");
  EXPECT_NE(at, std::string::npos) << name << " missing from:\n" << all;
  return at == std::string::npos ? -1 : std::stoll(all.substr(at + name.size() + 1));
}

std::vector<void*> OneIteration(cca::CUDAAllocator* a, std::size_t extra) {
  EXPECT_EQ(stitchalloc_torch_iteration_begin(-1, 42), 0) << stitchalloc_torch_last_error();
  std::vector<void*> seen;
  for (int layer = 0; layer < 4; ++layer) {
    EXPECT_EQ(stitchalloc_torch_layer_begin(-1, "block", layer, 0), 0) << stitchalloc_torch_last_error();
    void* x = a->raw_alloc_with_stream((3 << 20) + extra, StreamId(0));
    void* y = a->raw_alloc_with_stream(1 << 20, StreamId(0));
    std::memset(x, layer, (3 << 20) + extra);
    a->raw_delete(y);
    seen.push_back(x);
    EXPECT_EQ(stitchalloc_torch_layer_end(-1), 0) << stitchalloc_torch_last_error();
  }
  for (void* x : seen) a->raw_delete(x);
  EXPECT_EQ(stitchalloc_torch_iteration_end(-1), 0) << stitchalloc_torch_last_error();
  return seen;
}

}  // namespace arena_marks

// Arena allocations in PyTorch's memory history carry their own size (the arena block was
// described instead: size 0 in the trace), and getBaseAllocation answers for them.
TEST(TorchPlugin, ArenaAllocationsKeepTheirSizesInTheMemoryHistory) {
  Install();
  auto* a = cca::get();
  arena_marks::OneIteration(a, 0);  // recorded and planned
  a->recordHistory(true, nullptr, 1000, cda::RecordContext::ALL, false, {});
  const std::vector<void*> served = arena_marks::OneIteration(a, 0);
  EXPECT_EQ(arena_marks::Stat("arena.hits"), 8);
  const cca::SnapshotInfo snap = a->snapshot({0, 0}, true);
  ASSERT_EQ(snap.device_traces.size(), 1u);
  int allocs = 0, frees = 0;
  for (const auto& e : snap.device_traces[0]) {
    if (e.action_ == cda::TraceEntry::ALLOC) {
      ++allocs;
      EXPECT_TRUE(e.size_ == (3u << 20) || e.size_ == (1u << 20)) << e.size_;
    } else if (e.action_ == cda::TraceEntry::FREE_COMPLETED) {
      ++frees;
      EXPECT_TRUE(e.size_ == (3u << 20) || e.size_ == (1u << 20)) << e.size_;
    }
  }
  EXPECT_EQ(allocs, 8);
  EXPECT_EQ(frees, 8);
  // A held arena allocation: its base allocation is the arena's mapping, which contains it.
  EXPECT_EQ(stitchalloc_torch_iteration_begin(-1, 42), 0) << stitchalloc_torch_last_error();
  EXPECT_EQ(stitchalloc_torch_layer_begin(-1, "block", 0, 0), 0) << stitchalloc_torch_last_error();
  void* x = a->raw_alloc_with_stream(3 << 20, StreamId(0));
  EXPECT_EQ(x, served[0]);
  size_t base_size = 0;
  auto* base = static_cast<char*>(a->getBaseAllocation(x, &base_size));
  EXPECT_LE(base, static_cast<char*>(x));
  EXPECT_GE(base + base_size, static_cast<char*>(x) + (3 << 20));
  a->raw_delete(x);
  EXPECT_EQ(stitchalloc_torch_layer_end(-1), 0) << stitchalloc_torch_last_error();
  EXPECT_EQ(stitchalloc_torch_iteration_end(-1), 0) << stitchalloc_torch_last_error();
}

TEST(TorchPlugin, ArenaMarksPlanAndServeThroughTheInstalledAllocator) {
  using arena_marks::Stat;
  EXPECT_EQ(stitchalloc_torch_iteration_begin(-1, 1), -1);  // not installed yet
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("not PyTorch's CUDA allocator"));
  Install();
  auto* a = cca::get();
  arena_marks::OneIteration(a, 0);  // recorded and planned
  EXPECT_EQ(Stat("arena.recorded_iterations"), 1);
  EXPECT_EQ(Stat("arena.plans_built"), 1);
  const std::vector<void*> second = arena_marks::OneIteration(a, 0);
  const std::vector<void*> third = arena_marks::OneIteration(a, 0);
  EXPECT_EQ(second, third);  // planned offsets: the same addresses every iteration
  EXPECT_GT(Stat("arena.arena_bytes"), 0);
  EXPECT_EQ(Stat("arena.served_iterations"), 2);
  EXPECT_EQ(Stat("arena.hits"), 16);  // 4 layers x 2 requests x 2 iterations
  EXPECT_EQ(Stat("arena.misses"), 0);
  arena_marks::OneIteration(a, 4096);  // another size: falls back, counted
  EXPECT_GT(Stat("arena.misses"), 0);

  EXPECT_EQ(stitchalloc_torch_layer_begin(-1, "", 0, 0), -1);
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("empty layer kind"));
  EXPECT_EQ(stitchalloc_torch_layer_begin(-1, "block", 0, 2), -1);
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("neither forward"));
  EXPECT_EQ(stitchalloc_torch_iteration_end(-1), -1);  // no open iteration
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("stitchalloc_torch_iteration_end"));
  EXPECT_EQ(stitchalloc_torch_iteration_begin(99, 1), -1);
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("invalid device index 99"));
  EXPECT_EQ(stitchalloc_torch_arena_drop_plans(-1), 0) << stitchalloc_torch_last_error();
  EXPECT_EQ(Stat("arena.plans_cached"), 0);
  // The allocator still works normally afterwards.
  void* p = a->raw_alloc_with_stream(1 << 20, StreamId(0));
  ASSERT_NE(p, nullptr);
  a->raw_delete(p);
}

// The swap entry points through the installed allocator: a borrowed block goes to pinned memory
// and comes back bit-exact in a new block; the prefetch blocks are in PyTorch's memory history
// like its own allocations, so every free in the trace has its alloc (also for the block the
// manager frees itself when a tensor dies during its prefetch); bad calls fail with a reason.
TEST(TorchPlugin, SwapThroughTheInstalledAllocatorKeepsTheMemoryHistoryWhole) {
  uint64_t ticket = 0;
  EXPECT_EQ(stitchalloc_torch_swap_begin(0, 2), -1);  // not installed yet
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("not PyTorch's CUDA allocator"));
  ASSERT_EQ(stitchalloc_torch_install("driver:host,host_capacity_mb:256,swap_slab_mb:8,swap_host_limit_mb:64,"
                                      "swap_keep_last_layers:0"),
            0)
      << stitchalloc_torch_last_error();
  cca::CUDAAllocator* a = cca::get();
  a->init(1);
  a->recordHistory(true, nullptr, 1000, cda::RecordContext::ALL, false, {});
  struct Owner {
    void* block = nullptr;
    int released = 0;
  };
  auto release = [](void* context) {
    auto* o = static_cast<Owner*>(context);
    ++o->released;
    cca::get()->raw_delete(o->block);  // the storage's last reference goes
  };
  constexpr size_t kP = 3 << 20, kQ = 2 << 20;
  Owner p{a->raw_alloc_with_stream(kP, StreamId(0))}, q{a->raw_alloc_with_stream(kQ, StreamId(0))};
  for (size_t i = 0; i < kP; ++i) static_cast<unsigned char*>(p.block)[i] = static_cast<unsigned char>(i * 7 + 1);
  std::memset(q.block, 0x5a, kQ);
  EXPECT_EQ(stitchalloc_torch_swap_offload(0, p.block, kP, 0, release, &p, &ticket), -1);
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("no swap session on device 0"));

  ASSERT_EQ(stitchalloc_torch_swap_begin(0, 2), 0) << stitchalloc_torch_last_error();
  // Memory stitchalloc did not make (here: the stack; under PyTorch, a tensor opened from
  // another process or one of the uncached mode) gets a ticket but stays where it is.
  static int foreign_released = 0;
  std::vector<unsigned char> foreign(1 << 20, 0x33);
  uint64_t tf = 0;
  ASSERT_EQ(stitchalloc_torch_swap_offload(0, foreign.data(), foreign.size(), 0, [](void*) { ++foreign_released; },
                                           nullptr, &tf),
            0)
      << stitchalloc_torch_last_error();
  EXPECT_EQ(stitchalloc_torch_swap_state(0, tf), 1);  // kept
  EXPECT_THAT(std::string(stitchalloc_torch_swap_stats(0)), HasSubstr("swap.kept_foreign 1\n"));
  EXPECT_EQ(stitchalloc_torch_swap_offload(0, p.block, 2 * kP, 0, release, &p, &ticket), -1);
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("overrun its allocation"));
  EXPECT_EQ(stitchalloc_torch_swap_offload(0, p.block, kP, 0, release, &p, nullptr), -1);
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("ticket is NULL"));
  EXPECT_EQ(stitchalloc_torch_swap_offload(0, p.block, kP, 5, release, &p, &ticket), -1);
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("layer 5 is outside"));
  // Passes (the _pass entry points): each with its own layer count; one never begun is refused.
  ASSERT_EQ(stitchalloc_torch_swap_begin_pass(0, 6, 7), 0) << stitchalloc_torch_last_error();
  EXPECT_EQ(stitchalloc_torch_swap_forward_end_pass(0, 5, 7), 0) << stitchalloc_torch_last_error();
  EXPECT_EQ(stitchalloc_torch_swap_backward_begin_pass(0, 5, 8), -1);
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("layer 5 is outside pass 8's 0 layers"));
  EXPECT_EQ(stitchalloc_torch_swap_offload_pass(0, p.block, kP, 5, 8, release, &p, &ticket), -1);
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("outside pass 8's 0 layers"));
  EXPECT_EQ(p.released, 0);

  uint64_t tp = 0, tq = 0;
  ASSERT_EQ(stitchalloc_torch_swap_offload(0, p.block, kP, 0, release, &p, &tp), 0) << stitchalloc_torch_last_error();
  ASSERT_EQ(stitchalloc_torch_swap_offload(0, q.block, kQ, 0, release, &q, &tq), 0) << stitchalloc_torch_last_error();
  ASSERT_EQ(stitchalloc_torch_swap_forward_end(0, 0), 0) << stitchalloc_torch_last_error();
  ASSERT_EQ(stitchalloc_torch_swap_forward_end(0, 1), 0) << stitchalloc_torch_last_error();
  EXPECT_EQ(p.released, 1);  // the device blocks went back to their owners as the copies left
  EXPECT_EQ(q.released, 1);
  EXPECT_EQ(stitchalloc_torch_swap_state(0, tf), 1);  // the foreign one stayed
  EXPECT_EQ(foreign_released, 0);
  {
    void* kept = nullptr;
    int kept_same = -1;
    ASSERT_EQ(stitchalloc_torch_swap_wait(0, tf, &kept, &kept_same), 0) << stitchalloc_torch_last_error();
    EXPECT_EQ(kept, foreign.data());
    EXPECT_EQ(kept_same, 1);
    EXPECT_EQ(foreign[12345], 0x33);
  }
  ASSERT_EQ(stitchalloc_torch_swap_backward_begin(0, 1), 0) << stitchalloc_torch_last_error();  // layer 0 back
  EXPECT_EQ(stitchalloc_torch_swap_state(0, tp), 4);  // prefetching
  ASSERT_EQ(stitchalloc_torch_swap_cancel(0, tq), 0) << stitchalloc_torch_last_error();  // q died meanwhile
  void* back = nullptr;
  int same = -1;
  ASSERT_EQ(stitchalloc_torch_swap_wait(0, tp, &back, &same), 0) << stitchalloc_torch_last_error();
  EXPECT_EQ(same, 0);
  ASSERT_EQ(stitchalloc_torch_swap_synchronize(0), 0) << stitchalloc_torch_last_error();
  size_t wrong = 0;
  for (size_t i = 0; i < kP; ++i) wrong += static_cast<unsigned char*>(back)[i] != static_cast<unsigned char>(i * 7 + 1);
  EXPECT_EQ(wrong, 0u);
  a->raw_delete(back);  // as PyTorch's deleter frees it
  EXPECT_EQ(stitchalloc_torch_swap_wait(0, tq, &back, &same), -1);
  EXPECT_THAT(stitchalloc_torch_last_error(), HasSubstr("no ticket"));
  const std::string stats = stitchalloc_torch_swap_stats(0);
  EXPECT_THAT(stats, HasSubstr("swap.offloads 2\n"));
  EXPECT_THAT(stats, HasSubstr("swap.prefetches 2\n"));
  EXPECT_THAT(stats, HasSubstr("swap.cancelled 1\n"));
  EXPECT_THAT(stats, HasSubstr("swap.live_tickets 0\n"));

  // The trace: p and q, the two prefetch blocks; each freed once, after its alloc.
  const cca::SnapshotInfo snap = a->snapshot({0, 0}, true);
  ASSERT_EQ(snap.device_traces.size(), 1u);
  std::unordered_set<size_t> live;
  int allocs = 0, frees = 0, unpaired = 0, prefetch_allocs = 0;
  for (const auto& e : snap.device_traces[0]) {
    if (e.action_ == cda::TraceEntry::ALLOC) {
      ++allocs;
      if (e.stream_ != StreamId(0)) ++prefetch_allocs;  // on the copy stream
      if (!live.insert(e.addr_).second) ++unpaired;
    } else if (e.action_ == cda::TraceEntry::FREE_COMPLETED) {
      ++frees;
      if (live.erase(e.addr_) != 1) ++unpaired;
    }
  }
  EXPECT_EQ(allocs, 4);
  EXPECT_EQ(prefetch_allocs, 2);
  EXPECT_EQ(frees, 4);
  EXPECT_EQ(unpaired, 0);
  EXPECT_TRUE(live.empty());
  EXPECT_EQ(a->getDeviceStats(0).allocated_bytes[0].current, 0);
}

}  // namespace
