// CachingAllocator implementation: orchestration of policy (policy.h) and mechanism
// (mapping_store.h), statistics, stream events and error reporting.
#include "allocator/caching_allocator.h"

#include <algorithm>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vmm/driver_factory.h"
#include "vmm/format.h"
#include "vmm/nvtx.h"

namespace stitchalloc {
absl::StatusOr<std::unique_ptr<CachingAllocator>> CachingAllocator::Create(const Config& config) {
  auto created = CreateDriver(config.driver);
  if (!created.ok()) return created.status();
  auto alloc = Create(config, std::move(created->driver));
  if (alloc.ok()) (*alloc)->fallback_reason_ = std::move(created->fallback_reason);
  return alloc;
}

absl::StatusOr<std::unique_ptr<CachingAllocator>> CachingAllocator::Create(const Config& config,
                                                                          std::unique_ptr<Driver> driver) {
  if (driver == nullptr) return absl::InvalidArgumentError("stitchalloc: Create: null driver");
  const std::size_t gran = driver->granularity();
  const std::size_t chunk = config.chunk_size == 0 ? gran : config.chunk_size;
  if (chunk % gran != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "stitchalloc config: key 'chunk_size_mb': %s is not a multiple of the driver granularity %s",
        FormatBytes(chunk), FormatBytes(gran)));
  }
  if (!(config.memory_fraction > 0.0 && config.memory_fraction <= 1.0)) {
    return absl::InvalidArgumentError("stitchalloc config: key 'memory_fraction': must be in (0, 1]");
  }
  auto info = driver->GetMemInfo();
  if (!info.ok()) return info.status();
  return std::unique_ptr<CachingAllocator>(
      new CachingAllocator(config, std::move(driver), chunk, info->total_bytes));
}

CachingAllocator::CachingAllocator(const Config& config, std::unique_ptr<Driver> driver,
                                   std::size_t chunk_size, std::size_t total_memory)
    : PoolAllocator(config, total_memory),
      config_(config),
      driver_(std::move(driver)),
      chunk_size_(chunk_size),
      policy_(config, driver_->granularity(), chunk_size) {
  MutexLock l(&mu_);
  stitch_cache_limit_ = config.stitch_cache_bytes.value_or(total_memory_);
  store_ = std::make_unique<MappingStore>(*driver_, stats_, config.max_split_size);
}

CachingAllocator::~CachingAllocator() {
  MutexLock l(&mu_);
  // Let in-flight stream work finish before the memory goes away. A stream is synchronized only
  // while the allocator holds memory that work on it may still use: the caller may have
  // destroyed a stream whose blocks it freed and whose cache it emptied (the CUDA driver
  // crashed on cuStreamSynchronize of such a stream on the H100, 2026-11-23).
  ProcessPending(/*synchronize=*/true);
  const bool allocated = stats_.allocated_bytes.all().current > 0;
  for (auto& [stream, pool] : pools_) {
    if (allocated || !pool->small.empty() || !pool->large.empty()) driver_->SynchronizeStream(stream).IgnoreError();
    for (const auto& [event, seq] : pool->fences) driver_->DestroyEvent(event).IgnoreError();
  }
  for (Event e : spare_events_) driver_->DestroyEvent(e).IgnoreError();
  if (shared_reserved_ != nullptr) shared_reserved_->fetch_sub(stats_.reserved_bytes.all().current);
  if (segment_observer_) {
    std::vector<SegmentEvent> gone = store_->TakeSegmentEventsForTeardown();
    if (!gone.empty()) segment_observer_(gone);
  }
  store_.reset();  // releases everything without counting it out (done just above)
}

void CachingAllocator::SetSegmentObserver(SegmentObserver observer) {
  MutexLock l(&mu_);
  PublishSegments();  // what changed so far goes to the observer it happened under
  store_->TrackSegments(static_cast<bool>(observer));
  segment_observer_ = std::move(observer);
}

void CachingAllocator::PublishSegments() {
  std::vector<SegmentEvent> events = store_->TakeSegmentEvents();
  if (!events.empty() && segment_observer_) segment_observer_(events);
}

void CachingAllocator::SharedReservedChanged() { store_->ShareReserved(shared_reserved_.get()); }

// ---- hot path ------------------------------------------------------------------------------

StreamPool* CachingAllocator::GetPool(Stream stream) {
  if (last_pool_ != nullptr && last_pool_->stream == stream) return last_pool_;
  auto& slot = pools_[stream];
  if (slot == nullptr) {
    slot = std::make_unique<StreamPool>();
    slot->stream = stream;
  }
  last_pool_ = slot.get();
  return last_pool_;
}

namespace {
// The block ends a mapping that can still grow in place.
bool GrowableTail(const Block* b) { return b->next == nullptr && b->mapping->reserved > b->mapping->size; }
// A free block's size together with the headroom it could grow into.
std::size_t GrowableSize(const Block* b) {
  return GrowableTail(b) ? b->size + (b->mapping->reserved - b->mapping->size) : b->size;
}
}  // namespace

FreeSet::Map::iterator CachingAllocator::Fit(FreeSet& set, PoolKind kind, std::size_t rounded) const {
  auto it = set.LowerBound(rounded);
  if (it == set.end()) return it;
  // Small pool, as PyTorch's expandable segments (get_free_block): a best fit that could grow
  // in place is passed over for the next larger blocks while they could grow less, so that the
  // tail is used last and small requests fill holes first. (In the large pool the same rule
  // measured worse: holes there lend their chunks and are refilled instead.)
  if (kind == PoolKind::kSmall && GrowableTail(it->second)) {
    for (auto next = std::next(it); next != set.end() && GrowableSize(next->second) < GrowableSize(it->second);) {
      it = next++;
    }
  }
  return policy_.Acceptable(it->second->size, rounded) ? it : set.end();
}

Block* CachingAllocator::BestFit(StreamPool* pool, PoolKind kind, std::size_t rounded) const {
  FreeSet& set = pool->set(kind);
  auto it = Fit(set, kind, rounded);
  return it == set.end() ? nullptr : it->second;
}

void* CachingAllocator::Hand(Block* b, PoolKind kind, std::size_t size, std::size_t rounded,
                             std::optional<FreeSet::Map::iterator> at) {
  if (b->mapping->idle()) OnBusy(b->mapping);
  const bool split = policy_.ShouldSplit(b->size, rounded, kind, GrowableTail(b));
  return Account(store_->Allocate(b, rounded, split, policy_.TakesBack(b, rounded, kind), at), kind, size);
}

void* CachingAllocator::Account(Block* b, PoolKind kind, std::size_t size) {
  b->requested = size;
  allocated_.emplace(b->ptr, b);
  const int pool = static_cast<int>(kind);
  const auto bytes = static_cast<std::int64_t>(b->size);
  stats_.allocation.Add(pool, 1);
  stats_.allocated_bytes.Add(pool, bytes);
  stats_.active.Add(pool, 1);
  stats_.active_bytes.Add(pool, bytes);
  stats_.requested_bytes.Add(pool, static_cast<std::int64_t>(size));
  if (b->size >= policy_.max_split_size()) stats_.oversize_allocations.Add(1);
  return reinterpret_cast<void*>(b->ptr);
}

