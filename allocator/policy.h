// Policy: the allocator's decisions, apart from the mechanism (MappingStore) that carries
// them out, so that policies can be compared. The sizes follow PyTorch's caching allocator:
// requests are rounded up to 512 bytes; requests up to 1 MiB use the small pool (mappings of
// driver-granularity chunks); larger ones use the large pool, whose mappings are made
// of chunk_size chunks: 20 MiB for 1-10 MiB requests that are no multiple of the chunk (so
// that they pack), else the fewest chunks that hold the request. A free block is split when
// the remainder is at least 512 bytes (small pool) or more than 1 MiB (large pool; while holes
// are refilled, at least 512 bytes as in expandable_segments), never when it is
// max_split_size or larger.
//
// Stitching: when no free block fits a large request, whole free chunks of other mappings are
// borrowed, the requesting stream's own first, then the smallest free runs first (fragments
// are used up, large free blocks are kept whole for large requests). Wholly free small-pool
// chunks count too when their size is the large pool's chunk size. New chunks make up any
// shortfall. A chunk the two pools take from each other in turn (it comes home from the other
// pool kind twice within kPingPongMisses misses: Contested) stays out of the other pool for the
// next kPingPongMisses misses, unless the alternative is out of memory: a layer loop whose small
// and large requests alternate would otherwise map, stitch, refill and unmap once per layer,
// and with the chunk kept, the loop stops missing altogether. Loans far apart are not
// ping-pong and stay free: the shared inference traces need one-off loans to stay within 1.05
// of their allocated peak, and a random 4-stream workload (docs/results.md) crept from 1.07 to
// 1.43 when any second return barred a chunk for good (windows of 2 to 4,096 misses kept it at
// 1.05-1.07).
//
// Refilling holes: a free block between live blocks that lent chunks keeps its address range
// (the lent slots stay behind absent blocks). When a later request no free block holds would
// fit such a hole again, chunks are mapped back at its absent slots instead: the lent chunk
// itself when it is free again at its borrower (it comes home with no driver call, its home
// view is still mapped), else borrowed or new ones. The refill is taken when it needs fewer new
// chunks than growing in place or a new mapping, or as many and no more mapped chunks. A
// request served from the piece that follows lent slots takes the piece's back when less than
// a chunk would remain, so the remainder stays in the hole's window (TakesBack). So lending
// a hole's chunks never costs more than keeping them: the chunks go back when the hole is
// wanted, and the hole's layout (and the partly used chunks at its ends) is what it was. In a
// training step such a hole is typically the next layer's temporary of the same size.
//
// Before a new mapping is made, a mapping of the stream whose last block is free
// grows in place (Headroom) by just the chunks the request still lacks, so a tail shorter
// than a chunk is not left behind: both pools then pack like PyTorch's expandable_segments
// (the small pool into one growing range per stream whose blocks span chunks), while the
// chunks still come from anywhere. A request that leaves more than 1 MiB but less than a chunk
// of a whole growable mapping takes its back (TakesBack): freed, it is the growable tail, so a
// larger request after it grows the mapping instead of stitching all its chunks anew.
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include "absl/status/status.h"
#include "allocator/block.h"
#include "allocator/config.h"
#include "allocator/mapping_store.h"

namespace stitchalloc {

class Policy {
 public:
  static constexpr std::size_t kMinBlockSize = 512;
  static constexpr std::size_t kSmallSize = 1 * kMiB;
  static constexpr std::size_t kLargeBuffer = 20 * kMiB;
  static constexpr std::size_t kMinLargeAlloc = 10 * kMiB;
  // Requests above this are rejected as impossible before any work (1 PiB).
  static constexpr std::size_t kMaxRequest = std::size_t{1} << 50;

  Policy(const Config& config, std::size_t granularity, std::size_t chunk_size)
      : stitching_(config.stitching),
        max_split_size_(config.max_split_size),
        headroom_(config.mapping_headroom / chunk_size * chunk_size),
        granularity_(granularity),
        chunk_size_(chunk_size) {}

