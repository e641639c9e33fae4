// Stats: allocator statistics with the names and meaning of torch.cuda.memory_stats(), plus
// stitchalloc's own counters.
//
// A Stat tracks current, peak, allocated (sum of increases) and freed (sum of decreases).
// A StatArray holds one Stat per pool: all, small_pool, large_pool. Peaks reset to current with
// ResetPeak; allocated/freed and the event counters reset with ResetAccumulated.
//
// Meaning, as in PyTorch (a "segment" here is one virtual mapping; "reserved" is physical
// memory, so a stitched mapping adds a segment but no reserved bytes):
//   allocation / allocated_bytes      blocks handed out by malloc (rounded sizes)
//   requested_bytes                   the sizes callers asked for
//   active / active_bytes             allocated plus freed blocks still waiting on stream events
//   inactive_split / ..._bytes        free blocks that are part of a split mapping
//   segment / reserved_bytes          mappings / physical chunk bytes held
//   num_alloc_retries                 mallocs that released cached memory and retried
//   num_ooms                          out-of-memory errors returned
//   num_device_alloc / num_device_free  physical chunks created / released
// stitchalloc only:
//   num_stitches, stitched_bytes      stitch operations, bytes of borrowed chunks they mapped
//   stitched_segment                  live mappings made by stitching (current/peak)
//   num_map_calls / num_unmap_calls   driver map/unmap calls
//   num_dissolves                     stitched or emptied mappings unmapped
//   num_cross_stream_reuses           free mappings moved to another stream after its events
//   num_grows_in_place                mappings grown at their end instead of a new mapping
//   num_refills                       holes made whole again by mapping chunks at their lent slots
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/attributes.h"

namespace stitchalloc {

enum PoolIndex : int { kPoolAll = 0, kPoolSmall = 1, kPoolLarge = 2 };

struct Stat {
  std::int64_t current = 0;
  std::int64_t peak = 0;
  std::int64_t allocated = 0;
  std::int64_t freed = 0;

  ABSL_ATTRIBUTE_ALWAYS_INLINE void Add(std::int64_t delta) {
    current += delta;
    if (delta >= 0) {
      allocated += delta;
      if (current > peak) peak = current;
    } else {
      freed -= delta;
    }
  }
  void ResetPeak() { peak = current; }
  void ResetAccumulated() { allocated = freed = 0; }
};

struct StatArray {
  std::array<Stat, 3> pools;
  // Adds to "all" and to `pool` (kPoolSmall or kPoolLarge).
  ABSL_ATTRIBUTE_ALWAYS_INLINE void Add(int pool, std::int64_t delta) {
    pools[kPoolAll].Add(delta);
    pools[pool].Add(delta);
  }
  const Stat& all() const { return pools[kPoolAll]; }
};

struct Stats {
  StatArray allocation, segment, active, inactive_split;
  StatArray allocated_bytes, reserved_bytes, active_bytes, inactive_split_bytes, requested_bytes;
  Stat oversize_allocations, oversize_segments, stitched_segment;
  std::int64_t num_alloc_retries = 0;
  std::int64_t num_ooms = 0;
  std::int64_t num_sync_all_streams = 0;
  std::int64_t num_device_alloc = 0;
  std::int64_t num_device_free = 0;
  std::int64_t max_split_size = -1;  // bytes; -1 when unlimited (as PyTorch reports)
  std::int64_t num_stitches = 0;
  std::int64_t stitched_bytes = 0;
  std::int64_t num_map_calls = 0;
  std::int64_t num_unmap_calls = 0;
  std::int64_t num_dissolves = 0;
  std::int64_t num_cross_stream_reuses = 0;
  std::int64_t num_grows_in_place = 0;
  std::int64_t num_refills = 0;

  void ResetPeak();
  void ResetAccumulated();
  // Adds `other` in (currents, peaks, allocated/freed and counters summed; max_split_size
  // kept): the statistics of several allocators seen as one. A summed peak is an upper bound
  // of the peak of the sum.
  void Accumulate(const Stats& other);
  // What destroying the allocator does to its statistics: every current goes to zero, counted
  // as freed; peaks and counters stay.
  void ReleaseAll();
};

// The flat "name -> value" form of torch.cuda.memory_stats(), e.g.
// "allocated_bytes.all.current". Names and their order are fixed for a given release:
// StatNames()[i] names StatValues(stats)[i].
const std::vector<std::string>& StatNames();
std::vector<std::int64_t> StatValues(const Stats& stats);

}  // namespace stitchalloc
