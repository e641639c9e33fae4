// Recording of one training iteration: every request between IterationBegin and
// IterationEnd with its lifetime in event time, and the layer spans marked by
// layer_begin(kind, index, phase) / layer_end.
//
// Time is an event counter: each alloc, free and layer mark advances it by one. A request's
// ordinal numbers it within its context, the innermost open layer at its alloc (or the
// iteration outside any layer), which is how the runtime recognises it later: (layer kind,
// index, phase, ordinal, size, stream). A request never freed inside the iteration has
// free_time -1 and is not planned (it outlives the arena's reuse cycle). Frees of blocks
// allocated before the iteration are ignored.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "vmm/types.h"

namespace stitchalloc::arena {

enum class Phase : std::uint8_t { kForward = 0, kBackward = 1 };
absl::string_view PhaseName(Phase p);

struct LayerSpan {
  std::string kind;
  int index = 0;
  Phase phase = Phase::kForward;
  std::int64_t begin = 0;  // event time of layer_begin
  std::int64_t end = -1;   // event time of layer_end
  int occurrence = 0;      // earlier spans of the same (kind, index, phase) in the iteration
};

struct RecordedRequest {
  std::size_t size = 0;  // rounded to the allocator's 512-byte granule
  Stream stream = kDefaultStream;
  std::int64_t alloc_time = 0;
  std::int64_t free_time = -1;  // -1: still live at the iteration's end
  int layer = -1;               // index into IterationRecording::layers; -1 outside layers
  int ordinal = 0;              // position within its context
};

struct IterationRecording {
  std::vector<RecordedRequest> requests;
  std::vector<LayerSpan> layers;
  std::int64_t end_time = 0;
};

inline constexpr std::size_t kArenaGranule = 512;
inline std::size_t RoundToGranule(std::size_t n) { return (n + kArenaGranule - 1) / kArenaGranule * kArenaGranule; }

class Recorder {
 public:
  void Begin();
  absl::Status LayerBegin(absl::string_view kind, int index, Phase phase);
  absl::Status LayerEnd();
  void OnAlloc(std::uintptr_t ptr, std::size_t size, Stream stream);
  void OnFree(std::uintptr_t ptr);
  // Ends the iteration; InvalidArgument if a layer is still open.
  absl::Status Finish(IterationRecording* out);
  bool in_layer() const { return open_ >= 0; }

 private:
  IterationRecording rec_;
  std::int64_t now_ = 0;
  int open_ = -1;
  int outside_ordinal_ = 0;
  std::vector<int> layer_ordinal_;
  absl::flat_hash_map<std::tuple<std::string, int, Phase>, int> occurrences_;
  absl::flat_hash_map<std::uintptr_t, std::size_t> live_;  // ptr -> request index
};

}  // namespace stitchalloc::arena
