// SegmentPool implementation (see segment_pool.h), and the two segment sources.
#include "allocator/segment_pool.h"

#include <algorithm>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/policy.h"
#include "vmm/format.h"
#include "vmm/nvtx.h"

namespace stitchalloc {

// ---- sources -----------------------------------------------------------------------------------

absl::StatusOr<SharedRange> SegmentSource::Share(const Segment& segment, std::size_t offset) {
  (void)segment;
  (void)offset;
  return absl::FailedPreconditionError(
      absl::StrCat("memory from ", name(), " cannot be shared with another process: stitchalloc does not know how "
                   "that allocator made it"));
}

namespace {

class FunctionSource final : public SegmentSource {
 public:
  FunctionSource(std::function<void*(std::size_t)> allocate, std::function<void(void*)> release, std::string name)
      : allocate_(std::move(allocate)), release_(std::move(release)), name_(std::move(name)) {}
  absl::StatusOr<Segment> Allocate(std::size_t bytes) override {
    void* p = allocate_(bytes);
    if (p == nullptr) {
      return absl::ResourceExhaustedError(absl::StrFormat("%s returned no memory for %s", name_, FormatBytes(bytes)));
    }
    return Segment{reinterpret_cast<DevicePtr>(p), bytes};
  }
  absl::Status Release(const Segment& segment) override {
    release_(reinterpret_cast<void*>(segment.ptr));
    return absl::OkStatus();
  }
  std::string name() const override { return name_; }

 private:
  const std::function<void*(std::size_t)> allocate_;
  const std::function<void(void*)> release_;
  const std::string name_;
};

}  // namespace

std::unique_ptr<SegmentSource> SegmentSource::FromFunctions(std::function<void*(std::size_t)> allocate,
                                                            std::function<void(void*)> release, std::string name) {
  return std::make_unique<FunctionSource>(std::move(allocate), std::move(release), std::move(name));
}

DriverSegmentSource::~DriverSegmentSource() {
  MutexLock l(&mu_);
  if (!chunks_.empty()) driver_->SynchronizeDevice().IgnoreError();
  for (const auto& [ptr, handle] : chunks_) {
    // Sizes are not kept here: a segment left over means its pool leaked it; unmapping needs the
    // size, so the chunk is released (CUDA frees it with its last mapping) and the range stays.
    driver_->ReleaseChunk(handle).IgnoreError();
  }
}

absl::StatusOr<SegmentSource::Segment> DriverSegmentSource::Allocate(std::size_t bytes) {
  const std::size_t size = RoundUp(bytes, driver_->granularity());
  auto chunk = driver_->CreateChunk(size);
  if (!chunk.ok()) return chunk.status();
  auto va = driver_->Reserve(size);
  if (!va.ok()) {
    driver_->ReleaseChunk(*chunk).IgnoreError();
    return va.status();
  }
  absl::Status s = driver_->Map(*va, size, *chunk);
  if (s.ok()) {
    s = driver_->SetAccess(*va, size);
    if (!s.ok()) driver_->Unmap(*va, size).IgnoreError();
  }
  if (!s.ok()) {
    driver_->FreeReservation(*va, size).IgnoreError();
    driver_->ReleaseChunk(*chunk).IgnoreError();
    return s;
  }
  MutexLock l(&mu_);
  chunks_[*va] = *chunk;
  return Segment{*va, size};
}

absl::Status DriverSegmentSource::Release(const Segment& segment) {
  MutexLock l(&mu_);
  auto it = chunks_.find(segment.ptr);
  if (it == chunks_.end()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("stitchalloc: release of segment %s: not a segment of this source", FormatAddress(segment.ptr)));
  }
  absl::Status s = driver_->Unmap(segment.ptr, segment.size);
  s.Update(driver_->FreeReservation(segment.ptr, segment.size));
  s.Update(driver_->ReleaseChunk(it->second));
  chunks_.erase(it);
  return s;
}

