// Trace: one device's allocator event stream, the input of stitchalloc-replay and of the
// planner benchmarks. docs/trace-format.md is the reference of the file format; keep the two in
// step.
//
// In memory a trace is a vector of events in program order. Block ids name allocations: an
// id is live from its alloc to its free and is never reused within a trace (a converter assigns
// fresh ids when PyTorch reuses an address). Mark events (layer_begin, layer_end, step) carry a
// label index into `labels`; segment events record what the recording allocator reserved and
// are only read by the model validation, never replayed.
//
// Invariants checked by Validate(): every free names a live id whose alloc had the same size
// (a free's size may be 0: unknown), sizes of allocs are positive, layer_end closes the
// innermost open layer_begin with the same label and index. Blocks still live at the end are
// allowed (they are reported as live_at_end).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace stitchalloc::bench {

enum class TraceOp : std::uint8_t {
  kAlloc,
  kFree,
  kLayerBegin,    // id: layer index; label: "<kind>:<phase>"
  kLayerEnd,      // as kLayerBegin
  kStep,          // id: iteration number
  kSegmentAlloc,  // size: bytes the recording allocator reserved (cudaMalloc / map)
  kSegmentFree,   // size: bytes it released
};

absl::string_view TraceOpName(TraceOp op);

struct TraceEvent {
  TraceOp op = TraceOp::kAlloc;
  std::uint32_t label = 0;  // index into Trace::labels (0 is the empty label)
  std::uint64_t id = 0;
  std::uint64_t size = 0;
  std::uint64_t stream = 0;
  std::int64_t time_us = 0;
};

struct Trace {
  Trace() : labels{""} {}
  std::string name;
  // "# key: value" header lines other than the format line, in file order.
  std::vector<std::pair<std::string, std::string>> meta;
  std::vector<TraceEvent> events;
  std::vector<std::string> labels;

  // Appends events (generators and converters).
  void Alloc(std::uint64_t id, std::uint64_t size, std::uint64_t stream = 0, std::int64_t time_us = 0);
  void Free(std::uint64_t id, std::uint64_t size, std::uint64_t stream = 0, std::int64_t time_us = 0);
  void Mark(TraceOp op, std::uint64_t id, absl::string_view label, std::int64_t time_us = 0);
  std::uint32_t Label(absl::string_view label);
  // The value of a meta key, or "" when absent.
  std::string Meta(absl::string_view key) const;
};

struct TraceSummary {
  std::size_t events = 0;
  std::size_t allocs = 0;
  std::size_t frees = 0;
  std::size_t live_at_end = 0;
  std::size_t streams = 0;
  std::uint64_t peak_requested_bytes = 0;  // max over time of the sum of live request sizes
  std::uint64_t peak_rounded_bytes = 0;    // the same with each size rounded up to 512 bytes
  std::uint64_t largest_request = 0;
  std::size_t segment_allocs = 0;
};

// Checks the invariants of the file comment; the error names the event number.
absl::Status Validate(const Trace& trace);
TraceSummary Summarize(const Trace& trace);

// Parses the text form. `name` is used when the text has no "# name:" line.
absl::StatusOr<Trace> ParseTrace(absl::string_view text, absl::string_view name);
// Reads a trace file, gzip-compressed or not (detected from the content), and validates it.
absl::StatusOr<Trace> ReadTrace(const std::string& path);
// Writes the text form; gzip-compressed when the path ends in ".gz".
absl::Status WriteTrace(const Trace& trace, const std::string& path);
std::string FormatTrace(const Trace& trace);

}  // namespace stitchalloc::bench
