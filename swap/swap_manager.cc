// SwapManager: tickets, the layer-boundary schedule, event-deferred frees and eviction under
// pressure (see swap_manager.h).
#include "swap/swap_manager.h"

#include <algorithm>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"
#include "vmm/format.h"
#include "vmm/nvtx.h"

namespace stitchalloc::swap {

absl::StatusOr<std::unique_ptr<SwapManager>> SwapManager::Create(CachingAllocator* allocator, PinnedPool* pool,
                                                                 CopyEngine* engine, Stream compute,
                                                                 const SwapOptions& options) {
  if (allocator == nullptr || pool == nullptr || engine == nullptr) {
    return absl::InvalidArgumentError("swap manager: allocator, pinned pool and copy engine are required");
  }
  if (&allocator->driver() != &engine->driver()) {
    return absl::InvalidArgumentError("swap manager: the allocator and the copy engine use different drivers");
  }
  if (options.lookahead < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("swap manager: lookahead %d must be at least 1", options.lookahead));
  }
  if (options.keep_last_layers < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("swap manager: keep_last_layers %d must not be negative", options.keep_last_layers));
  }
  std::unique_ptr<SwapManager> m(new SwapManager(allocator, pool, engine, compute, options));
  SwapManager* raw = m.get();
  allocator->SetPressureHandler([raw](std::size_t bytes, Stream) { return raw->Evict(bytes); });
  return m;
}

SwapManager::~SwapManager() {
  alloc_->SetPressureHandler(nullptr);
  MutexLock l(&mu_);
  for (auto& [t, e] : tickets_) {
    if (e.copy != 0) engine_->Synchronize(e.copy).IgnoreError();
    if (e.release) ReturnBlock(e, std::nullopt).IgnoreError();
    else if (e.state == TicketState::kPrefetching) FreeOwn(e.device);
    else if (e.device != nullptr) alloc_->Free(e.device).IgnoreError();
    if (e.host != nullptr) pool_->Free(e.host).IgnoreError();
    if (e.copy != 0) engine_->Release(e.copy).IgnoreError();
  }
  tickets_.clear();
  for (const Deferred& d : deferred_) {
    engine_->Release(d.copy).IgnoreError();  // waits for the copy first
    pool_->Free(d.host).IgnoreError();
  }
  deferred_.clear();
  for (CopyEngine::CopyId c : finished_) engine_->Release(c).IgnoreError();
  finished_.clear();
}

absl::Status SwapManager::BeginIteration(int num_layers, Pass pass) {
  if (num_layers < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("swap manager: %d layers; at least 1 is needed", num_layers));
  }
  MutexLock l(&mu_);
  PollLocked();
  passes_[pass] = PassInfo{num_layers, ++begins_};
  if (passes_.size() > kMaxPasses) ForgetPassesLocked(pass);
  return absl::OkStatus();
}

void SwapManager::ForgetPassesLocked(Pass keep) {
  absl::flat_hash_set<Pass> held;
  for (const auto& [t, e] : tickets_) held.insert(e.pass);
  std::vector<std::pair<std::uint64_t, Pass>> idle;  // (begun, pass), oldest first
  for (const auto& [pass, info] : passes_) {
    if (pass != keep && !held.contains(pass)) idle.emplace_back(info.begun, pass);
  }
  std::sort(idle.begin(), idle.end());
  // Down to half the limit, so that forgetting runs once per kMaxPasses / 2 begins at most.
  const std::size_t excess = passes_.size() > kMaxPasses / 2 ? passes_.size() - kMaxPasses / 2 : 0;
  for (std::size_t k = 0; k < idle.size() && k < excess; ++k) passes_.erase(idle[k].second);
}

absl::StatusOr<int> SwapManager::LayersOfLocked(const char* what, int layer, Pass pass) const {
  auto it = passes_.find(pass);
  const int n = it == passes_.end() ? 0 : it->second.num_layers;
  if (layer < 0 || layer >= n) {
    if (pass == 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "swap manager: %s: layer %d is outside the iteration's %d layers (call BeginIteration first)", what, layer, n));
    }
    return absl::InvalidArgumentError(absl::StrFormat(
        "swap manager: %s: layer %d is outside pass %d's %d layers (call BeginIteration(num_layers, %d) first)", what,
        layer, pass, n, pass));
  }
  return n;
}