absl::StatusOr<SharedRange> DriverSegmentSource::Share(const Segment& segment, std::size_t offset) {
  PhysHandle handle;
  {
    MutexLock l(&mu_);
    auto it = chunks_.find(segment.ptr);
    if (it == chunks_.end()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("stitchalloc: share: %s is not a segment of this source", FormatAddress(segment.ptr)));
    }
    handle = it->second;
  }
  RaiseDescriptorLimitOnce();
  absl::StatusOr<int> fd = driver_->ExportChunk(handle);
  if (!fd.ok()) return fd.status();
  return SharedRange{offset, segment.size, {*fd}};
}

std::string DriverSegmentSource::name() const { return absl::StrCat("whole segments of ", driver_->name()); }

// ---- SegmentPool -------------------------------------------------------------------------------

namespace {
// PyTorch's segment sizes (get_allocation_size).
std::size_t SegmentSizeFor(std::size_t rounded, PoolKind kind) {
  constexpr std::size_t kSmallBuffer = 2 * kMiB;
  if (kind == PoolKind::kSmall) return kSmallBuffer;
  if (rounded < Policy::kMinLargeAlloc) return Policy::kLargeBuffer;
  return RoundUp(rounded, kSmallBuffer);
}
}  // namespace

absl::StatusOr<std::unique_ptr<SegmentPool>> SegmentPool::Create(const Config& config, Driver* driver,
                                                                  std::shared_ptr<SegmentSource> source,
                                                                  Options options) {
  if (driver == nullptr) return absl::InvalidArgumentError("stitchalloc: SegmentPool: null driver");
  if (source == nullptr) return absl::InvalidArgumentError("stitchalloc: SegmentPool: null segment source");
  if (!(config.memory_fraction > 0.0 && config.memory_fraction <= 1.0)) {
    return absl::InvalidArgumentError("stitchalloc config: key 'memory_fraction': must be in (0, 1]");
  }
  auto info = driver->GetMemInfo();
  if (!info.ok()) return info.status();
  return std::unique_ptr<SegmentPool>(
      new SegmentPool(config, driver, std::move(source), std::move(options), info->total_bytes));
}

SegmentPool::SegmentPool(const Config& config, Driver* driver, std::shared_ptr<SegmentSource> source,
                         Options options, std::size_t total_memory)
    : PoolAllocator(config, total_memory),
      config_(config),
      driver_(driver),
      source_(std::move(source)),
      options_(std::move(options)) {}

SegmentPool::~SegmentPool() {
  MutexLock l(&mu_);
  ProcessPending(/*synchronize=*/true);
  if (!segments_.empty()) driver_->SynchronizeDevice().IgnoreError();  // nothing may still use them
  std::vector<SegmentEvent> events;
  while (!segments_.empty()) ReleaseSegment(segments_.begin()->second.get(), &events);
  Publish(std::move(events));
}

SegmentPool::FreeSet& SegmentPool::SetOf(Stream stream, PoolKind kind) { return free_[{stream, kind}]; }

void SegmentPool::Insert(Blk* b) {
  SetOf(b->seg->stream, b->seg->kind).emplace(std::make_pair(b->size, b->ptr), b);
  if (b->prev != nullptr || b->next != nullptr) {
    stats_.inactive_split.Add(static_cast<int>(b->seg->kind), 1);
    stats_.inactive_split_bytes.Add(static_cast<int>(b->seg->kind), static_cast<std::int64_t>(b->size));
  }
}

void SegmentPool::Remove(Blk* b) {
  SetOf(b->seg->stream, b->seg->kind).erase(std::make_pair(b->size, b->ptr));
  if (b->prev != nullptr || b->next != nullptr) {
    stats_.inactive_split.Add(static_cast<int>(b->seg->kind), -1);
    stats_.inactive_split_bytes.Add(static_cast<int>(b->seg->kind), -static_cast<std::int64_t>(b->size));
  }
}

