#include "bench/trace/trace.h"

#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <memory>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "allocator/policy.h"

namespace stitchalloc::bench {
namespace {

constexpr absl::string_view kFormatLine = "# stitchalloc-trace v1";
constexpr absl::string_view kHeader = "action,id,size,stream,time_us,label";

struct OpName {
  TraceOp op;
  absl::string_view name;
};
constexpr OpName kOps[] = {
    {TraceOp::kAlloc, "alloc"},           {TraceOp::kFree, "free"},
    {TraceOp::kLayerBegin, "layer_begin"}, {TraceOp::kLayerEnd, "layer_end"},
    {TraceOp::kStep, "step"},             {TraceOp::kSegmentAlloc, "segment_alloc"},
    {TraceOp::kSegmentFree, "segment_free"},
};

bool ParseOp(absl::string_view s, TraceOp* op) {
  for (const OpName& o : kOps) {
    if (o.name == s) {
      *op = o.op;
      return true;
    }
  }
  return false;
}

}  // namespace

absl::string_view TraceOpName(TraceOp op) {
  for (const OpName& o : kOps) {
    if (o.op == op) return o.name;
  }
  return "?";
}

void Trace::Alloc(std::uint64_t id, std::uint64_t size, std::uint64_t stream, std::int64_t time_us) {
  events.push_back(TraceEvent{TraceOp::kAlloc, 0, id, size, stream, time_us});
}

void Trace::Free(std::uint64_t id, std::uint64_t size, std::uint64_t stream, std::int64_t time_us) {
  events.push_back(TraceEvent{TraceOp::kFree, 0, id, size, stream, time_us});
}

void Trace::Mark(TraceOp op, std::uint64_t id, absl::string_view label, std::int64_t time_us) {
  events.push_back(TraceEvent{op, Label(label), id, 0, 0, time_us});
}

std::uint32_t Trace::Label(absl::string_view label) {
  for (std::size_t i = 0; i < labels.size(); ++i) {
    if (labels[i] == label) return static_cast<std::uint32_t>(i);
  }
  labels.emplace_back(label);
  return static_cast<std::uint32_t>(labels.size() - 1);
}

std::string Trace::Meta(absl::string_view key) const {
  for (const auto& [k, v] : meta) {
    if (k == key) return v;
  }
  return "";
}

absl::Status Validate(const Trace& trace) {
  absl::flat_hash_map<std::uint64_t, std::uint64_t> live;  // id -> size
  absl::flat_hash_set<std::uint64_t> seen;
  std::vector<std::pair<std::uint64_t, std::uint32_t>> layers;
  for (std::size_t i = 0; i < trace.events.size(); ++i) {
    const TraceEvent& e = trace.events[i];
    if (e.label >= trace.labels.size()) {
      return absl::InvalidArgumentError(absl::StrFormat("trace %s, event %d: label index out of range", trace.name, i));
    }
    switch (e.op) {
      case TraceOp::kAlloc:
        if (e.size == 0) {
          return absl::InvalidArgumentError(
              absl::StrFormat("trace %s, event %d: alloc of block %d has size 0", trace.name, i, e.id));
        }
        if (!seen.insert(e.id).second) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "trace %s, event %d: block id %d allocated twice (ids are never reused)", trace.name, i, e.id));
        }
        live.emplace(e.id, e.size);
        break;
      case TraceOp::kFree: {
        auto it = live.find(e.id);
        if (it == live.end()) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "trace %s, event %d: free of block %d, which is not live", trace.name, i, e.id));
        }
        if (e.size != 0 && e.size != it->second) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "trace %s, event %d: free of block %d with size %d, allocated with size %d", trace.name, i, e.id,
              e.size, it->second));
        }
        live.erase(it);
        break;
      }
      case TraceOp::kLayerBegin:
        layers.emplace_back(e.id, e.label);
        break;
      case TraceOp::kLayerEnd:
        if (layers.empty() || layers.back() != std::make_pair(e.id, e.label)) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "trace %s, event %d: layer_end %d %s does not close the innermost layer_begin", trace.name, i, e.id,
              trace.labels[e.label]));
        }
        layers.pop_back();
        break;
      case TraceOp::kStep:
      case TraceOp::kSegmentAlloc:
      case TraceOp::kSegmentFree:
        break;
    }
  }
  return absl::OkStatus();
}

