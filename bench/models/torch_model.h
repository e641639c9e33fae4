// TorchAllocatorModel: a model of PyTorch's CUDA caching allocator (c10/cuda/
// CUDACachingAllocator.cpp, DeviceCachingAllocator) in its default mode and in its
// expandable_segments mode, for trace replay. It moves no memory and calls no driver: addresses
// are simulated, "reserved" is what PyTorch would hold from cudaMalloc (or map, in expandable
// mode). docs/policies.md lists which PyTorch behaviour each part follows.
//
// Data structures, as in PyTorch:
// - Block: a contiguous range of one segment, linked to its address neighbours (prev/next) in
//   that segment. A block is allocated, free (cached, in its pool's `blocks` set) or, in
//   expandable mode, unmapped (in the pool's `unmapped` set).
// - Pool: small (rounded requests <= 1 MiB) and large. `blocks` is ordered by (stream, size,
//   address), so lower_bound is best fit on the request's stream; `unmapped` by (stream,
//   address), so the lowest unmapped range of a stream comes first.
// - Default mode: a segment is one cudaMalloc of get_allocation_size(request) (2 MiB for the
//   small pool, 20 MiB for 1-10 MiB requests, else the request rounded up to 2 MiB); segments
//   are freed only whole, by release_cached_blocks (empty_cache, or the retry before an OOM).
// - Expandable mode: one segment per (stream, pool) reserves the device's capacity of virtual
//   addresses and maps pages (2 MiB small pool, 20 MiB large pool) at the lowest free range
//   that can hold the request; release_cached_blocks unmaps the whole pages inside free blocks.
//
// Invariants (CheckInvariants): blocks of a segment tile it without gaps; no two adjacent free
// blocks with the same mapped state (they would have been merged); set membership matches the
// block state; the counters equal the sums over blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/btree_set.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace stitchalloc::bench {

struct TorchModelOptions {
  bool expandable_segments = false;
  // PyTorch's max_split_size_mb in bytes; SIZE_MAX is PyTorch's default (unlimited).
  std::size_t max_split_size = SIZE_MAX;
  // garbage_collection_threshold (0: off). Active only with a memory fraction, as in PyTorch.
  double garbage_collection_threshold = 0.0;
  // set_per_process_memory_fraction; nullopt-like: < 0 means never called.
  double memory_fraction = -1.0;
  // Device capacity: cudaMalloc (or map) fails beyond it.
  std::size_t device_memory = std::size_t{80} << 30;
};

struct TorchModelCounters {
  std::int64_t allocated = 0, allocated_peak = 0;  // allocated_bytes (block sizes)
  std::int64_t reserved = 0, reserved_peak = 0;    // reserved_bytes
  std::int64_t segment_allocs = 0;                 // cudaMalloc calls (map calls in expandable mode)
  std::int64_t segment_frees = 0;                  // cudaFree calls (unmap calls)
  std::int64_t ooms = 0;
  std::int64_t retries = 0;  // num_alloc_retries: mallocs that released all cached blocks and retried
};

// Where the model's reserved bytes sit (see MemoryBreakdown in bench/replay/replay.h).
struct TorchModelMemory {
  std::int64_t requested = 0, rounding = 0, free_small = 0, free_pages = 0, free_pieces = 0, segments = 0;
};

class TorchAllocatorModel {
 public:
  static constexpr std::size_t kMinBlockSize = 512;
  static constexpr std::size_t kSmallSize = std::size_t{1} << 20;
  static constexpr std::size_t kSmallBuffer = std::size_t{2} << 20;
  static constexpr std::size_t kLargeBuffer = std::size_t{20} << 20;
  static constexpr std::size_t kMinLargeAlloc = std::size_t{10} << 20;
  static constexpr std::size_t kRoundLarge = std::size_t{2} << 20;

