// stitchalloc-hotpath: N cached malloc+free pairs of one size (as BM_CachedMallocFree), for instruction
// counting under callgrind (timings on a shared VM are noisy; instruction counts are not):
//   for n in 20000 40000; do valgrind --tool=callgrind --callgrind-out-file=/dev/null
//     ./build/default/bench/stitchalloc-hotpath $n 8388608; done   (one line)
// The difference of the two totals divided by 20000 is the cost of one pair.
#include <cstdio>
#include <cstdlib>

#include "allocator/caching_allocator.h"
#include "vmm/host_driver.h"

int main(int argc, char** argv) {
  using namespace stitchalloc;
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s PAIRS BYTES\n", argv[0]);
    return 2;
  }
  const long pairs = std::atol(argv[1]);
  const std::size_t size = std::strtoull(argv[2], nullptr, 10);
  auto alloc = CachingAllocator::Create(Config{}, *HostDriver::Create({16 * kGiB, 2 * kMiB}));
  if (!alloc.ok() || size == 0 || pairs < 0) return 1;
  // As BM_CachedMallocFree: a live neighbour keeps the freed block whole, so each pair reuses it.
  void* warm = *(*alloc)->Malloc(size);
  void* pinned = *(*alloc)->Malloc(size);
  (*alloc)->Free(warm).IgnoreError();
  for (long i = 0; i < pairs; ++i) {
    void* p = *(*alloc)->Malloc(size);
    (*alloc)->Free(p).IgnoreError();
  }
  (*alloc)->Free(pinned).IgnoreError();
  return 0;
}
