// Bi-level plans (MEMO): one offset plan per layer kind and phase, reused by every layer of
// that kind, then a top-level plan in which each layer is a single pseudo-buffer, planned
// together with the rest of the iteration (embedding, loss, optimizer, and the tensors a layer
// leaves behind for backward).
//
// A request is layer-local when it is allocated and freed inside one layer span; those form
// the layer's own problem, with lifetimes relative to the layer's begin. Layers whose local
// problems are identical (sizes, streams, ordinals, lifetimes) share one plan; the layer's
// pseudo-buffer is as large as that plan's peak and lives for the layer's span. Everything else
// freed within the iteration is a top-level buffer. The arena offset of a local request is its
// layer's pseudo-buffer offset plus its offset in the layer plan.
//
// The composed offsets are checked against the flat problem with plan::CheckSolution before a
// plan is returned. The result is a lookup table for the runtime: per layer instance (kind, index, phase) and
// for the iteration outside layers, a vector indexed by ordinal of the expected size, stream
// and arena offset (or "not planned" for requests that outlive the iteration).
#pragma once

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "allocator/arena/recording.h"
#include "allocator/plan/planner.h"

namespace stitchalloc::arena {

struct Slot {
  bool planned = false;
  std::size_t size = 0;
  Stream stream = kDefaultStream;
  std::int64_t offset = 0;  // in the arena
};

using LayerKey = std::tuple<std::string, int, Phase, int>;  // kind, index, phase, occurrence

struct ArenaPlan {
  std::int64_t arena_bytes = 0;   // the top-level plan's peak
  std::int64_t lower_bound = 0;   // max live load of all planned requests (flat)
  Stream stream = kDefaultStream; // the arena's stream: every planned request is on it
  std::int64_t planned_requests = 0;
  std::int64_t unplanned_requests = 0;  // live at the iteration's end, or on another stream
  std::int64_t other_stream_requests = 0;  // of those, freed in the iteration but on another stream
  int layer_plans = 0;        // distinct layer plans solved
  int layers_sharing = 0;     // layer instances that reused another layer's plan
  bool optimal_layers = true; // every layer plan proven optimal
  absl::Duration plan_time;
  absl::flat_hash_map<LayerKey, std::vector<Slot>> layers;
  std::vector<LayerKey> layer_sequence;  // layer spans in recorded order (the runtime's fast path)
  std::vector<Slot> outside;
};

struct BiLevelOptions {
  absl::Duration layer_time_limit = absl::Seconds(1);
  absl::Duration top_time_limit = absl::Seconds(2);
};

absl::StatusOr<ArenaPlan> PlanIteration(const IterationRecording& rec, const BiLevelOptions& options = {});

// The stream an arena plan serves: the one whose requests freed inside the iteration request
// the most bytes (ties: the stream of the earliest such request). Only its requests are
// planned. Arena offsets are reused in host order without events, which orders work on one
// stream only: a range freed by one stream and handed to another could be overwritten while
// the first stream's queued work still reads it. Requests on other streams go to the caching
// allocator, whose per-stream pools and events order cross-stream reuse.
Stream ArenaStream(const IterationRecording& rec);
// Whether `r` is planned in an arena on `stream` (freed inside the iteration, on that stream).
inline bool Planned(const RecordedRequest& r, Stream stream) { return r.free_time >= 0 && r.stream == stream; }

// The flat problem (every request planned on ArenaStream(rec) one buffer) for comparison and
// lower bounds.
plan::Problem FlatProblem(const IterationRecording& rec);

}  // namespace stitchalloc::arena
