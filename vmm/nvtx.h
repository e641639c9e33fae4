// NVTX ranges for the slow paths (map, unmap, stitch, release, out-of-memory). NVTX3 is
// header-only; without a profiler attached a range costs a few nanoseconds, so ranges mark
// slow paths only, never the cached malloc/free path.
#pragma once

#include "nvtx3/nvtx3.hpp"

namespace stitchalloc {

struct NvtxDomain {
  static constexpr char const* name{"stitchalloc"};
};

// Usage: STITCHALLOC_NVTX_RANGE("stitch"); marks the rest of the enclosing scope.
using NvtxRange = nvtx3::scoped_range_in<NvtxDomain>;
#define STITCHALLOC_NVTX_CONCAT2(a, b) a##b
#define STITCHALLOC_NVTX_CONCAT(a, b) STITCHALLOC_NVTX_CONCAT2(a, b)
#define STITCHALLOC_NVTX_RANGE(label) \
  ::stitchalloc::NvtxRange STITCHALLOC_NVTX_CONCAT(nvtx_range_, __LINE__) { label }

}  // namespace stitchalloc
