// Microbenchmarks of the allocator on the host driver (Google Benchmark). Raw output is committed
// under bench/results/ and summarised in docs/results.md; see README for the command.
//
//   BM_CachedMallocFree/<bytes>   a malloc+free pair of a cached size on one stream (hot path):
//                                 the freed block stays whole (a live neighbour keeps it from
//                                 merging) and is handed out again; the pool holds nothing else
//   BM_CachedMallocFreeWarmPool/<bytes>  the same with 64 other cached blocks in each pool, as in a
//                                 process that has run for a while
//   BM_SplitMergePair/<bytes>     a malloc+free pair carved from a larger free block and merged
//                                 back into it on free
//   BM_SplitMerge                 16 blocks of mixed sizes carved from one mapping, freed in an
//                                 interleaved order (every free merges), per iteration
//   BM_Stitch8Chunks              stitch 8 free chunks from 8 mappings into one range, then
//                                 unstitch (chunks return home): 8 maps + 8 unmaps + reserve/free
//   BM_HostMapUnmap               the host driver's map + set-access + unmap of one 2 MiB chunk
//   BM_SegmentPool{CachedMallocFree,NoSplitMallocFree}/<bytes>  the pair of BM_CachedMallocFree in
//                                 a SegmentPool (a MemPool with its own allocator; no_split)
// stitchalloc side by side with the model of PyTorch's native allocator (bench/models; the
// model takes a mutex per call as PyTorch does per device; stitchalloc's host driver maps no
// memory and runs stream work inline, see StitchallocSide):
//   BM_Pair_{Stitchalloc,Native}/<bytes>       cached malloc+free pair of one size
//   BM_Mixed_{Stitchalloc,Native}/<streams>    steady state of 64 live blocks of mixed sizes
//                                              (512 B to 64 MiB, log-uniform, fixed seed): each
//                                              iteration frees one and allocates the next size,
//                                              round-robin over 1 or 4 streams
//   BM_Threads_{Stitchalloc,Native}/threads:N  cached pairs from N threads on one allocator
#include <cmath>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <type_traits>
#include <vector>

#include "allocator/arena/arena.h"
#include "allocator/caching_allocator.h"
#include "allocator/mapping_store.h"
#include "allocator/segment_pool.h"
#include "benchmark/benchmark.h"
#include "bench/models/torch_model.h"
#include "vmm/host_driver.h"

