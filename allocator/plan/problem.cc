// Offset-assignment problems: input checks, lower bound, the independent solution validator,
// and MiniMalloc CSV reading and writing.
#include "allocator/plan/problem.h"

#include <algorithm>
#include <fstream>
#include <limits>
#include <sstream>
#include <utility>

#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace stitchalloc::plan {
namespace {

constexpr std::int64_t kMaxValue = std::int64_t{1} << 60;  // sums of sizes cannot overflow

// (time, is_start, buffer): ends sort before starts at the same instant (half-open lifetimes).
struct Point {
  std::int64_t time;
  bool start;
  std::size_t index;
  bool operator<(const Point& o) const {
    if (time != o.time) return time < o.time;
    if (start != o.start) return !start;
    return index < o.index;
  }
};

std::vector<Point> Points(const Problem& p) {
  std::vector<Point> points;
  points.reserve(2 * p.buffers.size());
  for (std::size_t i = 0; i < p.buffers.size(); ++i) {
    points.push_back({p.buffers[i].lower, true, i});
    points.push_back({p.buffers[i].upper, false, i});
  }
  std::sort(points.begin(), points.end());
  return points;
}

std::string Name(const Problem& p, std::size_t i) {
  return absl::StrCat("buffer ", p.buffers[i].id.empty() ? absl::StrCat("#", i) : p.buffers[i].id);
}

}  // namespace

absl::Status CheckProblem(const Problem& problem) {
  for (std::size_t i = 0; i < problem.buffers.size(); ++i) {
    const Buffer& b = problem.buffers[i];
    if (b.lower < 0) return absl::InvalidArgumentError(absl::StrCat(Name(problem, i), ": negative lower ", b.lower));
    if (b.upper <= b.lower) {
      return absl::InvalidArgumentError(
          absl::StrCat(Name(problem, i), ": empty lifetime [", b.lower, ", ", b.upper, ")"));
    }
    if (b.size <= 0 || b.size > kMaxValue) {
      return absl::InvalidArgumentError(absl::StrCat(Name(problem, i), ": size ", b.size, " is not in (0, 2^60]"));
    }
    if (b.alignment <= 0 || b.alignment > kMaxValue) {
      return absl::InvalidArgumentError(absl::StrCat(Name(problem, i), ": alignment ", b.alignment, " is not positive"));
    }
  }
  if (LowerBound(problem) > kMaxValue) return absl::InvalidArgumentError("the live load exceeds 2^60 bytes");
  return absl::OkStatus();
}

std::int64_t LowerBound(const Problem& problem) {
  std::int64_t live = 0, best = 0;
  for (const Point& pt : Points(problem)) {
    const std::int64_t s = std::min(problem.buffers[pt.index].size, kMaxValue);
    live += pt.start ? s : -s;
    best = std::max(best, live);
  }
  return best;
}

std::int64_t Peak(const Problem& problem, absl::Span<const std::int64_t> offsets) {
  std::int64_t peak = 0;
  for (std::size_t i = 0; i < problem.buffers.size() && i < offsets.size(); ++i) {
    peak = std::max(peak, offsets[i] + problem.buffers[i].size);
  }
  return peak;
}

absl::Status CheckSolution(const Problem& problem, absl::Span<const std::int64_t> offsets,
                           std::optional<std::int64_t> capacity) {
  if (offsets.size() != problem.buffers.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(offsets.size(), " offsets for ", problem.buffers.size(), " buffers"));
  }
  for (std::size_t i = 0; i < offsets.size(); ++i) {
    const Buffer& b = problem.buffers[i];
    if (offsets[i] < 0 || offsets[i] > kMaxValue) {
      return absl::InvalidArgumentError(absl::StrCat(Name(problem, i), ": offset ", offsets[i], " out of range"));
    }
    if (offsets[i] % b.alignment != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(Name(problem, i), ": offset ", offsets[i], " is not a multiple of ", b.alignment));
    }
    if (capacity && offsets[i] + b.size > *capacity) {
      return absl::InvalidArgumentError(absl::StrCat(Name(problem, i), ": ends at ", offsets[i] + b.size,
                                                     ", beyond the capacity ", *capacity));
    }
  }
  // Live buffers keyed by offset: they are pairwise disjoint, so a new one can only collide
  // with its neighbours in offset order.
  absl::btree_map<std::int64_t, std::size_t> live;
  for (const Point& pt : Points(problem)) {
    const std::int64_t off = offsets[pt.index];
    if (!pt.start) {
      live.erase(off);
      continue;
    }
    auto next = live.lower_bound(off);
    if (next != live.end() && next->first < off + problem.buffers[pt.index].size) {
      return absl::InvalidArgumentError(absl::StrCat(Name(problem, pt.index), " [", off, ", ",
                                                     off + problem.buffers[pt.index].size, ") overlaps ",
                                                     Name(problem, next->second), " at ", next->first,
                                                     " while both are live at ", pt.time));
    }
    if (next != live.begin()) {
      auto prev = std::prev(next);
      if (prev->first + problem.buffers[prev->second].size > off) {
        return absl::InvalidArgumentError(absl::StrCat(Name(problem, pt.index), " at ", off, " overlaps ",
                                                       Name(problem, prev->second), " [", prev->first, ", ",
                                                       prev->first + problem.buffers[prev->second].size,
                                                       ") while both are live at ", pt.time));
      }
    }
    live.emplace(off, pt.index);
  }
  return absl::OkStatus();
}