TraceSummary Summarize(const Trace& trace) {
  TraceSummary s;
  s.events = trace.events.size();
  absl::flat_hash_map<std::uint64_t, std::uint64_t> live;
  absl::flat_hash_set<std::uint64_t> streams;
  std::uint64_t requested = 0, rounded = 0;
  for (const TraceEvent& e : trace.events) {
    if (e.op == TraceOp::kAlloc) {
      ++s.allocs;
      streams.insert(e.stream);
      live[e.id] = e.size;
      requested += e.size;
      rounded += Policy::RoundSize(e.size);
      s.peak_requested_bytes = std::max(s.peak_requested_bytes, requested);
      s.peak_rounded_bytes = std::max(s.peak_rounded_bytes, rounded);
      s.largest_request = std::max(s.largest_request, e.size);
    } else if (e.op == TraceOp::kFree) {
      auto it = live.find(e.id);
      if (it == live.end()) continue;
      ++s.frees;
      requested -= it->second;
      rounded -= Policy::RoundSize(it->second);
      live.erase(it);
    } else if (e.op == TraceOp::kSegmentAlloc) {
      ++s.segment_allocs;
    }
  }
  s.live_at_end = live.size();
  s.streams = streams.size();
  return s;
}

absl::StatusOr<Trace> ParseTrace(absl::string_view text, absl::string_view name) {
  Trace trace;
  trace.name = std::string(name);
  std::size_t line_no = 0;
  bool format_seen = false, header_seen = false;
  auto error = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrFormat("trace %s, line %d: %s", trace.name, line_no, what));
  };
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripSuffix(line, "\r");
    if (line.empty()) continue;
    if (!format_seen) {
      if (line != kFormatLine) return error(absl::StrCat("not a stitchalloc trace: the first line must be \"", kFormatLine, "\""));
      format_seen = true;
      continue;
    }
    if (line[0] == '#') {
      absl::string_view body = absl::StripAsciiWhitespace(line.substr(1));
      std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(body, absl::MaxSplits(':', 1));
      const std::string key(absl::StripAsciiWhitespace(kv.first));
      const std::string value(absl::StripAsciiWhitespace(kv.second));
      if (key == "name") trace.name = value;
      else if (!key.empty()) trace.meta.emplace_back(key, value);
      continue;
    }
    if (!header_seen) {
      if (line != kHeader) return error(absl::StrCat("expected the header \"", kHeader, "\""));
      header_seen = true;
      continue;
    }
    // action,id,size,stream,time_us,label  (label may contain no comma)
    absl::string_view f[6];
    int n = 0;
    for (absl::string_view part : absl::StrSplit(line, ',')) {
      if (n == 6) return error("more than 6 fields");
      f[n++] = part;
    }
    if (n < 5) return error(absl::StrFormat("%d fields, expected 5 or 6 (%s)", n, kHeader));
    TraceEvent e;
    if (!ParseOp(f[0], &e.op)) return error(absl::StrCat("unknown action \"", f[0], "\""));
    if (!absl::SimpleAtoi(f[1], &e.id)) return error(absl::StrCat("id \"", f[1], "\" is not a non-negative integer"));
    if (!absl::SimpleAtoi(f[2], &e.size)) return error(absl::StrCat("size \"", f[2], "\" is not a non-negative integer"));
    if (!absl::SimpleAtoi(f[3], &e.stream)) return error(absl::StrCat("stream \"", f[3], "\" is not a non-negative integer"));
    if (!absl::SimpleAtoi(f[4], &e.time_us)) return error(absl::StrCat("time_us \"", f[4], "\" is not an integer"));
    if (n == 6 && !f[5].empty()) e.label = trace.Label(f[5]);
    if ((e.op == TraceOp::kLayerBegin || e.op == TraceOp::kLayerEnd) && e.label == 0) {
      return error("layer marks need a label \"<kind>:<phase>\"");
    }
    trace.events.push_back(e);
  }
  if (!format_seen) return absl::InvalidArgumentError(absl::StrFormat("trace %s: empty file", trace.name));
  if (!header_seen) return absl::InvalidArgumentError(absl::StrFormat("trace %s: no header line \"%s\"", trace.name, kHeader));
  return trace;
}