SegmentPool::Blk* SegmentPool::BestFit(Stream stream, PoolKind kind, std::size_t rounded) {
  auto found = free_.find(std::make_pair(stream, kind));
  if (found == free_.end()) return nullptr;
  FreeSet& set = found->second;
  const std::size_t max_split = config_.max_split_size;
  auto it = set.lower_bound({rounded, 0});
  if (it == set.end()) return nullptr;
  const std::size_t size = it->first.first;
  // PyTorch's max_split_size rules: an oversize block serves only requests close to its size.
  if (max_split != SIZE_MAX) {
    if (rounded < max_split && size >= max_split) return nullptr;
    if (rounded >= max_split && size >= rounded + Policy::kLargeBuffer) return nullptr;
  }
  return it->second;
}

bool SegmentPool::ShouldSplit(const Blk* b, std::size_t rounded) const {
  if (options_.no_split) return false;
  const std::size_t rest = b->size - rounded;
  if (b->seg->kind == PoolKind::kSmall) return rest >= Policy::kMinBlockSize;
  return b->size < config_.max_split_size && rest > Policy::kSmallSize;
}

SegmentPool::Blk* SegmentPool::Carve(Blk* b, std::size_t offset, std::size_t rounded) {
  auto split_after = [&](Blk* x, std::size_t bytes) {
    Blk* rest = new Blk;
    rest->ptr = x->ptr + bytes;
    rest->size = x->size - bytes;
    rest->seg = x->seg;
    rest->prev = x;
    rest->next = x->next;
    if (x->next != nullptr) x->next->prev = rest;
    x->next = rest;
    x->size = bytes;
    return rest;
  };
  if (offset > 0) {
    Blk* at = split_after(b, offset);
    Insert(b);  // the piece before stays free
    b = at;
  }
  if (b->size > rounded) Insert(split_after(b, rounded));
  return b;
}

void* SegmentPool::Account(Blk* b, std::size_t requested) {
  b->state = BlockState::kAllocated;
  b->requested = requested;
  allocated_.emplace(b->ptr, b);
  const int pool = static_cast<int>(b->seg->kind);
  const auto size = static_cast<std::int64_t>(b->size);
  stats_.allocation.Add(pool, 1);
  stats_.allocated_bytes.Add(pool, size);
  stats_.active.Add(pool, 1);
  stats_.active_bytes.Add(pool, size);
  stats_.requested_bytes.Add(pool, static_cast<std::int64_t>(requested));
  if (b->size >= config_.max_split_size) stats_.oversize_allocations.Add(1);
  return reinterpret_cast<void*>(b->ptr);
}

std::size_t SegmentPool::Reserved() const { return static_cast<std::size_t>(stats_.reserved_bytes.all().current); }

void SegmentPool::AddReserved(std::int64_t delta, PoolKind kind) {
  const int pool = static_cast<int>(kind);
  stats_.segment.Add(pool, delta > 0 ? 1 : -1);
  stats_.reserved_bytes.Add(pool, delta);
  if (shared_reserved_ != nullptr) shared_reserved_->fetch_add(delta);
}

absl::StatusOr<SegmentPool::Blk*> SegmentPool::NewSegment(Stream stream, PoolKind kind, std::size_t rounded,
                                                          absl::Status* refused) {
  const std::size_t want = SegmentSizeFor(rounded, kind);
  if (LimitedReserved() + want > limit_) {
    *refused = absl::ResourceExhaustedError(absl::StrFormat(
        "a new %s segment would pass the memory limit", FormatBytes(want)));
    return *refused;
  }
  STITCHALLOC_NVTX_RANGE("stitchalloc::SegmentPool::NewSegment");
  auto mem = source_->Allocate(want);
  if (!mem.ok()) {
    *refused = mem.status();
    return mem.status();
  }
  // A source that breaks its contract must not corrupt the pool: the segment goes back.
  const char* wrong = nullptr;
  if (mem->ptr == 0) {
    wrong = "a null segment";
  } else if (mem->size < want) {
    wrong = "a segment smaller than asked for";
  } else if (mem->ptr % Policy::kMinBlockSize != 0) {
    wrong = "a segment not aligned to 512 bytes";
  } else {
    auto next = segments_.lower_bound(mem->ptr);
    const bool overlaps_next = next != segments_.end() && next->first < mem->ptr + mem->size;
    const bool overlaps_prev = next != segments_.begin() &&
                               std::prev(next)->first + std::prev(next)->second->mem.size > mem->ptr;
    if (overlaps_next || overlaps_prev) wrong = "a segment overlapping one it gave before";
  }
  if (wrong != nullptr) {
    if (mem->ptr != 0) source_->Release(*mem).IgnoreError();
    *refused = absl::InternalError(absl::StrFormat("%s returned %s (%s at %s for %s)", source_->name(), wrong,
                                                   FormatBytes(mem->size), FormatAddress(mem->ptr), FormatBytes(want)));
    return *refused;
  }
  auto seg = std::make_unique<Seg>();
  seg->mem = *mem;
  seg->stream = stream;
  seg->kind = kind;
  Blk* head = new Blk;
  head->ptr = mem->ptr;
  head->size = mem->size;
  head->seg = seg.get();
  seg->head = head;
  segments_.emplace(mem->ptr, std::move(seg));
  AddReserved(static_cast<std::int64_t>(mem->size), kind);
  ++stats_.num_device_alloc;
  if (mem->size >= config_.max_split_size) stats_.oversize_segments.Add(1);
  Publish({SegmentEvent{true, mem->ptr, mem->size, stream, kind}});
  return head;
}