absl::StatusOr<Problem> ParseCsv(absl::string_view text, absl::string_view source) {
  Problem problem;
  std::vector<absl::string_view> lines = absl::StrSplit(text, '\n');
  std::size_t line_no = 0;
  absl::flat_hash_map<std::string, int> column;
  std::size_t width = 0;
  auto error = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(source, ":", line_no, ": ", what));
  };
  for (absl::string_view raw : lines) {
    ++line_no;
    absl::string_view line = absl::StripAsciiWhitespace(raw);
    if (line.empty() || line.front() == '#') continue;
    std::vector<absl::string_view> fields = absl::StrSplit(line, ',');
    for (auto& f : fields) f = absl::StripAsciiWhitespace(f);
    if (column.empty()) {
      for (std::size_t c = 0; c < fields.size(); ++c) column[absl::AsciiStrToLower(fields[c])] = static_cast<int>(c);
      for (const char* need : {"id", "lower", "upper", "size"}) {
        if (!column.contains(need)) {
          return error(absl::StrCat("header lacks the column '", need,
                                    "' (expected id,lower,upper,size[,alignment])"));
        }
      }
      problem.has_alignment_column = column.contains("alignment");
      width = fields.size();
      continue;
    }
    if (fields.size() != width) {
      return error(absl::StrCat(fields.size(), " fields, the header has ", width));
    }
    Buffer b;
    b.id = std::string(fields[column["id"]]);
    if (b.id.empty()) return error("empty id");
    auto number = [&](const char* name, std::int64_t* out) -> absl::Status {
      absl::string_view f = fields[column[name]];
      if (!absl::SimpleAtoi(f, out)) return error(absl::StrCat(name, " '", f, "' is not an integer"));
      return absl::OkStatus();
    };
    for (auto [name, out] : {std::pair{"lower", &b.lower}, {"upper", &b.upper}, {"size", &b.size}}) {
      if (absl::Status s = number(name, out); !s.ok()) return s;
    }
    if (problem.has_alignment_column) {
      if (absl::Status s = number("alignment", &b.alignment); !s.ok()) return s;
    }
    if (b.lower < 0) return error(absl::StrCat("negative lower ", b.lower));
    if (b.upper <= b.lower) return error(absl::StrCat("empty lifetime [", b.lower, ", ", b.upper, ")"));
    if (b.size <= 0 || b.size > kMaxValue) return error(absl::StrCat("size ", b.size, " is not in (0, 2^60]"));
    if (b.alignment <= 0 || b.alignment > kMaxValue) return error(absl::StrCat("alignment ", b.alignment, " is not positive"));
    problem.buffers.push_back(std::move(b));
  }
  if (column.empty()) return absl::InvalidArgumentError(absl::StrCat(source, ": no header line"));
  if (absl::Status s = CheckProblem(problem); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", s.message()));
  }
  return problem;
}

absl::StatusOr<Problem> ReadCsv(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseCsv(ss.str(), path);
}

std::string FormatCsv(const Problem& problem, absl::Span<const std::int64_t> offsets) {
  std::string out = problem.has_alignment_column ? "id,lower,upper,size,alignment,offset\n"
                                                 : "id,lower,upper,size,offset\n";
  for (std::size_t i = 0; i < problem.buffers.size(); ++i) {
    const Buffer& b = problem.buffers[i];
    absl::StrAppend(&out, b.id, ",", b.lower, ",", b.upper, ",", b.size);
    if (problem.has_alignment_column) absl::StrAppend(&out, ",", b.alignment);
    absl::StrAppend(&out, ",", i < offsets.size() ? offsets[i] : -1, "\n");
  }
  return out;
}

absl::Status WriteCsv(const std::string& path, const Problem& problem, absl::Span<const std::int64_t> offsets) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot write"));
  out << FormatCsv(problem, offsets);
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

}  // namespace stitchalloc::plan