  static std::size_t RoundSize(std::size_t n) { return n < kMinBlockSize ? kMinBlockSize : RoundUp(n, kMinBlockSize); }
  // The checks every allocator of a device applies to its input, with the messages users see:
  // a malloc size (1 byte to 1 PiB), a placement (AllocateAt: a positive multiple of
  // kMinBlockSize holding the requested bytes), a memory fraction (in (0, 1]).
  static absl::Status CheckRequest(std::size_t size) {
    if (size - 1 < kMaxRequest) [[likely]] return absl::OkStatus();  // 0 wraps around
    return RequestError(size);
  }
  static absl::Status RequestError(std::size_t size);
  static absl::Status CheckPlacement(DevicePtr ptr, std::size_t size, std::size_t requested);
  static absl::Status CheckFraction(double fraction);
  static PoolKind PoolFor(std::size_t rounded) { return rounded <= kSmallSize ? PoolKind::kSmall : PoolKind::kLarge; }

  // PyTorch's max_split_size rules for serving `rounded` from a free block of `block_size`.
  bool Acceptable(std::size_t block_size, std::size_t rounded) const {
    if (max_split_size_ == SIZE_MAX) return true;
    if (rounded < max_split_size_ && block_size >= max_split_size_) return false;
    if (rounded >= max_split_size_ && block_size >= rounded + kLargeBuffer) return false;
    return true;
  }
  // Large-pool remainders of 1 MiB or less split off (as in PyTorch's expandable_segments) when
  // the mapping can grow in place (`growable_tail`: the next growth joins the remainder) and
  // whenever holes are refilled (stitching without max_split_size): a remainder then merges with
  // its free neighbours while the block lives, so holes keep their full size (MayRefill).
  bool ShouldSplit(std::size_t block_size, std::size_t rounded, PoolKind kind, bool growable_tail = false) const {
    if (block_size >= max_split_size_) return false;
    const std::size_t rest = block_size - rounded;
    if (kind == PoolKind::kSmall) return rest >= kMinBlockSize;
    return rest > kSmallSize || ((growable_tail || MayRefill(kind)) && rest >= kMinBlockSize);
  }
  std::size_t ChunkSize(PoolKind kind) const { return kind == PoolKind::kSmall ? granularity_ : chunk_size_; }
  // The fewest chunks that hold `rounded`.
  std::size_t SlotsFor(std::size_t rounded, PoolKind kind) const {
    return kind == PoolKind::kSmall ? 1 : (rounded + chunk_size_ - 1) / chunk_size_;
  }
  // The chunks of a new mapping for `rounded`: as PyTorch's 20 MiB segments for 1-10 MiB
  // requests, a medium request that is no multiple of the chunk size gets a mapping of
  // kLargeBuffer, so that later medium requests pack into it instead of each leaving a tail
  // (unsplittable up to 1 MiB, a sliver only other medium requests can use above).
  std::size_t GrowSlots(std::size_t rounded, PoolKind kind) const {
    const std::size_t exact = SlotsFor(rounded, kind);
    if (kind == PoolKind::kSmall || rounded >= kMinLargeAlloc || chunk_size_ > kLargeBuffer) return exact;
    const std::size_t tail = exact * chunk_size_ - rounded;
    if (tail == 0) return exact;  // a whole number of chunks: nothing to pack
    return std::max(exact, kLargeBuffer / chunk_size_);
  }
  // The small pool stitches too (borrowed chunks in its mappings) when its chunks are
  // the large pool's size: then no pool keeps free whole chunks while the other makes new ones.
  bool MayStitch(PoolKind kind) const {
    return stitching_ && (kind == PoolKind::kLarge || granularity_ == chunk_size_);
  }
  // Mappings of either pool grow in place (the file comment) with stitching, unless
  // max_split_size is set (its oversize blocks never split); Headroom is the virtual space
  // reserved behind a new mapping for that.
  bool MayGrowInPlace() const { return stitching_ && max_split_size_ == SIZE_MAX; }
  std::size_t Headroom() const { return MayGrowInPlace() ? headroom_ : 0; }
  // Holes that lent chunks are refilled (the file comment) in the large pool, when mappings
  // grow in place.
  bool MayRefill(PoolKind kind) const { return kind == PoolKind::kLarge && MayGrowInPlace(); }
  // A chunk that comes home from the other pool kind within kPingPongMisses misses of its last
  // such return is contested for the next kPingPongMisses misses (the file comment). `miss`:
  // the caching allocator's count of misses so far.
  static constexpr std::uint64_t kPingPongMisses = 64;
  static void NoteCrossRecall(Chunk& c, std::uint64_t miss) {
    if (c.cross_recall_miss != 0 && miss - c.cross_recall_miss <= kPingPongMisses) {
      c.contested_until = miss + kPingPongMisses;
    }
    c.cross_recall_miss = miss;
  }
  static bool Contested(const Chunk& c, std::uint64_t miss) { return miss < c.contested_until; }
  // Oversize free blocks (max_split_size or larger) stay whole: no chunk is borrowed from them.
  bool MayBorrowFrom(std::size_t free_block_size) const { return free_block_size < max_split_size_; }
  // Whether a hole that lent chunks is refilled for a request it would hold (`refill_fresh` new
  // chunks, `refill_slots` chunks mapped in all at its absent slots; chunks that come home cost
  // nothing) rather than a mapping grown or made (`grow_fresh`, `grow_slots`): when it needs
  // fewer new chunks, or as many and no more mapped chunks (a tie restores the hole, whose
  // pieces next to the absent slots are used again; growing would leave them idle).
  static bool RefillBeatsGrowing(std::size_t refill_fresh, std::size_t refill_slots, std::size_t grow_fresh,
                                 std::size_t grow_slots) {
    return refill_fresh < grow_fresh || (refill_fresh == grow_fresh && refill_slots <= grow_slots);
  }
  // Whether a request served from free block `b` takes its back rather than its front, when
  // holes are refilled and less than a chunk would remain:
  // - `b` follows absent (lent) slots and is no mapping's end: the remainder then stays next to
  //   the absent slots, in the window a refill maps chunks back into, instead of becoming a
  //   sliver between live blocks that no large request fits and no stitch can borrow;
  // - `b` is the whole of a mapping that can grow in place (a new one, typically) and the
  //   remainder is more than kSmallSize: the remainder, a large-pool piece on its own, serves a
  //   later request at the front, and the block, once freed, is the growable tail, so that a
  //   larger request after it grows the mapping by the chunks it lacks instead of stitching
  //   every chunk anew. (A remainder of kSmallSize or less stays at the end, where only growth
  //   can use it: no large-pool request is that small.)
  bool TakesBack(const Block* b, std::size_t rounded, PoolKind kind) const {
    if (!MayRefill(kind)) return false;
    const std::size_t rest = b->size - rounded;
    if (rest >= b->mapping->chunk_size) return false;
    if (b->prev == nullptr && b->next == nullptr) {
      return rest > kSmallSize && b->mapping->reserved > b->mapping->size;
    }
    return b->prev != nullptr && b->prev->state == BlockState::kAbsent && b->next != nullptr &&
           b->next->state != BlockState::kAbsent;
  }
  std::size_t max_split_size() const { return max_split_size_; }

  struct Candidate {
    SlotRun run;
    bool same_stream = false;
  };
  // Picks at most `needed` slots from the candidates (see the file comment for the order).
  std::vector<SlotRun> ChooseStitch(std::vector<Candidate> candidates, std::size_t needed) const;

 private:
  bool stitching_;
  std::size_t max_split_size_;
  std::size_t headroom_;
  std::size_t granularity_;
  std::size_t chunk_size_;
};

}  // namespace stitchalloc
