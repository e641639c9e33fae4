// Handle encoding and ImportedRange; see ipc.h for the format and the protocol.
#include "allocator/ipc.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>

#include "absl/strings/str_format.h"
#include "vmm/format.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

namespace stitchalloc {
namespace {

constexpr char kTypeChunks = 'e';
constexpr char kTypeCudaMalloc = 'c';
// PyTorch's ShareHeader {pid_t pid; size_t segment_size; size_t num_handles;} on LP64 Linux.
constexpr std::size_t kHeaderBytes = 24;
constexpr std::size_t kPidAt = 0, kChunkSizeAt = 8, kCountAt = 16;

template <typename T>
void Put(std::string& out, std::size_t at, T value) {
  std::memcpy(out.data() + at, &value, sizeof(T));
}
template <typename T>
T Get(std::string_view in, std::size_t at) {
  T value;
  std::memcpy(&value, in.data() + at, sizeof(T));
  return value;
}

absl::Status Bad(std::string_view why) {
  return absl::InvalidArgumentError(absl::StrFormat("stitchalloc IPC handle: %s", why));
}

}  // namespace

void RaiseDescriptorLimitOnce() {
  static std::once_flag once;
  std::call_once(once, [] {
    rlimit lim = {};
    if (getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
      lim.rlim_cur = lim.rlim_max;
      setrlimit(RLIMIT_NOFILE, &lim);
    }
  });
}

std::string EncodeIpcHandle(const SharedRange& range, pid_t pid) {
  std::string out(2 + kHeaderBytes + range.fds.size() * sizeof(std::int32_t), '\0');  // padding stays zero
  out[0] = kIpcHandleVersion;
  out[1] = kTypeChunks;
  Put<std::int32_t>(out, 2 + kPidAt, static_cast<std::int32_t>(pid));
  Put<std::uint64_t>(out, 2 + kChunkSizeAt, range.chunk_size);
  Put<std::uint64_t>(out, 2 + kCountAt, range.fds.size());
  for (std::size_t i = 0; i < range.fds.size(); ++i) {
    Put<std::int32_t>(out, 2 + kHeaderBytes + i * sizeof(std::int32_t), range.fds[i]);
  }
  return out;
}

absl::StatusOr<std::string> EncodeCudaMallocHandle(std::string_view cuda_ipc_handle) {
  if (cuda_ipc_handle.size() != kCudaIpcHandleBytes) {
    return Bad(absl::StrFormat("a cudaIpcMemHandle_t has %d bytes, not %d", kCudaIpcHandleBytes,
                               cuda_ipc_handle.size()));
  }
  std::string out(2, '\0');
  out[0] = kIpcHandleVersion;
  out[1] = kTypeCudaMalloc;
  out.append(cuda_ipc_handle);
  return out;
}

absl::StatusOr<IpcHandle> DecodeIpcHandle(std::string_view bytes) {
  IpcHandle h;
  if (bytes.size() == kCudaIpcHandleBytes) {  // from a PyTorch older than versioned handles
    h.kind = IpcHandle::Kind::kCudaMalloc;
    h.cuda_ipc_handle = std::string(bytes);
    return h;
  }
  if (bytes.size() < 2) return Bad(absl::StrFormat("%d bytes is too short", bytes.size()));
  const int version = static_cast<unsigned char>(bytes[0]);
  if (version < 1 || version > kIpcHandleVersion) {
    return Bad(absl::StrFormat("format version %d is not one this build reads (1 to %d): it comes from a newer "
                               "PyTorch or is not a handle",
                               version, kIpcHandleVersion));
  }
  const char type = bytes[1];
  if (type == kTypeCudaMalloc) {
    if (bytes.size() != 2 + kCudaIpcHandleBytes) {
      return Bad(absl::StrFormat("a cudaMalloc handle has %d bytes, not %d", bytes.size(), 2 + kCudaIpcHandleBytes));
    }
    h.kind = IpcHandle::Kind::kCudaMalloc;
    h.cuda_ipc_handle = std::string(bytes.substr(2));
    return h;
  }
  if (type != kTypeChunks) return Bad(absl::StrFormat("unknown handle type 0x%02x", static_cast<unsigned char>(type)));
  if (bytes.size() < 2 + kHeaderBytes) return Bad(absl::StrFormat("%d bytes is too short for its header", bytes.size()));
  const std::string_view body = bytes.substr(2);
  h.kind = IpcHandle::Kind::kChunks;
  h.pid = static_cast<pid_t>(Get<std::int32_t>(body, kPidAt));
  h.chunk_size = Get<std::uint64_t>(body, kChunkSizeAt);
  const std::uint64_t count = Get<std::uint64_t>(body, kCountAt);
  if (h.pid <= 0) return Bad(absl::StrFormat("exporter pid %d", h.pid));
  if (h.chunk_size == 0 || count == 0) return Bad("no memory in it (zero chunks or chunk size)");
  constexpr std::size_t kFabricHandleBytes = 64;  // CUmemFabricHandle
  if (count <= (body.size() - kHeaderBytes) / kFabricHandleBytes &&
      body.size() == kHeaderBytes + count * kFabricHandleBytes) {
    return Bad("it carries fabric handles (PyTorch's expandable_segments_handle_type fabric), which stitchalloc "
               "does not open; share with POSIX file descriptors (the default)");
  }
  if (count > (body.size() - kHeaderBytes) / sizeof(std::int32_t) ||
      body.size() != kHeaderBytes + count * sizeof(std::int32_t)) {
    return Bad(absl::StrFormat("%d bytes do not hold the %d descriptors it announces", bytes.size(), count));
  }
  if (h.chunk_size > std::numeric_limits<std::size_t>::max() / count) return Bad("size overflows");
  h.fds.reserve(count);
  for (std::uint64_t i = 0; i < count; ++i) {
    h.fds.push_back(Get<std::int32_t>(body, kHeaderBytes + i * sizeof(std::int32_t)));
  }
  return h;
}

absl::StatusOr<std::unique_ptr<ImportedRange>> ImportedRange::Open(Driver& driver, const IpcHandle& handle) {
  if (handle.kind != IpcHandle::Kind::kChunks) {
    return absl::InvalidArgumentError(
        "stitchalloc IPC: a cudaMalloc handle cannot be opened as chunks (it needs cudaIpcOpenMemHandle)");
  }
  if (handle.chunk_size % driver.granularity() != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "stitchalloc IPC: the exporter's chunk size %s is not a multiple of this device's granularity %s",
        FormatBytes(handle.chunk_size), FormatBytes(driver.granularity())));
  }
  std::unique_ptr<ImportedRange> r(new ImportedRange(driver, handle.chunk_size));
  const long pidfd = syscall(SYS_pidfd_open, handle.pid, 0);
  if (pidfd < 0) {
    const int err = errno;
    if (err == ENOSYS) {
      return absl::UnimplementedError("stitchalloc IPC: this kernel lacks pidfd_open (Linux 5.3 or newer is needed)");
    }
    if (err == ESRCH) {
      return absl::NotFoundError(absl::StrFormat(
          "stitchalloc IPC: process %d, which shared the memory, has exited", handle.pid));
    }
    return absl::InternalError(absl::StrFormat("stitchalloc IPC: pidfd_open(%d) failed: %s", handle.pid,
                                               std::strerror(err)));
  }
  absl::Status failed;
  for (const int remote : handle.fds) {
    const long fd = syscall(SYS_pidfd_getfd, pidfd, remote, 0);
    if (fd < 0) {
      const int err = errno;
      if (err == EPERM) {
        failed = absl::PermissionDeniedError(absl::StrFormat(
            "stitchalloc IPC: not permitted to take descriptors from process %d (pidfd_getfd needs the right to "
            "ptrace it: the same user, and /proc/sys/kernel/yama/ptrace_scope 0 unless it is an ancestor)",
            handle.pid));
      } else if (err == EBADF) {
        failed = absl::FailedPreconditionError(absl::StrFormat(
            "stitchalloc IPC: descriptor %d of process %d is closed: the memory was freed before this process "
            "opened the handle",
            remote, handle.pid));
      } else if (err == ENOSYS) {
        failed = absl::UnimplementedError("stitchalloc IPC: this kernel lacks pidfd_getfd (Linux 5.6 or newer is needed)");
      } else {
        failed = absl::InternalError(absl::StrFormat("stitchalloc IPC: pidfd_getfd(%d, %d) failed: %s", handle.pid,
                                                     remote, std::strerror(err)));
      }
      break;
    }
    absl::StatusOr<PhysHandle> chunk = driver.ImportChunk(static_cast<int>(fd), handle.chunk_size);
    close(static_cast<int>(fd));
    if (!chunk.ok()) {
      failed = chunk.status();
      break;
    }
    r->chunks_.push_back(*chunk);
  }
  close(static_cast<int>(pidfd));
  if (failed.ok()) {
    absl::StatusOr<DevicePtr> va = driver.Reserve(r->size());
    if (va.ok()) {
      r->va_ = *va;
      r->reserved_ = r->size();
      while (r->mapped_ < r->chunks_.size()) {
        failed = driver.Map(r->va_ + r->mapped_ * r->chunk_size_, r->chunk_size_, r->chunks_[r->mapped_]);
        if (!failed.ok()) break;
        ++r->mapped_;
      }
      if (failed.ok()) failed = driver.SetAccess(r->va_, r->size());
    } else {
      failed = va.status();
    }
  }
  if (!failed.ok()) {
    r->Close();
    return failed;
  }
  return r;
}

void ImportedRange::Close() {
  for (std::size_t i = 0; i < mapped_; ++i) driver_.Unmap(va_ + i * chunk_size_, chunk_size_).IgnoreError();
  mapped_ = 0;
  for (PhysHandle c : chunks_) driver_.ReleaseChunk(c).IgnoreError();
  chunks_.clear();
  if (va_ != 0) driver_.FreeReservation(va_, reserved_).IgnoreError();
  va_ = 0;
  reserved_ = 0;
}

ImportedRange::~ImportedRange() {
  if (mapped_ > 0) driver_.SynchronizeDevice().IgnoreError();
  Close();
}

}  // namespace stitchalloc
