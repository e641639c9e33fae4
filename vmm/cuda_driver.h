// CudaDriver: the Driver contract over the CUDA driver API.
//
// libcuda.so.1 is opened at run time (dlopen) and every entry point is looked up with
// cuGetProcAddress at the ABI version this file was written against, so the library loads and
// runs on machines without an NVIDIA driver (Create then fails with Unavailable, and the
// allocator falls back to the host driver when configured to). All work runs in the device's
// primary context, the one PyTorch and the CUDA runtime use; it is pushed around each call
// only when the calling thread has another context current, and popped afterwards.
//
// Streams are CUstream values, so a cudaStream_t from PyTorch passes through unchanged.
//
// Sharing: with options.shareable, chunks are created with the POSIX file descriptor handle type
// (as PyTorch's expandable segments are), so that ExportChunk can hand them to another process.
// Where the driver refuses that handle type (some containers and virtualised GPUs), the first
// refusal turns it off for the driver's lifetime: chunks are then created without it,
// shareable() is false and ExportChunk names the reason. Exported descriptors are kept in
// exported_ (one per chunk) and closed when the chunk is released.
#pragma once

#include <atomic>
#include <cstddef>
#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "vmm/mutex.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/driver.h"

namespace stitchalloc {

struct CudaDriverOptions {
  int device = 0;
  std::string libcuda_path = "libcuda.so.1";
  bool shareable = true;  // create chunks exportable to other processes (POSIX file descriptors)
};

class CudaDriver final : public Driver {
 public:
  // Unavailable when libcuda cannot be opened, cuInit fails (no driver, a stub library), the
  // device does not exist or does not support virtual memory management.
  static absl::StatusOr<std::unique_ptr<CudaDriver>> Create(const CudaDriverOptions& options);
  ~CudaDriver() override;

  DriverKind kind() const override { return DriverKind::kCuda; }
  std::string name() const override { return name_; }
  int device() const override { return ordinal_; }
  std::size_t granularity() const override { return granularity_; }

  absl::StatusOr<PhysHandle> CreateChunk(std::size_t bytes) override;
  absl::Status ReleaseChunk(PhysHandle handle) override;
  absl::StatusOr<DevicePtr> Reserve(std::size_t bytes) override;
  absl::Status FreeReservation(DevicePtr va, std::size_t bytes) override;
  absl::Status Map(DevicePtr va, std::size_t bytes, PhysHandle handle) override;
  absl::Status Unmap(DevicePtr va, std::size_t bytes) override;
  absl::Status SetAccess(DevicePtr va, std::size_t bytes) override;
  bool shareable() const override { return shareable_.load(std::memory_order_relaxed); }
  absl::StatusOr<int> ExportChunk(PhysHandle handle) override;
  absl::StatusOr<PhysHandle> ImportChunk(int fd, std::size_t bytes) override;

  absl::StatusOr<Stream> CreateStream() override;
  absl::Status DestroyStream(Stream stream) override;
  absl::Status SynchronizeStream(Stream stream) override;
  absl::Status SynchronizeDevice() override;
  absl::StatusOr<Event> CreateEvent() override;
  absl::Status DestroyEvent(Event event) override;
  absl::Status RecordEvent(Event event, Stream stream) override;
  absl::StatusOr<bool> QueryEvent(Event event) override;
  absl::Status SynchronizeEvent(Event event) override;
  absl::Status StreamWaitEvent(Stream stream, Event event) override;
  absl::StatusOr<Event> CreateTimingEvent() override;
  absl::StatusOr<double> ElapsedSeconds(Event start, Event end) override;
  absl::StatusOr<void*> AllocateHostPinned(std::size_t bytes) override;
  absl::Status FreeHostPinned(void* ptr) override;
  absl::Status MemcpyAsync(void* dst, const void* src, std::size_t bytes, Stream stream) override;
  absl::StatusOr<MemInfo> GetMemInfo() override;

  struct Api;  // the table of driver entry points (defined in cuda_driver.cc)

 private:
  class ContextScope;
  CudaDriver() = default;
  absl::Status Check(int result, const char* call) const;

  std::unique_ptr<Api> api_;
  int ordinal_ = 0;
  int device_handle_ = 0;       // CUdevice
  void* context_ = nullptr;     // CUcontext (the primary context, retained)
  std::size_t granularity_ = 0;
  std::string name_;
  std::atomic<bool> shareable_{false};
  Mutex export_mu_;
  std::string unshareable_reason_ ABSL_GUARDED_BY(export_mu_);
  absl::flat_hash_map<PhysHandle, int> exported_ ABSL_GUARDED_BY(export_mu_);
};

}  // namespace stitchalloc