absl::StatusOr<void*> CachingAllocator::Malloc(std::size_t size, Stream stream) {
  if (absl::Status bad = Policy::CheckRequest(size); !bad.ok()) return bad;
  const std::size_t rounded = Policy::RoundSize(size);
  const PoolKind kind = Policy::PoolFor(rounded);
  {
    ChangeLock l(this);
    if (!pending_.empty()) ProcessPending(/*synchronize=*/false);
    if (!retiring_.empty()) ProcessRetiring(/*synchronize=*/false);
    StreamPool* pool = GetPool(stream);
    FreeSet& set = pool->set(kind);
    if (auto it = Fit(set, kind, rounded); it != set.end()) return Hand(it->second, kind, size, rounded, it);  // hot path
    const bool last_resort = !has_pressure_handler_.load(std::memory_order_relaxed);
    auto slow = MallocSlow(pool, kind, size, rounded, last_resort);
    if (slow.ok()) {
      void* p = Hand(*slow, kind, size, rounded);
      // Mappings the miss emptied (lending all their chunks) go now, not at the next call.
      if (!retiring_.empty()) ProcessRetiring(/*synchronize=*/false);
      return p;
    }
    if (last_resort || !absl::IsResourceExhausted(slow.status())) return slow.status();
  }
  return MallocUnderPressure(size, rounded, kind, stream);
}

void CachingAllocator::SetPressureHandler(PressureHandler handler) {
  MutexLock l(&pressure_mu_);
  has_pressure_handler_.store(static_cast<bool>(handler));
  pressure_ = handler ? std::make_shared<const PressureHandler>(std::move(handler)) : nullptr;
}

absl::StatusOr<void*> CachingAllocator::MallocUnderPressure(std::size_t size, std::size_t rounded, PoolKind kind,
                                                            Stream stream) {
  STITCHALLOC_NVTX_RANGE("malloc under pressure");
  std::shared_ptr<const PressureHandler> handler;
  {
    MutexLock l(&pressure_mu_);
    handler = pressure_;
  }
  const PressureRelief relief = handler ? (*handler)(rounded, stream) : PressureRelief{};
  ChangeLock l(this);
  // Blocks the handler freed may wait for copies (event-deferred frees): out of memory is
  // the moment to wait for them.
  if (relief.freed > 0 && !pending_.empty()) ProcessPending(/*synchronize=*/true);
  auto slow = MallocSlow(GetPool(stream), kind, size, rounded, /*last_resort=*/true);
  if (!slow.ok()) {
    if (!absl::IsResourceExhausted(slow.status()) || relief.note.empty()) return slow.status();
    return absl::ResourceExhaustedError(absl::StrCat(slow.status().message(), ". ", relief.note));
  }
  return Hand(*slow, kind, size, rounded);
}

absl::Status CachingAllocator::Free(void* ptr) {
  if (ptr == nullptr) return absl::OkStatus();
  const auto p = reinterpret_cast<DevicePtr>(ptr);
  ChangeLock l(this);
  auto it = allocated_.find(p);
  if (it == allocated_.end()) return BadPointer("free", p);
  Block* b = it->second;
  allocated_.erase(it);
  const int pool = static_cast<int>(b->mapping->kind);
  stats_.allocation.Add(pool, -1);
  stats_.allocated_bytes.Add(pool, -static_cast<std::int64_t>(b->size));
  stats_.requested_bytes.Add(pool, -static_cast<std::int64_t>(b->requested));
  if (b->size >= policy_.max_split_size()) stats_.oversize_allocations.Add(-1);
  if (!b->stream_uses.empty()) {
    // Other streams may still use the block: it waits for their work (as PyTorch does).
    b->state = BlockState::kPending;
    for (Stream s : b->stream_uses) {
      Event e = GetEvent();
      if (e == 0) {
        // No event to wait with: wait for the stream itself (slow, but never unsafe).
        driver_->SynchronizeStream(s).IgnoreError();
        continue;
      }
      if (driver_->RecordEvent(e, s).ok()) {
        pending_.push_back({e, b});
        ++b->pending_events;
      } else {
        spare_events_.push_back(e);  // the stream is gone, and its work with it
      }
    }
    if (b->pending_events > 0) return absl::OkStatus();
  }
  FreeBlock(b);
  if (!retiring_.empty()) ProcessRetiring(/*synchronize=*/false);
  return absl::OkStatus();
}

void CachingAllocator::FreeBlock(Block* b) {
  const int pool = static_cast<int>(b->mapping->kind);
  stats_.active.Add(pool, -1);
  stats_.active_bytes.Add(pool, -static_cast<std::int64_t>(b->size));
  Mapping* m = b->mapping;
  store_->Free(b, ++m->pool->free_seq);
  if (m->idle()) OnIdle(m);
}

absl::Status CachingAllocator::RecordStream(void* ptr, Stream stream) {
  const auto p = reinterpret_cast<DevicePtr>(ptr);
  MutexLock l(&mu_);
  auto it = allocated_.find(p);
  if (it == allocated_.end()) return BadPointer("record_stream", p);
  Block* b = it->second;
  if (stream == b->mapping->pool->stream) return absl::OkStatus();
  if (std::find(b->stream_uses.begin(), b->stream_uses.end(), stream) == b->stream_uses.end()) {
    b->stream_uses.push_back(stream);
  }
  return absl::OkStatus();
}

// ---- miss path -----------------------------------------------------------------------------

absl::StatusOr<Block*> CachingAllocator::MallocSlow(StreamPool* pool, PoolKind kind, std::size_t size,
                                                    std::size_t rounded, bool last_resort) {
  STITCHALLOC_NVTX_RANGE("malloc miss");
  ++misses_;
  // Fences say which frees the streams' queued work has passed: what other streams may reuse,
  // and which views of freed memory may be unmapped (a refill remaps them).
  PollFences();
  if (!retiring_.empty()) ProcessRetiring(/*synchronize=*/false);
  for (int attempt = 0;; ++attempt) {
    if (Block* b = BestFit(pool, kind, rounded)) return b;
    if (Block* b = ReuseFromOtherStream(pool, kind, rounded)) return b;
    auto grown = Grow(pool, kind, rounded, /*lend_contested=*/false);
    if (absl::IsResourceExhausted(grown.status()) && misses_ < contested_horizon_) {
      grown = Grow(pool, kind, rounded, /*lend_contested=*/true);  // under pressure (policy.h)
    }
    if (grown.ok()) return *grown;
    if (!absl::IsResourceExhausted(grown.status())) return grown.status();
    const bool final = attempt > 0 || keep_cached_.load(std::memory_order_relaxed);
    if (final && !last_resort) return grown.status();
    if (final) {
      STITCHALLOC_NVTX_RANGE("out of memory");
      ++stats_.num_ooms;
      return absl::ResourceExhaustedError(OutOfMemoryReport(size, rounded, pool->stream, grown.status()));
    }
    ++stats_.num_alloc_retries;
    ReleaseCached().IgnoreError();
  }
}

