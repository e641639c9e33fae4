// SegmentPool: a caching allocator over whole segments that a SegmentSource hands out, as
// PyTorch's allocator serves a torch.cuda.MemPool created with its own allocator
// (CUDAPluggableAllocator: NCCL's ncclMemAlloc for symmetric memory and user-buffer
// registration, vLLM's sleep-mode cuMem allocator) or with no_split.
//
// Such memory cannot be stitched or mapped at stitchalloc's addresses: the source decides where
// a segment lies and how it is made. So this is the classic caching allocator, with PyTorch's
// rules:
//   - sizes round to 512 bytes; requests up to 1 MiB use the small pool, larger ones the large;
//   - a new segment is 2 MiB (small pool), 20 MiB (large requests under 10 MiB) or the request
//     rounded to 2 MiB;
//   - a free block of the request's stream and pool serves it best-fit (max_split_size rules);
//     the rest splits off (small pool: 512 bytes or more left; large pool: more than 1 MiB left,
//     blocks under max_split_size) unless the pool is no_split, when every allocation holds a
//     whole segment;
//   - a freed block merges with its free neighbours; one used by other streams (RecordStream)
//     waits for their events first;
//   - EmptyCache returns the segments that are wholly free to the source;
//   - when the source fails, or the memory limit would be passed, the pool returns its own
//     wholly free segments (unless SetKeepCached) and asks `on_source_exhausted` (the device's
//     other pools returning their cache, as PyTorch's allocator releases its cached blocks
//     before failing), then tries once more; after that, ResourceExhausted with the report.
//
// Invariants: the blocks of a segment cover it without gaps, linked in address order; no two
// free neighbours; every free block is in exactly one free set (its stream's, its pool's),
// keyed (size, address); allocated_ holds exactly the allocated blocks, pending_ the blocks
// that wait for events. Statistics follow stats.h ("segment" is one source segment, reserved
// bytes its size). Thread-safe; the source is called with the pool's lock held, as PyTorch
// calls a pool's allocator with its own lock held.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/pool_allocator.h"
#include "vmm/driver.h"
#include "vmm/mutex.h"

namespace stitchalloc {

// Where a SegmentPool's segments come from.
class SegmentSource {
 public:
  struct Segment {
    DevicePtr ptr = 0;
    std::size_t size = 0;  // at least what was asked for
  };
  virtual ~SegmentSource() = default;
  // A segment of at least `bytes`; ResourceExhausted when the memory is not there, any other
  // error when the source itself failed (both end the request; only the first is retried).
  virtual absl::StatusOr<Segment> Allocate(std::size_t bytes) = 0;
  // Returns a segment Allocate gave (ptr and size as it returned them).
  virtual absl::Status Release(const Segment& segment) = 0;
  // For another process: [offset, ...) of `segment`. FailedPrecondition where the source's
  // memory cannot be shared.
  virtual absl::StatusOr<SharedRange> Share(const Segment& segment, std::size_t offset);
  // Names the source in errors and reports, e.g. "the MemPool's own allocator".
  virtual std::string name() const = 0;

  // A source calling `allocate(bytes)` (nullptr: out of memory) and `release(ptr)`.
  static std::unique_ptr<SegmentSource> FromFunctions(std::function<void*(std::size_t)> allocate,
                                                      std::function<void(void*)> release, std::string name);
};

// Segments of the driver's own memory: one chunk each, reserved and mapped on its own (the
// VMM counterpart of a cudaMalloc); shareable when the driver is. The driver outlives it.
class DriverSegmentSource final : public SegmentSource {
 public:
  explicit DriverSegmentSource(Driver* driver) : driver_(driver) {}
  ~DriverSegmentSource() override;
  absl::StatusOr<Segment> Allocate(std::size_t bytes) override;
  absl::Status Release(const Segment& segment) override;
  absl::StatusOr<SharedRange> Share(const Segment& segment, std::size_t offset) override;
  std::string name() const override;

