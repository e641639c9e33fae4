// PlannedAllocator: the plan-guided arena runtime in front of a CachingAllocator.
//
// Life cycle per plan signature (for example the sequence length), chosen by the caller at
// BeginIteration:
//   no plan      the iteration is recorded (requests served by the caching allocator); at
//                EndIteration it is planned bi-level (bilevel.h), one arena of the plan's size
//                is allocated from the caching allocator (VMM-backed) and the plan is cached;
//   plan cached  each request is matched by (layer kind, index, phase, occurrence, ordinal) to
//                its slot; when size and stream match and the planned range is free, it is
//                served at arena base + offset (a hit) with no driver call. Anything else (an
//                extra request, another size, another stream, a range still occupied because
//                frees came in another order) is served by the caching allocator and counted
//                as a miss. Requests recorded as outliving the iteration always go to the
//                caching allocator (counted as unplanned). After `replan_after` consecutive
//                iterations with misses, the plan is dropped and the next iteration records.
// Plans of other signatures stay cached, so alternating shapes costs a lookup. Iterations never
// overlap, so all plans share one arena, as large as the largest cached plan, taken from the
// caching allocator (VMM-backed) when a serving iteration starts. A recording iteration lends
// it back (freed to the caching pool, whose cache then serves the recording), so the arena
// never sits idle beside a recording. Growing or taking it needs no arena allocation to be
// live; until then the plan's iterations pass through. Dropping the last plan frees it too.
//
// Safety: an arena range is handed out only if no live arena allocation overlaps it (an
// offset-ordered map of live ranges), so a changed order can cost a miss but never aliases two
// live allocations, whichever plans they came from. A plan serves one stream (ArenaStream: the
// recording's requests on other streams are unplanned) and the arena is a block of that stream,
// so reusing a range in host order is ordered on the device too, and so is the block's return
// to the caching allocator.
//
// Thread-safe. While no iteration is open and no plan or arena allocation exists, Malloc and
// Free pass straight through without taking the arena's lock.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/arena/bilevel.h"
#include "allocator/arena/recording.h"
#include "allocator/caching_allocator.h"
#include "vmm/mutex.h"

namespace stitchalloc::arena {

struct ArenaOptions {
  int replan_after = 2;  // consecutive iterations with misses before re-planning
  BiLevelOptions planning;
};

struct ArenaStats {
  std::int64_t hits = 0;
  std::int64_t misses = 0;
  std::int64_t unplanned = 0;       // requests planned to go to the caching allocator
  std::int64_t replans = 0;         // plans dropped after repeated misses
  std::int64_t plans_built = 0;
  std::int64_t plans_cached = 0;    // current
  std::int64_t plan_failures = 0;   // recordings that could not be planned or mapped
  std::int64_t arena_bytes = 0;     // current size of the shared arena
  std::int64_t passthrough_iterations = 0;  // a cached plan waited for the arena to grow
  std::int64_t recorded_iterations = 0;
  std::int64_t served_iterations = 0;
  std::int64_t last_plan_lower_bound = 0;
  std::int64_t last_plan_arena_bytes = 0;
  std::int64_t last_plan_time_us = 0;
  std::int64_t deferred_frees = 0;  // arena frees held until other streams (record_stream) were done
};

// Calls fn(name, value) for every statistic, named as the C API and the Python package show
// them ("arena.hits", ...), in a fixed order.
template <typename Fn>
void ForEachArenaStat(const ArenaStats& s, Fn&& fn) {
  fn("arena.hits", s.hits);
  fn("arena.misses", s.misses);
  fn("arena.unplanned", s.unplanned);
  fn("arena.replans", s.replans);
  fn("arena.plans_built", s.plans_built);
  fn("arena.plans_cached", s.plans_cached);
  fn("arena.plan_failures", s.plan_failures);
  fn("arena.arena_bytes", s.arena_bytes);
  fn("arena.passthrough_iterations", s.passthrough_iterations);
  fn("arena.recorded_iterations", s.recorded_iterations);
  fn("arena.served_iterations", s.served_iterations);
  fn("arena.last_plan_lower_bound", s.last_plan_lower_bound);
  fn("arena.last_plan_arena_bytes", s.last_plan_arena_bytes);
  fn("arena.last_plan_time_us", s.last_plan_time_us);
  fn("arena.deferred_frees", s.deferred_frees);
}

class PlannedAllocator {
 public:
  // `backing` must outlive this object.
  explicit PlannedAllocator(CachingAllocator* backing, ArenaOptions options = {});
  // Frees the arena (arena allocations still live are lost with it).
  ~PlannedAllocator();
  PlannedAllocator(const PlannedAllocator&) = delete;
  PlannedAllocator& operator=(const PlannedAllocator&) = delete;

  absl::Status BeginIteration(std::uint64_t signature);
  absl::Status EndIteration();
  // Layer marks outside an iteration are accepted and ignored.
  absl::Status LayerBegin(absl::string_view kind, int index, Phase phase);
  absl::Status LayerEnd();

