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
#include <memory>
#include <vector>

#include "allocator/caching_allocator.h"
#include "allocator/mapping_store.h"
#include "benchmark/benchmark.h"
#include "vmm/host_driver.h"

namespace stitchalloc {
namespace {

std::unique_ptr<CachingAllocator> MakeAllocator() {
  auto driver = HostDriver::Create({16 * kGiB, 2 * kMiB});
  auto alloc = CachingAllocator::Create(Config{}, *std::move(driver));
  return *std::move(alloc);
}

// The measured loop: malloc+free pairs of state.range(0) bytes after one warm-up pair. With
// `pin`, a live block allocated right after the warm-up one keeps the freed block from merging
// with the free rest of its mapping, so every pair reuses one cached block whole.
void MallocFreePairs(benchmark::State& state, CachingAllocator& alloc, bool pin) {
  const auto size = static_cast<std::size_t>(state.range(0));
  void* warm = *alloc.Malloc(size);
  void* pinned = pin ? *alloc.Malloc(size) : nullptr;
  alloc.Free(warm).IgnoreError();
  for (auto _ : state) {
    void* p = *alloc.Malloc(size);
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

}  // namespace
}  // namespace stitchalloc

BENCHMARK_MAIN();