Block* CachingAllocator::ReuseFromOtherStream(StreamPool* pool, PoolKind kind, std::size_t rounded) {
  // The smallest fitting whole block of any other stream, the lowest address among equals (so
  // that the choice does not depend on the pools' hash order).
  Block* best = nullptr;
  for (auto& [stream, other] : pools_) {
    if (other.get() == pool) continue;
    const FreeSet& set = other->set(kind);
    for (auto it = set.LowerBound(rounded); it != set.end(); ++it) {
      Block* b = it->second;
      if (best != nullptr && std::pair(b->size, b->ptr) >= std::pair(best->size, best->ptr)) break;
      if (b->is_split() || !other->Fenced(b->freed_at) || !policy_.Acceptable(b->size, rounded)) continue;
      best = b;
      break;
    }
  }
  if (best == nullptr) return nullptr;
  store_->MoveToPool(best->mapping, pool);
  ++stats_.num_cross_stream_reuses;
  return best;
}

std::vector<Policy::Candidate> CachingAllocator::StitchCandidates(StreamPool* pool, PoolKind kind,
                                                                  bool lend_contested) const {
  std::vector<Policy::Candidate> out;
  const bool small_chunks_fit = driver_->granularity() == chunk_size_;
  const bool skip_contested = !lend_contested && misses_ < contested_horizon_;
  // A contested chunk crosses pools only under pressure (policy.h). Its whole free block stays
  // out: a candidate run covers its block's whole chunks, which Refill relies on (a recall
  // from a block invalidates every run in it).
  const auto contested = [&](const SlotRun& run) {
    if (!skip_contested || run.block->mapping->kind == kind) return false;
    const Mapping* m = run.block->mapping;
    for (std::uint32_t k = 0; k < run.count; ++k) {
      if (Policy::Contested(*m->slots[run.first_slot + k], misses_)) return true;
    }
    return false;
  };
  for (const auto& [stream, p] : pools_) {
    const bool same = p.get() == pool;
    const FreeSet& set = p->large;
    for (auto it = set.LowerBound(chunk_size_); it != set.end(); ++it) {
      Block* b = it->second;
      if (!policy_.MayBorrowFrom(b->size)) break;  // ordered by size: all further are oversize
      if (!same && !p->Fenced(b->freed_at)) continue;
      if (auto run = MappingStore::FreeSlots(b); run && !contested(*run)) out.push_back({*run, same});
    }
    // Whole free chunks of small-pool mappings serve the large pool as well when the chunk
    // sizes agree.
    if (!small_chunks_fit) continue;
    for (auto it = p->small.LowerBound(chunk_size_); it != p->small.end(); ++it) {
      Block* b = it->second;
      if (!same && !p->Fenced(b->freed_at)) continue;
      if (auto run = MappingStore::FreeSlots(b); run && !contested(*run)) out.push_back({*run, same});
    }
  }
  return out;
}

Mapping* CachingAllocator::GrowableMapping(StreamPool* pool, PoolKind kind, std::size_t rounded,
                                           std::size_t* slots) const {
  // The longest free tail shorter than the request that its mapping's headroom can extend:
  // walk the free set downwards from the request's size.
  const std::size_t chunk = policy_.ChunkSize(kind);
  const FreeSet& set = pool->set(kind);
  for (auto it = set.LowerBound(rounded); it != set.begin();) {
    --it;
    const Block* b = it->second;
    if (!GrowableTail(b)) continue;
    const std::size_t need = (rounded - b->size + chunk - 1) / chunk;
    if (need <= b->mapping->headroom_slots()) {
      *slots = need;
      return b->mapping;
    }
  }
  // No free tail: the mapping of the stream with the least headroom that still holds the
  // request grows, so that the stream's memory stays in few contiguous ranges whose free
  // blocks can merge.
  const std::size_t need = (rounded + chunk - 1) / chunk;
  Mapping* best = nullptr;
  for (const auto& [va, m] : store_->mappings()) {
    if (m->pool != pool || m->kind != kind || m->tail->is_free()) continue;
    const std::size_t room = m->headroom_slots();
    if (room >= need && (best == nullptr || room < best->headroom_slots())) best = m.get();
  }
  *slots = need;
  return best;
}

namespace {
// Whether `m` maps any chunk of the candidate run (then it cannot take the run).
bool MapsAnyOf(const Mapping* m, const Policy::Candidate& c) {
  const Mapping* from = c.run.block->mapping;
  for (std::uint32_t k = 0; k < c.run.count; ++k) {
    if (MappingStore::MapsChunk(m, from->slots[c.run.first_slot + k])) return true;
  }
  return false;
}

// The free block of its owner that holds chunk `c`'s whole slot, or nullptr. The walk along the
// owner's blocks starts at `*hint` when that is one of them (consecutive lookups in one owner
// then cost one walk together), else at the nearer end; `*hint` becomes the block reached.
Block* FreeAtOwner(const Chunk* c, Block** hint = nullptr) {
  const Mapping* owner = c->owner;
  const DevicePtr at = owner->slot_address(c->owner_slot);
  Block* b = hint != nullptr && *hint != nullptr && (*hint)->mapping == owner ? *hint
             : at - owner->va < owner->size / 2                                ? owner->head
                                                                               : owner->tail;
  while (b->ptr > at) b = b->prev;
  while (b->ptr + b->size <= at) b = b->next;
  if (hint != nullptr) *hint = b;
  if (!b->is_free() || b->ptr + b->size < at + owner->chunk_size) return nullptr;
  return b;
}
}  // namespace

bool CachingAllocator::Recallable(const Mapping* m, std::uint32_t s, Block** hint) const {
  Chunk* c = m->slots[s];
  if (c == nullptr || c->home != m || c->owner == m) return false;
  const Mapping* owner = c->owner;
  // An idle owner of the same stream holds the chunk in a free block (no walk needed).
  if (owner->idle() && owner->pool == m->pool) return true;
  // Found busy before, and the owner's free blocks have not changed since.
  if (c->busy_at_owner == owner && c->busy_at_version == owner->version) return false;
  const Block* b = FreeAtOwner(c, hint);
  if (b == nullptr) {
    c->busy_at_owner = owner;
    c->busy_at_version = owner->version;
    return false;
  }
  if (!policy_.MayBorrowFrom(b->size)) return false;
  return owner->pool == m->pool || owner->pool->Fenced(b->freed_at);
}