absl::StatusOr<SwapManager::Ticket> SwapManager::Offload(void* device_ptr, std::size_t bytes, int layer, Release release,
                                                         Pass pass) {
  return Register(device_ptr, bytes, layer, std::move(release), KeptWhy::kNot, pass);
}

absl::StatusOr<SwapManager::Ticket> SwapManager::Keep(void* device_ptr, std::size_t bytes, int layer, Release release,
                                                      Pass pass) {
  return Register(device_ptr, bytes, layer, std::move(release), KeptWhy::kForeign, pass);
}

absl::StatusOr<SwapManager::Ticket> SwapManager::Register(void* device_ptr, std::size_t bytes, int layer,
                                                          Release release, KeptWhy keep, Pass pass) {
  if (device_ptr == nullptr) return absl::InvalidArgumentError("swap manager: offload of a null pointer");
  if (bytes == 0) return absl::InvalidArgumentError("swap manager: offload of 0 bytes");
  MutexLock l(&mu_);
  if (auto n = LayersOfLocked("offload", layer, pass); !n.ok()) return n.status();
  const Ticket t = next_++;
  Entry e;
  e.layer = layer;
  e.pass = pass;
  e.bytes = bytes;
  e.device = device_ptr;
  e.release = std::move(release);
  if (keep == KeptWhy::kForeign) {
    e.state = TicketState::kKept;
    e.why = KeptWhy::kForeign;
    ++stats_.kept_foreign;
  } else if (bytes < options_.min_bytes) {
    e.state = TicketState::kKept;
    e.why = KeptWhy::kSmall;
    ++stats_.kept_small;
  }
  tickets_.emplace(t, e);
  ++stats_.registered;
  return t;
}

absl::Status SwapManager::OffloadLocked(Ticket t, Entry& e) {
  auto host = pool_->Allocate(e.bytes);
  if (!host.ok()) {
    // No pinned memory left: the tensor stays where it is (counted once, not at every retry).
    if (e.state != TicketState::kKept) ++stats_.kept_no_host_memory;
    e.state = TicketState::kKept;
    e.why = KeptWhy::kNoHostMemory;
    return absl::OkStatus();
  }
  auto copy = engine_->Issue(Direction::kDeviceToHost, *host, e.device, e.bytes, compute_);
  if (!copy.ok()) {
    pool_->Free(*host).IgnoreError();
    e.state = TicketState::kKept;
    e.why = KeptWhy::kCopyFailed;
    return copy.status();
  }
  e.copy = *copy;
  // The device block goes back now, reusable once the copy has read it.
  if (auto s = ReturnBlock(e, engine_->stream(Direction::kDeviceToHost)); !s.ok()) {
    DeferHostFree(*copy, *host);
    tickets_.erase(t);
    return absl::InvalidArgumentError(absl::StrFormat(
        "swap manager: ticket %d: the device block was not the allocator's (%s); ticket dropped", t, s.message()));
  }
  e.device = nullptr;
  e.host = *host;
  e.copy = *copy;
  e.state = TicketState::kOffloading;
  ++stats_.offloads;
  stats_.bytes_offloaded += static_cast<std::int64_t>(e.bytes);
  return absl::OkStatus();
}

absl::Status SwapManager::ForwardEnd(int layer, Pass pass) {
  STITCHALLOC_NVTX_RANGE("swap: forward end, offload");
  MutexLock l(&mu_);
  PollLocked();
  auto n = LayersOfLocked("ForwardEnd", layer, pass);
  if (!n.ok()) return n.status();
  const bool keep = layer >= *n - options_.keep_last_layers;
  absl::Status first = absl::OkStatus();
  std::vector<Ticket> due;
  for (auto& [t, e] : tickets_) {
    if (e.layer == layer && e.pass == pass && e.state == TicketState::kRegistered) due.push_back(t);
  }
  for (Ticket t : due) {
    Entry& e = tickets_[t];
    if (keep) {
      e.state = TicketState::kKept;
      e.why = KeptWhy::kLastLayers;
      ++stats_.kept_last_layers;
      continue;
    }
    if (auto s = OffloadLocked(t, e); !s.ok() && first.ok()) first = s;
  }
  return first;
}

