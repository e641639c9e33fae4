// PinnedPool: page-locked host memory for offloaded tensors, pinned once in large slabs and
// sub-allocated by its own best-fit allocator. Pinning costs milliseconds per call
// (cuMemHostAlloc), so it never happens per tensor.
//
// Data structures (all under mu_):
// - slabs_: every pinned slab (base, size, bytes in use, high-water mark); slab_at_ maps the base
//   of each pinned slab to its index (SlabOf: one ordered lookup). A request larger
//   than the slab size gets a slab of its own, rounded up to the alignment; the slab that
//   reaches the capacity is only as large as what is left of it.
// - free_by_addr_: the free ranges of all slabs, address -> size, coalesced (two free ranges
//   are never adjacent within one slab); free_by_size_: the same ranges as (size, address), for
//   best fit (the smallest range that holds the request, the lowest address among equals).
// - used_: allocated address -> (size, slab index).
// Invariants: every byte of every slab is in exactly one free range or one allocation; the
// pinned total never exceeds the capacity; free ranges never span two slabs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/container/btree_map.h"
#include "absl/container/btree_set.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/driver.h"
#include "vmm/mutex.h"

namespace stitchalloc::swap {

struct PinnedPoolOptions {
  std::size_t slab_bytes = std::size_t{256} << 20;  // pinned per growth step
  std::size_t capacity = std::size_t{64} << 30;     // most host memory ever pinned
  std::size_t alignment = 512;                      // of every allocation (a power of two)
};

struct SlabStats {
  std::size_t bytes = 0;
  std::size_t in_use = 0;
  std::size_t high_water = 0;  // most bytes in use at once
};

struct PinnedPoolStats {
  std::size_t pinned_bytes = 0;  // all slabs
  std::size_t in_use_bytes = 0;
  std::size_t peak_in_use_bytes = 0;
  std::int64_t allocations = 0;       // current
  std::int64_t exhausted = 0;         // requests refused: capacity reached or pinning failed
  std::int64_t pin_calls = 0;         // slabs pinned so far
  std::vector<SlabStats> slabs;
};

class PinnedPool {
 public:
  // InvalidArgument for a zero slab size or capacity, or an alignment that is not a power of two.
  static absl::StatusOr<std::unique_ptr<PinnedPool>> Create(Driver* driver, const PinnedPoolOptions& options);
  // Unpins every slab (allocations still live are lost with them).
  ~PinnedPool();
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  // At least `bytes` of pinned host memory. InvalidArgument for 0; ResourceExhausted when the
  // capacity would be exceeded or the driver cannot pin more (the caller keeps the tensor on
  // the device). Pins a new slab only when no free range fits.
  absl::StatusOr<void*> Allocate(std::size_t bytes);
  // InvalidArgument for a pointer that is not a live allocation of this pool (foreign, double
  // free); nothing changes then.
  absl::Status Free(void* ptr);
  // Unpins slabs with nothing in use; returns the bytes unpinned.
  std::size_t ReleaseEmptySlabs();

  PinnedPoolStats GetStats() const;
  const PinnedPoolOptions& options() const { return options_; }
  // Walks the structures and checks the invariants above (tests).
  absl::Status CheckInvariants() const;

 private:
  struct Slab {
    std::uintptr_t base = 0;
    std::size_t bytes = 0;
    std::size_t in_use = 0;
    std::size_t high_water = 0;
  };
  struct Used {
    std::size_t bytes = 0;
    std::size_t slab = 0;
  };
  PinnedPool(Driver* driver, const PinnedPoolOptions& options) : driver_(driver), options_(options) {}
  void AddFree(std::uintptr_t at, std::size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RemoveFree(std::uintptr_t at, std::size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::size_t SlabOf(std::uintptr_t at) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  Driver* const driver_;
  const PinnedPoolOptions options_;
  mutable Mutex mu_;
  std::vector<Slab> slabs_ ABSL_GUARDED_BY(mu_);  // an unpinned slab keeps its entry with bytes 0
  absl::btree_map<std::uintptr_t, std::size_t> slab_at_ ABSL_GUARDED_BY(mu_);  // base -> index, pinned slabs
  absl::btree_map<std::uintptr_t, std::size_t> free_by_addr_ ABSL_GUARDED_BY(mu_);
  absl::btree_set<std::pair<std::size_t, std::uintptr_t>> free_by_size_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::uintptr_t, Used> used_ ABSL_GUARDED_BY(mu_);
  std::size_t pinned_ ABSL_GUARDED_BY(mu_) = 0;
  std::size_t in_use_ ABSL_GUARDED_BY(mu_) = 0;
  std::size_t peak_ ABSL_GUARDED_BY(mu_) = 0;
  std::int64_t exhausted_ ABSL_GUARDED_BY(mu_) = 0;
  std::int64_t pin_calls_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace stitchalloc::swap