absl::StatusOr<void*> SegmentPool::Malloc(std::size_t size, Stream stream) {
  if (absl::Status bad = Policy::CheckRequest(size); !bad.ok()) return bad;
  const std::size_t rounded = Policy::RoundSize(size);
  const PoolKind kind = Policy::PoolFor(rounded);
  absl::Status refused;
  for (int attempt = 0;; ++attempt) {
    {
      MutexLock l(&mu_);
      if (!pending_.empty()) ProcessPending(/*synchronize=*/false);
      Blk* b = BestFit(stream, kind, rounded);
      if (b == nullptr) {
        auto fresh = NewSegment(stream, kind, rounded, &refused);
        if (fresh.ok()) {
          b = *fresh;
        } else if (!absl::IsResourceExhausted(fresh.status())) {
          return absl::Status(fresh.status().code(),
                              absl::StrCat("stitchalloc: malloc(", size, "): ", fresh.status().message()));
        }
      } else {
        Remove(b);
      }
      if (b != nullptr) {
        return Account(Carve(b, 0, ShouldSplit(b, rounded) ? rounded : b->size), size);
      }
      if (attempt == 1) {
        ++stats_.num_ooms;
        return absl::ResourceExhaustedError(OutOfMemoryReport(size, rounded, stream, refused));
      }
      // Out of memory: this pool's own cache first (unless a graph may replay from it), then
      // the device's other pools', and once more.
      ++stats_.num_alloc_retries;
      if (!keep_cached_.load(std::memory_order_relaxed)) {
        if (!pending_.empty()) {
          ++stats_.num_sync_all_streams;
          ProcessPending(/*synchronize=*/true);
        }
        ReleaseFreeSegments();
      }
    }
    if (options_.on_source_exhausted) options_.on_source_exhausted();
  }
}

absl::Status SegmentPool::Free(void* ptr) {
  if (ptr == nullptr) return absl::OkStatus();
  const auto p = reinterpret_cast<DevicePtr>(ptr);
  MutexLock l(&mu_);
  auto it = allocated_.find(p);
  if (it == allocated_.end()) return BadPointer("free", p);
  Blk* b = it->second;
  allocated_.erase(it);
  const int pool = static_cast<int>(b->seg->kind);
  stats_.allocation.Add(pool, -1);
  stats_.allocated_bytes.Add(pool, -static_cast<std::int64_t>(b->size));
  stats_.requested_bytes.Add(pool, -static_cast<std::int64_t>(b->requested));
  if (b->size >= config_.max_split_size) stats_.oversize_allocations.Add(-1);
  b->requested = 0;
  if (b->uses.empty()) {
    FreeBlock(b);
    return absl::OkStatus();
  }
  // Used by other streams too: free once the work queued on them so far has run.
  b->state = BlockState::kPending;
  for (Stream s : b->uses) {
    auto e = driver_->CreateEvent();
    if (e.ok() && driver_->RecordEvent(*e, s).ok()) {
      pending_.push_back({*e, b});
      ++b->events;
      continue;
    }
    if (e.ok()) driver_->DestroyEvent(*e).IgnoreError();
    driver_->SynchronizeStream(s).IgnoreError();  // no event to wait on: wait now
  }
  b->uses.clear();
  if (b->events == 0) FreeBlock(b);
  return absl::OkStatus();
}

