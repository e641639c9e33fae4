#include "tests/gpu/kernels.h"

#include <cuda_runtime.h>

namespace stitchalloc::gpu {

__host__ __device__ std::uint32_t MixImpl(std::uint32_t seed, std::uint64_t i) {
  std::uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  return static_cast<std::uint32_t>(x);
}

__global__ void FillKernel(std::uint32_t* p, std::size_t words, std::uint32_t seed) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < words;
       i += std::size_t{gridDim.x} * blockDim.x) {
    p[i] = MixImpl(seed, i);
  }
}

int LaunchFill(void* p, std::size_t words, std::uint32_t seed, std::uintptr_t stream) {
  FillKernel<<<264, 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(static_cast<std::uint32_t*>(p), words, seed);
  return static_cast<int>(cudaGetLastError());
}

std::uint32_t Mix(std::uint32_t seed, std::uint64_t i) { return MixImpl(seed, i); }

int DeviceCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

}  // namespace stitchalloc::gpu