 private:
  Driver* const driver_;
  Mutex mu_;
  absl::flat_hash_map<DevicePtr, PhysHandle> chunks_ ABSL_GUARDED_BY(mu_);
};

class SegmentPool final : public PoolAllocator {
 public:
  struct Options {
    bool no_split = false;
    // Called (without the pool's lock) when the source or the memory limit refuses a segment:
    // it may release other pools' cached memory. May be empty.
    std::function<void()> on_source_exhausted;
  };
  // `driver` provides events (for RecordStream) and the device's total memory (the memory
  // fraction's base); it must outlive the pool. The source is shared: PoolSet keeps a pool's own
  // allocator to rebuild the pool over it (SetNoSplit).
  static absl::StatusOr<std::unique_ptr<SegmentPool>> Create(const Config& config, Driver* driver,
                                                             std::shared_ptr<SegmentSource> source,
                                                             Options options);
  // Returns every segment to the source, allocated blocks included.
  ~SegmentPool() override;

  absl::StatusOr<void*> Malloc(std::size_t size, Stream stream) override;
  absl::Status Free(void* ptr) override;
  absl::Status RecordStream(void* ptr, Stream stream) override;
  absl::Status EmptyCache() override;
  void SetSegmentObserver(SegmentObserver observer) override;

  absl::StatusOr<BlockInfo> Describe(const void* ptr) const override;
  absl::StatusOr<SharedRange> Share(const void* ptr) override;
  std::vector<SegmentInfo> Snapshot() const override;
  std::vector<LiveAllocation> LiveAllocations() const override;
  absl::StatusOr<void*> AllocateAt(const LiveAllocation& a) override;
  absl::Status CheckInvariants() const override;


 private:
  struct Seg;
  struct Blk {
    DevicePtr ptr = 0;
    std::size_t size = 0;
    std::size_t requested = 0;
    Seg* seg = nullptr;
    Blk* prev = nullptr;
    Blk* next = nullptr;
    BlockState state = BlockState::kFree;
    int events = 0;                          // kPending: events still to complete
    absl::flat_hash_set<Stream> uses;        // RecordStream's other streams (allocated)
  };
  struct Seg {
    SegmentSource::Segment mem;
    Stream stream = kDefaultStream;
    PoolKind kind = PoolKind::kLarge;
    Blk* head = nullptr;
  };
  using FreeSet = absl::btree_map<std::pair<std::size_t, DevicePtr>, Blk*>;
  struct PendingEvent {
    Event event;
    Blk* block;
  };

  SegmentPool(const Config& config, Driver* driver, std::shared_ptr<SegmentSource> source, Options options,
              std::size_t total_memory);

  FreeSet& SetOf(Stream stream, PoolKind kind) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Insert(Blk* b) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);  // into its free set, counted
  void Remove(Blk* b) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);  // out of its free set, counted
  Blk* BestFit(Stream stream, PoolKind kind, std::size_t rounded) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool ShouldSplit(const Blk* b, std::size_t rounded) const;
  // Allocates [b->ptr + offset, + rounded) of free block `b` (already out of its set); the
  // pieces either side go back free.
  Blk* Carve(Blk* b, std::size_t offset, std::size_t rounded) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void* Account(Blk* b, std::size_t requested) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<Blk*> NewSegment(Stream stream, PoolKind kind, std::size_t rounded, absl::Status* refused)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void FreeBlock(Blk* b) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);  // merge and insert
  void ProcessPending(bool synchronize) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Returns the wholly free segments to the source; their events are published.
  void ReleaseFreeSegments() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReleaseSegment(Seg* s, std::vector<SegmentEvent>* events) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Publish(std::vector<SegmentEvent> events) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::size_t Reserved() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void AddReserved(std::int64_t delta, PoolKind kind) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status BadPointer(const char* op, DevicePtr p) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The block holding address `p`, or null (blocks are reached through pointers: a const pool
  // still hands out a mutable one, for AllocateAt).
  Blk* Find(DevicePtr p) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string OutOfMemoryReport(std::size_t size, std::size_t rounded, Stream stream,
                                const absl::Status& cause) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Config config_;
  Driver* const driver_;
  const std::shared_ptr<SegmentSource> source_;
  const Options options_;
  SegmentObserver observer_ ABSL_GUARDED_BY(mu_);
  absl::btree_map<DevicePtr, std::unique_ptr<Seg>> segments_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::pair<Stream, PoolKind>, FreeSet> free_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<DevicePtr, Blk*> allocated_ ABSL_GUARDED_BY(mu_);
  std::vector<PendingEvent> pending_ ABSL_GUARDED_BY(mu_);
};

}  // namespace stitchalloc
