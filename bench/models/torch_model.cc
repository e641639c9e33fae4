#include "bench/models/torch_model.h"

#include <algorithm>
#include <map>
#include <tuple>

#include "absl/strings/str_format.h"

namespace stitchalloc::bench {
namespace {
constexpr std::size_t RoundUpTo(std::size_t n, std::size_t a) { return (n + a - 1) / a * a; }
}  // namespace

bool TorchAllocatorModel::BySize::operator()(const Block* a, const Block* b) const {
  return std::tie(a->stream, a->size, a->ptr) < std::tie(b->stream, b->size, b->ptr);
}
bool TorchAllocatorModel::ByAddress::operator()(const Block* a, const Block* b) const {
  return std::tie(a->stream, a->ptr) < std::tie(b->stream, b->ptr);
}

TorchAllocatorModel::TorchAllocatorModel(const TorchModelOptions& options) : options_(options) {
  small_.is_small = true;
}

TorchAllocatorModel::~TorchAllocatorModel() {
  for (Pool* p : {&small_, &large_}) {
    for (Block* b : p->blocks) delete b;
    for (Block* b : p->unmapped) delete b;
  }
  for (auto& [ptr, b] : active_) delete b;
}

std::size_t TorchAllocatorModel::RoundSize(std::size_t size) {
  return size < kMinBlockSize ? kMinBlockSize : RoundUpTo(size, kMinBlockSize);
}

std::size_t TorchAllocatorModel::AllocationSize(std::size_t rounded) {
  if (rounded <= kSmallSize) return kSmallBuffer;
  if (rounded < kMinLargeAlloc) return kLargeBuffer;
  return RoundUpTo(rounded, kRoundLarge);
}

std::size_t TorchAllocatorModel::allowed() const {
  return fraction_set() ? static_cast<std::size_t>(options_.memory_fraction * double(options_.device_memory))
                        : options_.device_memory;
}

TorchAllocatorModel::Block* TorchAllocatorModel::NewBlock(std::uint64_t stream, std::size_t size, std::uint64_t ptr,
                                                          Pool* pool, Segment* segment) {
  Block* b = new Block;
  b->stream = stream;
  b->size = size;
  b->ptr = ptr;
  b->pool = pool;
  b->segment = segment;
  return b;
}

void TorchAllocatorModel::AddReserved(std::int64_t delta) {
  counters_.reserved += delta;
  counters_.reserved_peak = std::max(counters_.reserved_peak, counters_.reserved);
}

bool TorchAllocatorModel::Fits(std::size_t bytes) const {
  const std::size_t reserved = static_cast<std::size_t>(counters_.reserved);
  if (fraction_set() && reserved + bytes > allowed()) return false;  // the set_fraction check
  return reserved + bytes <= options_.device_memory;                 // cudaMalloc's own limit
}

// get_free_block: best fit on the request's stream, with the max_split_size rules and, in
// expandable mode, a preference for blocks that cannot grow into unmapped space.
TorchAllocatorModel::Block* TorchAllocatorModel::GetFreeBlock(Pool& pool, std::uint64_t stream, std::size_t rounded) {
  if (fraction_set() && options_.garbage_collection_threshold > 0) ++pool.get_free_calls;
  Block key;
  key.stream = stream;
  key.size = rounded;
  key.ptr = 0;
  auto it = pool.blocks.lower_bound(&key);
  if (it == pool.blocks.end() || (*it)->stream != stream) return nullptr;
  if ((*it)->segment->expandable) {
    auto expandable_size = [](const Block* b) {
      return b->size + (b->next != nullptr && !b->next->mapped ? b->next->size : 0);
    };
    auto next = std::next(it);
    while (next != pool.blocks.end() && (*next)->stream == stream && (*it)->segment->expandable &&
           expandable_size(*next) < expandable_size(*it)) {
      it = next++;
    }
  }
  const std::size_t max_split = options_.max_split_size;
  if (rounded < max_split && (*it)->size >= max_split) return nullptr;
  if (rounded >= max_split && (*it)->size >= rounded + kLargeBuffer) return nullptr;
  Block* b = *it;
  pool.blocks.erase(it);
  return b;
}

TorchAllocatorModel::Block* TorchAllocatorModel::AllocBlock(Pool& pool, std::uint64_t stream, std::size_t rounded,
                                                            std::size_t alloc_size, bool is_retry) {
  if (is_retry) ++counters_.retries;
  if (options_.expandable_segments) return TryAllocateExpandable(pool, stream, rounded);
  if (!Fits(alloc_size)) return nullptr;
  auto seg = std::make_unique<Segment>();
  seg->base = next_va_;
  seg->size = alloc_size;
  next_va_ += RoundUpTo(alloc_size, kRoundLarge);
  Block* b = NewBlock(stream, alloc_size, seg->base, &pool, seg.get());
  segments_.emplace(seg->base, std::move(seg));
  AddReserved(static_cast<std::int64_t>(alloc_size));
  ++counters_.segment_allocs;
  segment_log_.push_back(alloc_size);
  return b;
}

TorchAllocatorModel::Block* TorchAllocatorModel::FindExpandable(Pool& pool, std::uint64_t stream, std::size_t size) {
  auto allocatable = [](const Block* b) { return b != nullptr && !b->allocated; };
  Block key;
  key.stream = stream;
  key.ptr = 0;
  for (auto it = pool.unmapped.lower_bound(&key); it != pool.unmapped.end() && (*it)->stream == stream; ++it) {
    Block* c = *it;
    if (allocatable(c->prev)) c = c->prev;
    std::size_t bytes = 0;
    for (const Block* b = c; bytes < size && allocatable(b); b = b->next) bytes += b->size;
    if (bytes >= size) return c;
  }
  // A new expandable segment reserving the device's capacity of virtual addresses.
  auto seg = std::make_unique<Segment>();
  seg->expandable = true;
  seg->page = pool.is_small ? kSmallBuffer : kLargeBuffer;
  seg->size = RoundUpTo(std::max(options_.device_memory, size), seg->page);
  seg->base = RoundUpTo(next_va_, seg->page);
  next_va_ = seg->base + seg->size;
  Block* b = NewBlock(stream, seg->size, seg->base, &pool, seg.get());
  b->mapped = false;
  pool.unmapped.insert(b);
  segments_.emplace(seg->base, std::move(seg));
  return b;
}

TorchAllocatorModel::Block* TorchAllocatorModel::MapBlock(Block* to_map, std::size_t size) {
  Pool& pool = *to_map->pool;
  const std::size_t bytes = std::min(RoundUpTo(size, to_map->segment->page), to_map->size);
  if (!Fits(bytes)) return nullptr;
  pool.unmapped.erase(to_map);
  to_map->mapped = true;
  if (bytes < to_map->size) {
    Block* rest = NewBlock(to_map->stream, to_map->size - bytes, to_map->ptr + bytes, &pool, to_map->segment);
    rest->mapped = false;
    rest->prev = to_map;
    rest->next = to_map->next;
    if (rest->next != nullptr) rest->next->prev = rest;
    to_map->next = rest;
    to_map->size = bytes;
    pool.unmapped.insert(rest);
  }
  TryMerge(to_map, to_map->prev);
  TryMerge(to_map, to_map->next);
  pool.blocks.insert(to_map);
  AddReserved(static_cast<std::int64_t>(bytes));
  ++counters_.segment_allocs;
  segment_log_.push_back(bytes);
  return to_map;
}

TorchAllocatorModel::Block* TorchAllocatorModel::TryAllocateExpandable(Pool& pool, std::uint64_t stream,
                                                                       std::size_t size) {
  Block* c = FindExpandable(pool, stream, size);
  if (!c->mapped) {
    c = MapBlock(c, std::min(c->size, size));
    if (c == nullptr) return nullptr;
  }
  while (c->size < size) {
    // c is free and mapped, followed by unmapped space: map part of it, which merges c in.
    Block* next = c->next;
    c = MapBlock(next, std::min(size - c->size, next->size));
    if (c == nullptr) return nullptr;
  }
  pool.blocks.erase(c);
  return c;
}

std::size_t TorchAllocatorModel::TryMerge(Block* dst, Block* src) {
  if (src == nullptr || src->allocated || src->mapped != dst->mapped) return 0;
  Pool& pool = *src->pool;
  if (src->mapped) pool.blocks.erase(src);
  else pool.unmapped.erase(src);
  if (dst->prev == src) {
    dst->ptr = src->ptr;
    dst->prev = src->prev;
    if (dst->prev != nullptr) dst->prev->next = dst;
  } else {
    dst->next = src->next;
    if (dst->next != nullptr) dst->next->prev = dst;
  }
  const std::size_t merged = src->size;
  dst->size += merged;
  delete src;
  return merged;
}

bool TorchAllocatorModel::ShouldSplit(const Block* b, std::size_t rounded) const {
  const std::size_t remaining = b->size - rounded;
  if (b->pool->is_small || options_.expandable_segments) return remaining >= kMinBlockSize;
  return rounded < options_.max_split_size && remaining > kSmallSize;
}

void TorchAllocatorModel::FreeBlock(Block* b) {
  TryMerge(b, b->prev);
  TryMerge(b, b->next);
  b->gc_base = b->pool->get_free_calls;
  b->pool->blocks.insert(b);
}

void TorchAllocatorModel::ReleaseBlock(Block* b) {
  // A whole non-expandable segment, free: cudaFree.
  b->pool->blocks.erase(b);
  AddReserved(-static_cast<std::int64_t>(b->size));
  ++counters_.segment_frees;
  segments_.erase(b->segment->base);
  delete b;
}

void TorchAllocatorModel::UnmapBlock(Block* b) {
  Segment& seg = *b->segment;
  const std::uint64_t begin = seg.base + RoundUpTo(b->ptr - seg.base, seg.page);
  const std::uint64_t end = seg.base + (b->ptr + b->size - seg.base) / seg.page * seg.page;
  if (begin >= end) return;
  Pool& pool = *b->pool;
  pool.blocks.erase(b);
  if (begin > b->ptr) {
    Block* before = NewBlock(b->stream, begin - b->ptr, b->ptr, &pool, &seg);
    before->prev = b->prev;
    if (before->prev != nullptr) before->prev->next = before;
    before->next = b;
    b->prev = before;
    pool.blocks.insert(before);
  }
  if (end < b->ptr + b->size) {
    Block* after = NewBlock(b->stream, b->ptr + b->size - end, end, &pool, &seg);
    after->next = b->next;
    if (after->next != nullptr) after->next->prev = after;
    after->prev = b;
    b->next = after;
    pool.blocks.insert(after);
  }
  b->ptr = begin;
  b->size = end - begin;
  b->mapped = false;
  AddReserved(-static_cast<std::int64_t>(b->size));
  ++counters_.segment_frees;
  TryMerge(b, b->prev);
  TryMerge(b, b->next);
  pool.unmapped.insert(b);
}

// release_available_cached_blocks: with max_split_size set, frees oversize cached segments of
// the stream, the smallest sufficient one or else the largest ones, before a full release.
bool TorchAllocatorModel::ReleaseAvailable(Pool& pool, std::uint64_t stream, std::size_t rounded) {
  const std::size_t max_split = options_.max_split_size;
  if (max_split == SIZE_MAX) return false;
  Block key;
  key.stream = stream;
  key.size = std::max(rounded, max_split);
  key.ptr = 0;
  auto whole = [](const Block* b) { return b->prev == nullptr && b->next == nullptr && !b->segment->expandable; };
  auto it = pool.blocks.lower_bound(&key);
  if (it == pool.blocks.end() || (*it)->stream != stream || !whole(*it)) {
    if (it == pool.blocks.begin()) return false;
    std::size_t released = 0;
    std::vector<Block*> victims;
    --it;
    while (released < key.size && (*it)->size >= max_split && (*it)->stream == stream) {
      if (whole(*it)) {
        released += (*it)->size;
        victims.push_back(*it);
      }
      if (it == pool.blocks.begin()) break;
      --it;
    }
    for (Block* b : victims) ReleaseBlock(b);
    return released >= key.size;
  }
  ReleaseBlock(*it);
  return true;
}

// release_cached_blocks: every free whole segment is freed; in expandable mode the whole pages
// inside free blocks are unmapped.
void TorchAllocatorModel::ReleaseCached() {
  for (Pool* pool : {&large_, &small_}) {
    std::vector<Block*> release, unmap;
    for (Block* b : pool->blocks) {
      if (b->segment->expandable) unmap.push_back(b);
      else if (b->prev == nullptr && b->next == nullptr) release.push_back(b);
    }
    for (Block* b : release) ReleaseBlock(b);
    for (Block* b : unmap) UnmapBlock(b);
  }
}

// garbage_collect_cached_blocks: frees whole cached large segments not reused for at least
// the average age, until reserved memory is back under the threshold.
void TorchAllocatorModel::GarbageCollect() {
  const double threshold = options_.garbage_collection_threshold * double(allowed());
  if (double(counters_.reserved) <= threshold) return;
  const std::size_t target = static_cast<std::size_t>(double(counters_.reserved) - threshold);
  std::size_t reclaimed = 0;
  auto freeable = [](const Block* b) { return b->prev == nullptr && b->next == nullptr && !b->segment->expandable; };
  bool freed = true;
  while (reclaimed < target && freed) {
    double total_age = 0;
    std::size_t count = 0;
    for (const Block* b : large_.blocks) {
      if (freeable(b)) {
        total_age += double(large_.get_free_calls - b->gc_base);
        ++count;
      }
    }
    if (count == 0) return;
    const double age_threshold = total_age / double(count);
    freed = false;
    std::vector<Block*> victims;
    for (Block* b : large_.blocks) {
      if (reclaimed >= target) break;
      if (freeable(b) && double(large_.get_free_calls - b->gc_base) >= age_threshold) {
        reclaimed += b->size;
        victims.push_back(b);
      }
    }
    for (Block* b : victims) ReleaseBlock(b);
    freed = !victims.empty();
  }
}

absl::StatusOr<std::uint64_t> TorchAllocatorModel::Malloc(std::size_t size, std::uint64_t stream) {
  if (size == 0) return absl::InvalidArgumentError("torch model: malloc of 0 bytes");
  const std::size_t rounded = RoundSize(size);
  Pool& pool = rounded <= kSmallSize ? small_ : large_;
  const std::size_t alloc_size = AllocationSize(rounded);
  Block* b = GetFreeBlock(pool, stream, rounded);
  if (b == nullptr) {
    if (fraction_set() && options_.garbage_collection_threshold > 0) GarbageCollect();
    b = AllocBlock(pool, stream, rounded, alloc_size, false);
    if (b == nullptr && ReleaseAvailable(pool, stream, rounded)) b = AllocBlock(pool, stream, rounded, alloc_size, false);
    if (b == nullptr) {
      ReleaseCached();
      b = AllocBlock(pool, stream, rounded, alloc_size, true);
    }
    if (b == nullptr) {
      ++counters_.ooms;
      return absl::ResourceExhaustedError(absl::StrFormat(
          "torch model: out of memory allocating %d bytes (reserved %d, allocated %d, limit %d)", size,
          counters_.reserved, counters_.allocated, allowed()));
    }
  }
  if (ShouldSplit(b, rounded)) {
    Block* rest = NewBlock(stream, b->size - rounded, b->ptr + rounded, &pool, b->segment);
    rest->prev = b;
    rest->next = b->next;
    if (rest->next != nullptr) rest->next->prev = rest;
    b->next = rest;
    b->size = rounded;
    rest->gc_base = pool.get_free_calls;
    pool.blocks.insert(rest);
  }
  b->allocated = true;
  b->requested = size;
  active_.emplace(b->ptr, b);
  counters_.allocated += static_cast<std::int64_t>(b->size);
  counters_.allocated_peak = std::max(counters_.allocated_peak, counters_.allocated);
  return b->ptr;
}

absl::Status TorchAllocatorModel::Free(std::uint64_t ptr) {
  auto it = active_.find(ptr);
  if (it == active_.end()) {
    return absl::InvalidArgumentError(absl::StrFormat("torch model: free of %#x, which is not allocated", ptr));
  }
  Block* b = it->second;
  active_.erase(it);
  b->allocated = false;
  counters_.allocated -= static_cast<std::int64_t>(b->size);
  FreeBlock(b);
  return absl::OkStatus();
}

void TorchAllocatorModel::EmptyCache() { ReleaseCached(); }

absl::Status TorchAllocatorModel::CheckInvariants() const {
  std::map<std::uint64_t, const Block*> all;  // by address
  std::int64_t allocated = 0, reserved = 0;
  auto add = [&](const Block* b) -> absl::Status {
    if (!all.emplace(b->ptr, b).second) return absl::InternalError(absl::StrFormat("two blocks at %#x", b->ptr));
    if (b->mapped) reserved += static_cast<std::int64_t>(b->size);
    if (b->allocated) allocated += static_cast<std::int64_t>(b->size);
    return absl::OkStatus();
  };
  for (const Pool* p : {&small_, &large_}) {
    for (const Block* b : p->blocks) {
      if (b->allocated || !b->mapped || b->pool != p) return absl::InternalError("cached block in the wrong state");
      if (absl::Status s = add(b); !s.ok()) return s;
    }
    for (const Block* b : p->unmapped) {
      if (b->allocated || b->mapped || b->pool != p) return absl::InternalError("unmapped block in the wrong state");
      if (absl::Status s = add(b); !s.ok()) return s;
    }
  }
  for (const auto& [ptr, b] : active_) {
    if (!b->allocated || !b->mapped || b->ptr != ptr) return absl::InternalError("active block in the wrong state");
    if (absl::Status s = add(b); !s.ok()) return s;
  }
  if (allocated != counters_.allocated || reserved != counters_.reserved) {
    return absl::InternalError(absl::StrFormat("counters: allocated %d vs %d, reserved %d vs %d", counters_.allocated,
                                               allocated, counters_.reserved, reserved));
  }
  // Tiling and links, segment by segment.
  for (const auto& [base, seg] : segments_) {
    auto it = all.find(base);
    if (it == all.end()) return absl::InternalError(absl::StrFormat("segment %#x has no first block", base));
    const Block* b = it->second;
    if (b->prev != nullptr) return absl::InternalError("first block of a segment has a predecessor");
    std::uint64_t at = base;
    for (; b != nullptr; b = b->next) {
      if (b->ptr != at || b->segment != seg.get()) return absl::InternalError(absl::StrFormat("gap or overlap at %#x", at));
      if (b->next != nullptr && b->next->prev != b) return absl::InternalError("broken prev/next links");
      if (b->next != nullptr && !b->allocated && !b->next->allocated && b->mapped == b->next->mapped) {
        return absl::InternalError(absl::StrFormat("unmerged free neighbours at %#x", b->ptr));
      }
      at += b->size;
    }
    if (at != base + seg->size) return absl::InternalError(absl::StrFormat("segment %#x not fully tiled", base));
  }
  return absl::OkStatus();
}

TorchModelMemory TorchAllocatorModel::Memory() const {
  TorchModelMemory m;
  for (const auto& [ptr, b] : active_) {
    m.requested += static_cast<std::int64_t>(b->requested);
    m.rounding += static_cast<std::int64_t>(b->size - b->requested);
  }
  for (const Block* b : small_.blocks) m.free_small += static_cast<std::int64_t>(b->size);
  for (const Block* b : large_.blocks) {
    const std::uint64_t first = (b->ptr + kRoundLarge - 1) / kRoundLarge * kRoundLarge;
    const std::uint64_t last = (b->ptr + b->size) / kRoundLarge * kRoundLarge;
    const std::int64_t pages = last > first ? static_cast<std::int64_t>(last - first) : 0;
    m.free_pages += pages;
    m.free_pieces += static_cast<std::int64_t>(b->size) - pages;
  }
  m.segments = static_cast<std::int64_t>(segments_.size());
  return m;
}

}  // namespace stitchalloc::bench
