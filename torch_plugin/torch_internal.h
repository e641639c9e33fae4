// What the other files of libstitchalloc_torch.so (the swap entry points) need from the
// installed TorchAllocator (torch_allocator.cc); nothing here is exported from the library.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "torch_plugin/pool_set.h"

namespace stitchalloc::torch_internal {

// The installed allocator's PoolSet of `device` (-1: the current device); *resolved is the
// device index. FailedPrecondition when stitchalloc is not PyTorch's allocator.
absl::StatusOr<PoolSet*> InstalledPoolSet(int device, int* resolved);
// Frees a block the way PyTorch's deleter does (statistics, memory history).
void FreeThroughTorch(void* ptr);
// The calling thread's message for stitchalloc_torch_last_error().
void SetLastError(std::string message);
// PyTorch's current CUDA stream of `device` as a driver stream.
Stream CurrentStream(int device);
// Records a prefetch block of the swap manager in PyTorch's memory history (and trace
// trackers): allocated, or about to be freed by the manager (never handed out). Never throws
// out of the swap manager: failures to record are dropped.
void TraceSwapBlock(bool allocated, int device, void* ptr, Stream stream) noexcept;

}  // namespace stitchalloc::torch_internal
