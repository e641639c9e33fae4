// CachingAllocator: the public C++ allocator. Serves device memory from VMM mappings, caches
// freed blocks per stream, and when nothing cached fits, stitches free chunks of other mappings
// into a new contiguous range instead of growing or failing.
//
// Hot path (a cached size on the same stream): one lock, a best-fit lookup in the stream's free
// set, maybe a split, statistics; no driver call (only while record_stream frees or over-limit
// stitched mappings wait on events are those events polled first). Miss path, in order:
//   1. blocks whose record_stream events completed return to their pools; retry;
//   2. a wholly free mapping of another stream whose fence event has completed moves over;
//   3. large pool: a hole that lent chunks is refilled, or a mapping of the stream whose last
//      block is free grows in place by the chunks the request still lacks; else a new mapping
//      stitched from free whole chunks (own stream first, others once fenced), topped up with
//      new chunks when they are not enough; the small pool grows in place the same way (its
//      chunks borrowed when they have the large pool's size); stitching off: a new mapping of
//      new chunks;
//   4. all cached memory is released (after synchronizing pending events) and 1-3 retried;
//   5. ResourceExhausted, with a message stating requested, allocated, reserved,
//      free-but-fragmented and largest free contiguous bytes.
// Idle stitched mappings stay cached for reuse up to stitch_cache_mb of virtual space; past
// that the least recently used are unmapped once their stream has finished with them.
//
// Every public function is thread-safe and validates its input: a zero or impossible size, a
// foreign, interior or already freed pointer return InvalidArgument naming the problem and
// change nothing.
#pragma once

#include <atomic>
#include <cstddef>
#include <functional>
#include <list>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/block.h"
#include "allocator/config.h"
#include "allocator/ipc.h"
#include "allocator/mapping_store.h"
#include "allocator/policy.h"
#include "allocator/pool_allocator.h"
#include "allocator/stats.h"
#include "vmm/driver.h"
#include "vmm/mutex.h"

namespace stitchalloc {

struct ChunkView {
  DevicePtr address = 0;       // where the chunk appears inside the block's mapping
  std::size_t size = 0;
  DevicePtr home_address = 0;  // where the same physical chunk is mapped in its home mapping
  bool borrowed = false;       // home_address is another mapping (the block is stitched)
};

struct BlockInfo {
  DevicePtr ptr = 0;
  std::size_t size = 0;        // rounded size held by the allocation
  std::size_t requested = 0;
  Stream stream = kDefaultStream;
  DevicePtr mapping_va = 0;
  std::size_t mapping_size = 0;
  bool stitched = false;
  std::vector<ChunkView> chunks;  // the chunks the block overlaps, in address order
};

struct SegmentInfo {
  struct BlockSummary {
    DevicePtr ptr = 0;
    std::size_t size = 0;
    std::size_t requested = 0;
    BlockState state = BlockState::kFree;
  };
  DevicePtr va = 0;
  std::size_t size = 0;
  Stream stream = kDefaultStream;
  bool small_pool = false;
  bool stitched = false;
  std::size_t owned_bytes = 0;  // bytes of chunks this mapping owns
  std::vector<BlockSummary> blocks;
};

class CachingAllocator final : public PoolAllocator {
 public:
  // Opens the driver named by config (auto: CUDA if present, host otherwise).
  static absl::StatusOr<std::unique_ptr<CachingAllocator>> Create(const Config& config);
  // Uses the given driver (tests, benchmarks, other bindings).
  static absl::StatusOr<std::unique_ptr<CachingAllocator>> Create(const Config& config,
                                                                  std::unique_ptr<Driver> driver);
  // Releases all device memory, including blocks still allocated.
  ~CachingAllocator() override;
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // At least `size` bytes, 512-byte aligned, usable in order on `stream`. InvalidArgument for
  // size 0 or above 1 PiB; ResourceExhausted (the out-of-memory report) when even a release
  // of cached memory cannot make room.
  absl::StatusOr<void*> Malloc(std::size_t size, Stream stream = kDefaultStream) override;
  // Returns a block; a null pointer is a no-op. The block is reused on its stream at once and
  // by other streams after the work recorded on them (RecordStream) completes.
  absl::Status Free(void* ptr) override;
  // Marks an allocated block as used by `stream` as well (torch's Tensor.record_stream).
  absl::Status RecordStream(void* ptr, Stream stream) override;
  // Waits for pending stream events, then returns every cached chunk to the driver.
  absl::Status EmptyCache() override;

  // Called when a request would otherwise fail with out-of-memory, after cached memory was
  // released: handler(bytes, stream) may free allocations (the swap manager moving tensors that
  // wait for their backward to host memory) and says how many bytes it freed, and what holds the
  // rest (`note`); the request is then tried once more, and if that fails the note ends the
  // out-of-memory report. Runs without the allocator's lock (the handler may call Free), so it
  // must be thread-safe. An empty function removes the handler.
  struct PressureRelief {
    std::size_t freed = 0;
    std::string note;
  };
  using PressureHandler = std::function<PressureRelief(std::size_t bytes, Stream stream)>;
  void SetPressureHandler(PressureHandler handler);

