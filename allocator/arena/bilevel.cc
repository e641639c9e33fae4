// PlanIteration: layer plans keyed by their local problem, then the top-level plan.
#include "allocator/arena/bilevel.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/node_hash_map.h"
#include "absl/strings/str_cat.h"

namespace stitchalloc::arena {
namespace {

// A layer's local problem in canonical form: (ordinal, size, stream, begin, end) relative to
// the layer's begin. Equal keys mean one plan serves both layers.
using LocalKey = std::vector<std::int64_t>;

struct LocalPlan {
  std::int64_t peak = 0;
  absl::flat_hash_map<int, std::int64_t> offset_by_ordinal;
};

}  // namespace

Stream ArenaStream(const IterationRecording& rec) {
  absl::flat_hash_map<Stream, std::int64_t> bytes;
  std::vector<Stream> order;  // by first request (requests are in allocation order)
  for (const RecordedRequest& r : rec.requests) {
    if (r.free_time < 0) continue;
    auto [it, added] = bytes.try_emplace(r.stream, 0);
    if (added) order.push_back(r.stream);
    it->second += static_cast<std::int64_t>(r.size);
  }
  Stream best = kDefaultStream;
  std::int64_t most = -1;
  for (Stream s : order) {
    if (bytes[s] > most) {
      best = s;
      most = bytes[s];
    }
  }
  return best;
}

plan::Problem FlatProblem(const IterationRecording& rec) {
  const Stream stream = ArenaStream(rec);
  plan::Problem p;
  for (std::size_t i = 0; i < rec.requests.size(); ++i) {
    const RecordedRequest& r = rec.requests[i];
    if (!Planned(r, stream)) continue;
    p.buffers.push_back({absl::StrCat(i), r.alloc_time, r.free_time, static_cast<std::int64_t>(r.size), 1});
  }
  return p;
}

absl::StatusOr<ArenaPlan> PlanIteration(const IterationRecording& rec, const BiLevelOptions& options) {
  const absl::Time start = absl::Now();
  ArenaPlan out;
  const std::size_t nl = rec.layers.size();
  for (const LayerSpan& l : rec.layers) {
    if (l.end < l.begin) return absl::InvalidArgumentError(absl::StrCat("layer ", l.kind, " ", l.index, " never ended"));
  }
  out.stream = ArenaStream(rec);
  // Local requests per layer instance.
  std::vector<std::vector<std::size_t>> local(nl);
  for (std::size_t i = 0; i < rec.requests.size(); ++i) {
    const RecordedRequest& r = rec.requests[i];
    if (!Planned(r, out.stream)) {
      ++out.unplanned_requests;
      if (r.free_time >= 0) ++out.other_stream_requests;
      continue;
    }
    ++out.planned_requests;
    if (r.layer >= 0 && r.free_time <= rec.layers[r.layer].end) local[r.layer].push_back(i);
  }
  // Solve each distinct local problem once.
  absl::node_hash_map<LocalKey, LocalPlan> plans;  // stable addresses: plan_of points in
  std::vector<const LocalPlan*> plan_of(nl, nullptr);
  for (std::size_t l = 0; l < nl; ++l) {
    if (local[l].empty()) continue;
    const std::int64_t base = rec.layers[l].begin;
    LocalKey key;
    plan::Problem prob;
    for (std::size_t i : local[l]) {
      const RecordedRequest& r = rec.requests[i];
      key.insert(key.end(), {r.ordinal, static_cast<std::int64_t>(r.size), static_cast<std::int64_t>(r.stream),
                             r.alloc_time - base, r.free_time - base});
      prob.buffers.push_back({absl::StrCat(r.ordinal), r.alloc_time - base, r.free_time - base,
                              static_cast<std::int64_t>(r.size), 1});
    }
    auto [it, inserted] = plans.try_emplace(std::move(key));
    if (inserted) {
      auto solved = plan::Plan(prob, {.capacity = std::nullopt, .time_limit = options.layer_time_limit});
      if (!solved.ok()) return solved.status();
      if (!solved->solved) return absl::InternalError("layer plan found no solution");
      out.optimal_layers = out.optimal_layers && solved->optimal;
      it->second.peak = solved->peak;
      for (std::size_t k = 0; k < local[l].size(); ++k) {
        it->second.offset_by_ordinal[rec.requests[local[l][k]].ordinal] = solved->offsets[k];
      }
      ++out.layer_plans;
    } else {
      ++out.layers_sharing;
    }
    plan_of[l] = &it->second;
  }
  // Top level: one pseudo-buffer per layer with a local plan, plus every other planned request.
  plan::Problem top;
  std::vector<std::int64_t> top_ref;  // >= 0: request index; < 0: -(layer + 1)
  for (std::size_t l = 0; l < nl; ++l) {
    if (plan_of[l] == nullptr || plan_of[l]->peak == 0) continue;
    top.buffers.push_back({absl::StrCat("layer", l), rec.layers[l].begin, rec.layers[l].end, plan_of[l]->peak, 1});
    top_ref.push_back(-static_cast<std::int64_t>(l) - 1);
  }
  std::vector<bool> is_local(rec.requests.size(), false);
  for (const auto& v : local) {
    for (std::size_t i : v) is_local[i] = true;
  }
  for (std::size_t i = 0; i < rec.requests.size(); ++i) {
    const RecordedRequest& r = rec.requests[i];
    if (!Planned(r, out.stream) || is_local[i]) continue;
    top.buffers.push_back({absl::StrCat(i), r.alloc_time, r.free_time, static_cast<std::int64_t>(r.size), 1});
    top_ref.push_back(static_cast<std::int64_t>(i));
  }
  std::vector<std::int64_t> top_offset;
  if (!top.buffers.empty()) {
    auto solved = plan::Plan(top, {.capacity = std::nullopt, .time_limit = options.top_time_limit});
    if (!solved.ok()) return solved.status();
    if (!solved->solved) return absl::InternalError("top-level plan found no solution");
    out.arena_bytes = solved->peak;
    top_offset = std::move(solved->offsets);
  }
  const plan::Problem flat = FlatProblem(rec);
  out.lower_bound = plan::LowerBound(flat);
  // Lookup tables.
  std::vector<std::int64_t> layer_base(nl, 0);
  std::vector<std::int64_t> request_offset(rec.requests.size(), -1);
  for (std::size_t k = 0; k < top_ref.size(); ++k) {
    if (top_ref[k] < 0) layer_base[static_cast<std::size_t>(-top_ref[k] - 1)] = top_offset[k];
    else request_offset[static_cast<std::size_t>(top_ref[k])] = top_offset[k];
  }
  for (std::size_t l = 0; l < nl; ++l) {
    for (std::size_t i : local[l]) request_offset[i] = layer_base[l] + plan_of[l]->offset_by_ordinal.at(rec.requests[i].ordinal);
  }
  for (std::size_t i = 0; i < rec.requests.size(); ++i) {
    const RecordedRequest& r = rec.requests[i];
    std::vector<Slot>* v;
    if (r.layer >= 0) {
      const LayerSpan& span = rec.layers[r.layer];
      v = &out.layers[LayerKey{span.kind, span.index, span.phase, span.occurrence}];
    } else {
      v = &out.outside;
    }
    if (v->size() <= static_cast<std::size_t>(r.ordinal)) v->resize(r.ordinal + 1);
    const bool planned = Planned(r, out.stream);
    (*v)[r.ordinal] = {planned, r.size, r.stream, planned ? request_offset[i] : 0};
  }
  // The composed offsets must solve the flat problem: check with the independent validator.
  {
    std::vector<std::int64_t> flat_offsets;
    for (std::size_t i = 0; i < rec.requests.size(); ++i) {
      if (Planned(rec.requests[i], out.stream)) flat_offsets.push_back(request_offset[i]);
    }
    if (absl::Status s = plan::CheckSolution(flat, flat_offsets, out.arena_bytes); !s.ok()) {
      return absl::InternalError(absl::StrCat("bi-level plan is inconsistent: ", s.message()));
    }
  }
  for (const LayerSpan& span : rec.layers) {
    out.layer_sequence.push_back(LayerKey{span.kind, span.index, span.phase, span.occurrence});
    out.layers[out.layer_sequence.back()];  // every span has a table, even an empty one
  }
  out.plan_time = absl::Now() - start;
  return out;
}

}  // namespace stitchalloc::arena
