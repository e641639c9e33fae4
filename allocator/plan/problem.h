// The offset-assignment problem (dynamic storage allocation) and its independent checks.
//
// A Problem is a list of buffers, each with a half-open lifetime [lower, upper), a size and an
// alignment. A solution gives every buffer an offset, a multiple of its alignment, such that two
// buffers whose lifetimes intersect never share a byte: [offset, offset + size) are disjoint.
// Its peak is max(offset + size); a capacity, when given, bounds the peak.
//
// The lower bound of every solution is the maximum live load: the largest sum of sizes of
// buffers live at one instant. CheckSolution is the validator every planner answer goes
// through; it shares no code with the planners (a sweep over time with an offset-ordered set
// of live buffers, in which only neighbours can collide).
//
// CSV (MiniMalloc's format): header `id,lower,upper,size[,alignment]` in any column order,
// extra columns ignored; solutions add an `offset` column. Errors name the line.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace stitchalloc::plan {

struct Buffer {
  std::string id;
  std::int64_t lower = 0;  // first instant live
  std::int64_t upper = 0;  // first instant no longer live (> lower)
  std::int64_t size = 0;   // bytes, > 0
  std::int64_t alignment = 1;
};

struct Problem {
  std::vector<Buffer> buffers;
  bool has_alignment_column = false;  // echoed when the solution is written back
};

// InvalidArgument naming the first bad buffer: empty or negative lifetime, size <= 0,
// alignment <= 0, or offsets that could overflow.
absl::Status CheckProblem(const Problem& problem);

// The maximum live load (alignment ignored): a lower bound on every solution's peak.
std::int64_t LowerBound(const Problem& problem);

// max(offset + size) over all buffers (0 for an empty problem).
std::int64_t Peak(const Problem& problem, absl::Span<const std::int64_t> offsets);

// OK when `offsets` is a valid solution (one offset per buffer, >= 0, aligned, no two live
// buffers overlapping, peak <= capacity if given); otherwise InvalidArgument naming the pair or
// the buffer at fault.
absl::Status CheckSolution(const Problem& problem, absl::Span<const std::int64_t> offsets,
                           std::optional<std::int64_t> capacity = std::nullopt);

// Parses MiniMalloc CSV text; `source` names it in errors ("file.csv:12: ...").
absl::StatusOr<Problem> ParseCsv(absl::string_view text, absl::string_view source = "input");
absl::StatusOr<Problem> ReadCsv(const std::string& path);
// The problem's rows in input order with an offset column appended.
std::string FormatCsv(const Problem& problem, absl::Span<const std::int64_t> offsets);
absl::Status WriteCsv(const std::string& path, const Problem& problem,
                      absl::Span<const std::int64_t> offsets);

}  // namespace stitchalloc::plan