std::optional<CachingAllocator::RefillPlan> CachingAllocator::FindRefill(StreamPool* pool,
                                                                          std::size_t rounded) const {
  std::optional<RefillPlan> best;
  const auto cost = [](const RefillPlan& p) { return std::make_pair(p.slots.size(), p.recall.size()); };
  std::vector<bool> back;  // per absent block of the window: whether its chunk can be recalled
  std::vector<bool> unsafe;  // per absent block: a mapped view that may not be unmapped yet
  const auto is_window = [](const Block* b) { return b->is_free() || b->state == BlockState::kAbsent; };
  for (const auto& [va, m] : store_->mappings_with_absent()) {
    if (m->pool != pool || m->kind != PoolKind::kLarge || m->size < rounded) continue;
    if (m->refill_version != m->version) {
      // Windows (maximal runs of free and absent blocks) around the absent slots, each once.
      m->refill_windows.clear();
      DevicePtr covered = m->va;
      for (const std::uint32_t slot : m->absent_slots) {
        const Block* first = m->absent[slot];
        if (first->ptr < covered) continue;
        while (first->prev != nullptr && is_window(first->prev)) first = first->prev;
        Mapping::Window w{first, 0, {}};
        const Block* b = first;
        for (; b != nullptr && is_window(b); b = b->next) {
          if (b->state == BlockState::kAbsent) w.absent.push_back(b);
          covered = b->ptr + b->size;
        }
        w.size = covered - first->ptr;
        m->refill_windows.push_back(std::move(w));
      }
      m->refill_version = m->version;
    }
    for (const Mapping::Window& w : m->refill_windows) {
      if (w.size < rounded) continue;
      const Block* first = w.first;
      const std::size_t window = w.size;
      const std::vector<const Block*>& absent = w.absent;
      const DevicePtr window_end = first->ptr + window;
      back.clear();
      unsafe.clear();
      Block* hint = nullptr;
      for (const Block* x : absent) {
        const auto s = static_cast<std::uint32_t>((x->ptr - m->va) / m->chunk_size);
        back.push_back(Recallable(m, s, &hint));
        // A slot that is refilled unmaps the view still there (a lent home chunk, a stale
        // view) and maps another chunk at its address: only once the work queued before the
        // view's last free has run, or that work would touch the other chunk (or fault).
        unsafe.push_back(!back.back() && m->slots[s] != nullptr && !pool->Fenced(x->freed_at));
      }
      // The request starts at the window's start or right after an absent slot (that stays
      // absent), so that the refilled free block starts where the request does. A sweep keeps
      // the absent slots inside [at, at + rounded) as the index range [lo, hi).
      std::size_t lo = 0, hi = 0, slots = 0, recalls = 0, blocked = 0, best_k = absent.size() + 1;
      std::pair<std::size_t, std::size_t> best_cost;
      for (std::size_t k = 0; k <= absent.size(); ++k) {
        const DevicePtr at = k == 0 ? first->ptr : absent[k - 1]->ptr + absent[k - 1]->size;
        if (at + rounded > window_end) break;
        for (; lo < hi && absent[lo]->ptr + absent[lo]->size <= at; ++lo) {
          (back[lo] ? recalls : slots) -= 1;
          blocked -= unsafe[lo] ? 1 : 0;
        }
        lo = std::max(lo, k);
        hi = std::max(hi, lo);
        for (; hi < absent.size() && absent[hi]->ptr < at + rounded; ++hi) {
          (back[hi] ? recalls : slots) += 1;
          blocked += unsafe[hi] ? 1 : 0;
        }
        if (slots + recalls == 0) continue;  // a free block holds it: best fit's
        if (blocked > 0) continue;
        const auto c = std::make_pair(slots, recalls);
        if (best_k > absent.size() || c < best_cost) best_k = k, best_cost = c;
      }
      if (best_k > absent.size() ||
          (best && (best_cost > cost(*best) || (best_cost == cost(*best) && window >= best->window)))) {
        continue;
      }
      const DevicePtr at = best_k == 0 ? first->ptr : absent[best_k - 1]->ptr + absent[best_k - 1]->size;
      RefillPlan plan{m, at, {}, {}, window};
      for (std::size_t q = best_k; q < absent.size() && absent[q]->ptr < at + rounded; ++q) {
        const auto s = static_cast<std::uint32_t>((absent[q]->ptr - m->va) / m->chunk_size);
        if (back[q]) {
          plan.recall.push_back(s);
        } else {
          plan.slots.push_back(s);
        }
      }
      best = std::move(plan);
    }
  }
  return best;
}

absl::StatusOr<Block*> CachingAllocator::Refill(const RefillPlan& plan, std::vector<Policy::Candidate> candidates) {
  Mapping* m = plan.mapping;
  const std::size_t need = plan.slots.size();
  std::vector<SlotRun> borrow;
  std::size_t fresh = 0;
  if (need > 0) {
    // (Recalled chunks are homed in m, so their runs are not lent to the refill a second time.)
    std::erase_if(candidates, [m](const Policy::Candidate& c) { return MapsAnyOf(m, c); });
    borrow = policy_.ChooseStitch(std::move(candidates), need);
    std::size_t borrowed = 0;
    for (const SlotRun& r : borrow) borrowed += r.count;
    fresh = need - borrowed;
    const std::size_t reserved = LimitedReserved();
    if (fresh > 0 && reserved + fresh * m->chunk_size > limit_) {
      return absl::ResourceExhaustedError("refilling a hole would exceed the memory limit");
    }
  }
  if (m->idle()) OnBusy(m);
  Block* last = nullptr;
  // Recalls first: they make no driver call and cannot fail.
  // (Each one's block at its owner is found now: an earlier recall from the same block split it.)
  for (const std::uint32_t s : plan.recall) {
    Chunk* c = m->slots[s];
    Block* at_owner = FreeAtOwner(c);
    if (at_owner == nullptr) return absl::InternalError("stitchalloc internal: a recalled chunk is not free at its owner");
    const bool cross = at_owner->mapping->kind != m->kind;
    last = store_->Recall(m, s, at_owner);
    if (cross) {
      Policy::NoteCrossRecall(*c, misses_);
      contested_horizon_ = std::max(contested_horizon_, c->contested_until);
    }
  }
  if (need > 0) {
    auto b = store_->Refill(m, plan.slots, borrow, fresh);
    if (!b.ok()) {
      for (Mapping* e : store_->TakeEmptied()) Retire(e);
      if (m->idle()) OnIdle(m);
      return b.status();
    }
    last = *b;
  }
  ++stats_.num_refills;
  for (Mapping* e : store_->TakeEmptied()) Retire(e);
  // The refilled block starts where the request goes (FindRefill's choice of `at`).
  Block* start = last;
  while (start != nullptr && start->ptr > plan.at) start = start->prev;
  if (start == nullptr || start->ptr != plan.at || !start->is_free()) {
    return absl::InternalError("stitchalloc internal: a refilled hole does not start where planned");
  }
  return start;
}

