// UncachedAllocations (uncached.h): sources are called outside mu_, so that one device's
// cudaMalloc or device synchronisation does not hold up another thread's lookups.
#include "torch_plugin/uncached.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/policy.h"
#include "vmm/format.h"

namespace stitchalloc {
namespace {

constexpr const char* kMode = "uncached mode (PYTORCH_NO_CUDA_MEMORY_CACHING=1 or caching_allocator_enable(False))";

}  // namespace

absl::StatusOr<UncachedAllocations::DeviceSource*> UncachedAllocations::SourceOf(int device) {
  if (device < 0 || device >= kMaxDevices) {
    return absl::InvalidArgumentError(absl::StrCat(kMode, ": device ", device, " is out of range"));
  }
  auto it = devices_.find(device);
  if (it != devices_.end()) return it->second.get();
  absl::StatusOr<DeviceSource> made = factory_(device);
  if (!made.ok()) return made.status();
  if (made->source == nullptr) {
    return absl::InternalError(absl::StrCat(kMode, ": no memory source for device ", device));
  }
  auto& slot = devices_[device];
  slot = std::make_unique<DeviceSource>(*std::move(made));
  return slot.get();
}

absl::StatusOr<void*> UncachedAllocations::Allocate(int device, std::size_t bytes) {
  if (absl::Status s = Policy::CheckRequest(bytes); !s.ok()) return s;
  DeviceSource* source = nullptr;
  {
    MutexLock l(&mu_);
    absl::StatusOr<DeviceSource*> found = SourceOf(device);
    if (!found.ok()) return found.status();
    source = *found;
  }
  absl::StatusOr<SegmentSource::Segment> segment = source->source->Allocate(bytes);
  if (!segment.ok()) {
    const absl::Status& s = segment.status();
    std::string numbers;
    if (absl::IsResourceExhausted(s)) {
      if (source->mem_info) {
        if (absl::StatusOr<MemInfo> info = source->mem_info(); info.ok()) {
          absl::StrAppend(&numbers, "; the device has ", FormatBytes(info->free_bytes), " free of ",
                          FormatBytes(info->total_bytes));
        }
      }
      MutexLock l(&mu_);
      std::size_t count = 0;
      for (const auto& [p, live] : live_) count += live.device == device;
      absl::StrAppend(&numbers, "; the mode's ", count, " live allocations there hold ",
                      FormatBytes(held_bytes_[device]));
    }
    return absl::Status(s.code(), absl::StrCat(kMode, ": ", bytes, " bytes (", FormatBytes(bytes), ") on device ",
                                               device, " from ", source->source->name(), ": ", s.message(), numbers));
  }
  if (segment->ptr == 0 || segment->size < bytes) {
    source->source->Release(*segment).IgnoreError();
    return absl::InternalError(absl::StrFormat("%s: %s gave %u bytes at %#x for a request of %u",
                                               kMode, source->source->name(), segment->size, segment->ptr, bytes));
  }
  void* p = reinterpret_cast<void*>(segment->ptr);
  {
    MutexLock l(&mu_);
    if (live_.try_emplace(p, Live{device, *segment}).second) {
      held_bytes_[device] += segment->size;
      count_.store(live_.size(), std::memory_order_relaxed);
      return p;
    }
  }
  // The source handed out memory that is still live: it keeps neither (this one goes back).
  source->source->Release(*segment).IgnoreError();
  return absl::InternalError(
      absl::StrFormat("%s: %s gave %#x, which is still live", kMode, source->source->name(), segment->ptr));
}

absl::Status UncachedAllocations::Free(const void* ptr) {
  Live freed;
  DeviceSource* source = nullptr;
  {
    MutexLock l(&mu_);
    auto it = live_.find(ptr);
    if (it == live_.end()) {
      return absl::NotFoundError(absl::StrFormat("%s: %p is not a live allocation", kMode, ptr));
    }
    freed = it->second;
    live_.erase(it);
    held_bytes_[freed.device] -= freed.segment.size;
    count_.store(live_.size(), std::memory_order_relaxed);
    source = devices_.at(freed.device).get();
  }
  absl::Status s = source->synchronize ? source->synchronize() : absl::OkStatus();
  s.Update(source->source->Release(freed.segment));
  return s;
}

std::optional<UncachedAllocations::Live> UncachedAllocations::Find(const void* ptr) const {
  MutexLock l(&mu_);
  auto it = live_.find(ptr);
  if (it == live_.end()) return std::nullopt;
  return it->second;
}

absl::StatusOr<SharedRange> UncachedAllocations::Share(const void* ptr) {
  std::optional<Live> live = Find(ptr);
  if (!live.has_value()) {
    return absl::NotFoundError(absl::StrFormat("%s: %p is not a live allocation", kMode, ptr));
  }
  DeviceSource* source = nullptr;
  {
    MutexLock l(&mu_);
    source = devices_.at(live->device).get();
  }
  return source->source->Share(live->segment, 0);
}

}  // namespace stitchalloc
