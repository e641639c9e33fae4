/* stitchalloc as PyTorch's CUDA allocator (libstitchalloc_torch.so), for C++ programs that use
 * LibTorch directly. Python users call stitchalloc.install(); jobs that cannot be changed use
 * PYTORCH_CUDA_ALLOC_CONF=backend:stitchalloc or LD_PRELOAD (README.md, docs/torch.md).
 */
#ifndef STITCHALLOC_TORCH_H_
#define STITCHALLOC_TORCH_H_

#ifdef __cplusplus
extern "C" {
#endif

/* Makes stitchalloc PyTorch's CUDA allocator (c10::cuda::CUDACachingAllocator::allocator and the
 * kCUDA device allocator). `config` is "key:value,..." (docs/configuration.md) on top of the
 * STITCHALLOC_CONF environment variable; NULL means the environment alone. Must run before CUDA
 * is first used: once PyTorch's allocator is initialised it fails and changes nothing. Calling
 * it again with the same configuration is a no-op. Returns 0, or -1 with
 * stitchalloc_torch_last_error() saying why. */
int stitchalloc_torch_install(const char* config);
/* The calling thread's last error message ("" if none). */
const char* stitchalloc_torch_last_error(void);
/* 1 when stitchalloc is PyTorch's current CUDA allocator, 0 otherwise. */
int stitchalloc_torch_installed(void);
/* The PyTorch version the library was compiled against, e.g. "2.15.0". */
const char* stitchalloc_torch_built_for(void);

#ifdef __cplusplus
}
#endif

#endif /* STITCHALLOC_TORCH_H_ */