absl::StatusOr<Block*> CachingAllocator::Grow(StreamPool* pool, PoolKind kind, std::size_t rounded,
                                              bool lend_contested) {
  const std::size_t chunk = policy_.ChunkSize(kind);
  const std::size_t reserved = LimitedReserved();
  // Lendable chunks, gathered once for refilling, growing in place and for a new mapping.
  const std::vector<Policy::Candidate> all =
      policy_.MayStitch(kind) ? StitchCandidates(pool, kind, lend_contested) : std::vector<Policy::Candidate>{};
  std::size_t need = 0;
  Mapping* growable = policy_.Headroom() > 0 ? GrowableMapping(pool, kind, rounded, &need) : nullptr;
  // A hole that lent its chunks takes the request back when that maps fewer chunks than
  // growing would (policy.h).
  if (policy_.MayRefill(kind)) {
    if (std::optional<RefillPlan> plan = FindRefill(pool, rounded)) {
      // New chunks each way, after borrowing what may be borrowed.
      const auto lendable_to = [&all](const Mapping* m) {
        std::size_t n = 0;
        for (const Policy::Candidate& c : all) n += m != nullptr && MapsAnyOf(m, c) ? 0 : c.run.count;
        return n;
      };
      const auto fresh_for = [](std::size_t slots, std::size_t lendable) { return slots - std::min(slots, lendable); };
      const std::size_t exact = policy_.SlotsFor(rounded, kind);
      std::size_t grow_fresh = fresh_for(exact, lendable_to(nullptr)), grow_slots = exact;
      if (growable != nullptr) {
        if (const std::size_t in_place = fresh_for(need, lendable_to(growable)); in_place <= grow_fresh) {
          grow_fresh = in_place;
          grow_slots = need;
        }
      }
      const std::size_t refill_fresh = fresh_for(plan->slots.size(), lendable_to(plan->mapping));
      if (Policy::RefillBeatsGrowing(refill_fresh, plan->slots.size(), grow_fresh, grow_slots)) {
        auto b = Refill(*plan, all);
        if (b.ok() || !absl::IsResourceExhausted(b.status())) return b;
      }
    }
  }
  if (Mapping* m = growable) {
    // Growing cannot borrow the mapping's own free chunks: when a new stitched mapping
    // would need fewer new chunks, that is made instead.
    std::vector<Policy::Candidate> candidates = all;
    auto owns = [m](const Policy::Candidate& c) { return MapsAnyOf(m, c); };
    std::size_t lendable = 0, own = 0;
    for (const Policy::Candidate& c : candidates) (owns(c) ? own : lendable) += c.run.count;
    std::erase_if(candidates, owns);
    const std::size_t fresh = need - std::min(need, lendable);
    const std::size_t exact = policy_.SlotsFor(rounded, kind);
    const std::size_t fresh_if_new = exact - std::min(exact, lendable + own);
    if (fresh <= fresh_if_new && (fresh == 0 || reserved + fresh * chunk <= limit_)) {
      std::vector<SlotRun> borrow = policy_.ChooseStitch(std::move(candidates), need);
      // An idle mapping leaves the idle cache first: that accounts for it by its size.
      if (m->idle()) OnBusy(m);
      auto tail = store_->Extend(m, borrow, fresh);
      if (!tail.ok()) {
        if (m->idle()) OnIdle(m);
        return tail.status();
      }
      ++stats_.num_grows_in_place;
      for (Mapping* e : store_->TakeEmptied()) Retire(e);
      return *tail;
    }
  }
  // The preferred mapping size first; near the limit, only what the request needs.
  need = policy_.GrowSlots(rounded, kind);
  std::vector<SlotRun> borrow;
  std::size_t fresh = 0;
  for (;;) {
    borrow.clear();
    if (!all.empty()) borrow = policy_.ChooseStitch(all, need);
    std::size_t borrowed = 0;
    for (const SlotRun& r : borrow) borrowed += r.count;
    fresh = need - borrowed;
    if (fresh == 0 || reserved + fresh * chunk <= limit_) break;
    const std::size_t exact = policy_.SlotsFor(rounded, kind);
    if (need == exact) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "the memory limit of %s would be exceeded (%s reserved, %s more needed)", FormatBytes(limit_),
          FormatBytes(reserved), FormatBytes(fresh * chunk)));
    }
    need = exact;
  }
  auto m = store_->Create(pool, kind, chunk, borrow, fresh, policy_.Headroom());
  if (!m.ok()) return m.status();
  for (Mapping* e : store_->TakeEmptied()) Retire(e);
  return (*m)->head;
}

// ---- events, fences and the idle stitch cache ------------------------------------------------

Event CachingAllocator::GetEvent() {
  if (!spare_events_.empty()) {
    Event e = spare_events_.back();
    spare_events_.pop_back();
    return e;
  }
  auto e = driver_->CreateEvent();
  return e.ok() ? *e : 0;
}

void CachingAllocator::ProcessPending(bool synchronize) {
  for (std::size_t i = 0; i < pending_.size();) {
    auto [event, block] = pending_[i];
    bool done = true;
    if (synchronize) {
      driver_->SynchronizeEvent(event).IgnoreError();
    } else {
      auto q = driver_->QueryEvent(event);
      done = !q.ok() || *q;  // an error means the event can no longer complete: nothing waits on it
    }
    if (!done) {
      ++i;
      continue;
    }
    spare_events_.push_back(event);
    pending_[i] = pending_.back();
    pending_.pop_back();
    if (--block->pending_events == 0) FreeBlock(block);
  }
}

void CachingAllocator::RequestFence(StreamPool* p) {
  if (p->fence_recorded_seq() >= p->free_seq) return;  // the frees so far are covered
  if (p->fences.size() >= StreamPool::kMaxFences) {
    PollFence(p);
    if (p->fences.size() >= StreamPool::kMaxFences) return;
  }
  const Event e = GetEvent();
  if (e == 0) return;
  if (driver_->RecordEvent(e, p->stream).ok()) {
    p->fences.emplace_back(e, p->free_seq);
  } else {
    spare_events_.push_back(e);
  }
}

void CachingAllocator::PollFence(StreamPool* p) {
  while (!p->fences.empty()) {
    const auto [event, seq] = p->fences.front();
    auto q = driver_->QueryEvent(event);
    if (q.ok() && !*q) return;  // later fences are later on the same stream
    p->fence_done_seq = seq;   // complete, or an error: then it can no longer complete
    spare_events_.push_back(event);
    p->fences.erase(p->fences.begin());
  }
}

void CachingAllocator::PollFences() {
  for (auto& [stream, p] : pools_) {
    PollFence(p.get());
    const bool idle_fence = !p->fence_pending();
    RequestFence(p.get());
    // A fence recorded on a stream with no work left completes at once: the blocks it freed
    // since its last fence then serve this very miss, not only the next one (a stream that
    // frees and moves on would otherwise leave its memory idle while others make new chunks).
    if (idle_fence && p->fence_pending()) PollFence(p.get());
  }
}

void CachingAllocator::SyncFence(StreamPool* p) {
  // Fences every free so far: the newest fence covers them, and its completion implies the
  // older ones' (one stream). Without an event to fence with, waits for the stream itself (a
  // destroyed stream has no work left).
  if (p->Fenced(p->free_seq)) return;
  RequestFence(p);
  if (!p->fences.empty() && p->fence_recorded_seq() >= p->free_seq) {
    driver_->SynchronizeEvent(p->fences.back().first).IgnoreError();
  } else {
    driver_->SynchronizeStream(p->stream).IgnoreError();
  }
  for (const auto& [event, seq] : p->fences) spare_events_.push_back(event);
  p->fences.clear();
  p->fence_done_seq = p->free_seq;
}

bool CachingAllocator::EnsureFenced(StreamPool* p, std::uint64_t seq, bool synchronize) {
  if (p->Fenced(seq)) return true;
  if (synchronize) {
    SyncFence(p);
    return true;
  }
  PollFence(p);
  RequestFence(p);
  return p->Fenced(seq);
}