  // Segment events (mapping_store.h): the segments a snapshot shows that appeared or went, for
  // PyTorch's segment_alloc / segment_free trace entries. The observer is called at the end of
  // every call that changed them (and, at destruction, with every segment unmapped), with the
  // allocator's lock held, so that events reach it in the order the changes happened: it must be
  // quick and must not call into this allocator. Setting one starts tracking from the segments
  // there are (no events for them); an empty function stops it.
  void SetSegmentObserver(SegmentObserver observer) override;

  absl::StatusOr<BlockInfo> Describe(const void* ptr) const override;
  // For another process (ipc.h): the chunks under live allocation `ptr`, exported by the driver.
  // ShareRange shares [begin, begin + bytes) of live allocation `allocation` (bytes 0: to its end).
  // InvalidArgument for a pointer that is not a live allocation or a range outside it;
  // FailedPrecondition when the driver cannot export (Driver::ExportChunk). The descriptors stay
  // open while the chunks live, which they do at least as long as the allocation.
  absl::StatusOr<SharedRange> Share(const void* ptr) override;
  absl::StatusOr<SharedRange> ShareRange(const void* allocation, DevicePtr begin, std::size_t bytes);
  std::vector<SegmentInfo> Snapshot() const override;

  // The allocations live now, in address order (PyTorch's CUDA graph trees checkpoint a private
  // pool's state with these, and restore it with AllocateAt).
  std::vector<LiveAllocation> LiveAllocations() const override;
  // Allocates exactly [a.ptr, a.ptr + a.size) for a.stream, a.requested bytes asked for. The
  // range must lie in one free block of that stream's pool (frees still waiting for other
  // streams' events are waited for first); otherwise FailedPrecondition says what is there,
  // and nothing changes.
  absl::StatusOr<void*> AllocateAt(const LiveAllocation& a) override;
  // Walks every structure and checks the invariants of block.h and the statistics. For tests.
  absl::Status CheckInvariants() const override;

  Driver& driver() const { return *driver_; }
  const Config& config() const { return config_; }
  const std::string& driver_fallback_reason() const { return fallback_reason_; }
  std::size_t chunk_size() const { return chunk_size_; }

 private:
  struct PendingFree {
    Event event;
    Block* block;
  };

  CachingAllocator(const Config& config, std::unique_ptr<Driver> driver, std::size_t chunk_size,
                   std::size_t total_memory);

  // mu_, held by a call that may change mappings: on release, the segment observer hears what
  // changed (one load on the hot path when nothing did).
  class ABSL_SCOPED_LOCKABLE ChangeLock {
   public:
    explicit ChangeLock(CachingAllocator* a) ABSL_EXCLUSIVE_LOCK_FUNCTION(a->mu_) : a_(a) { a_->mu_.Lock(); }
    ~ChangeLock() ABSL_UNLOCK_FUNCTION() ABSL_NO_THREAD_SAFETY_ANALYSIS {
      if (a_->store_->segments_changed()) a_->PublishSegments();
      a_->mu_.Unlock();
    }
    ChangeLock(const ChangeLock&) = delete;
    ChangeLock& operator=(const ChangeLock&) = delete;

