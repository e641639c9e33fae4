#include "bench/patterns.h"

#include <vector>

namespace stitchalloc {

absl::StatusOr<PatternResult> RunAdversarial(CachingAllocator& alloc, const AdversarialOptions& o) {
  alloc.ResetPeakStats();
  const Stats before = alloc.GetStats();
  PatternResult r;
  std::vector<void*> small_blocks;
  absl::Status error;
  for (std::size_t i = 0; i < o.cycles; ++i) {
    const std::size_t segment = o.first_segment + i * o.growth;
    auto large = alloc.Malloc(segment - o.small, o.stream);
    if (!large.ok()) {
      if (!absl::IsResourceExhausted(large.status())) error = large.status();
      break;
    }
    auto small = alloc.Malloc(o.small, o.stream);
    if (!small.ok()) {
      alloc.Free(*large).IgnoreError();
      if (!absl::IsResourceExhausted(small.status())) error = small.status();
      break;
    }
    small_blocks.push_back(*small);
    if (auto s = alloc.Free(*large); !s.ok()) {
      error = s;
      break;
    }
    ++r.cycles_done;
  }
  for (void* p : small_blocks) {
    if (auto s = alloc.Free(p); !s.ok() && error.ok()) error = s;
  }
  if (!error.ok()) return error;
  const Stats after = alloc.GetStats();
  r.peak_allocated = after.allocated_bytes.all().peak;
  r.peak_reserved = after.reserved_bytes.all().peak;
  r.ooms = after.num_ooms - before.num_ooms;
  r.retries = after.num_alloc_retries - before.num_alloc_retries;
  r.stitches = after.num_stitches - before.num_stitches;
  r.map_calls = after.num_map_calls - before.num_map_calls;
  return r;
}

}  // namespace stitchalloc