void CachingAllocator::OnIdle(Mapping* m) {
  if (!m->stitched || m->idle_lru.has_value()) return;
  m->idle_lru = idle_lru_.insert(idle_lru_.end(), m);
  idle_stitched_bytes_ += m->size;
  TrimStitchCache();
}

void CachingAllocator::OnBusy(Mapping* m) {
  if (m->idle_lru.has_value()) {
    idle_lru_.erase(*m->idle_lru);
    m->idle_lru.reset();
    idle_stitched_bytes_ -= m->size;
  }
  if (m->retiring) {
    m->retiring = false;
    retiring_.erase(std::remove(retiring_.begin(), retiring_.end(), m), retiring_.end());
  }
}

void CachingAllocator::ForgetMapping(Mapping* m) {
  OnBusy(m);  // leaves the idle cache and the retiring list
}

void CachingAllocator::TrimStitchCache() {
  while (idle_stitched_bytes_ > stitch_cache_limit_ && !idle_lru_.empty()) {
    Mapping* m = idle_lru_.front();
    idle_lru_.pop_front();
    m->idle_lru.reset();
    idle_stitched_bytes_ -= m->size;
    Retire(m);
  }
  if (!retiring_.empty()) ProcessRetiring(/*synchronize=*/false);
}

void CachingAllocator::Retire(Mapping* m) {
  if (m->retiring) return;
  m->retiring = true;
  retiring_.push_back(m);
  RequestFence(m->pool);
}

bool CachingAllocator::StaleViewsFenced(const Mapping* m, bool synchronize) {
  // Dissolving m releases the chunks homed in it, which unmaps their stale views in other
  // mappings: each only once the work its own stream queued before that view's last free has run.
  bool fenced = true;
  for (const Chunk* c : m->slots) {
    if (c == nullptr || c->home != m) continue;
    for (const auto& [view, slot] : c->stale) {
      StreamPool* p = view->pool;
      const Block* a = view->absent[slot];
      const std::uint64_t seq = a != nullptr ? a->freed_at : view->last_free_seq;
      fenced = EnsureFenced(p, seq, synchronize) && fenced;
    }
  }
  return fenced;
}

void CachingAllocator::ProcessRetiring(bool synchronize) {
  bool progress = true;
  while (progress && !retiring_.empty()) {
    progress = false;
    for (std::size_t i = 0; i < retiring_.size(); ++i) {
      Mapping* m = retiring_[i];
      if (!m->idle()) continue;
      if (!EnsureFenced(m->pool, m->last_free_seq, synchronize)) continue;
      if (!StaleViewsFenced(m, synchronize)) continue;
      // Chunks it lent out stay with their borrowers, which become their homes: waiting for
      // them to come home could take forever (a borrower lends them on), and would keep the
      // range, its views and its place in this list meanwhile.
      if (m->lent_home > 0) store_->Disown(m).IgnoreError();
      ForgetMapping(m);
      store_->Dissolve(m).IgnoreError();
      progress = true;
      break;  // retiring_ changed
    }
  }
}

absl::Status CachingAllocator::ReleaseCached() {
  STITCHALLOC_NVTX_RANGE("release cached memory");
  ProcessPending(/*synchronize=*/true);
  for (auto& [stream, p] : pools_) SyncFence(p.get());
  ++stats_.num_sync_all_streams;
  absl::Status first;
  auto note = [&](absl::Status s) {
    if (first.ok() && !s.ok()) first = std::move(s);
  };
  // 1. Dissolve idle mappings, stitched ones first so that their chunks go home, until no more.
  for (bool progress = true; progress;) {
    progress = false;
    std::vector<Mapping*> idle;
    for (const auto& [va, m] : store_->mappings()) {
      if (m->idle() && m->lent_home == 0) idle.push_back(m.get());
    }
    std::stable_partition(idle.begin(), idle.end(), [](Mapping* m) { return m->stitched; });
    for (Mapping* m : idle) {
      if (!m->idle() || m->lent_home > 0) continue;
      ForgetMapping(m);
      note(store_->Dissolve(m));
      progress = true;
    }
  }
  // 2. Trim busy mappings: borrowers first (their free chunks go home), then homes.
  std::vector<Mapping*> rest;
  for (const auto& [va, m] : store_->mappings()) rest.push_back(m.get());
  std::stable_partition(rest.begin(), rest.end(), [](Mapping* m) { return m->stitched; });
  for (Mapping* m : rest) note(store_->Trim(m));
  for (Mapping* m : rest) note(store_->Trim(m));  // chunks that came home in the first pass
  // 3. Drop mappings left with nothing.
  std::vector<Mapping*> empty;
  for (const auto& [va, m] : store_->mappings()) {
    if (m->idle() && m->lent_home == 0 && m->present == 0) empty.push_back(m.get());
  }
  for (Mapping* m : empty) {
    ForgetMapping(m);
    note(store_->Dissolve(m));
  }
  return first;
}

absl::Status CachingAllocator::EmptyCache() {
  if (keep_cached_.load(std::memory_order_relaxed)) return absl::OkStatus();  // SetKeepCached
  ChangeLock l(this);
  return ReleaseCached();
}

// ---- errors ----------------------------------------------------------------------------------

absl::Status CachingAllocator::BadPointer(const char* op, DevicePtr p) const {
  Mapping* m = store_->Find(p);
  if (m == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "stitchalloc: %s(%s): foreign pointer: it was not allocated by this allocator", op, FormatAddress(p)));
  }
  const Block* b = m->head;
  while (b != nullptr && !(p >= b->ptr && p < b->ptr + b->size)) b = b->next;
  if (b != nullptr && b->ptr == p) {
    // Freeing it again is a double free; anything else is a use after free.
    const char* what = std::string_view(op) == "free" ? "double free" : "use after free";
    switch (b->state) {
      case BlockState::kFree:
        return absl::InvalidArgumentError(absl::StrFormat(
            "stitchalloc: %s(%s): %s: the block is already free", op, FormatAddress(p), what));
      case BlockState::kPending:
        return absl::InvalidArgumentError(absl::StrFormat(
            "stitchalloc: %s(%s): %s: the block was freed and waits for stream events", op, FormatAddress(p), what));
      default:
        break;
    }
  }
  if (b != nullptr && (b->state == BlockState::kAllocated || b->state == BlockState::kPending)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "stitchalloc: %s(%s): interior pointer: it lies %d bytes into the allocation at %s (%s); pass "
        "the address malloc returned",
        op, FormatAddress(p), p - b->ptr, FormatAddress(b->ptr), FormatBytes(b->size)));
  }
  return absl::InvalidArgumentError(absl::StrFormat(
      "stitchalloc: %s(%s): not a live allocation: the address lies in memory this allocator holds free "
      "(double free, or a pointer malloc never returned)",
      op, FormatAddress(p)));
}

