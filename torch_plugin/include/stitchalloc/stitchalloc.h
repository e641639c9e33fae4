/* stitchalloc C API: a stable ABI over the caching allocator, for the PyTorch plugin and any
 * other binding (ctypes, JAX, CuPy, C programs).
 *
 * Conventions:
 * - Every function returns a stitchalloc_status (0 on success) unless it is a pure getter.
 * - On failure, stitchalloc_last_error() returns a message for the calling thread that names
 *   the problem (valid until the thread's next failing call).
 * - Handles are opaque; streams are passed as uintptr_t (a CUstream / cudaStream_t value on
 *   CUDA, 0 for the default stream).
 * - ABI: functions are only ever added; existing signatures and enum values never change.
 *   Statistics are addressed by name (see stitchalloc_stat_name), never by struct layout.
 * - Thread-safe: any thread may call any function on a live allocator.
 */
#ifndef STITCHALLOC_STITCHALLOC_H_
#define STITCHALLOC_STITCHALLOC_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define STITCHALLOC_ABI_VERSION 1

#if defined(__GNUC__)
#define STITCHALLOC_API __attribute__((visibility("default")))
#else
#define STITCHALLOC_API
#endif

typedef enum stitchalloc_status {
  STITCHALLOC_OK = 0,
  STITCHALLOC_ERROR_INVALID_ARGUMENT = 1, /* bad size, pointer, handle or configuration */
  STITCHALLOC_ERROR_OUT_OF_MEMORY = 2,    /* the message carries the out-of-memory report */
  STITCHALLOC_ERROR_UNAVAILABLE = 3,      /* the requested driver cannot be used here */
  STITCHALLOC_ERROR_DRIVER = 4,           /* the driver failed */
  STITCHALLOC_ERROR_INTERNAL = 5
} stitchalloc_status;

typedef struct stitchalloc_allocator stitchalloc_allocator;

/* The ABI version the library was built with (STITCHALLOC_ABI_VERSION). */
STITCHALLOC_API int stitchalloc_abi_version(void);
/* The library version, e.g. "0.1.0". */
STITCHALLOC_API const char* stitchalloc_version(void);
/* The calling thread's last error message ("" if none). */
STITCHALLOC_API const char* stitchalloc_last_error(void);

/* Creates an allocator. `config` is "key:value,..." (docs/configuration.md) applied on top of
 * the STITCHALLOC_CONF environment variable; NULL or "" means the environment alone. */
STITCHALLOC_API stitchalloc_status stitchalloc_create(const char* config, stitchalloc_allocator** out);
/* Releases all memory of the allocator, allocations included. NULL is a no-op. */
STITCHALLOC_API void stitchalloc_destroy(stitchalloc_allocator* a);

/* Allocates `size` bytes (> 0) usable in order on `stream`. */
STITCHALLOC_API stitchalloc_status stitchalloc_malloc(stitchalloc_allocator* a, size_t size, uintptr_t stream,
                                                      void** out);
/* Frees a pointer stitchalloc_malloc returned; NULL is a no-op. */
STITCHALLOC_API stitchalloc_status stitchalloc_free(stitchalloc_allocator* a, void* ptr);

/* Sharing with another process, in PyTorch's handle format for expandable segments (so the other
 * side may be PyTorch): writes the handle of live allocation `ptr` into `handle` (at most
 * `capacity` bytes; *size receives its length, also when it does not fit, which fails) and
 * *offset, where the allocation starts in the memory the handle maps. Keep the allocation until
 * the other process has opened the handle. */
STITCHALLOC_API stitchalloc_status stitchalloc_share(stitchalloc_allocator* a, void* ptr, void* handle,
                                                     size_t capacity, size_t* size, size_t* offset);
/* Maps a handle another process shared (stitchalloc_share, or PyTorch's expandable segments) on
 * this allocator's device; *base is the start of the mapping (add the sender's offset). It stays
 * mapped until stitchalloc_close_shared(a, base) or stitchalloc_destroy, and keeps the memory
 * alive after the sender frees it. */
STITCHALLOC_API stitchalloc_status stitchalloc_open_shared(stitchalloc_allocator* a, const void* handle, size_t size,
                                                           void** base);
STITCHALLOC_API stitchalloc_status stitchalloc_close_shared(stitchalloc_allocator* a, void* base);
/* Records that `stream` also uses the allocation at `ptr` (torch's record_stream). */
STITCHALLOC_API stitchalloc_status stitchalloc_record_stream(stitchalloc_allocator* a, void* ptr, uintptr_t stream);
/* Returns all cached, unused memory to the device (waits for pending stream work first). */
STITCHALLOC_API stitchalloc_status stitchalloc_empty_cache(stitchalloc_allocator* a);
/* Caps reserved memory at `fraction` (0, 1] of device memory. */
STITCHALLOC_API stitchalloc_status stitchalloc_set_memory_fraction(stitchalloc_allocator* a, double fraction);

/* Statistics, named as torch.cuda.memory_stats() ("allocated_bytes.all.current", ...). */
STITCHALLOC_API size_t stitchalloc_stat_count(void);
/* The name of statistic `index` (< stitchalloc_stat_count()), or NULL. Static storage. */
STITCHALLOC_API const char* stitchalloc_stat_name(size_t index);
/* Writes min(capacity, stitchalloc_stat_count()) values, in name order, taken atomically. */
STITCHALLOC_API stitchalloc_status stitchalloc_stats(stitchalloc_allocator* a, int64_t* values, size_t capacity,
                                                     size_t* written);
