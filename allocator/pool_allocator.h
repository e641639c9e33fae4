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
// What every pool keeps the same way lives here: its lock, its statistics, its memory limit (a
// fraction of the device's memory, checked against its own reserved bytes or those of every
// pool sharing a total) and whether it keeps its cache; the subclasses guard their own state
// with the same lock.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/config.h"
#include "allocator/ipc.h"
#include "allocator/mapping_store.h"
#include "allocator/stats.h"
#include "vmm/mutex.h"
#include "vmm/types.h"

namespace stitchalloc {

struct BlockInfo;
struct SegmentInfo;

class PoolAllocator {
 public:
  virtual ~PoolAllocator() = default;

  virtual absl::StatusOr<void*> Malloc(std::size_t size, Stream stream) = 0;
  virtual absl::Status Free(void* ptr) = 0;
  virtual absl::Status RecordStream(void* ptr, Stream stream) = 0;
  virtual absl::Status EmptyCache() = 0;
  // Caps reserved memory at `fraction` of the device's total memory, in (0, 1].
  absl::Status SetMemoryFraction(double fraction);
  // While set, cached memory stays mapped where it is: EmptyCache returns nothing, and a request
  // that does not fit fails with the out-of-memory report instead of releasing the cache first.
  // A private pool keeps it set while a captured CUDA graph may replay at its addresses.
  void SetKeepCached(bool keep) { keep_cached_.store(keep, std::memory_order_relaxed); }
  // The memory limit (memory_fraction) then caps the reserved bytes of every allocator sharing
  // `total` together, as PyTorch's fraction caps a device's pools together: each adds its
  // reserved bytes to it (those it holds already at once) and takes them out when it goes.
  void ShareMemoryLimit(std::shared_ptr<std::atomic<std::int64_t>> total);
  std::size_t memory_limit() const;

  using SegmentObserver = std::function<void(const std::vector<SegmentEvent>&)>;
  virtual void SetSegmentObserver(SegmentObserver observer) = 0;

  Stats GetStats() const;
  void ResetPeakStats();
  void ResetAccumulatedStats();

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

 protected:
  // The limit from config.memory_fraction of `total_memory`; max_split_size in the statistics.
  PoolAllocator(const Config& config, std::size_t total_memory);
  // The reserved bytes the memory limit is checked against: the shared total, or this pool's.
  std::size_t LimitedReserved() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // ShareMemoryLimit changed shared_reserved_ (CachingAllocator tells its mapping store).
  virtual void SharedReservedChanged() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {}

  const std::size_t total_memory_;
  std::atomic<bool> keep_cached_{false};
  mutable Mutex mu_;
  std::size_t limit_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<std::atomic<std::int64_t>> shared_reserved_ ABSL_GUARDED_BY(mu_);
};

}  // namespace stitchalloc