void SegmentPool::FreeBlock(Blk* b) {
  const int pool = static_cast<int>(b->seg->kind);
  stats_.active.Add(pool, -1);
  stats_.active_bytes.Add(pool, -static_cast<std::int64_t>(b->size));
  b->state = BlockState::kFree;
  auto absorb = [&](Blk* into, Blk* gone) {  // `gone` follows `into`
    into->size += gone->size;
    into->next = gone->next;
    if (gone->next != nullptr) gone->next->prev = into;
    delete gone;
  };
  if (b->prev != nullptr && b->prev->state == BlockState::kFree) {
    Blk* prev = b->prev;
    Remove(prev);
    absorb(prev, b);
    b = prev;
  }
  if (b->next != nullptr && b->next->state == BlockState::kFree) {
    Remove(b->next);
    absorb(b, b->next);
  }
  Insert(b);
}

void SegmentPool::ProcessPending(bool synchronize) {
  for (std::size_t i = 0; i < pending_.size();) {
    auto [event, block] = pending_[i];
    bool done = true;
    if (synchronize) {
      driver_->SynchronizeEvent(event).IgnoreError();
    } else {
      auto q = driver_->QueryEvent(event);
      done = !q.ok() || *q;
    }
    if (!done) {
      ++i;
      continue;
    }
    driver_->DestroyEvent(event).IgnoreError();
    pending_[i] = pending_.back();
    pending_.pop_back();
    if (--block->events == 0) FreeBlock(block);
  }
}

absl::Status SegmentPool::RecordStream(void* ptr, Stream stream) {
  const auto p = reinterpret_cast<DevicePtr>(ptr);
  MutexLock l(&mu_);
  auto it = allocated_.find(p);
  if (it == allocated_.end()) return BadPointer("record_stream", p);
  Blk* b = it->second;
  if (stream != b->seg->stream) b->uses.insert(stream);
  return absl::OkStatus();
}

void SegmentPool::ReleaseSegment(Seg* s, std::vector<SegmentEvent>* events) {
  // Blocks still allocated (destruction only) go with their segment.
  for (Blk* b = s->head; b != nullptr;) {
    Blk* next = b->next;
    if (b->state == BlockState::kFree) Remove(b);
    if (b->state == BlockState::kAllocated) {
      allocated_.erase(b->ptr);
      const int pool = static_cast<int>(s->kind);
      stats_.allocation.Add(pool, -1);
      stats_.allocated_bytes.Add(pool, -static_cast<std::int64_t>(b->size));
      stats_.requested_bytes.Add(pool, -static_cast<std::int64_t>(b->requested));
      stats_.active.Add(pool, -1);
      stats_.active_bytes.Add(pool, -static_cast<std::int64_t>(b->size));
      if (b->size >= config_.max_split_size) stats_.oversize_allocations.Add(-1);
    }
    delete b;
    b = next;
  }
  const SegmentSource::Segment mem = s->mem;
  events->push_back(SegmentEvent{false, mem.ptr, mem.size, s->stream, s->kind});
  AddReserved(-static_cast<std::int64_t>(mem.size), s->kind);
  ++stats_.num_device_free;
  if (mem.size >= config_.max_split_size) stats_.oversize_segments.Add(-1);
  segments_.erase(mem.ptr);
  source_->Release(mem).IgnoreError();  // the source's own error is its to report; the range is gone here
}

void SegmentPool::ReleaseFreeSegments() {
  std::vector<Seg*> idle;
  for (const auto& [ptr, s] : segments_) {
    if (s->head->state == BlockState::kFree && s->head->next == nullptr) idle.push_back(s.get());
  }
  if (idle.empty()) return;
  STITCHALLOC_NVTX_RANGE("stitchalloc::SegmentPool::ReleaseFreeSegments");
  // Work queued before the frees may still touch the memory (cudaFree synchronizes the device too).
  driver_->SynchronizeDevice().IgnoreError();
  std::vector<SegmentEvent> events;
  for (Seg* s : idle) ReleaseSegment(s, &events);
  Publish(std::move(events));
}