absl::StatusOr<Trace> ReadTrace(const std::string& path) {
  // gzread reads plain files unchanged, so one path serves both.
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) return absl::NotFoundError(absl::StrCat("cannot open trace file ", path));
  std::string text;
  char buf[1 << 16];
  for (;;) {
    const int n = gzread(f, buf, sizeof buf);
    if (n < 0) {
      int errnum = 0;
      std::string msg = gzerror(f, &errnum);
      gzclose(f);
      return absl::DataLossError(absl::StrCat("trace file ", path, ": ", msg));
    }
    if (n == 0) break;
    text.append(buf, static_cast<std::size_t>(n));
  }
  gzclose(f);
  std::string name = path.substr(path.find_last_of('/') + 1);
  for (absl::string_view ext : {".gz", ".trace", ".csv"}) {
    if (absl::EndsWith(name, ext)) name.resize(name.size() - ext.size());
  }
  absl::StatusOr<Trace> trace = ParseTrace(text, name);
  if (!trace.ok()) return trace.status();
  if (absl::Status s = Validate(*trace); !s.ok()) return s;
  return trace;
}

std::string FormatTrace(const Trace& trace) {
  std::string out;
  out.reserve(trace.events.size() * 40 + 256);
  absl::StrAppend(&out, kFormatLine, "\n");
  if (!trace.name.empty()) absl::StrAppend(&out, "# name: ", trace.name, "\n");
  for (const auto& [k, v] : trace.meta) absl::StrAppend(&out, "# ", k, ": ", v, "\n");
  absl::StrAppend(&out, kHeader, "\n");
  for (const TraceEvent& e : trace.events) {
    absl::StrAppend(&out, TraceOpName(e.op), ",", e.id, ",", e.size, ",", e.stream, ",", e.time_us, ",",
                    trace.labels[e.label], "\n");
  }
  return out;
}

absl::Status WriteTrace(const Trace& trace, const std::string& path) {
  const std::string text = FormatTrace(trace);
  if (absl::EndsWith(path, ".gz")) {
    gzFile f = gzopen(path.c_str(), "wb6");
    if (f == nullptr) return absl::PermissionDeniedError(absl::StrCat("cannot create ", path));
    bool ok = true;
    for (std::size_t at = 0; ok && at < text.size();) {  // gzwrite takes an unsigned length
      const unsigned n = static_cast<unsigned>(std::min<std::size_t>(text.size() - at, 1u << 24));
      ok = gzwrite(f, text.data() + at, n) == static_cast<int>(n);
      at += n;
    }
    if (gzclose(f) != Z_OK || !ok) return absl::DataLossError(absl::StrCat("writing ", path, " failed"));
    return absl::OkStatus();
  }
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "wb"), &std::fclose);
  if (!f) return absl::PermissionDeniedError(absl::StrCat("cannot create ", path));
  if (std::fwrite(text.data(), 1, text.size(), f.get()) != text.size()) {
    return absl::DataLossError(absl::StrCat("writing ", path, " failed"));
  }
  return absl::OkStatus();
}

}  // namespace stitchalloc::bench
