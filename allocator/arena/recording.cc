// Recorder: appends requests and layer spans with event times (see recording.h).
#include "allocator/arena/recording.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace stitchalloc::arena {

absl::string_view PhaseName(Phase p) { return p == Phase::kForward ? "forward" : "backward"; }

void Recorder::Begin() {
  rec_ = {};
  now_ = 0;
  open_ = -1;
  outside_ordinal_ = 0;
  layer_ordinal_.clear();
  occurrences_.clear();
  live_.clear();
}

absl::Status Recorder::LayerBegin(absl::string_view kind, int index, Phase phase) {
  if (open_ >= 0) {
    return absl::FailedPreconditionError(absl::StrCat("layer_begin(", kind, ", ", index, ") while layer ",
                                                      rec_.layers[open_].kind, " ", rec_.layers[open_].index,
                                                      " is open (layers do not nest)"));
  }
  open_ = static_cast<int>(rec_.layers.size());
  const int occurrence = occurrences_[std::make_tuple(std::string(kind), index, phase)]++;
  rec_.layers.push_back({std::string(kind), index, phase, now_++, -1, occurrence});
  layer_ordinal_.push_back(0);
  return absl::OkStatus();
}

absl::Status Recorder::LayerEnd() {
  if (open_ < 0) return absl::FailedPreconditionError("layer_end without layer_begin");
  rec_.layers[open_].end = now_++;
  open_ = -1;
  return absl::OkStatus();
}

void Recorder::OnAlloc(std::uintptr_t ptr, std::size_t size, Stream stream) {
  RecordedRequest r;
  r.size = RoundToGranule(size);
  r.stream = stream;
  r.alloc_time = now_++;
  r.layer = open_;
  r.ordinal = open_ >= 0 ? layer_ordinal_[open_]++ : outside_ordinal_++;
  live_[ptr] = rec_.requests.size();
  rec_.requests.push_back(r);
}

void Recorder::OnFree(std::uintptr_t ptr) {
  auto it = live_.find(ptr);
  if (it == live_.end()) return;  // allocated before the iteration
  rec_.requests[it->second].free_time = now_++;
  live_.erase(it);
}

absl::Status Recorder::Finish(IterationRecording* out) {
  if (open_ >= 0) {
    return absl::FailedPreconditionError(absl::StrCat("iteration ended inside layer ", rec_.layers[open_].kind, " ",
                                                      rec_.layers[open_].index));
  }
  rec_.end_time = now_;
  *out = std::move(rec_);
  Begin();
  return absl::OkStatus();
}

}  // namespace stitchalloc::arena
