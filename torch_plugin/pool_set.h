// PoolSet: everything one device needs under PyTorch, without PyTorch: the default pool (a
// CachingAllocator behind the plan-guided arena) and the private pools that CUDA graph capture
// and torch.cuda.MemPool ask for, each its own allocator on the same device (PoolAllocator): a
// CachingAllocator, or a SegmentPool for a MemPool with its own allocator (its segments come
// from that allocator) or created with no_split (each allocation a whole segment).
//
// Private pools follow PyTorch's semantics: CreateOrIncrefPool / BeginAllocateToPool add a
// user; while a pool is being allocated to, requests on streams its filter accepts are served
// from it (the first matching begin wins); ReleasePool drops a user, and a pool with no users
// returns its cached memory at once and disappears when its last allocation is freed. Memory of
// a private pool is never used for another pool's requests, which is what makes graph replay
// safe.
// A graph replays at the addresses it was captured with, including those of blocks it allocated
// and freed during the capture, so while a pool has users its memory stays mapped where it is:
// private pools do not stitch (stitching retires and dissolves mappings), and neither EmptyCache
// nor an out-of-memory retry releases their cache (CachingAllocator::SetKeepCached), as
// PyTorch's allocator keeps a graph pool's segments until the pool is released.
//
// Invariants: pool_of_ holds exactly the live pointers served by private pools (so Free and
// RecordStream route without asking every allocator); routing_ counts begun, not yet ended
// captures, pooled_ the entries of pool_of_ and oom_pools_ the pools with use_on_oom set, so
// while they are zero the hot path takes no lock of this class. Statistics are the sums over
// all pools: while private pools live, a peak is the sum of per-pool peaks (an upper bound of
// the device peak).
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/arena/arena.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/pool_allocator.h"
#include "allocator/segment_pool.h"
#include "vmm/mutex.h"

namespace stitchalloc {

// PyTorch's MempoolId_t: {0, 0} is the default pool.
using PoolId = std::pair<std::uint64_t, std::uint64_t>;
inline constexpr PoolId kDefaultPool{0, 0};

class PoolSet {
 public:
  using StreamFilter = std::function<bool(Stream)>;
  struct Segment {
    PoolId pool = kDefaultPool;
    SegmentInfo info;
  };

  static absl::StatusOr<std::unique_ptr<PoolSet>> Create(const Config& config);
  ~PoolSet();

  absl::StatusOr<void*> Malloc(std::size_t size, Stream stream);
  absl::Status Free(void* ptr);
  absl::Status RecordStream(void* ptr, Stream stream);
  absl::StatusOr<BlockInfo> Describe(const void* ptr) const;
  // CachingAllocator::Share, by whichever pool (or the arena) serves `ptr`.
  absl::StatusOr<SharedRange> Share(const void* ptr);
  // The pool that serves live allocation `ptr`: a private pool's id, else kDefaultPool (also
  // for a pointer no pool knows). Takes no lock while no private pool holds an allocation.
  PoolId PoolOf(const void* ptr) const;

  // `source`: the pool's own allocator (torch.cuda.MemPool(allocator)); its segments come from
  // it and are sub-allocated by a SegmentPool (segment_pool.h), as PyTorch's allocator serves such
  // a pool. Only when the pool is created: an existing pool keeps what it was made with.
  absl::Status CreateOrIncrefPool(PoolId id, std::shared_ptr<SegmentSource> source = nullptr);
  // torch.cuda.MemPool(no_split=True): every allocation of the pool holds a whole segment (a
  // SegmentPool over the pool's own allocator, or over whole driver segments). Only while the
  // pool holds no memory (PyTorch sets it right after creating the pool).
  absl::Status SetNoSplit(PoolId id);
  absl::Status BeginAllocateToPool(PoolId id, StreamFilter filter);
  absl::Status EndAllocateToPool(PoolId id);
  absl::Status ReleasePool(PoolId id);
  // torch.cuda.MemPool(use_on_oom=True): while private pool `id` has users, a default-pool
  // request that would run out of memory is served from it if it can (its cached memory first,
  // as PyTorch's allocator does); the allocation then belongs to `id`. PyTorch 2.11's MemPool
  // destructor calls it, whatever the pool was created with.
  absl::Status SetUseOnOom(PoolId id, bool use);
  // Users of the pool (0 for an unknown pool).
  int PoolUseCount(PoolId id) const;
  // CUDA graph trees' checkpoints (PyTorch's getCheckpointState / setCheckpointPoolState):
  // the live allocations of private pool `id` (in address order), and the pool made to hold
  // exactly `state` again. RestorePool frees the pool's allocations that are not in `state`
  // (`dropped`) and allocates those of `state` that are not live at their addresses (`made`;
  // AllocateAt: the pool never remaps, so a range it served is still its own). `freed` lists
  // every allocation live before (PyTorch's protocol: one kept is freed and allocated). On
  // failure nothing has changed.
  struct Restored {
    std::vector<void*> freed;
    std::vector<CachingAllocator::LiveAllocation> dropped, made;
  };
  absl::StatusOr<std::vector<CachingAllocator::LiveAllocation>> PoolAllocations(PoolId id) const;
  absl::StatusOr<Restored> RestorePool(PoolId id, std::vector<CachingAllocator::LiveAllocation> state);
  std::vector<PoolId> PrivatePools() const;