absl::Status SwapManager::Prefetch(Ticket t) {
  std::size_t bytes = 0;
  {
    MutexLock l(&mu_);
    auto it = tickets_.find(t);
    // Gone (another thread claimed or cancelled it after the caller saw it), already coming
    // back, or never left: nothing to prefetch. Claim reports a missing ticket itself.
    if (it == tickets_.end()) return absl::OkStatus();
    if (it->second.state != TicketState::kOffloading && it->second.state != TicketState::kOnHost) return absl::OkStatus();
    bytes = it->second.bytes;
  }
  // Allocated on the copy stream, so the copy needs to wait for nothing on the compute stream.
  const Stream h2d = engine_->stream(Direction::kHostToDevice);
  auto device = alloc_->Malloc(bytes, h2d);
  if (device.ok() && options_.hooks.allocated) options_.hooks.allocated(*device, h2d);
  MutexLock l(&mu_);
  auto it = tickets_.find(t);
  const bool still = it != tickets_.end() &&
                     (it->second.state == TicketState::kOffloading || it->second.state == TicketState::kOnHost);
  if (!device.ok()) {
    ++stats_.prefetch_failures;
    return device.status();
  }
  if (!still) {  // cancelled or prefetched meanwhile
    FreeOwn(*device);
    return absl::OkStatus();
  }
  STITCHALLOC_NVTX_RANGE("swap: prefetch");
  Entry& e = it->second;
  if (e.state == TicketState::kOffloading) {
    // Still leaving: the copy back waits for the copy out, on the device.
    if (auto s = engine_->StreamWait(h2d, e.copy); !s.ok()) {
      FreeOwn(*device);
      return s;
    }
    finished_.push_back(e.copy);
  }
  auto copy = engine_->Issue(Direction::kHostToDevice, *device, e.host, e.bytes, h2d);
  if (!copy.ok()) {
    FreeOwn(*device);
    return copy.status();
  }
  e.device = *device;
  e.copy = *copy;
  e.state = TicketState::kPrefetching;
  ++stats_.prefetches;
  stats_.bytes_prefetched += static_cast<std::int64_t>(e.bytes);
  return absl::OkStatus();
}

absl::Status SwapManager::BackwardBegin(int layer, Pass pass) {
  std::vector<Ticket> due;
  {
    MutexLock l(&mu_);
    PollLocked();
    if (auto n = LayersOfLocked("BackwardBegin", layer, pass); !n.ok()) return n.status();
    for (auto& [t, e] : tickets_) {
      if (e.pass == pass && e.layer < layer && e.layer >= layer - options_.lookahead &&
          (e.state == TicketState::kOffloading || e.state == TicketState::kOnHost)) {
        due.push_back(t);
      }
    }
  }
  absl::Status first = absl::OkStatus();
  for (Ticket t : due) {
    if (auto s = Prefetch(t); !s.ok() && first.ok()) first = s;
  }
  return first;
}

absl::Status SwapManager::ReturnBlock(Entry& e, std::optional<Stream> in_use_by) {
  if (e.release) {
    Release release = std::move(e.release);
    e.release = nullptr;
    release(in_use_by);
    return absl::OkStatus();
  }
  if (in_use_by.has_value()) {
    if (auto s = alloc_->RecordStream(e.device, *in_use_by); !s.ok()) {
      // Not recorded: the block must not be reused before the copy read it.
      if (e.copy != 0) engine_->Synchronize(e.copy).IgnoreError();
    }
  }
  return alloc_->Free(e.device);
}

