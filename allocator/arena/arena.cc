// PlannedAllocator (see arena.h): recording, plan cache, O(1) slot lookup, overlap guard.
#include "allocator/arena/arena.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "vmm/nvtx.h"

namespace stitchalloc::arena {

PlannedAllocator::PlannedAllocator(CachingAllocator* backing, ArenaOptions options)
    : backing_(backing), options_(options) {}

PlannedAllocator::~PlannedAllocator() {
  MutexLock l(&mu_);
  if (base_ != nullptr) (void)FreeArenaLocked();
  plans_.clear();
}

std::int64_t PlannedAllocator::LargestPlan() const {
  std::int64_t m = 0;
  for (const auto& [sig, p] : plans_) m = std::max(m, p->plan.arena_bytes);
  return m;
}

absl::Status PlannedAllocator::FreeArenaLocked() {
  ReapLocked();
  Driver& d = backing_->driver();
  for (const auto& [off, events] : deferred_) {
    for (const auto& [stream, event] : events) {
      // Not recorded: wait for the stream instead (the block must not be reused under it).
      if (!backing_->RecordStream(base_, stream).ok()) d.SynchronizeEvent(event).IgnoreError();
      d.DestroyEvent(event).IgnoreError();
    }
    live_.erase(off);
  }
  deferred_.clear();
  if (absl::Status s = backing_->Free(base_); !s.ok()) return s;
  base_ = nullptr;
  arena_size_ = 0;
  stats_.arena_bytes = 0;
  return absl::OkStatus();
}

bool PlannedAllocator::HeldLocked(std::int64_t off) const {
  return off >= 0 && live_.contains(off) && (deferred_.empty() || !deferred_.contains(off));
}

void PlannedAllocator::ReapLocked() {
  if (deferred_.empty()) return;
  Driver& d = backing_->driver();
  for (auto it = deferred_.begin(); it != deferred_.end();) {
    bool done = true;
    for (const auto& [stream, event] : it->second) {
      absl::StatusOr<bool> q = d.QueryEvent(event);
      if (!q.ok() || !*q) {  // an error keeps the range occupied: never unsafe
        done = false;
        break;
      }
    }
    if (!done) {
      ++it;
      continue;
    }
    for (const auto& [stream, event] : it->second) d.DestroyEvent(event).IgnoreError();
    live_.erase(it->first);
    deferred_.erase(it++);
  }
  UpdateEngaged();
}

void PlannedAllocator::UpdateEngaged() {
  engaged_.store(mode_ != Mode::kIdle || !plans_.empty() || !live_.empty(), std::memory_order_release);
}

std::int64_t PlannedAllocator::ArenaOffset(const void* ptr) const {
  if (base_ == nullptr) return -1;
  const std::int64_t off = static_cast<const char*>(ptr) - static_cast<const char*>(base_);
  return off >= 0 && off < arena_size_ ? off : -1;
}

absl::Status PlannedAllocator::BeginIteration(std::uint64_t signature) {
  Stream stream = kDefaultStream;
  std::int64_t largest = 0, own = 0;
  {
    MutexLock l(&mu_);
    if (mode_ != Mode::kIdle) return absl::FailedPreconditionError("iteration_begin while an iteration is open");
    signature_ = signature;
    occurrences_.clear();
    layer_pos_ = 0;
    off_sequence_ = false;
    ordinal_ = outside_ordinal_ = 0;
    in_layer_ = false;
    iteration_missed_ = false;
    auto it = plans_.find(signature);
    if (it == plans_.end()) {
      mode_ = Mode::kRecording;
      current_ = nullptr;
      slots_ = nullptr;
      recorder_.Begin();
      // A recording iteration runs on the caching allocator: lend it the arena's memory (the
      // block goes back to its pool; the next serving iteration takes a block again).
      if (base_ != nullptr && !AnyHeldLocked()) (void)FreeArenaLocked();
      UpdateEngaged();
      return absl::OkStatus();
    }
    stream = it->second->plan.stream;
    largest = LargestPlan();
    own = it->second->plan.arena_bytes;
    // Grow to the largest cached plan at once, so that alternating shapes never re-allocate.
    if (FitsLocked(largest, stream) || (AnyHeldLocked() && FitsLocked(own, stream))) {
      ServeLocked(it->second.get());
      return absl::OkStatus();
    }
    // Until a new arena is in place the iteration passes through (so it does if none can be had).
    mode_ = Mode::kPassThrough;
    ++stats_.passthrough_iterations;
    UpdateEngaged();
    if (AnyHeldLocked()) return absl::OkStatus();  // the arena cannot move under live allocations
    if (base_ != nullptr && !FreeArenaLocked().ok()) return absl::OkStatus();
  }
  // The new arena is allocated without the lock (see Malloc), then taken if the iteration still
  // waits for it.
  absl::StatusOr<void*> p = backing_->Malloc(static_cast<std::size_t>(largest), stream);
  std::int64_t bytes = largest;
  if (!p.ok() && own < largest) {
    p = backing_->Malloc(static_cast<std::size_t>(own), stream);
    bytes = own;
  }
  if (!p.ok()) return absl::OkStatus();
  MutexLock l(&mu_);
  auto it = plans_.find(signature);
  if (mode_ != Mode::kPassThrough || signature_ != signature || base_ != nullptr || it == plans_.end()) {
    (void)backing_->Free(*p);  // the iteration ended or the plan went meanwhile
    return absl::OkStatus();
  }
  base_ = *p;
  arena_stream_ = stream;
  arena_size_ = bytes;
  stats_.arena_bytes = bytes;
  --stats_.passthrough_iterations;
  ServeLocked(it->second.get());
  return absl::OkStatus();
}

bool PlannedAllocator::FitsLocked(std::int64_t bytes, Stream stream) const {
  return base_ != nullptr && bytes <= arena_size_ && stream == arena_stream_;
}

void PlannedAllocator::ServeLocked(CachedPlan* plan) {
  mode_ = Mode::kServing;
  current_ = plan;
  slots_ = &current_->plan.outside;
  UpdateEngaged();
}

absl::Status PlannedAllocator::EndIteration() {
  MutexLock l(&mu_);
  if (mode_ == Mode::kIdle) return absl::FailedPreconditionError("iteration_end without iteration_begin");
  if (in_layer_) return absl::FailedPreconditionError("iteration_end inside a layer");
  const Mode mode = mode_;
  mode_ = Mode::kIdle;
  absl::Status result = absl::OkStatus();
  if (mode == Mode::kPassThrough) {
    // nothing recorded, nothing served
  } else if (mode == Mode::kServing) {
    ++stats_.served_iterations;
    if (iteration_missed_) {
      if (++current_->missed_iterations >= options_.replan_after) {
        // Re-plan: forget the plan; the next iteration with this signature records. If the
        // arena cannot be released yet (live allocations), try again after the next one.
        current_ = nullptr;
        if (DropLocked(signature_).ok()) ++stats_.replans;
      }
    } else {
      current_->missed_iterations = 0;
    }
  } else {
    ++stats_.recorded_iterations;
    STITCHALLOC_NVTX_RANGE("stitchalloc::arena::plan");
    IterationRecording rec;
    result = recorder_.Finish(&rec);
    absl::StatusOr<ArenaPlan> plan = result.ok() ? PlanIteration(rec, options_.planning) : result;
    if (!plan.ok()) {
      ++stats_.plan_failures;
      result = plan.status();
    } else if (plan->arena_bytes > 0) {
      auto cached = std::make_unique<CachedPlan>();
      stats_.last_plan_lower_bound = plan->lower_bound;
      stats_.last_plan_arena_bytes = plan->arena_bytes;
      stats_.last_plan_time_us = absl::ToInt64Microseconds(plan->plan_time);
      cached->plan = *std::move(plan);
      for (const LayerKey& k : cached->plan.layer_sequence) cached->sequence.push_back(&cached->plan.layers.at(k));
      plans_[signature_] = std::move(cached);
      ++stats_.plans_built;  // the arena is taken when an iteration of a cached plan starts
    }
  }
  current_ = nullptr;
  slots_ = nullptr;
  stats_.plans_cached = static_cast<std::int64_t>(plans_.size());
  UpdateEngaged();
  return result;
}

absl::Status PlannedAllocator::LayerBegin(absl::string_view kind, int index, Phase phase) {
  MutexLock l(&mu_);
  if (mode_ == Mode::kIdle) return absl::OkStatus();
  if (in_layer_) return absl::FailedPreconditionError(absl::StrCat("layer_begin(", kind, ", ", index, ") inside a layer"));
  in_layer_ = true;
  if (mode_ == Mode::kRecording) return recorder_.LayerBegin(kind, index, phase);
  ordinal_ = 0;
  const std::vector<LayerKey>& seq = current_->plan.layer_sequence;
  if (!off_sequence_ && layer_pos_ < seq.size()) {
    const LayerKey& k = seq[layer_pos_];
    if (std::get<0>(k) == kind && std::get<1>(k) == index && std::get<2>(k) == phase) {
      slots_ = current_->sequence[layer_pos_++];
      return absl::OkStatus();
    }
  }
  if (!off_sequence_) {
    // Leaving the recorded sequence: count the layers seen so far, then look up by key.
    off_sequence_ = true;
    for (std::size_t i = 0; i < layer_pos_; ++i) {
      ++occurrences_[std::make_tuple(std::get<0>(seq[i]), std::get<1>(seq[i]), std::get<2>(seq[i]))];
    }
  }
  const int occurrence = occurrences_[std::make_tuple(std::string(kind), index, phase)]++;
  auto it = current_->plan.layers.find(LayerKey{std::string(kind), index, phase, occurrence});
  slots_ = it == current_->plan.layers.end() ? nullptr : &it->second;
  return absl::OkStatus();
}

absl::Status PlannedAllocator::LayerEnd() {
  MutexLock l(&mu_);
  if (mode_ == Mode::kIdle) return absl::OkStatus();
  if (!in_layer_) return absl::FailedPreconditionError("layer_end without layer_begin");
  in_layer_ = false;
  if (mode_ == Mode::kRecording) return recorder_.LayerEnd();
  slots_ = &current_->plan.outside;
  ordinal_ = outside_ordinal_;
  return absl::OkStatus();
}

absl::StatusOr<void*> PlannedAllocator::Malloc(std::size_t size, Stream stream) {
  if (!engaged_.load(std::memory_order_acquire)) return backing_->Malloc(size, stream);
  bool record = false;
  {
    MutexLock l(&mu_);
    if (mode_ == Mode::kRecording) {
      record = true;
    } else if (mode_ == Mode::kServing && size > 0) {
      const int ordinal = ordinal_++;
      if (!in_layer_) outside_ordinal_ = ordinal_;
      const Slot* slot =
          slots_ != nullptr && static_cast<std::size_t>(ordinal) < slots_->size() ? &(*slots_)[ordinal] : nullptr;
      const bool matches = slot != nullptr && slot->size == RoundToGranule(size) && slot->stream == stream;
      if (matches && !slot->planned) {
        ++stats_.unplanned;
      } else if (matches) {
        // Guard: no live arena allocation may overlap [offset, offset + size).
        const std::int64_t lo = slot->offset, hi = slot->offset + static_cast<std::int64_t>(slot->size);
        auto clash = [&] {
          auto next = live_.lower_bound(lo);
          return (next != live_.end() && next->first < hi) || (next != live_.begin() && std::prev(next)->second > lo);
        };
        bool clashes = clash();
        if (clashes && !deferred_.empty()) {
          ReapLocked();  // a deferred free whose other streams are done frees its range now
          clashes = clash();
        }
        if (!clashes) {
          live_.emplace(lo, hi);
          ++stats_.hits;
          return static_cast<void*>(static_cast<char*>(base_) + lo);
        }
        ++stats_.misses;
        iteration_missed_ = true;
      } else {
        ++stats_.misses;
        iteration_missed_ = true;
      }
    }
  }
  // Never with the lock held: under memory pressure the caching allocator asks the swap manager
  // to evict, which frees blocks (PyTorch's storages) through this allocator.
  absl::StatusOr<void*> p = backing_->Malloc(size, stream);
  if (record && p.ok()) {
    MutexLock l(&mu_);
    if (mode_ == Mode::kRecording) recorder_.OnAlloc(reinterpret_cast<std::uintptr_t>(*p), size, stream);
  }
  return p;
}

absl::Status PlannedAllocator::Free(void* ptr) {
  if (ptr == nullptr) return absl::OkStatus();
  if (!engaged_.load(std::memory_order_acquire)) return backing_->Free(ptr);
  MutexLock l(&mu_);
  // The arena is one block of ours: a pointer inside it is an arena allocation or invalid.
  if (const std::int64_t off = ArenaOffset(ptr); off >= 0) {
    auto it = live_.find(off);
    if (it == live_.end() || (!deferred_.empty() && deferred_.contains(off))) {
      return absl::InvalidArgumentError(absl::StrCat("free of arena offset ", off, ": not a live arena allocation (double free or interior pointer)"));
    }
    auto used = used_on_.empty() ? used_on_.end() : used_on_.find(off);  // no hashing on the hit path
    if (used != used_on_.end()) {
      // Other streams use the range: it stays occupied until their work queued so far is done.
      const std::vector<Stream> streams = std::move(used->second);
      used_on_.erase(used);
      Driver& d = backing_->driver();
      std::vector<std::pair<Stream, Event>> events;
      for (Stream stream : streams) {
        absl::StatusOr<Event> e = d.CreateEvent();
        if (e.ok() && d.RecordEvent(*e, stream).ok()) {
          events.emplace_back(stream, *e);
          continue;
        }
        if (e.ok()) d.DestroyEvent(*e).IgnoreError();
        // No event: wait for the stream here instead (slow, but the range is then free of it).
        if (absl::Status s = d.SynchronizeStream(stream); !s.ok()) return s;
      }
      if (!events.empty()) {
        deferred_.emplace(off, std::move(events));
        ++stats_.deferred_frees;
        return absl::OkStatus();
      }
    }
    live_.erase(it);
    UpdateEngaged();
    return absl::OkStatus();
  }
  absl::Status s = backing_->Free(ptr);
  if (s.ok() && mode_ == Mode::kRecording) recorder_.OnFree(reinterpret_cast<std::uintptr_t>(ptr));
  return s;
}

absl::Status PlannedAllocator::DropLocked(std::uint64_t signature) {
  auto it = plans_.find(signature);
  if (it == plans_.end()) return absl::NotFoundError(absl::StrCat("no plan cached for signature ", signature));
  if (mode_ == Mode::kServing && current_ == it->second.get()) {
    return absl::FailedPreconditionError("the plan is serving the open iteration");
  }
  if (plans_.size() == 1 && base_ != nullptr) {
    if (AnyHeldLocked()) {
      return absl::FailedPreconditionError(absl::StrCat("the arena still has ", live_.size() - deferred_.size(),
                                                        " live allocations; free them before dropping the last plan"));
    }
    if (absl::Status s = FreeArenaLocked(); !s.ok()) return s;
  }
  plans_.erase(it);
  stats_.plans_cached = static_cast<std::int64_t>(plans_.size());
  UpdateEngaged();
  return absl::OkStatus();
}

absl::Status PlannedAllocator::DropPlan(std::uint64_t signature) {
  MutexLock l(&mu_);
  return DropLocked(signature);
}

absl::Status PlannedAllocator::DropAllPlans() {
  MutexLock l(&mu_);
  std::vector<std::uint64_t> sigs;
  for (const auto& [sig, p] : plans_) sigs.push_back(sig);
  absl::Status result = absl::OkStatus();
  for (std::uint64_t sig : sigs) result.Update(DropLocked(sig));
  return result;
}

ArenaStats PlannedAllocator::GetStats() const {
  MutexLock l(&mu_);
  return stats_;
}

const ArenaPlan* PlannedAllocator::FindPlan(std::uint64_t signature) const {
  MutexLock l(&mu_);
  auto it = plans_.find(signature);
  return it == plans_.end() ? nullptr : &it->second->plan;
}

bool PlannedAllocator::IsArenaPointer(const void* ptr) const {
  MutexLock l(&mu_);
  return HeldLocked(ArenaOffset(ptr));
}

absl::StatusOr<std::int64_t> PlannedAllocator::HeldOffsetLocked(const void* ptr, absl::string_view op) const {
  const std::int64_t off = ArenaOffset(ptr);
  if (off >= 0 && !HeldLocked(off)) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, " of arena offset ", off, ": not a live arena allocation (freed or interior pointer)"));
  }
  return off;
}

