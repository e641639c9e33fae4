// MappingStore implementation; see mapping_store.h and block.h for the invariants.
#include "allocator/mapping_store.h"

#include <algorithm>
#include <iterator>
#include <tuple>
#include <utility>

#include "vmm/nvtx.h"

namespace stitchalloc {

MappingStore::MappingStore(Driver& driver, Stats& stats, std::size_t max_split_size)
    : driver_(driver), stats_(stats), max_split_size_(max_split_size) {}

MappingStore::~MappingStore() {
  // Teardown: every view is unmapped, every chunk released once, every range freed.
  for (auto& [va, m] : mappings_) {
    for (std::uint32_t s = 0; s < m->slots.size(); ++s) {
      if (m->slots[s] != nullptr) driver_.Unmap(m->slot_address(s), m->chunk_size).IgnoreError();
    }
  }
  for (auto& [ptr, c] : chunks_) driver_.ReleaseChunk(c->handle).IgnoreError();
  for (auto& [va, m] : mappings_) {
    for (Block* b = m->head; b != nullptr;) {
      Block* next = b->next;
      delete b;
      b = next;
    }
    driver_.FreeReservation(m->va, m->reserved).IgnoreError();
  }
  for (Block* b : spare_blocks_) delete b;
}

Block* MappingStore::NewBlock() {
  if (spare_blocks_.empty()) return new Block();
  Block* b = spare_blocks_.back();
  spare_blocks_.pop_back();
  *b = Block();
  return b;
}

void MappingStore::DeleteBlock(Block* b) {
  b->stream_uses.clear();
  spare_blocks_.push_back(b);
}

void MappingStore::InsertFree(Block* b, std::optional<FreeSet::Map::iterator> hint) {
  Touch(b->mapping);
  b->counted_split = b->is_split();
  const int pool = static_cast<int>(b->mapping->kind);
  if (b->counted_split) {
    stats_.inactive_split.Add(pool, 1);
    stats_.inactive_split_bytes.Add(pool, static_cast<std::int64_t>(b->size));
  }
  FreeSet& set = b->mapping->pool->set(b->mapping->kind);
  if (hint.has_value()) {
    set.Insert(b, *hint);
  } else {
    set.Insert(b);
  }
}

void MappingStore::UncountSplit(Block* b) {
  if (b->counted_split) {
    const int pool = static_cast<int>(b->mapping->kind);
    stats_.inactive_split.Add(pool, -1);
    stats_.inactive_split_bytes.Add(pool, -static_cast<std::int64_t>(b->size));
    b->counted_split = false;
  }
}

FreeSet::Map::iterator MappingStore::EraseFree(Block* b, std::optional<FreeSet::Map::iterator> at) {
  Touch(b->mapping);
  FreeSet& set = b->mapping->pool->set(b->mapping->kind);
  auto next = at.has_value() ? set.Erase(*at) : set.Erase(b);
  UncountSplit(b);
  return next;
}

std::optional<SlotRun> MappingStore::FreeSlots(Block* b) {
  const Mapping* m = b->mapping;
  const std::size_t c = m->chunk_size;
  const std::size_t first = (b->ptr - m->va + c - 1) / c;
  const std::size_t end = (b->ptr + b->size - m->va) / c;
  if (end <= first) return std::nullopt;
  return SlotRun{b, static_cast<std::uint32_t>(first), static_cast<std::uint32_t>(end - first)};
}

absl::Status MappingStore::MapChunks(const std::vector<DevicePtr>& at, std::size_t chunk_size,
                                     std::vector<Chunk*>& chunks, std::size_t fresh,
                                     std::vector<std::unique_ptr<Chunk>>& created) {
  absl::Status st;
  for (std::size_t i = 0; i < fresh && st.ok(); ++i) {
    auto h = driver_.CreateChunk(chunk_size);
    if (!h.ok()) {
      st = h.status();
      break;
    }
    auto c = std::make_unique<Chunk>();
    c->handle = *h;
    c->size = chunk_size;
    chunks.push_back(c.get());
    created.push_back(std::move(c));
  }
  const std::size_t n = chunks.size();
  std::size_t mapped = 0;
  for (; st.ok() && mapped < n; ++mapped) {
    ++stats_.num_map_calls;
    st = driver_.Map(at[mapped], chunk_size, chunks[mapped]->handle);
    if (!st.ok()) break;
  }
  // Access is granted once per run of consecutive addresses.
  for (std::size_t i = 0; st.ok() && i < n;) {
    std::size_t j = i + 1;
    while (j < n && at[j] == at[j - 1] + chunk_size) ++j;
    st = driver_.SetAccess(at[i], (j - i) * chunk_size);
    i = j;
  }
  if (st.ok()) return st;
  for (std::size_t i = 0; i < mapped; ++i) {
    ++stats_.num_unmap_calls;
    driver_.Unmap(at[i], chunk_size).IgnoreError();
  }
  chunks.resize(n - created.size());
  for (auto& c : created) driver_.ReleaseChunk(c->handle).IgnoreError();
  created.clear();
  return st;
}

namespace {
// The latest free, in `pool`'s sequence, of the blocks that `borrow`'s chunks come from: their
// stream's work queued before those frees may still use them, so a block made of them is
// fenced for other streams only from then on. Chunks of other pools were fenced before they
// were lent, so they add nothing.
std::uint64_t LastUse(const std::vector<SlotRun>& borrow, const StreamPool* pool) {
  std::uint64_t seq = 0;
  for (const SlotRun& r : borrow) {
    if (r.block->mapping->pool == pool) seq = std::max(seq, r.block->freed_at);
  }
  return seq;
}

std::vector<DevicePtr> Consecutive(DevicePtr va, std::size_t n, std::size_t chunk_size) {
  std::vector<DevicePtr> at(n);
  for (std::size_t i = 0; i < n; ++i) at[i] = va + i * chunk_size;
  return at;
}
std::vector<std::uint32_t> SlotRange(std::uint32_t first, std::size_t n) {
  std::vector<std::uint32_t> slots(n);
  for (std::size_t i = 0; i < n; ++i) slots[i] = first + static_cast<std::uint32_t>(i);
  return slots;
}
}  // namespace

void MappingStore::Adopt(Mapping* m, const std::vector<std::uint32_t>& slots, const std::vector<SlotRun>& borrow,
                         std::vector<std::unique_ptr<Chunk>>& created) {
  std::vector<Mapping*> sources;
  std::size_t next = 0;
  for (const SlotRun& r : borrow) {
    Mapping* from = r.block->mapping;
    CarveRun(r);
    for (std::uint32_t k = 0; k < r.count; ++k) {
      const std::uint32_t slot = slots[next++];
      Chunk* c = m->slots[slot];
      if (c->home == from) {
        ++from->lent_home;
      } else {
        c->stale.emplace_back(from, r.first_slot + k);
      }
      --from->present;
      c->owner = m;
      c->owner_slot = slot;
    }
    sources.push_back(from);
  }
  const int pool_index = static_cast<int>(m->kind);
  for (auto& c : created) {
    c->home = c->owner = m;
    c->home_slot = c->owner_slot = slots[next++];
    stats_.reserved_bytes.Add(pool_index, static_cast<std::int64_t>(c->size));
    if (shared_reserved_ != nullptr) shared_reserved_->fetch_add(static_cast<std::int64_t>(c->size));
    ++stats_.num_device_alloc;
    Chunk* raw = c.get();
    chunks_.emplace(raw, std::move(c));
  }
  if (!borrow.empty()) {
    std::size_t borrowed = 0;
    for (const SlotRun& r : borrow) borrowed += r.count;
    ++stats_.num_stitches;
    stats_.stitched_bytes += static_cast<std::int64_t>(borrowed * m->chunk_size);
    if (!m->stitched) stats_.stitched_segment.Add(1);
    m->stitched = true;
  }
  for (Mapping* from : sources) NoteIfEmptied(from);
}

absl::StatusOr<Mapping*> MappingStore::Create(StreamPool* pool, PoolKind kind, std::size_t chunk_size,
                                              const std::vector<SlotRun>& borrow, std::size_t fresh,
                                              std::size_t headroom) {
  STITCHALLOC_NVTX_RANGE(borrow.empty() ? "map new chunks" : "stitch");
  std::vector<Chunk*> chunks;
  for (const SlotRun& r : borrow) {
    for (std::uint32_t k = 0; k < r.count; ++k) chunks.push_back(r.block->mapping->slots[r.first_slot + k]);
  }
  const std::size_t n = chunks.size() + fresh;
  const std::size_t bytes = n * chunk_size;
  headroom = headroom / chunk_size * chunk_size;

  auto va_or = driver_.Reserve(bytes + headroom);
  if (!va_or.ok() && headroom > 0 && absl::IsResourceExhausted(va_or.status())) {
    headroom = 0;  // no room in the address space for growing in place; a plain mapping will do
    va_or = driver_.Reserve(bytes);
  }
  if (!va_or.ok()) return va_or.status();
  const DevicePtr va = *va_or;

  std::vector<std::unique_ptr<Chunk>> created;
  if (absl::Status st = MapChunks(Consecutive(va, n, chunk_size), chunk_size, chunks, fresh, created); !st.ok()) {
    driver_.FreeReservation(va, bytes + headroom).IgnoreError();
    return st;
  }

  // Commit: nothing below can fail.
  auto owned = std::make_unique<Mapping>();
  Mapping* m = owned.get();
  m->va = va;
  m->size = bytes;
  m->reserved = bytes + headroom;
  m->chunk_size = chunk_size;
  m->kind = kind;
  m->pool = pool;
  m->slots = chunks;
  m->absent.assign(n, nullptr);
  m->present = static_cast<int>(n);

  Block* b = NewBlock();
  b->ptr = va;
  b->size = bytes;
  b->mapping = m;
  b->freed_at = LastUse(borrow, pool);
  m->last_free_seq = b->freed_at;
  m->head = m->tail = b;
  mappings_.emplace(va, std::move(owned));
  Adopt(m, SlotRange(0, n), borrow, created);
  InsertFree(b);
  SegmentsMayChange(m);

  stats_.segment.Add(static_cast<int>(kind), 1);
  if (bytes >= max_split_size_) stats_.oversize_segments.Add(1);
  return m;
}

bool MappingStore::MapsChunk(const Mapping* m, const Chunk* c) {
  if (c->home == m || c->owner == m) return true;
  return std::any_of(c->stale.begin(), c->stale.end(), [m](const auto& view) { return view.first == m; });
}

absl::StatusOr<Block*> MappingStore::Extend(Mapping* m, const std::vector<SlotRun>& borrow, std::size_t fresh) {
  STITCHALLOC_NVTX_RANGE("grow mapping in place");
  std::vector<Chunk*> chunks;
  for (const SlotRun& r : borrow) {
    for (std::uint32_t k = 0; k < r.count; ++k) {
      Chunk* c = r.block->mapping->slots[r.first_slot + k];
      if (MapsChunk(m, c)) {
        // It cannot appear at a second place of the same mapping (its home slot or a stale
        // view keeps it there).
        return absl::InternalError("stitchalloc internal: a mapping cannot grow with its own chunks");
      }
      chunks.push_back(c);
    }
  }
  const std::size_t n = chunks.size() + fresh;
  if (n == 0 || n > m->headroom_slots()) {
    return absl::InternalError("stitchalloc internal: growing a mapping beyond its reserved range");
  }
  const DevicePtr at = m->va + m->size;
  std::vector<std::unique_ptr<Chunk>> created;
  if (absl::Status st = MapChunks(Consecutive(at, n, m->chunk_size), m->chunk_size, chunks, fresh, created); !st.ok()) {
    return st;
  }

  // Commit: nothing below can fail.
  const bool was_oversize = m->size >= max_split_size_;
  const auto first_slot = static_cast<std::uint32_t>(m->slots.size());
  m->slots.insert(m->slots.end(), chunks.begin(), chunks.end());
  m->absent.resize(m->slots.size(), nullptr);
  m->present += static_cast<int>(n);
  m->size += n * m->chunk_size;
  Block* b = NewBlock();
  b->ptr = at;
  b->size = n * m->chunk_size;
  b->mapping = m;
  b->freed_at = LastUse(borrow, m->pool);
  b->prev = m->tail;
  m->tail->next = b;
  m->tail = b;
  Adopt(m, SlotRange(first_slot, n), borrow, created);
  if (!was_oversize && m->size >= max_split_size_) stats_.oversize_segments.Add(1);
  SegmentsMayChange(m);
  return MergeAndInsert(b);
}

absl::StatusOr<Block*> MappingStore::Refill(Mapping* m, const std::vector<std::uint32_t>& slots,
                                             const std::vector<SlotRun>& borrow, std::size_t fresh) {
  STITCHALLOC_NVTX_RANGE("refill absent slots");
  const std::uint64_t borrowed_use = LastUse(borrow, m->pool);
  std::vector<Chunk*> chunks;
  for (const SlotRun& r : borrow) {
    for (std::uint32_t k = 0; k < r.count; ++k) {
      Chunk* c = r.block->mapping->slots[r.first_slot + k];
      if (MapsChunk(m, c)) return absl::InternalError("stitchalloc internal: a mapping cannot refill with its own chunks");
      chunks.push_back(c);
    }
  }
  if (slots.empty() || slots.size() != chunks.size() + fresh) {
    return absl::InternalError("stitchalloc internal: refill needs one chunk per slot");
  }
  std::vector<DevicePtr> at;
  for (std::uint32_t s : slots) {
    if (s >= m->slots.size() || m->absent[s] == nullptr) {
      return absl::InternalError("stitchalloc internal: refilling a slot that is not absent");
    }
    at.push_back(m->slot_address(s));
  }
  // The views still mapped there (a lent home chunk, a stale view) make way first; on failure
  // they are mapped back.
  std::vector<std::uint32_t> unmapped;
  absl::Status st;
  for (std::uint32_t s : slots) {
    if (m->slots[s] == nullptr) continue;
    ++stats_.num_unmap_calls;
    st = driver_.Unmap(m->slot_address(s), m->chunk_size);
    if (!st.ok()) break;
    unmapped.push_back(s);
  }
  std::vector<std::unique_ptr<Chunk>> created;
  if (st.ok()) st = MapChunks(at, m->chunk_size, chunks, fresh, created);
  if (!st.ok()) {
    for (std::uint32_t s : unmapped) {
      ++stats_.num_map_calls;
      if (driver_.Map(m->slot_address(s), m->chunk_size, m->slots[s]->handle).ok()) {
        driver_.SetAccess(m->slot_address(s), m->chunk_size).IgnoreError();
      }
    }
    return st;
  }

  // Commit: nothing below can fail. A home chunk lent out moves its home to its owner, which
  // maps it; a stale view is forgotten.
  for (std::uint32_t s : unmapped) {
    Chunk* c = m->slots[s];
    if (c->home == m) {
      c->home = c->owner;
      c->home_slot = c->owner_slot;
      --m->lent_home;
    } else {
      auto& views = c->stale;
      views.erase(std::remove(views.begin(), views.end(), std::make_pair(m, s)), views.end());
    }
  }
  for (std::size_t i = 0; i < slots.size(); ++i) m->slots[slots[i]] = chunks[i];
  m->present += static_cast<int>(slots.size());
  Adopt(m, slots, borrow, created);
  Block* merged = nullptr;
  for (std::uint32_t s : slots) {
    Block* a = m->absent[s];
    SetAbsent(m, s, nullptr);
    a->state = BlockState::kFree;
    // The slot's last use here (its old view was fenced before it was unmapped; kept, to be
    // safe) and the borrowed chunks' last use in this pool.
    a->freed_at = std::max(a->freed_at, borrowed_use);
    merged = MergeAndInsert(a);
  }
  return merged;
}

Block* MappingStore::Recall(Mapping* m, std::uint32_t slot, Block* at_owner) {
  Chunk* c = m->slots[slot];
  Mapping* owner = c->owner;
  const std::uint64_t owner_use = at_owner->freed_at;  // CarveRun deletes at_owner
  CarveRun(SlotRun{at_owner, c->owner_slot, 1});
  c->stale.emplace_back(owner, c->owner_slot);
  --owner->present;
  Block* a = m->absent[slot];
  SetAbsent(m, slot, nullptr);
  a->state = BlockState::kFree;
  // The home view's last use, and the owner's when it is of this pool (another pool's owner
  // was fenced before it lends).
  if (owner->pool == m->pool) a->freed_at = std::max(a->freed_at, owner_use);
  --m->lent_home;
  ++m->present;
  c->owner = m;
  c->owner_slot = slot;
  NoteIfEmptied(owner);
  return MergeAndInsert(a);
}

void MappingStore::SetAbsent(Mapping* m, std::uint32_t slot, Block* a) {
  if ((m->absent[slot] == nullptr) != (a == nullptr)) SegmentsMayChange(m);
  m->absent[slot] = a;
  if (a != nullptr) {
    m->absent_slots.insert(slot);
  } else {
    m->absent_slots.erase(slot);
  }
  if (m->absent_slots.empty()) {
    with_absent_.erase(m->va);
  } else {
    with_absent_.emplace(m->va, m);
  }
}

void MappingStore::CarveRun(const SlotRun& run) {
  Block* b = run.block;
  Mapping* m = b->mapping;
  EraseFree(b);
  const DevicePtr start = m->slot_address(run.first_slot);
  const DevicePtr end = start + std::size_t{run.count} * m->chunk_size;
  const DevicePtr b_end = b->ptr + b->size;

  std::vector<Block*> pieces;
  if (b->ptr < start) {
    Block* pre = NewBlock();
    pre->ptr = b->ptr;
    pre->size = start - b->ptr;
    pre->freed_at = b->freed_at;
    pieces.push_back(pre);
  }
  for (std::uint32_t k = 0; k < run.count; ++k) {
    Block* a = NewBlock();
    a->ptr = m->slot_address(run.first_slot + k);
    a->size = m->chunk_size;
    a->state = BlockState::kAbsent;
    a->freed_at = b->freed_at;  // the view's last use: it may be unmapped only once fenced
    SetAbsent(m, run.first_slot + k, a);
    pieces.push_back(a);
  }
  if (end < b_end) {
    Block* post = NewBlock();
    post->ptr = end;
    post->size = b_end - end;
    post->freed_at = b->freed_at;
    pieces.push_back(post);
  }
  Block* prev = b->prev;
  Block* next = b->next;
  for (Block* p : pieces) {
    p->mapping = m;
    p->prev = prev;
    if (prev != nullptr) prev->next = p; else m->head = p;
    prev = p;
  }
  prev->next = next;
  if (next != nullptr) next->prev = prev; else m->tail = prev;
  DeleteBlock(b);
  for (Block* p : pieces) {
    if (p->is_free()) InsertFree(p);
  }
}

Block* MappingStore::Allocate(Block* b, std::size_t size, bool split, bool back,
                              std::optional<FreeSet::Map::iterator> at) {
  const FreeSet::Map::iterator hint = EraseFree(b, at);
  Block* out = b;
  if (split && b->size > size) {
    Block* rest = SplitAfter(b, back ? b->size - size : size);
    if (back) out = rest;
    InsertFree(back ? b : rest, hint);  // the part not handed out stays free
  }
  out->state = BlockState::kAllocated;
  ++out->mapping->busy_blocks;
  return out;
}

Block* MappingStore::AllocateRange(Block* b, std::size_t offset, std::size_t size) {
  EraseFree(b);
  if (offset > 0) {
    Block* rest = SplitAfter(b, offset);
    InsertFree(b, std::nullopt);
    b = rest;
  }
  if (b->size > size) InsertFree(SplitAfter(b, size), std::nullopt);
  b->state = BlockState::kAllocated;
  ++b->mapping->busy_blocks;
  return b;
}

Block* MappingStore::SplitAfter(Block* b, std::size_t front) {
  Block* rest = NewBlock();
  rest->ptr = b->ptr + front;
  rest->size = b->size - front;
  rest->mapping = b->mapping;
  rest->freed_at = b->freed_at;
  rest->prev = b;
  rest->next = b->next;
  if (b->next != nullptr) b->next->prev = rest; else b->mapping->tail = rest;
  b->next = rest;
  b->size = front;
  return rest;
}

Block* MappingStore::MergeAndInsert(Block* b) {
  Mapping* m = b->mapping;
  m->last_free_seq = std::max(m->last_free_seq, b->freed_at);  // every way into the free set
  std::optional<FreeSet::Map::iterator> hint;
  if (Block* p = b->prev; p != nullptr && p->is_free()) {
    hint = EraseFree(p);
    p->size += b->size;
    p->freed_at = std::max(p->freed_at, b->freed_at);
    p->next = b->next;
    if (b->next != nullptr) b->next->prev = p;
    DeleteBlock(b);
    b = p;
  }
  if (Block* n = b->next; n != nullptr && n->is_free()) {
    hint = EraseFree(n);  // a later erase invalidates the earlier hint
    b->size += n->size;
    b->freed_at = std::max(b->freed_at, n->freed_at);
    b->next = n->next;
    if (n->next != nullptr) n->next->prev = b;
    DeleteBlock(n);
  }
  if (b->prev == nullptr) m->head = b;
  if (b->next == nullptr) m->tail = b;
  InsertFree(b, hint);
  return b;
}

Block* MappingStore::Free(Block* b, std::uint64_t seq) {
  Mapping* m = b->mapping;
  b->state = BlockState::kFree;
  b->freed_at = seq;
  b->requested = 0;
  b->pending_events = 0;
  b->stream_uses.clear();
  --m->busy_blocks;
  return MergeAndInsert(b);
}

void MappingStore::ReturnHome(Chunk* c) {
  Mapping* h = c->home;
  Block* a = h->absent[c->home_slot];
  SetAbsent(h, c->home_slot, nullptr);
  a->state = BlockState::kFree;
  // Keeps the home view's last use; the borrower's stream was fenced before it let go.
  --h->lent_home;
  ++h->present;
  c->owner = h;
  c->owner_slot = c->home_slot;
  MergeAndInsert(a);
}

absl::Status MappingStore::UnmapSlot(Mapping* m, std::uint32_t slot) {
  ++stats_.num_unmap_calls;
  absl::Status s = driver_.Unmap(m->slot_address(slot), m->chunk_size);
  m->slots[slot] = nullptr;
  return s;
}

absl::Status MappingStore::ReleasePhysical(Chunk* c) {
  STITCHALLOC_NVTX_RANGE("release chunk");
  absl::Status first;
  for (auto [view, slot] : c->stale) Note(first, UnmapSlot(view, slot));
  Mapping* h = c->home;
  Note(first, UnmapSlot(h, c->home_slot));
  --h->present;
  Note(first, driver_.ReleaseChunk(c->handle));
  stats_.reserved_bytes.Add(static_cast<int>(h->kind), -static_cast<std::int64_t>(c->size));
  if (shared_reserved_ != nullptr) shared_reserved_->fetch_sub(static_cast<std::int64_t>(c->size));
  ++stats_.num_device_free;
  chunks_.erase(c);
  return first;
}

absl::Status MappingStore::Trim(Mapping* m) {
  std::vector<SlotRun> runs;
  for (Block* b = m->head; b != nullptr; b = b->next) {
    if (!b->is_free()) continue;
    if (auto r = FreeSlots(b)) runs.push_back(*r);
  }
  if (runs.empty()) return absl::OkStatus();
  STITCHALLOC_NVTX_RANGE("trim mapping");
  absl::Status first;
  for (const SlotRun& r : runs) {
    CarveRun(r);
    for (std::uint32_t k = 0; k < r.count; ++k) {
      const std::uint32_t slot = r.first_slot + k;
      Chunk* c = m->slots[slot];
      if (c->home == m) {
        Note(first, ReleasePhysical(c));
      } else {
        Note(first, UnmapSlot(m, slot));
        --m->present;
        ReturnHome(c);
      }
    }
  }
  return first;
}

void MappingStore::NoteIfEmptied(Mapping* m) {
  if (Emptied(m) && std::find(emptied_.begin(), emptied_.end(), m) == emptied_.end()) emptied_.push_back(m);
}

absl::Status MappingStore::Disown(Mapping* m) {
  absl::Status first;
  for (std::uint32_t s = 0; s < m->slots.size() && m->lent_home > 0; ++s) {
    Chunk* c = m->slots[s];
    if (c == nullptr || c->home != m || c->owner == m) continue;
    Note(first, UnmapSlot(m, s));
    c->home = c->owner;
    c->home_slot = c->owner_slot;
    --m->lent_home;
  }
  Touch(m);
  return first;
}

absl::Status MappingStore::Dissolve(Mapping* m) {
  if (!m->idle() || m->lent_home > 0) {
    return absl::FailedPreconditionError(
        "stitchalloc internal: dissolving a mapping that is busy or has chunks lent out");
  }
  STITCHALLOC_NVTX_RANGE("dissolve mapping");
  absl::Status first;
  for (std::uint32_t s = 0; s < m->slots.size(); ++s) {
    Chunk* c = m->slots[s];
    if (c == nullptr) continue;
    if (c->owner == m) {
      if (c->home == m) {
        // Blocks are about to go; ReleasePhysical unmaps this slot and every stale view.
        Note(first, ReleasePhysical(c));
      } else {
        Note(first, UnmapSlot(m, s));
        ReturnHome(c);
      }
    } else {
      // A stale view (home chunks are never lent out from a dissolving mapping).
      Note(first, UnmapSlot(m, s));
      auto& st = c->stale;
      st.erase(std::remove(st.begin(), st.end(), std::make_pair(m, s)), st.end());
    }
  }
  for (Block* b = m->head; b != nullptr;) {
    Block* next = b->next;
    if (b->is_free()) EraseFree(b);
    DeleteBlock(b);
    b = next;
  }
  Note(first, driver_.FreeReservation(m->va, m->reserved));
  const int pool_index = static_cast<int>(m->kind);
  stats_.segment.Add(pool_index, -1);
  if (m->size >= max_split_size_) stats_.oversize_segments.Add(-1);
  if (m->stitched) stats_.stitched_segment.Add(-1);
  ++stats_.num_dissolves;
  emptied_.erase(std::remove(emptied_.begin(), emptied_.end(), m), emptied_.end());
  with_absent_.erase(m->va);
  if (tracking_) {
    segment_changes_.erase(m);
    for (const Mapping::Run& r : m->segments) {
      segments_gone_.push_back({false, r.ptr, r.size, r.stream, m->kind});
    }
  }
  mappings_.erase(m->va);
  return first;
}

void MappingStore::MoveToPool(Mapping* m, StreamPool* to) {
  std::vector<Block*> free_blocks;
  for (Block* b = m->head; b != nullptr; b = b->next) {
    if (b->is_free()) free_blocks.push_back(b);
  }
  for (Block* b : free_blocks) EraseFree(b);
  SegmentsMayChange(m);  // a segment belongs to one stream: it goes and comes back on `to`
  m->pool = to;
  m->last_free_seq = 0;
  for (Block* b : free_blocks) {
    b->freed_at = 0;
    InsertFree(b);
  }
}

std::vector<Mapping::Run> MappingStore::PresentRuns(const Mapping& m) {
  std::vector<Mapping::Run> runs;
  const Stream stream = m.pool->stream;
  for (std::size_t s = 0; s < m.absent.size(); ++s) {
    if (m.absent[s] != nullptr) continue;
    const DevicePtr at = m.slot_address(s);
    if (!runs.empty() && runs.back().ptr + runs.back().size == at) {
      runs.back().size += m.chunk_size;
    } else {
      runs.push_back({at, m.chunk_size, stream});
    }
  }
  return runs;
}

void MappingStore::TrackSegments(bool on) {
  tracking_ = on;
  segment_changes_.clear();
  segments_gone_.clear();
  for (auto& [va, m] : mappings_) {
    if (on) {
      m->segments = PresentRuns(*m);
    } else {
      m->segments.clear();
      m->segments.shrink_to_fit();
    }
  }
}

std::vector<SegmentEvent> MappingStore::TakeSegmentEvents() {
  std::vector<SegmentEvent> out = std::move(segments_gone_);
  segments_gone_.clear();
  std::vector<SegmentEvent> mapped;
  // Both lists are in address order, ordered so by (ptr, size, stream): a run in only one of them
  // went or came.
  auto before = [](const Mapping::Run& a, const Mapping::Run& b) {
    return std::tie(a.ptr, a.size, a.stream) < std::tie(b.ptr, b.size, b.stream);
  };
  for (Mapping* m : segment_changes_) {
    std::vector<Mapping::Run> now = PresentRuns(*m), went, came;
    std::set_difference(m->segments.begin(), m->segments.end(), now.begin(), now.end(), std::back_inserter(went), before);
    std::set_difference(now.begin(), now.end(), m->segments.begin(), m->segments.end(), std::back_inserter(came), before);
    for (const Mapping::Run& r : went) out.push_back({false, r.ptr, r.size, r.stream, m->kind});
    for (const Mapping::Run& r : came) mapped.push_back({true, r.ptr, r.size, r.stream, m->kind});
    m->segments = std::move(now);
  }
  segment_changes_.clear();
  auto by_address = [](const SegmentEvent& a, const SegmentEvent& b) { return a.ptr < b.ptr; };
  std::sort(out.begin(), out.end(), by_address);
  std::sort(mapped.begin(), mapped.end(), by_address);
  out.insert(out.end(), mapped.begin(), mapped.end());
  return out;
}

std::vector<SegmentEvent> MappingStore::TakeSegmentEventsForTeardown() {
  if (!tracking_) return {};
  std::vector<SegmentEvent> out = TakeSegmentEvents();
  for (auto& [va, m] : mappings_) {
    for (const Mapping::Run& r : m->segments) out.push_back({false, r.ptr, r.size, r.stream, m->kind});
  }
  TrackSegments(false);
  return out;
}

std::vector<Mapping*> MappingStore::TakeEmptied() {
  std::vector<Mapping*> out;
  out.swap(emptied_);
  return out;
}

Mapping* MappingStore::Find(DevicePtr p) const {
  auto it = mappings_.upper_bound(p);
  if (it == mappings_.begin()) return nullptr;
  --it;
  Mapping* m = it->second.get();
  return p < m->va + m->size ? m : nullptr;
}

}  // namespace stitchalloc