absl::StatusOr<void*> SwapManager::Wait(Ticket t) {
  auto c = Claim(t);
  if (!c.ok()) return c.status();
  return c->ptr;
}

absl::StatusOr<SwapManager::Claimed> SwapManager::Claim(Ticket t) {
  STITCHALLOC_NVTX_RANGE("swap: wait");
  for (int attempt = 0;; ++attempt) {
    {
      MutexLock l(&mu_);
      auto it = tickets_.find(t);
      if (it == tickets_.end()) return absl::NotFoundError(absl::StrFormat("swap manager: no ticket %d", t));
      Entry& e = it->second;
      if (e.state == TicketState::kRegistered || e.state == TicketState::kKept) {
        Claimed c{e.device, true};
        tickets_.erase(it);
        ++stats_.waits;
        return c;
      }
      if (e.state == TicketState::kPrefetching) {
        if (auto s = engine_->StreamWait(compute_, e.copy); !s.ok()) return s;
        void* p = e.device;
        // The compute stream uses a block of the copy stream's pool: its frees wait for that use.
        alloc_->RecordStream(p, compute_).IgnoreError();
        DeferHostFree(e.copy, e.host);
        tickets_.erase(it);
        ++stats_.waits;
        PollLocked();
        return Claimed{p, false};
      }
      if (attempt > 0) return absl::InternalError("swap manager: prefetch did not take effect");
      ++stats_.late_prefetches;
    }
    if (auto s = Prefetch(t); !s.ok()) return s;
  }
}

absl::Status SwapManager::Cancel(Ticket t) {
  MutexLock l(&mu_);
  auto it = tickets_.find(t);
  if (it == tickets_.end()) return absl::NotFoundError(absl::StrFormat("swap manager: no ticket %d", t));
  Entry& e = it->second;
  switch (e.state) {
    case TicketState::kRegistered:
    case TicketState::kKept:
      ReturnBlock(e, std::nullopt).IgnoreError();
      break;
    case TicketState::kOffloading:
      DeferHostFree(e.copy, e.host);
      break;
    case TicketState::kOnHost:
      pool_->Free(e.host).IgnoreError();
      break;
    case TicketState::kPrefetching:
      // The block belongs to the copy stream's pool: reuse there is ordered after the copy.
      FreeOwn(e.device);
      DeferHostFree(e.copy, e.host);
      break;
  }
  tickets_.erase(it);
  ++stats_.cancelled;
  PollLocked();
  return absl::OkStatus();
}

CachingAllocator::PressureRelief SwapManager::Evict(std::size_t bytes) {
  STITCHALLOC_NVTX_RANGE("swap: evict under pressure");
  MutexLock l(&mu_);
  PollLocked();
  // Earliest layer first: its backward is last. Tensors kept for want of pinned memory try
  // again: prefetches and cancels may have freed some since. Then the last layers kept on the
  // device because their backward follows at once, newest first: with several passes in flight
  // (micro-batches) only the first backward follows at once, and the oldest pass's is nearest.
  // Those come back at their Wait (a late prefetch) rather than the step running out of memory.
  struct Candidate {
    bool last_layer;
    int layer;
    Ticket order;  // ascending: earliest first among registered, newest first among last layers
    Ticket t;
    auto operator<=>(const Candidate&) const = default;
  };
  std::vector<Candidate> candidates;
  for (auto& [t, e] : tickets_) {
    const bool kept = e.state == TicketState::kKept;
    if (e.state == TicketState::kRegistered || (kept && e.why == KeptWhy::kNoHostMemory)) {
      candidates.push_back({false, e.layer, t, t});
    } else if (kept && e.why == KeptWhy::kLastLayers) {
      candidates.push_back({true, 0, ~t, t});
    }
  }
  std::sort(candidates.begin(), candidates.end());
  std::size_t freed = 0;
  std::int64_t moved = 0;
  for (const Candidate& c : candidates) {
    if (freed >= bytes) break;
    Entry& e = tickets_[c.t];
    const std::size_t n = e.bytes;
    if (!OffloadLocked(c.t, e).ok()) continue;
    if (e.state != TicketState::kOffloading) {  // no pinned memory for it
      if (c.last_layer) e.why = KeptWhy::kLastLayers;  // still kept for what it was kept for
      continue;
    }
    freed += n;
    ++moved;
    ++stats_.evicted;
    stats_.evicted_bytes += static_cast<std::int64_t>(n);
  }
  return {freed, PressureNoteLocked(moved, freed)};
}

