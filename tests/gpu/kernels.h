// Device kernels for the GPU tests, behind a plain C++ interface so that the test code itself
// is compiled by the host compiler. Streams are CUstream values (cudaStream_t).
#pragma once

#include <cstddef>
#include <cstdint>

namespace stitchalloc::gpu {

// Writes word i of [p, p + words*4) as Mix(seed, i), on `stream`; returns a cudaError_t value.
int LaunchFill(void* p, std::size_t words, std::uint32_t seed, std::uintptr_t stream);
// The value LaunchFill writes at word `i`.
std::uint32_t Mix(std::uint32_t seed, std::uint64_t i);
// Number of CUDA devices the runtime sees (0 when there is no driver).
int DeviceCount();

}  // namespace stitchalloc::gpu