  // kDefaultPool: the default pool and the cached memory of every private pool; otherwise
  // that pool's cached memory only.
  absl::Status EmptyCache(PoolId id = kDefaultPool);
  absl::Status SetMemoryFraction(double fraction);
  // Whether the calling thread's stream is being captured into a CUDA graph (the torch layer's
  // answer; none: never). While it is, a pool whose own allocator runs out does not have the
  // default pool release its cache (unmapping, and waiting for events, have no place in a
  // capture; PyTorch's allocator releases nothing while any pool is being allocated to). Set it
  // before the first private pool is made.
  void SetCaptureProbe(std::function<bool()> probe);
  double memory_fraction() const { return fraction_.load(std::memory_order_relaxed); }

  // Segment events of every pool (CachingAllocator::SetSegmentObserver) with the pool they
  // belong to, pools created later included; an empty function stops them. Called with the
  // pool's allocator lock held (and maybe this set's): it must not call into this PoolSet.
  using SegmentObserver = std::function<void(PoolId, const std::vector<SegmentEvent>&)>;
  void SetSegmentObserver(SegmentObserver observer);

  Stats GetStats() const;
  absl::flat_hash_map<PoolId, Stats> PrivatePoolStats() const;
  void ResetPeakStats();
  void ResetAccumulatedStats();
  // Segments of every pool, or of one private pool.
  std::vector<Segment> Snapshot(std::optional<PoolId> only = std::nullopt) const;
  // The largest free block in any pool's cache (torch's cacheInfo, used by cudnn.benchmark).
  std::size_t LargestFreeBlock() const;
  std::size_t memory_limit() const { return main_->memory_limit(); }

  CachingAllocator& main() { return *main_; }
  arena::PlannedAllocator& arena() { return *arena_; }
  const Config& config() const { return config_; }

 private:
  struct Pool {
    std::unique_ptr<PoolAllocator> allocator;
    std::shared_ptr<SegmentSource> source;  // the pool's own allocator, if it has one
    bool no_split = false;
    int users = 0;
    std::int64_t live = 0;  // allocations not yet freed
    bool use_on_oom = false;
  };
  struct Capture {
    PoolId id;
    StreamFilter filter;
  };
  explicit PoolSet(const Config& config, std::unique_ptr<CachingAllocator> main);
  absl::StatusOr<Pool*> GetOrCreate(PoolId id, std::shared_ptr<SegmentSource> source = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The allocator of a pool: a CachingAllocator, or a SegmentPool when it has a source or no_split.
  absl::StatusOr<std::unique_ptr<PoolAllocator>> MakeAllocator(const std::shared_ptr<SegmentSource>& source,
                                                               bool no_split) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Wires a pool's allocator into the device: memory limit, observer, cache kept while in use.
  void Attach(PoolId id, Pool* pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeErase(PoolId id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  PoolAllocator* OwnerOf(const void* ptr) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A default-pool request that failed with `oom`, tried on the use_on_oom pools.
  absl::StatusOr<void*> MallocOnOom(std::size_t size, Stream stream, absl::Status oom);
  void Record(void* p, PoolId id, Pool* pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The observer of pool `id`'s allocator: segment_observer_ with the pool's id, or none.
  PoolAllocator::SegmentObserver ObserverFor(PoolId id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Config config_;
  // Reserved bytes of every pool together: the memory fraction caps their sum, as PyTorch's does.
  const std::shared_ptr<std::atomic<std::int64_t>> reserved_ = std::make_shared<std::atomic<std::int64_t>>(0);
  const std::unique_ptr<CachingAllocator> main_;
  const std::unique_ptr<arena::PlannedAllocator> arena_;
  std::atomic<double> fraction_;
  std::atomic<int> routing_{0};
  std::atomic<std::int64_t> pooled_{0};
  std::atomic<int> oom_pools_{0};  // pools with use_on_oom set
  mutable Mutex mu_;
  absl::flat_hash_map<PoolId, std::unique_ptr<Pool>> pools_ ABSL_GUARDED_BY(mu_);
  std::vector<Capture> captures_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<const void*, PoolId> pool_of_ ABSL_GUARDED_BY(mu_);
  Stats retired_ ABSL_GUARDED_BY(mu_);  // accumulated counters of erased pools
  SegmentObserver segment_observer_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const std::function<bool()>> capture_probe_ ABSL_GUARDED_BY(mu_);
};

}  // namespace stitchalloc