std::string SwapManager::PressureNoteLocked(std::int64_t moved, std::size_t moved_bytes) const {
  struct Held {
    std::int64_t count = 0;
    std::size_t bytes = 0;
  };
  Held registered, last, small, no_host, failed, foreign;
  for (const auto& [t, e] : tickets_) {
    Held* h = nullptr;
    if (e.state == TicketState::kRegistered) h = &registered;
    if (e.state == TicketState::kKept) {
      h = e.why == KeptWhy::kLastLayers     ? &last
          : e.why == KeptWhy::kSmall        ? &small
          : e.why == KeptWhy::kNoHostMemory ? &no_host
          : e.why == KeptWhy::kForeign      ? &foreign
                                            : &failed;
    }
    if (h == nullptr) continue;
    ++h->count;
    h->bytes += e.bytes;
  }
  const PinnedPoolStats pool = pool_->GetStats();
  auto part = [](const Held& h) { return absl::StrFormat("%d (%s)", h.count, FormatBytes(h.bytes)); };
  return absl::StrFormat(
      "Swap manager under this pressure: moved %d saved tensors (%s) to pinned host memory. Still on the "
      "device, waiting for their backward: %s for want of pinned memory (the pool has %s of its %s limit in "
      "use, swap_host_limit_mb), %s of the last layers (swap_keep_last_layers), %s below swap_min_kb, %s of "
      "layers whose forward has not ended, %s whose copy could not be issued, %s in memory the allocator did "
      "not make.",
      moved, FormatBytes(moved_bytes), part(no_host), FormatBytes(pool.in_use_bytes),
      FormatBytes(pool_->options().capacity), part(last), part(small), part(registered), part(failed),
      part(foreign));
}

void SwapManager::DeferHostFree(CopyEngine::CopyId copy, void* host) { deferred_.push_back({copy, host}); }

void SwapManager::FreeOwn(void* block) {
  if (options_.hooks.freeing) options_.hooks.freeing(block, engine_->stream(Direction::kHostToDevice));
  alloc_->Free(block).IgnoreError();
}

void SwapManager::PollLocked() {
  for (auto& [t, e] : tickets_) {
    if (e.state != TicketState::kOffloading) continue;
    auto done = engine_->Done(e.copy);
    if (done.ok() && *done) {
      e.state = TicketState::kOnHost;
      finished_.push_back(e.copy);
      e.copy = 0;
    }
  }
  std::erase_if(deferred_, [&](const Deferred& d) {
    auto done = engine_->Done(d.copy);
    if (!done.ok() || !*done) return false;
    pool_->Free(d.host).IgnoreError();
    finished_.push_back(d.copy);
    return true;
  });
  std::erase_if(finished_, [&](CopyEngine::CopyId c) {
    auto done = engine_->Done(c);
    if (done.ok() && !*done) return false;
    engine_->Release(c).IgnoreError();  // completed (or unknown): returns at once
    return true;
  });
}

void SwapManager::Poll() {
  MutexLock l(&mu_);
  PollLocked();
}

absl::StatusOr<TicketState> SwapManager::State(Ticket t) const {
  MutexLock l(&mu_);
  auto it = tickets_.find(t);
  if (it == tickets_.end()) return absl::NotFoundError(absl::StrFormat("swap manager: no ticket %d", t));
  return it->second.state;
}

SwapStats SwapManager::GetStats() const {
  MutexLock l(&mu_);
  SwapStats s = stats_;
  s.live_tickets = static_cast<std::int64_t>(tickets_.size());
  return s;
}

}  // namespace stitchalloc::swap
