// UncachedAllocations: PyTorch's uncached mode without PyTorch. With PYTORCH_NO_CUDA_MEMORY_CACHING=1
// in the environment, or after torch.cuda.memory.caching_allocator_enable(False), PyTorch's
// allocator serves every request with its own cudaMalloc and returns it with cudaFree when it is
// freed: nothing is cached, and the allocator's statistics and memory history do not see it. It is
// how compute-sanitizer's memcheck sees each tensor's exact bounds, and how a job gives freed
// memory back to the device at once. stitchalloc does the same: each allocation is one segment of
// its device's SegmentSource (cudaMalloc under CUDA, a driver chunk of its own on the host
// driver), made when asked for and released when freed, after the device has finished with it
// (`synchronize`, as cudaFree waits for the device).
//
// Data structure: live_ maps each live allocation's address to its device and segment; devices_
// holds each device's source, made on the device's first request by the factory.
// Invariants: an address is in live_ exactly while its segment is out of its device's source;
// count_ == live_.size(), so a caller may skip the lookup while it is zero (the cached hot path
// pays one relaxed load). A failed request or release leaves live_ as it was.
#pragma once
#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/ipc.h"
#include "allocator/segment_pool.h"
#include "vmm/types.h"
#include "vmm/mutex.h"

namespace stitchalloc {

class UncachedAllocations {
 public:
  struct DeviceSource {
    std::unique_ptr<SegmentSource> source;
    // Waits until the device has finished with memory being released (may be empty: the
    // source's Release waits itself, as cudaFree does).
    std::function<absl::Status()> synchronize;
    // The device's free and total memory, for out-of-memory reports (may be empty).
    std::function<absl::StatusOr<MemInfo>()> mem_info;
  };
  using Factory = std::function<absl::StatusOr<DeviceSource>(int device)>;
  explicit UncachedAllocations(Factory factory) : factory_(std::move(factory)) {}
  UncachedAllocations(const UncachedAllocations&) = delete;
  UncachedAllocations& operator=(const UncachedAllocations&) = delete;

  // A segment of at least `bytes` for device `device` (0..kMaxDevices-1). InvalidArgument for
  // 0 bytes or an impossible size; ResourceExhausted when the device has no memory for it, with
  // the mode, the source's cause, the device's free and total memory and what the mode holds.
  absl::StatusOr<void*> Allocate(int device, std::size_t bytes);
  // Releases live allocation `ptr` once the device has finished with it. NotFound when `ptr` is
  // not one (nothing happens then); on a release error the allocation is forgotten all the same
  // (its segment is no longer usable) and the error returned.
  absl::Status Free(const void* ptr);
  // The device and the segment (address and size) of live allocation `ptr`, if it is one.
  struct Live {
    int device = 0;
    SegmentSource::Segment segment;
  };
  std::optional<Live> Find(const void* ptr) const;
  // For another process (torch.multiprocessing): the segment of live allocation `ptr`, as its
  // source shares it (FailedPrecondition where it cannot).
  absl::StatusOr<SharedRange> Share(const void* ptr);
  // Live allocations; 0 lets the cached path skip every lookup.
  std::size_t live() const { return count_.load(std::memory_order_relaxed); }

  static constexpr int kMaxDevices = 64;

 private:
  absl::StatusOr<DeviceSource*> SourceOf(int device) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Factory factory_;
  mutable Mutex mu_;
  absl::flat_hash_map<int, std::unique_ptr<DeviceSource>> devices_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<const void*, Live> live_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<int, std::size_t> held_bytes_ ABSL_GUARDED_BY(mu_);  // by device
  std::atomic<std::size_t> count_{0};
};

}  // namespace stitchalloc