void SegmentPool::Publish(std::vector<SegmentEvent> events) {
  if (!events.empty() && observer_) observer_(events);
}

absl::Status SegmentPool::EmptyCache() {
  if (keep_cached_.load(std::memory_order_relaxed)) return absl::OkStatus();  // SetKeepCached
  MutexLock l(&mu_);
  if (!pending_.empty()) {
    ++stats_.num_sync_all_streams;
    ProcessPending(/*synchronize=*/true);
  }
  ReleaseFreeSegments();
  return absl::OkStatus();
}

void SegmentPool::SetSegmentObserver(SegmentObserver observer) {
  MutexLock l(&mu_);
  observer_ = std::move(observer);
}

SegmentPool::Blk* SegmentPool::Find(DevicePtr p) const {
  auto it = segments_.upper_bound(p);
  if (it == segments_.begin()) return nullptr;
  const Seg* s = std::prev(it)->second.get();
  if (p >= s->mem.ptr + s->mem.size) return nullptr;
  Blk* b = s->head;
  while (b != nullptr && p >= b->ptr + b->size) b = b->next;
  return b;
}

absl::Status SegmentPool::BadPointer(const char* op, DevicePtr p) const {
  const Blk* b = Find(p);
  if (b == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "stitchalloc: %s(%s): foreign pointer: it was not allocated by this pool", op, FormatAddress(p)));
  }
  const char* what = std::string_view(op) == "free" ? "double free" : "use after free";
  if (b->ptr == p && b->state == BlockState::kPending) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "stitchalloc: %s(%s): %s: the block was freed and waits for stream events", op, FormatAddress(p), what));
  }
  if (b->state != BlockState::kFree) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "stitchalloc: %s(%s): interior pointer: it lies %d bytes into the allocation at %s (%s); pass "
        "the address malloc returned",
        op, FormatAddress(p), p - b->ptr, FormatAddress(b->ptr), FormatBytes(b->size)));
  }
  return absl::InvalidArgumentError(absl::StrFormat(
      "stitchalloc: %s(%s): %s: the address lies in memory this pool holds free", op, FormatAddress(p), what));
}

std::string SegmentPool::OutOfMemoryReport(std::size_t size, std::size_t rounded, Stream stream,
                                           const absl::Status& cause) const {
  std::size_t free_bytes = 0, free_blocks = 0, largest = 0, pending_bytes = 0;
  for (const auto& [ptr, s] : segments_) {
    for (const Blk* b = s->head; b != nullptr; b = b->next) {
      if (b->state == BlockState::kPending) pending_bytes += b->size;
      if (b->state != BlockState::kFree) continue;
      free_bytes += b->size;
      ++free_blocks;
      largest = std::max(largest, b->size);
    }
  }
  std::string device_free = "unknown";
  if (auto info = driver_->GetMemInfo(); info.ok()) device_free = FormatBytes(info->free_bytes);
  return absl::StrFormat(
      "stitchalloc: out of memory in a pool served by %s%s on %s: tried to allocate %s (%d bytes requested, %d "
      "after rounding) on stream 0x%x. This pool: allocated %s, reserved %s in %d segments%s, of a %s limit "
      "(device total %s, device free %s). Free but fragmented: %s in %d blocks; largest free block: %s. "
      "Waiting on stream events: %s. Cause: %s",
      source_->name(), options_.no_split ? " (no_split: one allocation per segment)" : "", driver_->name(),
      FormatBytes(size), size, rounded, stream, FormatBytes(static_cast<std::size_t>(stats_.allocated_bytes.all().current)),
      FormatBytes(Reserved()), segments_.size(),
      shared_reserved_ == nullptr ? std::string()
                                  : absl::StrCat(" (", FormatBytes(LimitedReserved()), " with the device's other pools)"),
      FormatBytes(limit_), FormatBytes(total_memory_), device_free, FormatBytes(free_bytes), free_blocks,
      FormatBytes(largest), FormatBytes(pending_bytes), cause.message());
}