absl::Status PlannedAllocator::RecordStream(void* ptr, Stream stream) {
  if (engaged_.load(std::memory_order_acquire)) {
    MutexLock l(&mu_);
    absl::StatusOr<std::int64_t> off = HeldOffsetLocked(ptr, "record_stream");
    if (!off.ok()) return off.status();
    if (*off >= 0) {
      if (stream == arena_stream_) return absl::OkStatus();
      std::vector<Stream>& streams = used_on_[*off];
      if (std::find(streams.begin(), streams.end(), stream) == streams.end()) streams.push_back(stream);
      return absl::OkStatus();
    }
  }
  return backing_->RecordStream(ptr, stream);
}

absl::StatusOr<SharedRange> PlannedAllocator::Share(const void* ptr) {
  if (engaged_.load(std::memory_order_acquire)) {
    MutexLock l(&mu_);
    absl::StatusOr<std::int64_t> off = HeldOffsetLocked(ptr, "share");
    if (!off.ok()) return off.status();
    if (*off >= 0) {  // the arena block's chunks under this allocation's range
      return backing_->ShareRange(base_, reinterpret_cast<DevicePtr>(ptr),
                                  static_cast<std::size_t>(live_.at(*off) - *off));
    }
  }
  return backing_->Share(ptr);
}

absl::StatusOr<BlockInfo> PlannedAllocator::Describe(const void* ptr) const {
  if (engaged_.load(std::memory_order_acquire)) {
    MutexLock l(&mu_);
    absl::StatusOr<std::int64_t> off = HeldOffsetLocked(ptr, "describe");
    if (!off.ok()) return off.status();
    if (*off >= 0) {
      absl::StatusOr<BlockInfo> arena = backing_->Describe(base_);
      if (!arena.ok()) return arena.status();
      BlockInfo info = *std::move(arena);  // the arena block's mapping, stream and chunks
      info.ptr = reinterpret_cast<DevicePtr>(ptr);
      info.size = static_cast<std::size_t>(live_.at(*off) - *off);
      info.requested = info.size;
      std::erase_if(info.chunks, [&](const ChunkView& c) {
        return c.address + c.size <= info.ptr || c.address >= info.ptr + info.size;
      });
      return info;
    }
  }
  return backing_->Describe(ptr);
}

}  // namespace stitchalloc::arena
