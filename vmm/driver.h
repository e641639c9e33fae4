// Driver: the device operations the allocator needs, and nothing more.
//
// Two implementations: CudaDriver (the CUDA driver API, opened at run time) and HostDriver
// (the same semantics emulated with real memory mappings on the CPU). The contract follows the
// CUDA virtual memory management API:
//
// - A chunk is physical memory of a size that is a multiple of granularity(). It is created
//   unmapped and released by ReleaseChunk; release while mapped is allowed and takes effect
//   when the last mapping goes (as cuMemRelease).
// - A reservation is a virtual range, a multiple of granularity() long and aligned to it.
// - Map places one whole chunk at an address inside a reservation that is not mapped yet;
//   the same chunk may be mapped at several addresses at once (aliasing). Mapped memory is
//   not accessible until SetAccess covers it. Unmap removes whole chunk mappings.
// - A chunk can be shared with another process: ExportChunk gives a POSIX file descriptor for
//   it, which the other process obtains with pidfd_getfd and turns into a chunk of its own
//   driver with ImportChunk (cuMemExportToShareableHandle / cuMemImportFromShareableHandle).
//   The physical memory lives until the exporter and every importer have released it.
// - Streams execute their work in order; events mark a point in a stream (Record), can be
//   polled (Query), waited for by the host (Synchronize) or by another stream (StreamWaitEvent).
//   An event that was never recorded counts as completed.
//
// Every function validates its arguments and returns a Status naming the problem; failures
// leave the driver's state unchanged. Implementations are thread-safe.
#pragma once

#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/types.h"

namespace stitchalloc {

enum class DriverKind { kHost, kCuda };

class Driver {
 public:
  virtual ~Driver() = default;

  virtual DriverKind kind() const = 0;
  // A human-readable description, e.g. "host (capacity 16.00 GiB)" or "cuda:0 NVIDIA H100".
  virtual std::string name() const = 0;
  virtual int device() const = 0;
  // Size and alignment unit of chunks and reservations (2 MiB on current GPUs).
  virtual std::size_t granularity() const = 0;

  // Physical memory. CreateChunk returns ResourceExhausted when the device is full.
  virtual absl::StatusOr<PhysHandle> CreateChunk(std::size_t bytes) = 0;
  virtual absl::Status ReleaseChunk(PhysHandle handle) = 0;

  // Virtual address ranges.
  virtual absl::StatusOr<DevicePtr> Reserve(std::size_t bytes) = 0;
  virtual absl::Status FreeReservation(DevicePtr va, std::size_t bytes) = 0;
  virtual absl::Status Map(DevicePtr va, std::size_t bytes, PhysHandle handle) = 0;
  virtual absl::Status Unmap(DevicePtr va, std::size_t bytes) = 0;
  virtual absl::Status SetAccess(DevicePtr va, std::size_t bytes) = 0;

  // Sharing between processes. ExportChunk returns a file descriptor for a live chunk, owned by
  // the driver, the same on every call and open until the chunk is released; it fails with
  // FailedPrecondition when chunks cannot be exported (shareable() false, or the chunk was made
  // before that was found out). ImportChunk makes a chunk of `bytes` (the exporter's chunk size)
  // from a descriptor another process exported; the caller keeps its descriptor. The imported
  // chunk maps like any other and does not count as this device's memory.
  virtual bool shareable() const = 0;
  virtual absl::StatusOr<int> ExportChunk(PhysHandle handle) = 0;
  virtual absl::StatusOr<PhysHandle> ImportChunk(int fd, std::size_t bytes) = 0;

  // Streams and events.
  virtual absl::StatusOr<Stream> CreateStream() = 0;
  virtual absl::Status DestroyStream(Stream stream) = 0;
  virtual absl::Status SynchronizeStream(Stream stream) = 0;
  // Waits until the work of every stream of the device has completed (cuCtxSynchronize).
  virtual absl::Status SynchronizeDevice() = 0;
  virtual absl::StatusOr<Event> CreateEvent() = 0;
  virtual absl::Status DestroyEvent(Event event) = 0;
  virtual absl::Status RecordEvent(Event event, Stream stream) = 0;
  // True when the work before the last Record has completed (or it was never recorded).
  virtual absl::StatusOr<bool> QueryEvent(Event event) = 0;
  virtual absl::Status SynchronizeEvent(Event event) = 0;
  virtual absl::Status StreamWaitEvent(Stream stream, Event event) = 0;

  // Events whose completion time is kept, for ElapsedSeconds (slightly costlier to record).
  virtual absl::StatusOr<Event> CreateTimingEvent() = 0;
  // Seconds of stream time from `start` to `end`, both timing events that have completed;
  // FailedPrecondition while either is pending or was never recorded.
  virtual absl::StatusOr<double> ElapsedSeconds(Event start, Event end) = 0;

  // Page-locked host memory that copies to and from the device run at full bandwidth
  // (cuMemHostAlloc). Slow (milliseconds per call): pin large slabs once and sub-allocate.
  virtual absl::StatusOr<void*> AllocateHostPinned(std::size_t bytes) = 0;
  // `ptr` must come from AllocateHostPinned of this driver (InvalidArgument otherwise).
  virtual absl::Status FreeHostPinned(void* ptr) = 0;

  // Copies `bytes` from `src` to `dst` in stream order (any direction: device or host memory).
  virtual absl::Status MemcpyAsync(void* dst, const void* src, std::size_t bytes,
                                   Stream stream) = 0;

  virtual absl::StatusOr<MemInfo> GetMemInfo() = 0;
};

}  // namespace stitchalloc
