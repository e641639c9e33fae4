// Allocation patterns shared by the tests, the demo and the benchmarks.
//
// Adversarial fragmentation pattern (cycles of growing large requests): cycle i allocates a
// large block L_i sized so that its mapping has room for exactly one small long-lived block
// S_i after it, allocates S_i (kept until the end), then frees L_i. Every L_{i+1} is larger
// than the free space S_i leaves in the mapping of L_i, so an allocator that cannot combine
// free memory from several segments reserves a new segment every cycle: reserved memory grows
// with the sum of all L_i while allocated memory stays near max L_i + sum S_i.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"
#include "allocator/caching_allocator.h"

namespace stitchalloc {

struct AdversarialOptions {
  std::size_t cycles = 24;
  std::size_t first_segment = 64 * kMiB;  // the mapping size of L_0 (a multiple of the chunk size)
  std::size_t growth = 8 * kMiB;          // segment growth per cycle (a multiple of the chunk size)
  std::size_t small = 3 * kMiB / 2;       // S_i: large pool (> 1 MiB), below one 2 MiB chunk
  Stream stream = kDefaultStream;
};

struct PatternResult {
  std::size_t cycles_done = 0;
  std::int64_t peak_allocated = 0;  // allocated_bytes.all.peak
  std::int64_t peak_reserved = 0;   // reserved_bytes.all.peak
  std::int64_t ooms = 0;
  std::int64_t retries = 0;
  std::int64_t stitches = 0;
  std::int64_t map_calls = 0;
  double ratio() const { return peak_allocated > 0 ? double(peak_reserved) / double(peak_allocated) : 0.0; }
};

// Runs the pattern on `alloc` (peaks are reset first) and frees everything it allocated.
// An out-of-memory error ends the run early and is counted, not returned; other errors are.
absl::StatusOr<PatternResult> RunAdversarial(CachingAllocator& alloc, const AdversarialOptions& options);

}  // namespace stitchalloc
