// MappingStore: the mechanism under the caching allocator. It owns every Chunk, Mapping and
// Block (see block.h for their invariants) and performs the driver work: creating mappings
// from new and borrowed chunks (stitching), splitting and merging blocks, lending chunks,
// returning them home, trimming free chunks and dissolving mappings. It makes no decisions:
// which block, which chunks and when are the policy's and the CachingAllocator's.
//
// It keeps these statistics in step: segment, reserved_bytes, inactive_split(_bytes),
// oversize_segments, stitched_segment, num_device_alloc/free, num_map/unmap_calls,
// num_stitches, stitched_bytes, num_dissolves.
//
// Segment tracking (for PyTorch's segment_alloc / segment_free trace events): while on, the store
// remembers each mapping's segments (maximal runs of present slots, as a snapshot shows them) as
// last reported, and notes every mapping whose slots, size or stream changed since; the runs of a
// dissolved mapping are queued as unmapped. TakeSegmentEvents turns the difference into events,
// so that the events reported since tracking began, applied to the segments there were then,
// give exactly the segments there are now, and every unmapped run was reported mapped with the
// same address, size and stream. Off (the default), nothing is tracked or allocated for it.
//
// Not thread-safe: the CachingAllocator calls it under its mutex.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/block.h"
#include "allocator/stats.h"
#include "vmm/driver.h"

namespace stitchalloc {

// Whole chunk slots [first_slot, first_slot + count) lying inside the free block `block`.
struct SlotRun {
  Block* block = nullptr;
  std::uint32_t first_slot = 0;
  std::uint32_t count = 0;
};

// A segment that appeared (mapped) or went (unmapped): see the file comment.
struct SegmentEvent {
  bool mapped = false;
  DevicePtr ptr = 0;
  std::size_t size = 0;
  Stream stream = kDefaultStream;
  PoolKind kind = PoolKind::kLarge;
  bool operator==(const SegmentEvent&) const = default;
};

class MappingStore {
 public:
  MappingStore(Driver& driver, Stats& stats, std::size_t max_split_size);
  // Also counts reserved bytes into `total` (the device's allocators together; may be null).
  void ShareReserved(std::atomic<std::int64_t>* total) { shared_reserved_ = total; }
  ~MappingStore();  // unmaps and releases everything, live allocations included
  MappingStore(const MappingStore&) = delete;
  MappingStore& operator=(const MappingStore&) = delete;

  // Maps a new range for `pool`: first the chunks of `borrow` (each run inside a free block;
  // the runs must lie in distinct blocks), lent by their current owners, then `fresh` new
  // chunks of `chunk_size`. The new mapping holds one free block covering it, in the pool's
  // free set. On failure nothing changes (created chunks are released, the range is freed).
  // `headroom` more virtual bytes are reserved behind the range for Extend (best effort: when
  // the address space cannot hold them, the mapping gets none).
  absl::StatusOr<Mapping*> Create(StreamPool* pool, PoolKind kind, std::size_t chunk_size,
                                  const std::vector<SlotRun>& borrow, std::size_t fresh,
                                  std::size_t headroom = 0);
  // Grows `m` in place: maps the chunks of `borrow` (runs of other mappings, as for Create),
  // then `fresh` new chunks, at its end, inside its headroom. The new range becomes free and
  // merges with a free tail; returns that free block. On failure nothing changes.
  absl::StatusOr<Block*> Extend(Mapping* m, const std::vector<SlotRun>& borrow, std::size_t fresh);

  // Maps chunks again at absent slots of `m` (each behind an absent block: its chunk lent out,
  // its view stale, or trimmed): the chunks of `borrow` (as for Create), then `fresh` new ones,
  // one per slot in order. The views still mapped at those slots are unmapped first; a home
  // chunk that was lent out makes its owner (which maps it) its home. The slots become free and
  // merge with free neighbours; returns the block holding the last slot. On failure nothing
  // changes.
  absl::StatusOr<Block*> Refill(Mapping* m, const std::vector<std::uint32_t>& slots,
                                const std::vector<SlotRun>& borrow, std::size_t fresh);

