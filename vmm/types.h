// Plain handle types shared by every layer. They are integers so that the C API, the torch
// glue and the host driver can pass them around without knowing the driver behind them.
//
// - DevicePtr:  a device virtual address (CUdeviceptr on CUDA, a host address on the host driver).
// - PhysHandle: a physical memory chunk (CUmemGenericAllocationHandle, or a host driver id).
// - Stream:     an opaque stream (the CUstream value on CUDA, so torch's cudaStream_t passes
//               through unchanged; a small id on the host driver). 0 is the default stream.
// - Event:      an opaque event handle created by the same driver.
#pragma once

#include <cstddef>
#include <cstdint>

namespace stitchalloc {

using DevicePtr = std::uintptr_t;
using PhysHandle = std::uint64_t;
using Stream = std::uintptr_t;
using Event = std::uintptr_t;

inline constexpr Stream kDefaultStream = 0;

inline constexpr std::size_t kKiB = std::size_t{1} << 10;
inline constexpr std::size_t kMiB = std::size_t{1} << 20;
inline constexpr std::size_t kGiB = std::size_t{1} << 30;
inline constexpr std::size_t kTiB = std::size_t{1} << 40;

struct MemInfo {
  std::size_t free_bytes = 0;   // physical memory the driver could still hand out
  std::size_t total_bytes = 0;  // physical capacity of the device
};

// Rounds `n` up to a multiple of `align` (a power of two or any positive value).
constexpr std::size_t RoundUp(std::size_t n, std::size_t align) {
  return (n + align - 1) / align * align;
}

}  // namespace stitchalloc
