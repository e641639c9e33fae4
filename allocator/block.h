// The allocator's data structures: Chunk, Mapping, Block, FreeSet and StreamPool.
//
// Physical memory is a set of Chunks, each one driver allocation of a fixed size (the large
// pool's chunk size, or the granularity for the small pool). Virtual memory is a set of
// Mappings: one reserved range with a slot per chunk-sized piece. A mapping (either pool) may
// reserve more virtual space than it maps (headroom) and grow in place: new slots are appended
// at its end, so that a free tail shorter than a chunk joins the new chunks in one block.
// Blocks are byte ranges of a mapping, linked in address order; they cover the mapped part
// [va, va + size) without gaps or overlap.
//
// Ownership of physical memory (the invariant that makes stitching safe):
// - Every chunk has exactly one owner: the mapping whose blocks hand its bytes out. In the
//   owner the chunk's slot is "present": covered by free or allocated blocks.
// - Every chunk has a home: the mapping it was created for. The home always maps it. When
//   the chunk is owned elsewhere (lent to a stitched mapping), the home's slot is covered by
//   one kAbsent block, so no byte is handed out twice. A home is never dissolved while any of
//   its chunks is lent out (lent_home > 0): a retiring home first hands the home of each lent
//   chunk to its owner, which maps it, and unmaps its own view (MappingStore::Disown).
// - A stitched mapping that lends a borrowed chunk onward keeps its (now stale) view mapped,
//   also behind a kAbsent block; the chunk records it in `stale` so that the view can be
//   unmapped before the chunk is released. Chunks return to their home, never to a stale view.
// - A slot with no chunk (nullptr) is an unmapped hole (trimmed memory), also kAbsent.
// So every byte of physical memory is reachable through exactly one non-absent block.
//
// Free blocks sit in the FreeSet of their mapping's StreamPool (small or large), ordered by
// (size, address) for best fit. Adjacent free blocks are always merged. A block freed while
// other streams still used it (record_stream) is kPending until their events complete.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <optional>
#include <utility>
#include <vector>

#include "absl/container/btree_map.h"
#include "absl/container/btree_set.h"
#include "absl/container/inlined_vector.h"
#include "vmm/types.h"

namespace stitchalloc {

struct Mapping;
struct StreamPool;

enum class PoolKind : std::uint8_t { kSmall = 1, kLarge = 2 };  // == PoolIndex values

struct Chunk {
  PhysHandle handle = 0;
  std::size_t size = 0;
  Mapping* home = nullptr;
  std::uint32_t home_slot = 0;
  Mapping* owner = nullptr;
  std::uint32_t owner_slot = 0;
  // Stitched mappings (not the home) that still map this chunk behind an absent block.
  absl::InlinedVector<std::pair<Mapping*, std::uint32_t>, 1> stale;
  // The caching allocator's refill search found this chunk busy at `owner` while the owner's
  // free blocks were at version `busy_at_version` (valid while owner and version are the same).
  const Mapping* busy_at_owner = nullptr;
  std::uint64_t busy_at_version = 0;
  // The caching allocator's miss count when the chunk last came home from a mapping of the other
  // pool kind (0: never), and the miss count until which it stays out of the other pool
  // (Policy::NoteCrossRecall, Policy::Contested).
  std::uint64_t cross_recall_miss = 0;
  std::uint64_t contested_until = 0;
};

enum class BlockState : std::uint8_t { kFree, kAllocated, kPending, kAbsent };

struct Block {
  DevicePtr ptr = 0;
  std::size_t size = 0;
  std::size_t requested = 0;    // bytes the caller asked for (allocated blocks)
  Mapping* mapping = nullptr;
  Block* prev = nullptr;        // address-order neighbours in the mapping
  Block* next = nullptr;
  BlockState state = BlockState::kFree;
  bool counted_split = false;   // free block counted in inactive_split (see FreeSet)
  int pending_events = 0;       // kPending: events still to complete
  std::uint64_t freed_at = 0;   // the pool's free sequence number when this became free
  std::vector<Stream> stream_uses;  // other streams that used the block (record_stream)