  // The chunk homed at absent slot `slot` of `m`, lent out, comes back home from the free block
  // `at_owner` of its owner, which holds the chunk's whole slot: its home view is still mapped,
  // so no driver call is made. The owner's slot becomes absent (its view stale); the home's
  // slot becomes free and merges. Returns the merged block.
  Block* Recall(Mapping* m, std::uint32_t slot, Block* at_owner);

  // Whether `m` maps chunk `c` anywhere (home, owner or stale view): then `m` cannot grow with it.
  static bool MapsChunk(const Mapping* m, const Chunk* c);

  // The whole chunk slots inside free block `b`, if any.
  static std::optional<SlotRun> FreeSlots(Block* b);

  // Hands out exactly [b->ptr + offset, + size) of free block `b`, which must contain it; the
  // bytes before and after stay free blocks.
  Block* AllocateRange(Block* b, std::size_t offset, std::size_t size);
  // Hands out the first `size` bytes of free block `b` (the last ones when `back`); the rest
  // becomes a free block when `split`, else stays part of the allocation. `at`: b's entry in its
  // pool's free set, when the caller has it (saves a second search).
  Block* Allocate(Block* b, std::size_t size, bool split, bool back = false,
                  std::optional<FreeSet::Map::iterator> at = std::nullopt);
  // Marks an allocated or pending block free at pool sequence `seq`, merges it with free
  // neighbours and files it in its pool's free set. Returns the merged block.
  Block* Free(Block* b, std::uint64_t seq);

  // Unmaps an idle mapping none of whose home chunks is lent out: borrowed chunks go home,
  // home chunks are released, stale views are dropped, the range is freed.
  absl::Status Dissolve(Mapping* m);
  // Gives up being the home of m's chunks that are lent out: each one's owner, which maps it,
  // becomes its home, and m's view of it is unmapped (the slot becomes an unmapped hole). Then
  // nothing keeps m from being dissolved. The caller checked m's fence (unmapping is immediate).
  absl::Status Disown(Mapping* m);
  // Keeps `m` but gives up its free whole chunks: borrowed ones go home, home ones not lent
  // out are released (their slots become unmapped holes).
  absl::Status Trim(Mapping* m);
  // Moves an idle mapping to another stream's pool (the caller checked the fence).
  void MoveToPool(Mapping* m, StreamPool* to);

  // Mappings that lending left with no chunk of their own and nothing busy, and either no chunk
  // lent out or made by a stitch (see Emptied): the caller retires them. Cleared by the call.
  std::vector<Mapping*> TakeEmptied();

  // Segment tracking (see the file comment). Turning it on takes the present segments as the
  // baseline (no events); turning it off forgets everything tracked.
  void TrackSegments(bool on);
  bool tracking_segments() const { return tracking_; }
  // Whether TakeSegmentEvents has anything to report (the allocator's hot path asks).
  bool segments_changed() const { return !segment_changes_.empty() || !segments_gone_.empty(); }
  // What changed since the last call: the unmapped segments, then the mapped ones, each in
  // address order.
  std::vector<SegmentEvent> TakeSegmentEvents();
  // Every tracked segment as unmapped (after what changed), and tracking off: the allocator's
  // teardown, which releases them all.
  std::vector<SegmentEvent> TakeSegmentEventsForTeardown();
  // The segments of `m` now: its maximal runs of present slots.
  static std::vector<Mapping::Run> PresentRuns(const Mapping& m);
  // Whether m's tracked segments are its runs now, or are noted as changed (CheckInvariants).
  bool SegmentsUpToDate(const Mapping& m) const {
    if (!tracking_) return m.segments.empty();
    return segment_changes_.contains(&m) || m.segments == PresentRuns(m);
  }

  // The mapping whose range contains `p`, or nullptr.
  Mapping* Find(DevicePtr p) const;
  const absl::btree_map<DevicePtr, std::unique_ptr<Mapping>>& mappings() const { return mappings_; }
  // The mappings with absent slots (lent, stale or trimmed), by address.
  const absl::btree_map<DevicePtr, Mapping*>& mappings_with_absent() const { return with_absent_; }
  std::size_t chunk_count() const { return chunks_.size(); }