  explicit TorchAllocatorModel(const TorchModelOptions& options);
  ~TorchAllocatorModel();
  TorchAllocatorModel(const TorchAllocatorModel&) = delete;
  TorchAllocatorModel& operator=(const TorchAllocatorModel&) = delete;

  static std::size_t RoundSize(std::size_t size);
  static std::size_t AllocationSize(std::size_t rounded);

  // Returns the block's (simulated) address. ResourceExhausted when PyTorch would raise
  // OutOfMemoryError; InvalidArgument for size 0.
  absl::StatusOr<std::uint64_t> Malloc(std::size_t size, std::uint64_t stream);
  // InvalidArgument for an address that is not an allocated block.
  absl::Status Free(std::uint64_t ptr);
  // torch.cuda.empty_cache(): release_cached_blocks.
  void EmptyCache();

  const TorchModelCounters& counters() const { return counters_; }
  // Sizes of the segments allocated (cudaMalloc) or pages mapped (expandable), in order.
  const std::vector<std::size_t>& segment_log() const { return segment_log_; }
  absl::Status CheckInvariants() const;
  // Reserved bytes by use; free large-pool bytes split into whole 2 MiB pages and the rest.
  TorchModelMemory Memory() const;

 private:
  struct Pool;
  struct Segment;
  struct Block {
    std::uint64_t stream = 0;
    std::size_t size = 0;
    std::uint64_t ptr = 0;
    Pool* pool = nullptr;
    Segment* segment = nullptr;
    Block* prev = nullptr;
    Block* next = nullptr;
    bool allocated = false;
    bool mapped = true;
    std::size_t requested = 0;
    std::uint64_t gc_base = 0;
  };
  struct BySize {
    bool operator()(const Block* a, const Block* b) const;
  };
  struct ByAddress {
    bool operator()(const Block* a, const Block* b) const;
  };
  struct Pool {
    bool is_small = false;
    absl::btree_set<Block*, BySize> blocks;
    absl::btree_set<Block*, ByAddress> unmapped;
    std::uint64_t get_free_calls = 0;
  };
  struct Segment {
    std::uint64_t base = 0;
    std::size_t size = 0;
    std::size_t page = 0;      // expandable: the mapping unit
    bool expandable = false;
  };

  Block* NewBlock(std::uint64_t stream, std::size_t size, std::uint64_t ptr, Pool* pool, Segment* segment);
  Block* GetFreeBlock(Pool& pool, std::uint64_t stream, std::size_t rounded);
  Block* AllocBlock(Pool& pool, std::uint64_t stream, std::size_t rounded, std::size_t alloc_size, bool is_retry);
  bool Fits(std::size_t bytes) const;
  Block* TryAllocateExpandable(Pool& pool, std::uint64_t stream, std::size_t size);
  Block* FindExpandable(Pool& pool, std::uint64_t stream, std::size_t size);
  Block* MapBlock(Block* to_map, std::size_t size);
  void UnmapBlock(Block* b);
  // Merges src into dst when src is free with the same mapped state; returns bytes merged.
  std::size_t TryMerge(Block* dst, Block* src);
  void FreeBlock(Block* b);
  bool ShouldSplit(const Block* b, std::size_t rounded) const;
  void ReleaseBlock(Block* b);
  bool ReleaseAvailable(Pool& pool, std::uint64_t stream, std::size_t rounded);
  void ReleaseCached();
  void GarbageCollect();
  void AddReserved(std::int64_t delta);
  bool fraction_set() const { return options_.memory_fraction >= 0; }
  std::size_t allowed() const;

  const TorchModelOptions options_;
  Pool small_, large_;
  TorchModelCounters counters_;
  absl::flat_hash_map<std::uint64_t, std::unique_ptr<Segment>> segments_;  // by base address
  absl::flat_hash_map<std::uint64_t, Block*> active_;
  std::vector<std::size_t> segment_log_;
  std::uint64_t next_va_ = std::uint64_t{1} << 40;
};

}  // namespace stitchalloc::bench
