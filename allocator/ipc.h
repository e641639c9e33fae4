// Sharing allocations with other processes: what torch.multiprocessing does with CUDA tensors.
//
// The exporter (CachingAllocator::Share) names the physical chunks under an allocation by file
// descriptors (Driver::ExportChunk) and EncodeIpcHandle writes them in PyTorch's handle format
// for expandable segments, so that a handle from stitchalloc opens under PyTorch's own
// allocator and one from PyTorch's expandable segments opens under stitchalloc:
//
//   byte 0     format version (2)
//   byte 1     'e' (chunks by file descriptor)
//   bytes 2..  PyTorch's ShareHeader as Linux x86-64 and aarch64 lay it out: the exporter's pid
//              (int32), 4 zero bytes, the chunk size (uint64), the number of chunks (uint64)
//   then       one int32 per chunk, in address order: the exporter's descriptor
//
// plus the offset of the allocation from the first chunk, which travels beside the handle (as
// PyTorch's ShareableHandle::offset). Version 2 type 'c' handles, and bare 64-byte ones from
// older PyTorch, carry a cudaIpcMemHandle_t instead (PyTorch's allocator without expandable
// segments); they decode here, and only the CUDA runtime can open them (torch_plugin does).
//
// The importer (ImportedRange::Open) takes a copy of each descriptor from the exporter with
// pidfd_getfd (Linux 5.6 or newer, and the right to ptrace the exporter, as PyTorch needs),
// imports the chunks, reserves one range and maps them there in order. The exporter keeps its
// descriptors open as long as the chunks live, so the allocation must stay allocated until the
// importer has opened the handle (torch's CUDA IPC reference counting sees to that).
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "vmm/driver.h"

namespace stitchalloc {

// The chunks under a shared allocation (CachingAllocator::Share).
struct SharedRange {
  std::size_t offset = 0;      // of the allocation from the start of the first chunk
  std::size_t chunk_size = 0;  // every chunk's size
  std::vector<int> fds;        // the exporting driver's descriptors, one per chunk, in address order
};

struct IpcHandle {
  enum class Kind { kChunks, kCudaMalloc };
  Kind kind = Kind::kChunks;
  // kChunks
  pid_t pid = 0;
  std::size_t chunk_size = 0;
  std::vector<int> fds;  // descriptors in the exporter's process
  // kCudaMalloc: the cudaIpcMemHandle_t's 64 bytes
  std::string cuda_ipc_handle;
};

inline constexpr char kIpcHandleVersion = 2;
inline constexpr std::size_t kCudaIpcHandleBytes = 64;

// Raises this process's soft limit of open descriptors to its hard limit, the first time only:
// every exported chunk holds a descriptor while it lives (as in PyTorch's expandable segments),
// and a soft limit of 1024, common on Linux, is 2 GiB of 2 MiB chunks.
void RaiseDescriptorLimitOnce();

// The handle of `range`, exported by process `pid`.
std::string EncodeIpcHandle(const SharedRange& range, pid_t pid);
// PyTorch's handle for memory the CUDA runtime shares itself (type 'c': a cudaIpcMemHandle_t,
// kCudaIpcHandleBytes long), as its allocator writes for cudaMalloc segments. stitchalloc writes it
// for memory a MemPool's own allocator made (torch_plugin). InvalidArgument for another length.
absl::StatusOr<std::string> EncodeCudaMallocHandle(std::string_view cuda_ipc_handle);
// InvalidArgument for anything that is not a well-formed handle of a known version and type.
absl::StatusOr<IpcHandle> DecodeIpcHandle(std::string_view bytes);

// An exporter's chunks mapped contiguously into this process.
class ImportedRange {
 public:
  // Fails (and leaves nothing behind) when the handle is not of kind kChunks, the exporter is
  // gone or does not let this process take its descriptors, the chunk size is not a multiple of
  // `driver`'s granularity, or the driver refuses the memory; the message says which.
  static absl::StatusOr<std::unique_ptr<ImportedRange>> Open(Driver& driver, const IpcHandle& handle);
  // Waits for the device (work of this process may still use the memory: cuMemUnmap does not
  // wait), then unmaps and releases the chunks and frees the range.
  ~ImportedRange();
  ImportedRange(const ImportedRange&) = delete;
  ImportedRange& operator=(const ImportedRange&) = delete;

  DevicePtr ptr() const { return va_; }
  std::size_t size() const { return chunk_size_ * chunks_.size(); }  // the chunks' bytes

 private:
  ImportedRange(Driver& driver, std::size_t chunk_size) : driver_(driver), chunk_size_(chunk_size) {}
  void Close();  // undoes whatever Open did so far

  Driver& driver_;
  const std::size_t chunk_size_;
  DevicePtr va_ = 0;                // 0 until reserved
  std::size_t reserved_ = 0;        // bytes reserved at va_
  std::vector<PhysHandle> chunks_;  // imported, in address order
  std::size_t mapped_ = 0;          // chunks_[0, mapped_) are mapped
};

}  // namespace stitchalloc
