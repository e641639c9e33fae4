// PoolAllocator: what a pool of a device needs of the allocator that serves it, so that a
// device's pools (torch_plugin's PoolSet) can be served by different allocators behind one
// interface:
//   - CachingAllocator (caching_allocator.h): VMM mappings, stitching; the default pool and
//     the private pools of CUDA graphs and torch.cuda.MemPool;
//   - SegmentPool (segment_pool.h): whole segments from a SegmentSource, split or not; a
//     MemPool with its own allocator, or created with no_split.
// The contract of every function is the one documented on CachingAllocator; an allocator that
// cannot do something returns a Status saying so (never a silent no-op). The default pool's
// hot path holds its CachingAllocator by its own type (final), so it pays no virtual call.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/ipc.h"
#include "allocator/mapping_store.h"
#include "allocator/stats.h"
#include "vmm/types.h"

namespace stitchalloc {

struct BlockInfo;
struct SegmentInfo;

// The reserved bytes a pool's memory limit is checked against: those of every pool of the device
// when they share a total (ShareMemoryLimit), else the pool's own.
inline std::size_t ReservedAgainstLimit(const std::atomic<std::int64_t>* shared, std::int64_t own) {
  const std::int64_t r = shared != nullptr ? shared->load() : own;
  return r > 0 ? static_cast<std::size_t>(r) : 0;
}

class PoolAllocator {
 public:
  virtual ~PoolAllocator() = default;

  virtual absl::StatusOr<void*> Malloc(std::size_t size, Stream stream) = 0;
  virtual absl::Status Free(void* ptr) = 0;
  virtual absl::Status RecordStream(void* ptr, Stream stream) = 0;
  virtual absl::Status EmptyCache() = 0;
  virtual absl::Status SetMemoryFraction(double fraction) = 0;
  virtual void SetKeepCached(bool keep) = 0;
  virtual void ShareMemoryLimit(std::shared_ptr<std::atomic<std::int64_t>> total) = 0;

  using SegmentObserver = std::function<void(const std::vector<SegmentEvent>&)>;
  virtual void SetSegmentObserver(SegmentObserver observer) = 0;

  virtual Stats GetStats() const = 0;
  virtual void ResetPeakStats() = 0;
  virtual void ResetAccumulatedStats() = 0;

  virtual absl::StatusOr<BlockInfo> Describe(const void* ptr) const = 0;
  virtual absl::StatusOr<SharedRange> Share(const void* ptr) = 0;
  virtual std::vector<SegmentInfo> Snapshot() const = 0;

  // A live allocation (PyTorch's CUDA graph trees checkpoint a private pool with these).
  struct LiveAllocation {
    DevicePtr ptr = 0;
    std::size_t size = 0;       // the block's bytes (rounded)
    std::size_t requested = 0;
    Stream stream = kDefaultStream;
    bool operator==(const LiveAllocation&) const = default;
  };
  virtual std::vector<LiveAllocation> LiveAllocations() const = 0;
  virtual absl::StatusOr<void*> AllocateAt(const LiveAllocation& a) = 0;
  virtual absl::Status CheckInvariants() const = 0;
};

}  // namespace stitchalloc