  absl::StatusOr<void*> Malloc(std::size_t size, Stream stream = kDefaultStream);
  absl::Status Free(void* ptr);
  // `stream` uses the allocation too (PyTorch's record_stream). For an arena allocation on
  // another stream than the arena's, its free is deferred: the range stays occupied until an
  // event recorded on each such stream at the free has completed (polled when a request needs
  // the range, never waited for on the host). Other pointers go to the caching allocator.
  absl::Status RecordStream(void* ptr, Stream stream);
  // The allocation at `ptr`: an arena allocation (its range, and the arena block's mapping), or
  // the caching allocator's answer.
  absl::StatusOr<BlockInfo> Describe(const void* ptr) const;
  // CachingAllocator::Share for an arena allocation too (the arena block's chunks under it).
  absl::StatusOr<SharedRange> Share(const void* ptr);

  // Forgets a cached plan; the arena is freed with the last plan. FailedPrecondition while
  // arena allocations are live or the plan serves the open iteration.
  absl::Status DropPlan(std::uint64_t signature);
  absl::Status DropAllPlans();

  ArenaStats GetStats() const;
  // The plan cached for `signature`, if any (tests and tools).
  const ArenaPlan* FindPlan(std::uint64_t signature) const;
  bool IsArenaPointer(const void* ptr) const;

 private:
  struct CachedPlan {
    ArenaPlan plan;
    std::vector<const std::vector<Slot>*> sequence;  // slots of plan.layer_sequence[i]
    int missed_iterations = 0;
  };
  enum class Mode { kIdle, kRecording, kServing, kPassThrough };

  void UpdateEngaged() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status DropLocked(std::uint64_t signature) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether the arena is at least `bytes` large and a block of `stream`.
  bool FitsLocked(std::int64_t bytes, Stream stream) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The open iteration is served from `plan`.
  void ServeLocked(CachedPlan* plan) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::int64_t LargestPlan() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The offset of `ptr` in the arena, or -1 when it lies outside it.
  std::int64_t ArenaOffset(const void* ptr) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether `off` starts an arena allocation the caller still holds (not freed, not deferred).
  bool HeldLocked(std::int64_t off) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The offset of `ptr` when it starts a held arena allocation, -1 when it lies outside the
  // arena; InvalidArgument naming `op` for any other pointer inside it.
  absl::StatusOr<std::int64_t> HeldOffsetLocked(const void* ptr, absl::string_view op) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether any arena allocation is held (deferred frees do not count).
  bool AnyHeldLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return live_.size() > deferred_.size(); }
  // Frees the deferred ranges whose streams are done with them.
  void ReapLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Returns the arena block to the caching allocator (no allocation may be held): the streams
  // of still-deferred ranges are recorded on the block first, so its reuse waits for them too.
  absl::Status FreeArenaLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  CachingAllocator* const backing_;
  const ArenaOptions options_;
  std::atomic<bool> engaged_{false};

  mutable Mutex mu_;
  Mode mode_ ABSL_GUARDED_BY(mu_) = Mode::kIdle;
  std::uint64_t signature_ ABSL_GUARDED_BY(mu_) = 0;
  Recorder recorder_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::uint64_t, std::unique_ptr<CachedPlan>> plans_ ABSL_GUARDED_BY(mu_);
  CachedPlan* current_ ABSL_GUARDED_BY(mu_) = nullptr;
  // Serving context: the slots of the open layer (or outside), and the next ordinal.
  const std::vector<Slot>* slots_ ABSL_GUARDED_BY(mu_) = nullptr;
  int ordinal_ ABSL_GUARDED_BY(mu_) = 0;
  int outside_ordinal_ ABSL_GUARDED_BY(mu_) = 0;
  bool in_layer_ ABSL_GUARDED_BY(mu_) = false;
  bool iteration_missed_ ABSL_GUARDED_BY(mu_) = false;
  // Layers follow the recorded sequence (fast path) until one does not; from then on they are
  // looked up by key with occurrences counted here.
  std::size_t layer_pos_ ABSL_GUARDED_BY(mu_) = 0;
  bool off_sequence_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_map<std::tuple<std::string, int, Phase>, int> occurrences_ ABSL_GUARDED_BY(mu_);
  void* base_ ABSL_GUARDED_BY(mu_) = nullptr;  // the shared arena
  Stream arena_stream_ ABSL_GUARDED_BY(mu_) = kDefaultStream;  // the stream it was allocated on
  std::int64_t arena_size_ ABSL_GUARDED_BY(mu_) = 0;
  absl::btree_map<std::int64_t, std::int64_t> live_ ABSL_GUARDED_BY(mu_);  // offset -> end
  // Held arena allocations that other streams use too: offset -> those streams.
  absl::flat_hash_map<std::int64_t, std::vector<Stream>> used_on_ ABSL_GUARDED_BY(mu_);
  // Freed ranges other streams may still use: offset -> (stream, event recorded on it at the
  // free). They stay in live_ (occupied) until every event has completed.
  absl::flat_hash_map<std::int64_t, std::vector<std::pair<Stream, Event>>> deferred_ ABSL_GUARDED_BY(mu_);

  ArenaStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace stitchalloc::arena