absl::StatusOr<BlockInfo> SegmentPool::Describe(const void* ptr) const {
  const auto p = reinterpret_cast<DevicePtr>(ptr);
  MutexLock l(&mu_);
  auto it = allocated_.find(p);
  if (it == allocated_.end()) return BadPointer("describe", p);
  const Blk* b = it->second;
  const Seg* s = b->seg;
  BlockInfo info;
  info.ptr = b->ptr;
  info.size = b->size;
  info.requested = b->requested;
  info.stream = s->stream;
  info.mapping_va = s->mem.ptr;
  info.mapping_size = s->mem.size;
  info.stitched = false;
  info.chunks.push_back({s->mem.ptr, s->mem.size, s->mem.ptr, false});  // the segment is one piece
  return info;
}

absl::StatusOr<SharedRange> SegmentPool::Share(const void* ptr) {
  const auto p = reinterpret_cast<DevicePtr>(ptr);
  SegmentSource::Segment mem;
  {
    MutexLock l(&mu_);
    auto it = allocated_.find(p);
    if (it == allocated_.end()) return BadPointer("share", p);
    mem = it->second->seg->mem;
  }
  // The segment stays while the allocation lives, which the caller guarantees during the call.
  auto r = source_->Share(mem, p - mem.ptr);
  if (!r.ok()) {
    return absl::Status(r.status().code(),
                        absl::StrFormat("stitchalloc: share(%s): %s", FormatAddress(p), r.status().message()));
  }
  return r;
}

std::vector<SegmentInfo> SegmentPool::Snapshot() const {
  MutexLock l(&mu_);
  std::vector<SegmentInfo> out;
  out.reserve(segments_.size());
  for (const auto& [ptr, s] : segments_) {
    SegmentInfo info;
    info.va = s->mem.ptr;
    info.size = s->mem.size;
    info.stream = s->stream;
    info.small_pool = s->kind == PoolKind::kSmall;
    info.stitched = false;
    info.owned_bytes = s->mem.size;
    for (const Blk* b = s->head; b != nullptr; b = b->next) info.blocks.push_back({b->ptr, b->size, b->requested, b->state});
    out.push_back(std::move(info));
  }
  return out;
}

std::vector<PoolAllocator::LiveAllocation> SegmentPool::LiveAllocations() const {
  MutexLock l(&mu_);
  std::vector<LiveAllocation> out;
  out.reserve(allocated_.size());
  for (const auto& [p, b] : allocated_) out.push_back({b->ptr, b->size, b->requested, b->seg->stream});
  std::sort(out.begin(), out.end(), [](const LiveAllocation& x, const LiveAllocation& y) { return x.ptr < y.ptr; });
  return out;
}

absl::StatusOr<void*> SegmentPool::AllocateAt(const LiveAllocation& a) {
  if (absl::Status bad = Policy::CheckPlacement(a.ptr, a.size, a.requested); !bad.ok()) return bad;
  MutexLock l(&mu_);
  if (!pending_.empty()) ProcessPending(/*synchronize=*/true);
  Blk* b = Find(a.ptr);
  if (b == nullptr || b->state != BlockState::kFree || b->seg->stream != a.stream ||
      a.ptr + a.size > b->ptr + b->size) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "stitchalloc: allocate_at(%#x, %d bytes, stream 0x%x): %s", a.ptr, a.size, a.stream,
        b == nullptr                      ? "the range is not in this pool's memory"
        : b->state != BlockState::kFree   ? "the range overlaps a live allocation"
        : b->seg->stream != a.stream      ? "the range's segment belongs to another stream"
                                          : "the range runs past its free block"));
  }
  Remove(b);
  return Account(Carve(b, a.ptr - b->ptr, a.size), a.requested);
}

