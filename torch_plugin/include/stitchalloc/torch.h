/* stitchalloc as PyTorch's CUDA allocator (libstitchalloc_torch.so), for C++ programs that use
 * LibTorch directly. Python users call stitchalloc.install(); jobs that cannot be changed use
 * PYTORCH_CUDA_ALLOC_CONF=backend:stitchalloc or LD_PRELOAD (README.md, docs/torch.md).
 */
#ifndef STITCHALLOC_TORCH_H_
#define STITCHALLOC_TORCH_H_

#include <stdint.h>

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
/* Plan-guided arena marks on the installed allocator (docs/arena.md), `device` -1 meaning the
 * current device. Between iteration_begin and iteration_end, the first iteration of each
 * signature (for example the sequence length) is recorded and planned and later ones are served
 * at planned offsets; layer marks name the layer kind, its index and the phase (0 forward,
 * 1 backward). Each returns 0, or -1 with stitchalloc_torch_last_error() saying why (not
 * installed, marks out of order, bad argument). */
int stitchalloc_torch_iteration_begin(int device, uint64_t signature);
int stitchalloc_torch_iteration_end(int device);
int stitchalloc_torch_layer_begin(int device, const char* kind, int index, int phase);
int stitchalloc_torch_layer_end(int device);
/* Frees the arenas of all cached plans (fails while arena allocations are live). */
int stitchalloc_torch_arena_drop_plans(int device);
/* One "name value" line per arena statistic ("arena.hits 12"), or NULL on error; valid until
 * the calling thread's next call. */
const char* stitchalloc_torch_arena_stats(int device);
/* The PyTorch version the library was compiled against, e.g. "2.15.0". */
const char* stitchalloc_torch_built_for(void);

#ifdef __cplusplus
}
#endif

#endif /* STITCHALLOC_TORCH_H_ */
