// PinnedPool: best fit over coalesced free ranges of pinned slabs (see pinned_pool.h).
#include "swap/pinned_pool.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "vmm/format.h"
#include "vmm/nvtx.h"

namespace stitchalloc::swap {

absl::StatusOr<std::unique_ptr<PinnedPool>> PinnedPool::Create(Driver* driver, const PinnedPoolOptions& options) {
  if (driver == nullptr) return absl::InvalidArgumentError("pinned pool: no driver");
  if (options.slab_bytes == 0) return absl::InvalidArgumentError("pinned pool: slab size must be positive");
  if (options.capacity == 0) return absl::InvalidArgumentError("pinned pool: capacity must be positive");
  if (options.alignment == 0 || (options.alignment & (options.alignment - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("pinned pool: alignment %d is not a power of two", options.alignment));
  }
  return std::unique_ptr<PinnedPool>(new PinnedPool(driver, options));
}

PinnedPool::~PinnedPool() {
  MutexLock l(&mu_);
  for (const Slab& s : slabs_) {
    if (s.bytes > 0) driver_->FreeHostPinned(reinterpret_cast<void*>(s.base)).IgnoreError();
  }
}

void PinnedPool::AddFree(std::uintptr_t at, std::size_t bytes) {
  const std::size_t slab = SlabOf(at);
  // Coalesce with the neighbours in the same slab.
  if (auto next = free_by_addr_.find(at + bytes); next != free_by_addr_.end() && SlabOf(next->first) == slab) {
    const std::size_t n = next->second;
    RemoveFree(next->first, n);
    bytes += n;
  }
  if (auto it = free_by_addr_.lower_bound(at); it != free_by_addr_.begin()) {
    --it;
    if (it->first + it->second == at && SlabOf(it->first) == slab) {
      const std::uintptr_t prev = it->first;
      const std::size_t n = it->second;
      RemoveFree(prev, n);
      at = prev;
      bytes += n;
    }
  }
  free_by_addr_.emplace(at, bytes);
  free_by_size_.emplace(bytes, at);
}

void PinnedPool::RemoveFree(std::uintptr_t at, std::size_t bytes) {
  free_by_addr_.erase(at);
  free_by_size_.erase({bytes, at});
}

std::size_t PinnedPool::SlabOf(std::uintptr_t at) const {
  auto it = slab_at_.upper_bound(at);  // the first slab above `at`
  if (it == slab_at_.begin()) return slabs_.size();
  --it;
  const Slab& s = slabs_[it->second];
  return at < s.base + s.bytes ? it->second : slabs_.size();
}

absl::StatusOr<void*> PinnedPool::Allocate(std::size_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("pinned pool: allocation of 0 bytes");
  const std::size_t a = options_.alignment;
  if (bytes > options_.capacity) {
    MutexLock l(&mu_);
    ++exhausted_;
    return absl::ResourceExhaustedError(absl::StrFormat("pinned pool: %s is more than the capacity %s",
                                                        FormatBytes(bytes), FormatBytes(options_.capacity)));
  }
  const std::size_t rounded = (bytes + a - 1) / a * a;
  MutexLock l(&mu_);
  auto fit = free_by_size_.lower_bound({rounded, 0});
  if (fit == free_by_size_.end()) {
    STITCHALLOC_NVTX_RANGE("pin host slab");
    // The last slab may be smaller than the slab size: what is left of the capacity.
    const std::size_t room = options_.capacity - pinned_;
    const std::size_t slab_bytes = std::min(std::max(options_.slab_bytes, rounded), room);
    if (rounded > room) {
      ++exhausted_;
      return absl::ResourceExhaustedError(absl::StrFormat(
          "pinned pool: %s requested, %s pinned of the %s capacity, %s in use and no free range fits",
          FormatBytes(bytes), FormatBytes(pinned_), FormatBytes(options_.capacity), FormatBytes(in_use_)));
    }
    auto p = driver_->AllocateHostPinned(slab_bytes);
    if (!p.ok()) {
      ++exhausted_;
      return absl::ResourceExhaustedError(
          absl::StrFormat("pinned pool: pinning a %s slab failed: %s", FormatBytes(slab_bytes), p.status().message()));
    }
    ++pin_calls_;
    pinned_ += slab_bytes;
    slab_at_[reinterpret_cast<std::uintptr_t>(*p)] = slabs_.size();
    slabs_.push_back({reinterpret_cast<std::uintptr_t>(*p), slab_bytes, 0, 0});
    AddFree(reinterpret_cast<std::uintptr_t>(*p), slab_bytes);
    fit = free_by_size_.lower_bound({rounded, 0});
  }
  const auto [size, at] = *fit;
  RemoveFree(at, size);
  if (size > rounded) AddFree(at + rounded, size - rounded);
  const std::size_t slab = SlabOf(at);
  used_.emplace(at, Used{rounded, slab});
  Slab& s = slabs_[slab];
  s.in_use += rounded;
  s.high_water = std::max(s.high_water, s.in_use);
  in_use_ += rounded;
  peak_ = std::max(peak_, in_use_);
  return reinterpret_cast<void*>(at);
}

absl::Status PinnedPool::Free(void* ptr) {
  const auto at = reinterpret_cast<std::uintptr_t>(ptr);
  MutexLock l(&mu_);
  auto it = used_.find(at);
  if (it == used_.end()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("pinned pool: free(%p): not a live allocation of this pool (foreign pointer or double free)", ptr));
  }
  const Used u = it->second;
  used_.erase(it);
  slabs_[u.slab].in_use -= u.bytes;
  in_use_ -= u.bytes;
  AddFree(at, u.bytes);
  return absl::OkStatus();
}

std::size_t PinnedPool::ReleaseEmptySlabs() {
  MutexLock l(&mu_);
  std::size_t released = 0;
  for (Slab& s : slabs_) {
    if (s.bytes == 0 || s.in_use > 0) continue;
    RemoveFree(s.base, s.bytes);  // an empty slab is one coalesced free range
    driver_->FreeHostPinned(reinterpret_cast<void*>(s.base)).IgnoreError();
    slab_at_.erase(s.base);
    pinned_ -= s.bytes;
    released += s.bytes;
    s.bytes = 0;
  }
  return released;
}

PinnedPoolStats PinnedPool::GetStats() const {
  MutexLock l(&mu_);
  PinnedPoolStats out;
  out.pinned_bytes = pinned_;
  out.in_use_bytes = in_use_;
  out.peak_in_use_bytes = peak_;
  out.allocations = static_cast<std::int64_t>(used_.size());
  out.exhausted = exhausted_;
  out.pin_calls = pin_calls_;
  for (const Slab& s : slabs_) {
    if (s.bytes > 0) out.slabs.push_back({s.bytes, s.in_use, s.high_water});
  }
  return out;
}

absl::Status PinnedPool::CheckInvariants() const {
  MutexLock l(&mu_);
  if (free_by_addr_.size() != free_by_size_.size()) return absl::InternalError("pinned pool: free indexes differ");
  std::size_t pinned = 0, used_total = 0;
  for (std::size_t i = 0; i < slabs_.size(); ++i) {
    const Slab& s = slabs_[i];
    if (s.bytes == 0) continue;
    pinned += s.bytes;
    // Walk the slab: free ranges and allocations must tile it exactly.
    std::size_t in_use = 0;
    for (std::uintptr_t at = s.base; at < s.base + s.bytes;) {
      if (auto f = free_by_addr_.find(at); f != free_by_addr_.end()) {
        if (!free_by_size_.contains({f->second, at})) return absl::InternalError("pinned pool: free range not in size index");
        auto next = free_by_addr_.find(at + f->second);
        if (next != free_by_addr_.end() && at + f->second < s.base + s.bytes) {
          return absl::InternalError("pinned pool: adjacent free ranges not coalesced");
        }
        at += f->second;
      } else if (auto u = used_.find(at); u != used_.end()) {
        if (u->second.slab != i) return absl::InternalError("pinned pool: allocation in the wrong slab");
        in_use += u->second.bytes;
        at += u->second.bytes;
      } else {
        return absl::InternalError(absl::StrFormat("pinned pool: byte %#x of slab %d is neither free nor used", at, i));
      }
    }
    if (in_use != s.in_use) return absl::InternalError("pinned pool: slab in-use count wrong");
    used_total += in_use;
  }
  if (pinned != pinned_ || pinned_ > options_.capacity) return absl::InternalError("pinned pool: pinned total wrong");
  if (used_total != in_use_) return absl::InternalError("pinned pool: in-use total wrong");
  return absl::OkStatus();
}

}  // namespace stitchalloc::swap
