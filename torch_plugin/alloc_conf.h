// AllocConf: splits a PYTORCH_CUDA_ALLOC_CONF value that selects stitchalloc
// ("backend:stitchalloc,<stitchalloc keys>,<PyTorch keys>") into what stitchalloc applies and
// what is left for PyTorch, which rejects keys it does not know.
//
// Every token lands in exactly one class, in the order given:
//   - backend:stitchalloc              enables; removed.
//   - a stitchalloc key (docs/configuration.md)  removed, applied by stitchalloc.
//   - a PyTorch device-allocator key that has a meaning here (max_split_size_mb,
//     per_process_memory_fraction)     removed, honoured (translated to stitchalloc's key).
//   - a PyTorch key for the pinned host allocator (pinned_*), which stays PyTorch's
//                                      kept for PyTorch.
//   - a PyTorch device-allocator key without a meaning here (expandable_segments, ...)
//                                      removed and reported in `notes`: never silently dropped.
//   - anything else                    an error naming the token; nothing is applied.
// Without backend:stitchalloc nothing is classified: `enabled` is false and `torch` is the input
// unchanged. Values in brackets may hold commas (roundup_power2_divisions:[256:1,>:8]).
// The stitchalloc part is validated with ParseConfig, so a bad value fails here, at startup.
// Torch-free: used by the preload library and, through the C API, by the Python startup hook.
#pragma once
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "allocator/config.h"

namespace stitchalloc {

struct AllocConfSplit {
  bool enabled = false;            // backend:stitchalloc was present
  std::string stitchalloc;         // "key:value,..." for ParseConfig
  std::string torch;               // what PYTORCH_CUDA_ALLOC_CONF should hold ("" if nothing)
  std::vector<std::string> notes;  // one line per honoured or ignored PyTorch key
};

absl::StatusOr<AllocConfSplit> SplitTorchAllocConf(absl::string_view text);

// PyTorch's allocator settings given at run time (torch._C._accelerator_setAllocatorSettings,
// torch.cuda.memory._set_allocator_settings) change PyTorch's configuration only; no allocator is
// told. Returns, for stitchalloc installed with `installed`, one note per device-allocator key in
// `text` that therefore does not do what it would under PyTorch's allocator:
//   - max_split_size_mb (unless equal to the installed value), per_process_memory_fraction:
//     honoured at startup only; the note names what to use instead;
//   - the keys without a meaning here (expandable_segments, ...): the reason, as at startup.
// pinned_* keys get no note (PyTorch's pinned host allocator applies them), nor do other or
// malformed tokens (PyTorch rejected those before any allocator could hear of them).
std::vector<std::string> RunTimeSettingNotes(absl::string_view text, const Config& installed);

}  // namespace stitchalloc