  bool is_free() const { return state == BlockState::kFree; }
  bool is_split() const { return prev != nullptr || next != nullptr; }
};

struct Mapping {
  DevicePtr va = 0;
  std::size_t size = 0;
  std::size_t reserved = 0;          // virtual bytes reserved at va (>= size): room to grow in place
  std::size_t chunk_size = 0;
  PoolKind kind = PoolKind::kLarge;
  StreamPool* pool = nullptr;
  bool stitched = false;             // made by a stitch: counts towards the idle stitch cache
  std::vector<Chunk*> slots;         // slot i covers [va + i*chunk_size, +chunk_size)
  std::vector<Block*> absent;        // the kAbsent block of slot i, or nullptr (change with MappingStore::SetAbsent)
  absl::btree_set<std::uint32_t> absent_slots;  // the slots i whose absent[i] is set, in order
  // Renewed by every change of the mapping's free blocks (MappingStore::Touch), so that the caching
  // allocator's refill search can reuse what it found in a mapping it has seen unchanged: the
  // runs of free and absent blocks holding an absent one, as of refill_version.
  struct Window {
    const Block* first = nullptr;
    std::size_t size = 0;
    std::vector<const Block*> absent;  // its absent blocks, in address order
  };
  std::uint64_t version = 0;
  std::uint64_t refill_version = ~std::uint64_t{0};
  std::vector<Window> refill_windows;
  Block* head = nullptr;
  Block* tail = nullptr;             // the last block (the one with next == nullptr)
  int busy_blocks = 0;               // allocated or pending blocks
  int present = 0;                   // slots whose chunk this mapping owns
  int lent_home = 0;                 // chunks homed here but owned elsewhere
  std::uint64_t last_free_seq = 0;   // pool sequence number of the last free inside
  std::optional<std::list<Mapping*>::iterator> idle_lru;  // in the idle stitched cache
  bool retiring = false;             // queued for dissolution once its stream is fenced
  // The segments last reported for this mapping while MappingStore tracks segments: its maximal
  // runs of present slots (what a snapshot shows as segments), in address order.
  struct Run {
    DevicePtr ptr = 0;
    std::size_t size = 0;
    Stream stream = kDefaultStream;
    bool operator==(const Run&) const = default;
  };
  std::vector<Run> segments;

  DevicePtr slot_address(std::size_t i) const { return va + i * chunk_size; }
  std::size_t headroom_slots() const { return (reserved - size) / chunk_size; }
  bool idle() const { return busy_blocks == 0; }
};

// Free blocks of one pool kind and stream, best fit by (size, address).
class FreeSet {
 public:
  using Key = std::pair<std::size_t, DevicePtr>;
  using Map = absl::btree_map<Key, Block*>;

  void Insert(Block* b) { map_.emplace(Key{b->size, b->ptr}, b); }
  // Insertion next to `hint` is O(1) when the key belongs there (an erase just returned it: a
  // split or merge changes a key only slightly), an ordinary insertion otherwise.
  void Insert(Block* b, Map::iterator hint) { map_.emplace_hint(hint, Key{b->size, b->ptr}, b); }
  // Both return the position after the erased entry, a hint for a following Insert.
  Map::iterator Erase(Block* b) { return map_.erase(map_.find(Key{b->size, b->ptr})); }
  Map::iterator Erase(Map::iterator it) { return map_.erase(it); }
  // The smallest block of at least `size` bytes (lowest address among equals), or end().
  Map::const_iterator LowerBound(std::size_t size) const { return map_.lower_bound(Key{size, 0}); }
  Map::iterator LowerBound(std::size_t size) { return map_.lower_bound(Key{size, 0}); }
  Map::iterator end() { return map_.end(); }
  Map::const_iterator end() const { return map_.end(); }
  Map::const_iterator begin() const { return map_.begin(); }
  std::size_t size() const { return map_.size(); }
  bool empty() const { return map_.empty(); }

 private:
  Map map_;
};

// The free blocks of one stream, and the fences that tell when the stream's queued work has
// passed its frees. Frees are numbered (free_seq); a fence is an event recorded on the stream
// after the frees up to its sequence number; once complete, it proves that no work the stream
// queued before those frees still runs, so their blocks may go to another stream and their
// views may be unmapped. Fences complete in order (one stream); up to kMaxFences are
// outstanding, so a fence still running never keeps a newer free from being fenced.
struct StreamPool {
  static constexpr std::size_t kMaxFences = 4;
  Stream stream = kDefaultStream;
  FreeSet small;
  FreeSet large;
  std::uint64_t free_seq = 0;
  // Recorded and not yet seen complete, oldest first: (event, free_seq when it was recorded).
  absl::InlinedVector<std::pair<Event, std::uint64_t>, kMaxFences> fences;
  std::uint64_t fence_done_seq = 0;

  FreeSet& set(PoolKind k) { return k == PoolKind::kSmall ? small : large; }
  bool Fenced(std::uint64_t seq) const { return seq <= fence_done_seq; }
  bool fence_pending() const { return !fences.empty(); }
  // The latest free that a recorded fence (complete or not) covers.
  std::uint64_t fence_recorded_seq() const { return fences.empty() ? fence_done_seq : fences.back().second; }
};

}  // namespace stitchalloc