namespace stitchalloc {
namespace {

std::unique_ptr<CachingAllocator> MakeAllocator(const HostDriverOptions& options = {16 * kGiB, 2 * kMiB}) {
  auto driver = HostDriver::Create(options);
  auto alloc = CachingAllocator::Create(Config{}, *std::move(driver));
  return *std::move(alloc);
}

// The measured loop: malloc+free pairs of state.range(0) bytes after one warm-up pair. With
// `pin`, a live block allocated right after the warm-up one keeps the freed block from merging
// with the free rest of its mapping, so every pair reuses one cached block whole.
template <typename Allocator>
void MallocFreePairs(benchmark::State& state, Allocator& alloc, bool pin) {
  const auto size = static_cast<std::size_t>(state.range(0));
  void* warm = *alloc.Malloc(size, kDefaultStream);
  void* pinned = pin ? *alloc.Malloc(size, kDefaultStream) : nullptr;
  alloc.Free(warm).IgnoreError();
  for (auto _ : state) {
    void* p = *alloc.Malloc(size, kDefaultStream);
    benchmark::DoNotOptimize(p);
    alloc.Free(p).IgnoreError();
  }
  state.SetItemsProcessed(state.iterations());
  alloc.Free(pinned).IgnoreError();
}

void BM_CachedMallocFree(benchmark::State& state) {
  auto alloc = MakeAllocator();
  MallocFreePairs(state, *alloc, /*pin=*/true);
}
BENCHMARK(BM_CachedMallocFree)->Arg(512)->Arg(64 << 10)->Arg(8 << 20)->Arg(256 << 20);

void BM_CachedMallocFreeWarmPool(benchmark::State& state) {
  auto alloc = MakeAllocator();
  // 128 blocks per pool, every other one freed: 64 cached free blocks that cannot merge.
  std::vector<void*> keep;
  for (int i = 0; i < 128; ++i) {
    void* s = *alloc->Malloc(512 * (1 + i % 7));
    void* l = *alloc->Malloc((2 + i % 5) * (1 << 20) + 4096);
    if (i % 2 == 0) {
      keep.push_back(s);
      keep.push_back(l);
    } else {
      alloc->Free(s).IgnoreError();
      alloc->Free(l).IgnoreError();
    }
  }
  MallocFreePairs(state, *alloc, /*pin=*/true);
  for (void* p : keep) alloc->Free(p).IgnoreError();
}
BENCHMARK(BM_CachedMallocFreeWarmPool)->Arg(512)->Arg(64 << 10)->Arg(8 << 20)->Arg(256 << 20);

void BM_SplitMergePair(benchmark::State& state) {
  auto alloc = MakeAllocator();
  MallocFreePairs(state, *alloc, /*pin=*/false);
}
BENCHMARK(BM_SplitMergePair)->Arg(512)->Arg(64 << 10);

// A MemPool with its own allocator (SegmentPool over host memory from aligned_alloc, standing in
// for a CUDAPluggableAllocator), as BM_CachedMallocFree: the same pinned cached pair; with
// no_split, every pair reuses one whole segment.
void SegmentPoolPairs(benchmark::State& state, bool no_split) {
  auto host = *HostDriver::Create({16 * kGiB, 2 * kMiB});
  auto source = SegmentSource::FromFunctions([](std::size_t n) { return std::aligned_alloc(4096, n); },
                                             [](void* p) { std::free(p); }, "aligned_alloc");
  SegmentPool::Options options;
  options.no_split = no_split;
  auto pool = *SegmentPool::Create(Config{}, host.get(), std::move(source), std::move(options));
  MallocFreePairs(state, *pool, /*pin=*/true);
}
void BM_SegmentPoolCachedMallocFree(benchmark::State& state) { SegmentPoolPairs(state, /*no_split=*/false); }
BENCHMARK(BM_SegmentPoolCachedMallocFree)->Arg(512)->Arg(64 << 10)->Arg(8 << 20)->Arg(256 << 20);
void BM_SegmentPoolNoSplitMallocFree(benchmark::State& state) { SegmentPoolPairs(state, /*no_split=*/true); }
BENCHMARK(BM_SegmentPoolNoSplitMallocFree)->Arg(512)->Arg(64 << 10)->Arg(8 << 20);

void BM_SplitMerge(benchmark::State& state) {
  auto alloc = MakeAllocator();
  static constexpr std::size_t kSizes[16] = {4 << 20, 6 << 20, 2 << 20, 8 << 20, 3 << 20, 5 << 20, 2 << 20, 7 << 20,
                                             4 << 20, 2 << 20, 3 << 20, 6 << 20, 2 << 20, 5 << 20, 4 << 20, 9 << 20};
  std::size_t total = 0;
  for (std::size_t s : kSizes) total += s;
  void* big = *alloc->Malloc(total + (4 << 20));  // one mapping that all 16 blocks fit in
  alloc->Free(big).IgnoreError();
  std::vector<void*> ptrs(16);
  for (auto _ : state) {
    for (int i = 0; i < 16; ++i) ptrs[i] = *alloc->Malloc(kSizes[i]);
    for (int i = 0; i < 16; i += 2) alloc->Free(ptrs[i]).IgnoreError();  // holes between live blocks
    for (int i = 1; i < 16; i += 2) alloc->Free(ptrs[i]).IgnoreError();  // each free merges 2-3 blocks
  }
  state.SetItemsProcessed(state.iterations() * 16);
}
BENCHMARK(BM_SplitMerge);

void BM_Stitch8Chunks(benchmark::State& state) {
  auto driver = *HostDriver::Create({16 * kGiB, 2 * kMiB});
  Stats stats;
  StreamPool pool;
  MappingStore store(*driver, stats, SIZE_MAX);
  std::vector<Block*> holes;
  for (int i = 0; i < 8; ++i) {
    Mapping* m = *store.Create(&pool, PoolKind::kLarge, 2 * kMiB, {}, 2);
    store.Allocate(m->head, 2 * kMiB, /*split=*/true);  // chunk 0 busy, chunk 1 free
  }
  for (auto _ : state) {
    std::vector<SlotRun> runs;
    for (const auto& [va, m] : store.mappings()) {
      if (auto r = MappingStore::FreeSlots(m->head->next)) runs.push_back(*r);
    }
    Mapping* stitched = *store.Create(&pool, PoolKind::kLarge, 2 * kMiB, runs, 0);
    benchmark::DoNotOptimize(stitched);
    store.Dissolve(stitched).IgnoreError();
  }
  state.counters["maps_per_iter"] = 8;
}
BENCHMARK(BM_Stitch8Chunks)->Unit(benchmark::kMicrosecond);

void BM_HostMapUnmap(benchmark::State& state) {
  auto driver = *HostDriver::Create({16 * kGiB, 2 * kMiB});
  PhysHandle h = *driver->CreateChunk(2 * kMiB);
  DevicePtr va = *driver->Reserve(2 * kMiB);
  for (auto _ : state) {
    driver->Map(va, 2 * kMiB, h).IgnoreError();
    driver->SetAccess(va, 2 * kMiB).IgnoreError();
    driver->Unmap(va, 2 * kMiB).IgnoreError();
  }
  driver->ReleaseChunk(h).IgnoreError();
  driver->FreeReservation(va, 2 * kMiB).IgnoreError();
}
BENCHMARK(BM_HostMapUnmap)->Unit(benchmark::kMicrosecond);


// ---- stitchalloc vs the native model ----------------------------------------------------------

// As in stitchalloc-replay: the host driver keeps all its bookkeeping and checks but maps no
// memory behind the chunks and completes stream work at submission (no worker threads), so
// that the comparison with the model (which has no driver) measures the allocators, not the
// host's mmap and thread wake-ups. (What those cost: BM_HostMapUnmap, BM_Stitch8Chunks.)
struct StitchallocSide {
  StitchallocSide()
      : alloc(MakeAllocator({.capacity = 16 * kGiB, .granularity = 2 * kMiB, .backed = false, .inline_streams = true})) {
    streams.push_back(kDefaultStream);
    for (int i = 0; i < 3; ++i) streams.push_back(*alloc->driver().CreateStream());
  }
  ~StitchallocSide() {
    alloc.reset();  // frees every block before the streams go
  }
  std::uint64_t Malloc(std::size_t n, int stream) {
    return reinterpret_cast<std::uint64_t>(*alloc->Malloc(n, streams[std::size_t(stream)]));
  }
  void Free(std::uint64_t p) { alloc->Free(reinterpret_cast<void*>(p)).IgnoreError(); }
  std::unique_ptr<CachingAllocator> alloc;
  std::vector<Stream> streams;
};

struct NativeSide {
  NativeSide() : model(bench::TorchModelOptions{}) {}
  std::uint64_t Malloc(std::size_t n, int stream) {
    std::lock_guard<std::mutex> l(mu);
    return *model.Malloc(n, std::uint64_t(stream));
  }
  void Free(std::uint64_t p) {
    std::lock_guard<std::mutex> l(mu);
    model.Free(p).IgnoreError();
  }
  std::mutex mu;
  bench::TorchAllocatorModel model;
};

template <typename Side>
void BM_Pair(benchmark::State& state) {
  Side side;
  const auto size = static_cast<std::size_t>(state.range(0));
  std::uint64_t warm = side.Malloc(size, 0);
  std::uint64_t pin = side.Malloc(size, 0);
  side.Free(warm);
  for (auto _ : state) {
    std::uint64_t p = side.Malloc(size, 0);
    benchmark::DoNotOptimize(p);
    side.Free(p);
  }
  side.Free(pin);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Pair<StitchallocSide>)->Name("BM_Pair_Stitchalloc")->Arg(512)->Arg(8 << 20);
BENCHMARK(BM_Pair<NativeSide>)->Name("BM_Pair_Native")->Arg(512)->Arg(8 << 20);

template <typename Side>
void BM_Mixed(benchmark::State& state) {
  Side side;
  const int streams = static_cast<int>(state.range(0));
  std::mt19937_64 rng(3);
  std::vector<std::size_t> sizes(4096);
  for (std::size_t& n : sizes) n = std::size_t(512.0 * std::pow(2.0, std::uniform_real_distribution<double>(0, 17)(rng)));
  constexpr std::size_t kLive = 64;
  std::vector<std::uint64_t> live(kLive);
  std::vector<int> stream_of(kLive);
  std::size_t next = 0;
  for (std::size_t i = 0; i < kLive; ++i) {
    stream_of[i] = int(i) % streams;
    live[i] = side.Malloc(sizes[next++ % sizes.size()], stream_of[i]);
  }
  // One pass over every size first, so that the measured loop runs on cached memory.
  for (std::size_t k = 0; k < sizes.size(); ++k) {
    const std::size_t i = k % kLive;
    side.Free(live[i]);
    live[i] = side.Malloc(sizes[next++ % sizes.size()], stream_of[i]);
  }
  std::size_t i = 0;
  for (auto _ : state) {
    side.Free(live[i]);
    live[i] = side.Malloc(sizes[next++ % sizes.size()], stream_of[i]);
    if (++i == kLive) i = 0;
  }
  for (std::uint64_t p : live) side.Free(p);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Mixed<StitchallocSide>)->Name("BM_Mixed_Stitchalloc")->Arg(1)->Arg(4);
BENCHMARK(BM_Mixed<NativeSide>)->Name("BM_Mixed_Native")->Arg(1)->Arg(4);

template <typename Side>
void BM_Threads(benchmark::State& state) {
  static Side* side = nullptr;
  if (state.thread_index() == 0) side = new Side;
  // Google Benchmark starts every thread's loop together, after thread 0's setup above.
  const std::size_t size = (std::size_t(state.thread_index()) + 1) * (64 << 10);
  for (auto _ : state) {
    std::uint64_t p = side->Malloc(size, 0);
    benchmark::DoNotOptimize(p);
    side->Free(p);
  }
  state.SetItemsProcessed(state.iterations());
  if (state.thread_index() == 0) {
    delete side;
    side = nullptr;
  }
}
BENCHMARK(BM_Threads<StitchallocSide>)->Name("BM_Threads_Stitchalloc")->Threads(1)->Threads(2)->Threads(4)->UseRealTime();
BENCHMARK(BM_Threads<NativeSide>)->Name("BM_Threads_Native")->Threads(1)->Threads(2)->Threads(4)->UseRealTime();

// ---- plan-guided arena vs the caching allocator's cached path ---------------------------------
// One "iteration" of 32 layers, each: malloc 1 MiB, malloc 4 MiB, free, malloc 2 MiB, free,
// free (6 operations). Caching: straight on a warmed CachingAllocator. Arena: the same through
// PlannedAllocator after one recorded iteration, so every request is an arena hit; the layer
// and iteration marks are inside the timed loop. Items = malloc + free operations.
constexpr int kArenaLayers = 32;

template <typename A>
void LayerLoop(A* a) {
  constexpr bool kMarks = std::is_same_v<A, arena::PlannedAllocator>;
  for (int l = 0; l < kArenaLayers; ++l) {
    if constexpr (kMarks) (void)a->LayerBegin("layer", l, arena::Phase::kForward);
    void* x = *a->Malloc(1 << 20);
    void* y = *a->Malloc(4 << 20);
    (void)a->Free(x);
    void* z = *a->Malloc(2 << 20);
    (void)a->Free(y);
    (void)a->Free(z);
    if constexpr (kMarks) (void)a->LayerEnd();
  }
}

void BM_Layers_Caching(benchmark::State& state) {
  auto alloc = MakeAllocator();
  LayerLoop(alloc.get());
  for (auto _ : state) LayerLoop(alloc.get());
  state.SetItemsProcessed(state.iterations() * kArenaLayers * 6);
}
BENCHMARK(BM_Layers_Caching);

void BM_Layers_Arena(benchmark::State& state) {
  auto alloc = MakeAllocator();
  arena::PlannedAllocator planned(alloc.get());
  for (int i = 0; i < 2; ++i) {
    (void)planned.BeginIteration(1);
    LayerLoop(&planned);
    (void)planned.EndIteration();
  }
  for (auto _ : state) {
    (void)planned.BeginIteration(1);
    LayerLoop(&planned);
    (void)planned.EndIteration();
  }
  const arena::ArenaStats s = planned.GetStats();
  if (s.misses != 0 || s.hits == 0) state.SkipWithError("arena did not serve every request");
  state.counters["hits"] = static_cast<double>(s.hits);
  state.SetItemsProcessed(state.iterations() * kArenaLayers * 6);
}
BENCHMARK(BM_Layers_Arena);

}  // namespace
}  // namespace stitchalloc

BENCHMARK_MAIN();