absl::Status SegmentPool::CheckInvariants() const {
  MutexLock l(&mu_);
  Stats expect;
  std::size_t free_count = 0, allocated_count = 0, pending_blocks = 0;
  for (const auto& [ptr, s] : segments_) {
    if (ptr != s->mem.ptr || s->head == nullptr || s->head->ptr != ptr || s->head->prev != nullptr) {
      return absl::InternalError(absl::StrFormat("segment %#x: bad head", ptr));
    }
    DevicePtr at = ptr;
    const int pool = static_cast<int>(s->kind);
    expect.reserved_bytes.Add(pool, static_cast<std::int64_t>(s->mem.size));
    for (const Blk* b = s->head; b != nullptr; b = b->next) {
      if (b->ptr != at || b->size == 0 || b->seg != s.get() || (b->next != nullptr && b->next->prev != b)) {
        return absl::InternalError(absl::StrFormat("segment %#x: blocks do not tile it at %#x", ptr, at));
      }
      at += b->size;
      const bool split = b->prev != nullptr || b->next != nullptr;
      switch (b->state) {
        case BlockState::kFree: {
          if (b->next != nullptr && b->next->state == BlockState::kFree) {
            return absl::InternalError(absl::StrFormat("free blocks %#x and %#x are not merged", b->ptr, b->next->ptr));
          }
          auto set = free_.find(std::make_pair(s->stream, s->kind));
          if (set == free_.end() || !set->second.contains(std::make_pair(b->size, b->ptr))) {
            return absl::InternalError(absl::StrFormat("free block %#x is not in its free set", b->ptr));
          }
          ++free_count;
          if (split) expect.inactive_split_bytes.Add(pool, static_cast<std::int64_t>(b->size));
          break;
        }
        case BlockState::kAllocated: {
          auto it = allocated_.find(b->ptr);
          if (it == allocated_.end() || it->second != b) {
            return absl::InternalError(absl::StrFormat("allocated block %#x is not indexed", b->ptr));
          }
          ++allocated_count;
          expect.allocated_bytes.Add(pool, static_cast<std::int64_t>(b->size));
          expect.active_bytes.Add(pool, static_cast<std::int64_t>(b->size));
          break;
        }
        case BlockState::kPending:
          if (b->events <= 0) return absl::InternalError(absl::StrFormat("pending block %#x waits for nothing", b->ptr));
          pending_blocks += b->events;
          expect.active_bytes.Add(pool, static_cast<std::int64_t>(b->size));
          break;
        default:
          return absl::InternalError(absl::StrFormat("block %#x has an impossible state", b->ptr));
      }
    }
    if (at != ptr + s->mem.size) return absl::InternalError(absl::StrFormat("segment %#x: blocks do not cover it", ptr));
  }
  std::size_t in_sets = 0;
  for (const auto& [key, set] : free_) in_sets += set.size();
  if (in_sets != free_count) {
    return absl::InternalError(absl::StrFormat("%d entries in free sets for %d free blocks", in_sets, free_count));
  }
  if (allocated_.size() != allocated_count) {
    return absl::InternalError(absl::StrFormat("%d indexed allocations for %d blocks", allocated_.size(), allocated_count));
  }
  if (pending_.size() != pending_blocks) {
    return absl::InternalError(absl::StrFormat("%d pending events for %d awaited", pending_.size(), pending_blocks));
  }
  auto same = [](const StatArray& x, const StatArray& y) {
    return x.pools[0].current == y.pools[0].current && x.pools[1].current == y.pools[1].current &&
           x.pools[2].current == y.pools[2].current;
  };
  if (!same(expect.reserved_bytes, stats_.reserved_bytes) || !same(expect.allocated_bytes, stats_.allocated_bytes) ||
      !same(expect.active_bytes, stats_.active_bytes) ||
      !same(expect.inactive_split_bytes, stats_.inactive_split_bytes)) {
    return absl::InternalError("statistics disagree with the blocks");
  }
  if (stats_.segment.all().current != static_cast<std::int64_t>(segments_.size()) ||
      stats_.allocation.all().current != static_cast<std::int64_t>(allocated_.size())) {
    return absl::InternalError("segment or allocation counts disagree with the pool");
  }
  return absl::OkStatus();
}

}  // namespace stitchalloc