/* One statistic by name. */
STITCHALLOC_API stitchalloc_status stitchalloc_get_stat(stitchalloc_allocator* a, const char* name, int64_t* out);
STITCHALLOC_API stitchalloc_status stitchalloc_reset_peak_stats(stitchalloc_allocator* a);
STITCHALLOC_API stitchalloc_status stitchalloc_reset_accumulated_stats(stitchalloc_allocator* a);

/* Describes the driver in use, e.g. "cuda:0 NVIDIA H100 ..." or "host (capacity ...)". The
 * string lives as long as the allocator. */
STITCHALLOC_API const char* stitchalloc_driver_name(stitchalloc_allocator* a);

/* Plan-guided arena (docs/arena.md). Between iteration_begin and iteration_end the first
 * iteration of each `signature` (e.g. the sequence length) is recorded and planned; later
 * iterations with that signature are served at planned offsets, falling back to the caching
 * allocator on any mismatch. Layer marks name the context that requests are matched in; they
 * do not nest, and outside an iteration they are accepted and ignored. Allocations served from
 * the arena are single-stream: stitchalloc_record_stream on them fails. */
typedef enum stitchalloc_phase { STITCHALLOC_PHASE_FORWARD = 0, STITCHALLOC_PHASE_BACKWARD = 1 } stitchalloc_phase;
STITCHALLOC_API stitchalloc_status stitchalloc_iteration_begin(stitchalloc_allocator* a, uint64_t signature);
STITCHALLOC_API stitchalloc_status stitchalloc_iteration_end(stitchalloc_allocator* a);
STITCHALLOC_API stitchalloc_status stitchalloc_layer_begin(stitchalloc_allocator* a, const char* kind, int index,
                                                           stitchalloc_phase phase);
STITCHALLOC_API stitchalloc_status stitchalloc_layer_end(stitchalloc_allocator* a);
/* Frees the arenas of all cached plans (fails while arena allocations are live). */
STITCHALLOC_API stitchalloc_status stitchalloc_arena_drop_plans(stitchalloc_allocator* a);
/* Arena statistics by name: "arena.hits", "arena.misses", "arena.unplanned", "arena.replans",
 * "arena.plans_built", "arena.plans_cached", "arena.plan_failures", "arena.arena_bytes",
 * "arena.passthrough_iterations", "arena.recorded_iterations", "arena.served_iterations",
 * "arena.last_plan_lower_bound", "arena.last_plan_arena_bytes", "arena.last_plan_time_us". */
STITCHALLOC_API stitchalloc_status stitchalloc_arena_stat(stitchalloc_allocator* a, const char* name, int64_t* out);

/* PYTORCH_CUDA_ALLOC_CONF with backend:stitchalloc, split into stitchalloc's keys and what is
 * left for PyTorch (docs/torch.md lists which PyTorch keys are kept, honoured or reported).
 * Used by the Python startup hook and the preload library. On success *out holds the result
 * (free it with stitchalloc_conf_split_free); without backend:stitchalloc it is returned with
 * enabled = 0 and the text unchanged as the PyTorch part. A malformed or unknown entry fails
 * with STITCHALLOC_ERROR_INVALID_ARGUMENT naming it. */
typedef struct stitchalloc_conf_split stitchalloc_conf_split;
STITCHALLOC_API stitchalloc_status stitchalloc_split_torch_conf(const char* text, stitchalloc_conf_split** out);
STITCHALLOC_API int stitchalloc_conf_split_enabled(const stitchalloc_conf_split* s);
/* `part` is "stitchalloc" (keys for stitchalloc), "torch" (the new PYTORCH_CUDA_ALLOC_CONF) or
 * "notes" (one line per honoured or ignored PyTorch key, newline-separated); NULL otherwise.
 * Valid until the split is freed. */
STITCHALLOC_API const char* stitchalloc_conf_split_part(const stitchalloc_conf_split* s, const char* part);
STITCHALLOC_API void stitchalloc_conf_split_free(stitchalloc_conf_split* s);

/* The token-wise offload plan (docs/offload.md): alpha, the fraction of each "other" saved
 * tensor's tokens that is swapped (the rest is recomputed), for `layers` layers whose per-layer
 * input, attention output and other saved tensors take the given bytes, with the measured copy
 * bandwidth (bytes/s), layer forward time (s) and the host memory available to this GPU.
 * Sets *alpha and, when `text` is not NULL, writes the formatted plan (truncated to `capacity`
 * bytes including the terminating NUL); *needed (if not NULL) is the full length + 1. */
STITCHALLOC_API stitchalloc_status stitchalloc_plan_offload(int layers, double input_bytes, double attention_bytes,
                                                            double other_bytes, double copy_bytes_per_second,
                                                            double layer_forward_seconds, double host_bytes,
                                                            double* alpha, char* text, size_t capacity,
                                                            size_t* needed);

#ifdef __cplusplus
}
#endif

#endif /* STITCHALLOC_STITCHALLOC_H_ */