std::string CachingAllocator::OutOfMemoryReport(std::size_t size, std::size_t rounded, Stream stream,
                                                const absl::Status& cause) const {
  std::size_t free_bytes = 0, free_blocks = 0, largest = 0, free_chunks = 0;
  for (const auto& [va, m] : store_->mappings()) {
    for (const Block* b = m->head; b != nullptr; b = b->next) {
      if (!b->is_free()) continue;
      free_bytes += b->size;
      ++free_blocks;
      largest = std::max(largest, b->size);
      if (m->kind == PoolKind::kLarge) {
        if (auto r = MappingStore::FreeSlots(const_cast<Block*>(b))) free_chunks += r->count;
      }
    }
  }
  std::size_t pending_bytes = 0;
  for (const auto& pf : pending_) pending_bytes += pf.block->size;
  const auto allocated = static_cast<std::size_t>(stats_.allocated_bytes.all().current);
  const auto reserved = static_cast<std::size_t>(stats_.reserved_bytes.all().current);
  std::string device_free = "unknown";
  if (auto info = driver_->GetMemInfo(); info.ok()) device_free = FormatBytes(info->free_bytes);
  return absl::StrFormat(
      "stitchalloc: out of memory on %s: tried to allocate %s (%d bytes requested, %d after rounding) "
      "on stream 0x%x. Allocated: %s. Reserved: %s%s of a %s limit (device total %s, device free %s). "
      "Free but fragmented: %s in %d blocks, %d whole %s chunks among them (stitching %s). Largest free "
      "contiguous block: %s. Waiting on stream events: %s. Cause: %s",
      driver_->name(), FormatBytes(size), size, rounded, stream, FormatBytes(allocated), FormatBytes(reserved),
      shared_reserved_ == nullptr ? std::string()
                                  : absl::StrCat(" (", FormatBytes(LimitedReserved()), " with the device's other pools)"),
      FormatBytes(limit_), FormatBytes(total_memory_), device_free, FormatBytes(free_bytes), free_blocks,
      free_chunks, FormatBytes(chunk_size_), config_.stitching ? "on" : "off", FormatBytes(largest),
      FormatBytes(pending_bytes), cause.message());
}

// ---- introspection -----------------------------------------------------------------------------

absl::StatusOr<BlockInfo> CachingAllocator::Describe(const void* ptr) const {
  const auto p = reinterpret_cast<DevicePtr>(ptr);
  MutexLock l(&mu_);
  auto it = allocated_.find(p);
  if (it == allocated_.end()) return BadPointer("describe", p);
  const Block* b = it->second;
  const Mapping* m = b->mapping;
  BlockInfo info;
  info.ptr = b->ptr;
  info.size = b->size;
  info.requested = b->requested;
  info.stream = m->pool->stream;
  info.mapping_va = m->va;
  info.mapping_size = m->size;
  info.stitched = m->stitched;
  const std::size_t first = (b->ptr - m->va) / m->chunk_size;
  const std::size_t last = (b->ptr + b->size - 1 - m->va) / m->chunk_size;
  for (std::size_t s = first; s <= last; ++s) {
    const Chunk* c = m->slots[s];
    info.chunks.push_back({m->slot_address(s), m->chunk_size, c->home->slot_address(c->home_slot), c->home != m});
  }
  return info;
}

absl::StatusOr<SharedRange> CachingAllocator::Share(const void* ptr) {
  return ShareRange(ptr, reinterpret_cast<DevicePtr>(ptr), 0);
}

absl::StatusOr<SharedRange> CachingAllocator::ShareRange(const void* allocation, DevicePtr begin, std::size_t bytes) {
  STITCHALLOC_NVTX_RANGE("share");
  RaiseDescriptorLimitOnce();
  const auto p = reinterpret_cast<DevicePtr>(allocation);
  MutexLock l(&mu_);
  auto it = allocated_.find(p);
  if (it == allocated_.end()) return BadPointer("share", p);
  const Block* b = it->second;
  const DevicePtr end = b->ptr + b->size;
  if (begin < b->ptr || begin >= end || (bytes != 0 && bytes > end - begin)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "stitchalloc: share(%s, %d bytes): the range is not inside the allocation at %s (%s)", FormatAddress(begin),
        bytes, FormatAddress(b->ptr), FormatBytes(b->size)));
  }
  if (bytes == 0) bytes = end - begin;
  const Mapping* m = b->mapping;
  const std::size_t first = (begin - m->va) / m->chunk_size;
  const std::size_t last = (begin + bytes - 1 - m->va) / m->chunk_size;
  SharedRange r;
  r.offset = begin - m->slot_address(first);
  r.chunk_size = m->chunk_size;
  for (std::size_t s = first; s <= last; ++s) {
    absl::StatusOr<int> fd = driver_->ExportChunk(m->slots[s]->handle);
    if (!fd.ok()) {
      return absl::Status(fd.status().code(), absl::StrFormat("stitchalloc: share(%s): %s", FormatAddress(begin),
                                                              fd.status().message()));
    }
    r.fds.push_back(*fd);
  }
  return r;
}

std::vector<CachingAllocator::LiveAllocation> CachingAllocator::LiveAllocations() const {
  MutexLock l(&mu_);
  std::vector<LiveAllocation> out;
  out.reserve(allocated_.size());
  for (const auto& [p, b] : allocated_) out.push_back({b->ptr, b->size, b->requested, b->mapping->pool->stream});
  std::sort(out.begin(), out.end(), [](const LiveAllocation& x, const LiveAllocation& y) { return x.ptr < y.ptr; });
  return out;
}

absl::StatusOr<void*> CachingAllocator::AllocateAt(const LiveAllocation& a) {
  if (absl::Status bad = Policy::CheckPlacement(a.ptr, a.size, a.requested); !bad.ok()) return bad;
  ChangeLock l(this);
  for (int attempt = 0;; ++attempt) {
    if (!pending_.empty()) ProcessPending(/*synchronize=*/attempt > 0);
    const auto& maps = store_->mappings();
    auto it = maps.upper_bound(a.ptr);
    Mapping* m = it == maps.begin() ? nullptr : std::prev(it)->second.get();
    if (m == nullptr || a.ptr >= m->va + m->size) {
      return absl::FailedPreconditionError(
          absl::StrFormat("stitchalloc: allocate_at(%#x): no mapping of this allocator holds it", a.ptr));
    }
    if (m->pool->stream != a.stream) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "stitchalloc: allocate_at(%#x): its mapping belongs to stream %#x, not %#x", a.ptr, m->pool->stream, a.stream));
    }
    Block* b = m->head;
    while (b != nullptr && b->ptr + b->size <= a.ptr) b = b->next;
    if (b != nullptr && b->state == BlockState::kPending && attempt == 0) continue;  // wait for its events
    if (b == nullptr || !b->is_free() || a.ptr + a.size > b->ptr + b->size) {
      static constexpr const char* kState[] = {"free", "allocated", "waiting for other streams", "not mapped"};
      return absl::FailedPreconditionError(absl::StrFormat(
          "stitchalloc: allocate_at(%#x, %d bytes): the range is not within one free block (the block there: "
          "%#x, %d bytes, %s)", a.ptr, a.size, b == nullptr ? 0 : b->ptr, b == nullptr ? 0 : b->size,
          b == nullptr ? "none" : kState[static_cast<int>(b->state)]));
    }
    if (m->idle()) OnBusy(m);
    return Account(store_->AllocateRange(b, a.ptr - b->ptr, a.size), m->kind, a.requested);
  }
}