   private:
    CachingAllocator* const a_;
  };
  void PublishSegments() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SharedReservedChanged() override ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  StreamPool* GetPool(Stream stream) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The free block of `set` (the `kind` pool) that serves `rounded` (best fit, growable small
  // tails last), or end().
  FreeSet::Map::iterator Fit(FreeSet& set, PoolKind kind, std::size_t rounded) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  Block* BestFit(StreamPool* pool, PoolKind kind, std::size_t rounded) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Hands out the front of free block `b`, or its back (Policy::TakesBack); `at`: its free-set
  // entry when the caller has it.
  void* Hand(Block* b, PoolKind kind, std::size_t size, std::size_t rounded,
             std::optional<FreeSet::Map::iterator> at = std::nullopt) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Indexes an allocated block and updates the allocation statistics.
  void* Account(Block* b, PoolKind kind, std::size_t size) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Asks the pressure handler for room, then tries once more (final).
  absl::StatusOr<void*> MallocUnderPressure(std::size_t size, std::size_t rounded, PoolKind kind, Stream stream)
      ABSL_LOCKS_EXCLUDED(mu_);
  // `last_resort`: an out-of-memory here is final (counted and reported); otherwise it returns
  // ResourceExhausted uncounted, for the pressure handler to act on.
  absl::StatusOr<Block*> MallocSlow(StreamPool* pool, PoolKind kind, std::size_t size, std::size_t rounded,
                                    bool last_resort) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  Block* ReuseFromOtherStream(StreamPool* pool, PoolKind kind, std::size_t rounded) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Maps memory for a request no free block holds: a refilled hole, a mapping grown in place
  // or a new (stitched) mapping, whichever needs the fewest new chunks (policy.h).
  // `lend_contested`: contested chunks may cross pools (a miss under pressure; policy.h).
  absl::StatusOr<Block*> Grow(StreamPool* pool, PoolKind kind, std::size_t rounded, bool lend_contested)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A hole of `pool` whose chunks were lent out and that holds `rounded` again once `slots` are
  // refilled (the fewest such slots; see policy.h).
  struct RefillPlan {
    Mapping* mapping = nullptr;
    DevicePtr at = 0;                   // where the request goes: a window start or just after an absent slot
    std::vector<std::uint32_t> slots;   // the absent slots inside [at, at + rounded) that need a chunk
    std::vector<std::uint32_t> recall;  // absent slots whose chunk comes home (MappingStore::Recall)
    std::size_t window = 0;             // bytes of the free-or-absent run around it (best fit among equals)
  };
  std::optional<RefillPlan> FindRefill(StreamPool* pool, std::size_t rounded) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether the chunk homed at absent slot `s` of `m` may come home now: free at its owner, as
  // StitchCandidates would lend it.
  // `hint`: see FreeAtOwner (caching_allocator.cc).
  bool Recallable(const Mapping* m, std::uint32_t s, Block** hint) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Block*> Refill(const RefillPlan& plan, std::vector<Policy::Candidate> candidates)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Free whole chunks that can be lent to a new or growing mapping of `pool`.
  // Free blocks of the other pool kind than `kind` holding a contested chunk (Policy::Contested)
  // are left out unless `lend_contested`.
  std::vector<Policy::Candidate> StitchCandidates(StreamPool* pool, PoolKind kind, bool lend_contested) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The mapping of `pool` whose free tail, grown in place by *slots chunks, holds `rounded`.
  Mapping* GrowableMapping(StreamPool* pool, PoolKind kind, std::size_t rounded, std::size_t* slots) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FreeBlock(Block* b) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ProcessPending(bool synchronize) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Marks the pool's pending fence done if its event has completed.
  void PollFence(StreamPool* pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void PollFences() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SyncFence(StreamPool* pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether the stream's work queued before free `seq` has run: polls and requests a fence
  // (waits for one when `synchronize`).
  bool EnsureFenced(StreamPool* pool, std::uint64_t seq, bool synchronize) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether every stale view that dissolving `m` would unmap (of the chunks homed in m) has been
  // passed by its stream's queued work; requests the fences needed (waits for them when
  // `synchronize`).
  bool StaleViewsFenced(const Mapping* m, bool synchronize) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RequestFence(StreamPool* pool) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void OnIdle(Mapping* m) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void OnBusy(Mapping* m) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void TrimStitchCache() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Retire(Mapping* m) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ProcessRetiring(bool synchronize) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ForgetMapping(Mapping* m) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ReleaseCached() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status BadPointer(const char* op, DevicePtr p) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string OutOfMemoryReport(std::size_t size, std::size_t rounded, Stream stream,
                                const absl::Status& cause) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  Event GetEvent() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Config config_;
  const std::unique_ptr<Driver> driver_;
  const std::size_t chunk_size_;
  const Policy policy_;
  std::string fallback_reason_;

  Mutex pressure_mu_;
  std::shared_ptr<const PressureHandler> pressure_ ABSL_GUARDED_BY(pressure_mu_);
  std::atomic<bool> has_pressure_handler_{false};
  std::size_t stitch_cache_limit_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<MappingStore> store_ ABSL_GUARDED_BY(mu_);
  SegmentObserver segment_observer_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<Stream, std::unique_ptr<StreamPool>> pools_ ABSL_GUARDED_BY(mu_);
  StreamPool* last_pool_ ABSL_GUARDED_BY(mu_) = nullptr;
  absl::flat_hash_map<DevicePtr, Block*> allocated_ ABSL_GUARDED_BY(mu_);
  // Misses so far (MallocSlow calls), and the largest Chunk::contested_until set: no chunk is
  // contested once misses_ reaches it.
  std::uint64_t misses_ ABSL_GUARDED_BY(mu_) = 0;
  std::uint64_t contested_horizon_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<PendingFree> pending_ ABSL_GUARDED_BY(mu_);
  std::vector<Event> spare_events_ ABSL_GUARDED_BY(mu_);
  std::list<Mapping*> idle_lru_ ABSL_GUARDED_BY(mu_);
  std::size_t idle_stitched_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<Mapping*> retiring_ ABSL_GUARDED_BY(mu_);
};

}  // namespace stitchalloc
