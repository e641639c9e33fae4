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
/* Offload to pinned host memory at layer boundaries (docs/offload.md). One swap session per
 * device, created by the first swap_begin with the installed configuration's swap_* keys and
 * PyTorch's current stream as the compute stream. Each returns 0, or -1 with
 * stitchalloc_torch_last_error() saying why.
 *   swap_begin            starts a forward pass over `num_layers` layers.
 *   ..._pass              the same in forward pass `pass` (pass 0 without the suffix): each
 *                         pass has its own layer count, and a layer boundary concerns its own
 *                         pass's tensors only, so micro-batches in flight together and models
 *                         sharing a device each prefetch their own (swap/swap_manager.h).
 *   swap_offload          hands a stitchalloc allocation saved by layer `layer` to the manager
 *                         and sets *ticket. With `release`, the block stays the caller's: when the
 *                         manager is done with it (its copy is queued, or the ticket was
 *                         cancelled) it records the copy stream's use and calls
 *                         release(context); the caller then drops its reference. Without, the
 *                         manager frees the block itself as PyTorch's deleter would.
 *   swap_forward_end      layer `layer`'s forward ended: its offloads are issued.
 *   swap_backward_begin   backward reached `layer`: the layers below it (lookahead) come back.
 *   swap_wait             the block to use on the compute stream, in stream order. *same_block
 *                         is 1 when it is the block given to swap_offload (it never left; the
 *                         caller's reference is still valid), 0 when it is a new allocation
 *                         the caller now owns (free it through PyTorch's CUDA allocator).
 *   swap_cancel           the tensor died before its backward: pending copies are dropped.
 *   swap_synchronize      blocks until the compute stream and both copy streams are idle.
 *   swap_state            0 registered, 1 kept, 2 offloading, 3 on host, 4 prefetching; -1 on error.
 *   swap_stats            "name value" lines (swap.*, pinned.*, copy.*), NULL on error; valid
 *                         until the calling thread's next call. */
int stitchalloc_torch_swap_begin(int device, int num_layers);
int stitchalloc_torch_swap_offload(int device, void* ptr, uint64_t bytes, int layer, void (*release)(void*),
                                   void* context, uint64_t* ticket);
int stitchalloc_torch_swap_forward_end(int device, int layer);
int stitchalloc_torch_swap_backward_begin(int device, int layer);
int stitchalloc_torch_swap_begin_pass(int device, int num_layers, uint64_t pass);
int stitchalloc_torch_swap_offload_pass(int device, void* ptr, uint64_t bytes, int layer, uint64_t pass,
                                        void (*release)(void*), void* context, uint64_t* ticket);
int stitchalloc_torch_swap_forward_end_pass(int device, int layer, uint64_t pass);
int stitchalloc_torch_swap_backward_begin_pass(int device, int layer, uint64_t pass);
int stitchalloc_torch_swap_wait(int device, uint64_t ticket, void** ptr, int* same_block);
int stitchalloc_torch_swap_cancel(int device, uint64_t ticket);
int stitchalloc_torch_swap_synchronize(int device);
int stitchalloc_torch_swap_state(int device, uint64_t ticket);
const char* stitchalloc_torch_swap_stats(int device);
/* The PyTorch version the library was compiled against, e.g. "2.15.0". */
const char* stitchalloc_torch_built_for(void);

#ifdef __cplusplus
}
#endif

#endif /* STITCHALLOC_TORCH_H_ */