 private:
  // Whether idle `m` has nothing left to hand out: no chunk of its own and, unless it was made
  // by a stitch, none lent out. A stitched range whose chunks all went on to other mappings
  // only costs every later refill search a walk through it (in a multi-stream steady state,
  // dozens of such ranges per miss), so it goes; the chunks it is home to get their borrowers
  // as homes (Disown). A mapping of new chunks that lent them all stays, as before, a refill
  // target (retiring those too changed nothing measurable on the 13 traces).
  static bool Emptied(const Mapping* m) {
    return m->present == 0 && m->idle() && (m->lent_home == 0 || m->stitched);
  }
  // Queues `m` for TakeEmptied when Emptied (once).
  void NoteIfEmptied(Mapping* m);
  Block* NewBlock();
  void DeleteBlock(Block* b);
  void InsertFree(Block* b, std::optional<FreeSet::Map::iterator> hint = std::nullopt);
  // `at`: b's entry in the free set, if known.
  FreeSet::Map::iterator EraseFree(Block* b, std::optional<FreeSet::Map::iterator> at = std::nullopt);
  void UncountSplit(Block* b);
  // Splits `b` after its first `front` bytes: b keeps them, a new block linked after it (not
  // in any free set) the rest.
  Block* SplitAfter(Block* b, std::size_t front);
  Block* MergeAndInsert(Block* b);
  // Replaces the run's slots by absent blocks (the free remainder stays free).
  void CarveRun(const SlotRun& run);
  void ReturnHome(Chunk* c);
  // Marks a change of m's free blocks: a version no mapping ever had (so a cached version
  // never matches a later mapping at the same address).
  void Touch(Mapping* m) { m->version = ++last_version_; }
  // Sets or clears the absent block of a slot, keeping Mapping::absent_slots and with_absent_.
  void SetAbsent(Mapping* m, std::uint32_t slot, Block* a);
  // Driver work shared by Create, Extend and Refill: creates `fresh` chunks, maps `chunks`
  // followed by them (chunk i at at[i]), sets access. On failure undoes all of it (the
  // reservation stays, `chunks` is as it was).
  absl::Status MapChunks(const std::vector<DevicePtr>& at, std::size_t chunk_size, std::vector<Chunk*>& chunks,
                         std::size_t fresh, std::vector<std::unique_ptr<Chunk>>& created);
  // Commit of borrowed runs and created chunks into `slots` of `m` (in that order), whose
  // m->slots entries already name the chunks.
  void Adopt(Mapping* m, const std::vector<std::uint32_t>& slots, const std::vector<SlotRun>& borrow,
             std::vector<std::unique_ptr<Chunk>>& created);
  absl::Status UnmapSlot(Mapping* m, std::uint32_t slot);
  absl::Status ReleasePhysical(Chunk* c);
  void Note(absl::Status& first, absl::Status s) {
    if (first.ok() && !s.ok()) first = std::move(s);
  }
  // Notes that m's segments may have changed (segment tracking).
  void SegmentsMayChange(Mapping* m) {
    if (!tracking_) return;
    segment_changes_.insert(m);
  }

  Driver& driver_;
  Stats& stats_;
  std::atomic<std::int64_t>* shared_reserved_ = nullptr;
  const std::size_t max_split_size_;
  absl::btree_map<DevicePtr, std::unique_ptr<Mapping>> mappings_;
  absl::btree_map<DevicePtr, Mapping*> with_absent_;
  std::uint64_t last_version_ = 0;
  absl::flat_hash_map<Chunk*, std::unique_ptr<Chunk>> chunks_;
  std::vector<Block*> spare_blocks_;
  std::vector<Mapping*> emptied_;
  bool tracking_ = false;
  absl::flat_hash_set<Mapping*> segment_changes_;  // live mappings whose segments may have changed
  std::vector<SegmentEvent> segments_gone_;        // the unmapped segments of dissolved mappings
};

}  // namespace stitchalloc