std::vector<SegmentInfo> CachingAllocator::Snapshot() const {
  MutexLock l(&mu_);
  std::vector<SegmentInfo> out;
  for (const auto& [va, m] : store_->mappings()) {
    SegmentInfo s;
    s.va = m->va;
    s.size = m->size;
    s.stream = m->pool->stream;
    s.small_pool = m->kind == PoolKind::kSmall;
    s.stitched = m->stitched;
    s.owned_bytes = static_cast<std::size_t>(m->present) * m->chunk_size;
    for (const Block* b = m->head; b != nullptr; b = b->next) s.blocks.push_back({b->ptr, b->size, b->requested, b->state});
    out.push_back(std::move(s));
  }
  return out;
}

absl::Status CachingAllocator::CheckInvariants() const {
  MutexLock l(&mu_);
  auto fail = [](std::string what) { return absl::InternalError("invariant violated: " + what); };
  std::int64_t allocated_bytes = 0, active_bytes = 0, split_bytes = 0, reserved = 0;
  std::size_t free_blocks = 0, allocated_blocks = 0;
  absl::flat_hash_map<const Chunk*, int> owners;
  for (const auto& [va, m] : store_->mappings()) {
    if (m->va != va || m->size != m->slots.size() * m->chunk_size) return fail("mapping geometry");
    DevicePtr cursor = m->va;
    int busy = 0, present = 0, lent_home = 0;
    const Block* prev = nullptr;
    for (const Block* b = m->head; b != nullptr; prev = b, b = b->next) {
      if (b->mapping != m.get() || b->prev != prev || b->ptr != cursor || b->size == 0) {
        return fail(absl::StrFormat("block chain of mapping %s broken at %s", FormatAddress(m->va), FormatAddress(cursor)));
      }
      if (prev != nullptr && prev->is_free() && b->is_free()) return fail("two adjacent free blocks");
      cursor += b->size;
      switch (b->state) {
        case BlockState::kFree: {
          ++free_blocks;
          const FreeSet& set = m->pool->set(m->kind);
          auto it = set.LowerBound(b->size);
          bool found = false;
          for (; it != set.end() && it->first.first == b->size; ++it) found = found || it->second == b;
          if (!found) return fail("free block missing from its free set");
          if (b->counted_split) split_bytes += static_cast<std::int64_t>(b->size);
          if (b->counted_split != b->is_split()) return fail("inactive_split accounting of a free block");
          break;
        }
        case BlockState::kAllocated:
          ++busy;
          ++allocated_blocks;
          allocated_bytes += static_cast<std::int64_t>(b->size);
          active_bytes += static_cast<std::int64_t>(b->size);
          if (!allocated_.contains(b->ptr) || allocated_.at(b->ptr) != b) return fail("allocated block not indexed");
          break;
        case BlockState::kPending:
          ++busy;
          active_bytes += static_cast<std::int64_t>(b->size);
          break;
        case BlockState::kAbsent: {
          const std::size_t s = (b->ptr - m->va) / m->chunk_size;
          if (b->size != m->chunk_size || m->absent[s] != b) return fail("absent block does not match its slot");
          const Chunk* c = m->slots[s];
          if (c != nullptr && c->owner == m.get()) return fail("absent block over a present chunk");
          break;
        }
      }
    }
    if (cursor != m->va + m->size) return fail("blocks do not cover the mapping");
    if (m->tail != prev) return fail("mapping's tail is not its last block");
    if (!store_->SegmentsUpToDate(*m)) return fail("tracked segments of a mapping differ from its present runs");
    if (m->reserved < m->size || m->reserved % m->chunk_size != 0) return fail("mapping's reserved range");
    for (std::size_t s = 0; s < m->slots.size(); ++s) {
      const Chunk* c = m->slots[s];
      const bool is_present = c != nullptr && c->owner == m.get();
      if (is_present) {
        ++present;
        ++owners[c];
        if (c->owner_slot != s) return fail("owner slot index");
        if (m->absent[s] != nullptr) return fail("present slot has an absent block");
      } else if (m->absent[s] == nullptr || !m->absent_slots.contains(static_cast<std::uint32_t>(s))) {
        return fail("slot without chunk or owner lacks an absent block");
      }
      if (c != nullptr && c->home == m.get()) {
        if (c->home_slot != s) return fail("home slot index");
        reserved += static_cast<std::int64_t>(c->size);
        if (c->owner != m.get()) ++lent_home;
      }
      if (c != nullptr && c->home != m.get() && c->owner != m.get()) {
        if (std::find(c->stale.begin(), c->stale.end(), std::make_pair(const_cast<Mapping*>(m.get()),
                                                                      static_cast<std::uint32_t>(s))) == c->stale.end()) {
          return fail("stale view not recorded by its chunk");
        }
      }
    }
    if (store_->mappings_with_absent().contains(m->va) == m->absent_slots.empty()) {
      return fail("the index of mappings with absent slots");
    }
    if (m->absent_slots.size() != m->slots.size() - static_cast<std::size_t>(present)) {
      return fail("the index of absent slots");
    }
    if (busy != m->busy_blocks || present != m->present || lent_home != m->lent_home) {
      return fail(absl::StrFormat("mapping %s counters: busy %d/%d present %d/%d lent_home %d/%d", FormatAddress(m->va), busy,
                                  m->busy_blocks, present, m->present, lent_home, m->lent_home));
    }
  }
  for (const auto& [c, n] : owners) {
    if (n != 1) return fail("a chunk has more than one owner");
  }
  if (owners.size() != store_->chunk_count()) return fail("a chunk has no owner");
  std::size_t in_sets = 0;
  for (const auto& [s, p] : pools_) in_sets += p->small.size() + p->large.size();
  if (in_sets != free_blocks) return fail("free sets hold blocks that are not free");
  if (allocated_blocks != allocated_.size()) return fail("allocation index size");
  if (allocated_bytes != stats_.allocated_bytes.all().current) return fail("allocated_bytes statistic");
  if (active_bytes != stats_.active_bytes.all().current) return fail("active_bytes statistic");
  if (reserved != stats_.reserved_bytes.all().current) return fail("reserved_bytes statistic");
  if (split_bytes != stats_.inactive_split_bytes.all().current) return fail("inactive_split_bytes statistic");
  std::size_t idle_bytes = 0;
  for (const Mapping* m : idle_lru_) {
    if (!m->idle() || !m->stitched) return fail("a busy or unstitched mapping in the idle stitch cache");
    idle_bytes += m->size;
  }
  if (idle_bytes != idle_stitched_bytes_) return fail("idle stitch cache bytes");
  if (static_cast<std::int64_t>(store_->mappings().size()) != stats_.segment.all().current) {
    return fail("segment statistic");
  }
  return absl::OkStatus();
}

}  // namespace stitchalloc
