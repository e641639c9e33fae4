// stitchalloc-replay: replays allocator traces against allocator policies and reports, per
// trace and policy, peak allocated and reserved bytes, their ratio, OOMs, retries, stitches,
// map/unmap calls and events per second.
//
//   stitchalloc-replay [flags] TRACE...      TRACE: a trace file (.gz or not), or gen:<name>
//                                            for a built-in generated trace (gen:all: every one)
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "bench/replay/replay.h"
#include "bench/trace/generators.h"
#include "bench/trace/trace.h"
#include "vmm/format.h"

ABSL_FLAG(std::string, policy, "stitchalloc",
          "comma-separated policies: stitchalloc, stitchalloc-nostitch, native, expandable");
ABSL_FLAG(bool, compare, false, "run every policy (overrides --policy)");
ABSL_FLAG(std::string, json, "", "write the results as JSON to this file");
ABSL_FLAG(std::string, timeline, "", "write allocated/reserved over time as CSV to this file");
ABSL_FLAG(std::string, timeline_trace, "", "only this trace's timeline (default: every trace)");
ABSL_FLAG(int, timeline_points, 1500, "points per timeline");
ABSL_FLAG(double, device_memory_gb, 80, "capacity of the replayed device, GiB");
ABSL_FLAG(std::string, stitchalloc_config, "", "extra stitchalloc configuration (key:value,...)");
ABSL_FLAG(std::string, torch_config, "",
          "settings of the torch models: max_split_size_mb:N,garbage_collection_threshold:F,memory_fraction:F");
ABSL_FLAG(std::string, driver, "host", "driver of the stitchalloc policies: host or cuda");
ABSL_FLAG(bool, host_backing, false,
          "host driver: put real memory (a memfd, one mmap per run of chunks) behind the stitchalloc policies' "
          "chunks; off, the driver keeps all its bookkeeping and checks but maps nothing (replays never touch "
          "bytes), so events/s measures the allocator rather than the kernel's mmap");
ABSL_FLAG(int, repeat, 1,
          "replay each trace on each policy this many times (1-100): the figures must be identical every time "
          "(the replay is deterministic) and events/s is the median run's");
ABSL_FLAG(std::string, write_traces, "", "write every generated trace to this directory (as NAME.trace.gz)");
ABSL_FLAG(std::uint64_t, seed, 1, "seed of the generated traces");
ABSL_FLAG(int, gen_steps, 0, "training steps of the generated traces (0: each trace's default)");
ABSL_FLAG(bool, check, false, "check the allocator's invariants after each replay");
ABSL_FLAG(bool, check_every_event, false, "check the allocator's invariants after every event (slow)");
ABSL_FLAG(bool, explain_peak, false,
          "after each replay, say where the policy's reserved bytes sit at its peak (replays twice)");
ABSL_FLAG(bool, validate_segments, false,
          "compare the native model's segment allocations with the trace's segment_alloc events");

namespace stitchalloc::bench {
namespace {

absl::Status ParseTorchConfig(absl::string_view text, TorchModelOptions& o) {
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(item, absl::MaxSplits(':', 1));
    double v = 0;
    if (!absl::SimpleAtod(kv.second, &v) || v < 0) {
      return absl::InvalidArgumentError(absl::StrCat("--torch_config: \"", item, "\": value is not a non-negative number"));
    }
    if (kv.first == "max_split_size_mb") {
      o.max_split_size = static_cast<std::size_t>(v) << 20;
    } else if (kv.first == "garbage_collection_threshold") {
      if (v <= 0 || v >= 1) return absl::InvalidArgumentError("--torch_config: garbage_collection_threshold must be in (0, 1)");
      o.garbage_collection_threshold = v;
    } else if (kv.first == "memory_fraction") {
      if (v <= 0 || v > 1) return absl::InvalidArgumentError("--torch_config: memory_fraction must be in (0, 1]");
      o.memory_fraction = v;
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "--torch_config: unknown key \"", kv.first,
          "\"; known: max_split_size_mb, garbage_collection_threshold, memory_fraction"));
    }
  }
  return absl::OkStatus();
}

std::string JsonString(absl::string_view s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      absl::StrAppendFormat(&out, "\\u%04x", c);
      continue;
    }
    out += c;
  }
  return out + "\"";
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "stitchalloc-replay: %s\n", std::string(s.message()).c_str());
  return absl::IsInvalidArgument(s) || absl::IsNotFound(s) ? 2 : 1;
}

int Run(const std::vector<char*>& args) {
  std::vector<PolicySpec> policies;
  if (absl::GetFlag(FLAGS_compare)) {
    policies = AllPolicies();
  } else {
    for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_policy), ',', absl::SkipEmpty())) {
      absl::StatusOr<PolicySpec> p = ParsePolicy(name);
      if (!p.ok()) return Fail(p.status());
      policies.push_back(*p);
    }
  }
  if (policies.empty()) return Fail(absl::InvalidArgumentError("no policy given"));
  ReplayOptions options;
  const double gb = absl::GetFlag(FLAGS_device_memory_gb);
  if (!(gb >= 1 && gb <= 4096)) return Fail(absl::InvalidArgumentError("--device_memory_gb must be in [1, 4096]"));
  options.device_memory = static_cast<std::size_t>(gb * 1024) << 20;
  options.stitchalloc_config = absl::GetFlag(FLAGS_stitchalloc_config);
  if (absl::Status s = ParseTorchConfig(absl::GetFlag(FLAGS_torch_config), options.torch); !s.ok()) return Fail(s);
  const std::string driver = absl::GetFlag(FLAGS_driver);
  if (driver != "host" && driver != "cuda") return Fail(absl::InvalidArgumentError("--driver must be host or cuda"));
  options.cuda_driver = driver == "cuda";
  options.host_backing = absl::GetFlag(FLAGS_host_backing);
  const int repeat = absl::GetFlag(FLAGS_repeat);
  if (repeat < 1 || repeat > 100) return Fail(absl::InvalidArgumentError("--repeat must be in [1, 100]"));
  options.check_invariants = absl::GetFlag(FLAGS_check) || absl::GetFlag(FLAGS_check_every_event);
  options.check_every_event = absl::GetFlag(FLAGS_check_every_event);

  std::vector<std::string> inputs;
  for (std::size_t i = 1; i < args.size(); ++i) {
    if (std::string(args[i]) == "gen:all") {
      for (const std::string& n : GeneratedTraceNames()) inputs.push_back("gen:" + n);
    } else {
      inputs.emplace_back(args[i]);
    }
  }
  if (inputs.empty()) {
    return Fail(absl::InvalidArgumentError("no trace given (a file, gen:<name> or gen:all); see --help"));
  }

  std::vector<std::vector<ReplayResult>> results;
  std::vector<Trace> traces;
  std::printf("%-36s %-21s %12s %12s %9s %5s %7s %8s %8s %8s %12s\n", "trace", "policy", "peak alloc",
              "peak reserv", "reserved/", "OOMs", "retries", "stitches", "maps", "unmaps", "events/s");
  std::printf("%-36s %-21s %12s %12s %9s\n", "", "", "", "", "allocated");
  for (const std::string& input : inputs) {
    absl::StatusOr<Trace> trace = absl::StartsWith(input, "gen:")
                                      ? GenerateNamed(absl::StripPrefix(input, "gen:"), absl::GetFlag(FLAGS_seed), absl::GetFlag(FLAGS_gen_steps))
                                      : ReadTrace(input);
    if (!trace.ok()) return Fail(trace.status());
    if (absl::StartsWith(input, "gen:") && !absl::GetFlag(FLAGS_write_traces).empty()) {
      const std::string path = absl::StrCat(absl::GetFlag(FLAGS_write_traces), "/", trace->name, ".trace.gz");
      if (absl::Status s = WriteTrace(*trace, path); !s.ok()) return Fail(s);
    }
    const bool timeline = !absl::GetFlag(FLAGS_timeline).empty() &&
                          (absl::GetFlag(FLAGS_timeline_trace).empty() || absl::GetFlag(FLAGS_timeline_trace) == trace->name);
    ReplayOptions o = options;
    o.timeline_points = timeline ? static_cast<std::size_t>(std::max(1, absl::GetFlag(FLAGS_timeline_points))) : 0;
    std::vector<ReplayResult> per_trace;
    for (const PolicySpec& policy : policies) {
      absl::StatusOr<ReplayResult> r = Replay(*trace, policy, o);
      if (!r.ok()) return Fail(r.status());
      if (!r->check_status.ok()) return Fail(r->check_status);
      if (repeat > 1) {
        std::vector<double> seconds = {r->seconds};
        ReplayOptions again = o;
        again.timeline_points = 0;
        again.check_invariants = false;
        for (int k = 1; k < repeat; ++k) {
          absl::StatusOr<ReplayResult> r2 = Replay(*trace, policy, again);
          if (!r2.ok()) return Fail(r2.status());
          if (r2->peak_reserved != r->peak_reserved || r2->peak_allocated != r->peak_allocated ||
              r2->ooms != r->ooms || r2->map_calls != r->map_calls) {
            return Fail(absl::InternalError(absl::StrFormat(
                "replay of %s on %s is not repeatable: run %d reserved %d (allocated %d, %d OOMs, %d maps), "
                "run 1 reserved %d (allocated %d, %d OOMs, %d maps)",
                trace->name, policy.name, k + 1, r2->peak_reserved, r2->peak_allocated, r2->ooms, r2->map_calls,
                r->peak_reserved, r->peak_allocated, r->ooms, r->map_calls)));
          }
          seconds.push_back(r2->seconds);
        }
        std::nth_element(seconds.begin(), seconds.begin() + seconds.size() / 2, seconds.end());
        r->seconds = seconds[seconds.size() / 2];
      }
      std::printf("%-36s %-21s %12s %12s %9.3f %5lld %7lld %8lld %8lld %8lld %12.0f\n", trace->name.c_str(),
                  policy.name.c_str(), FormatBytes(r->peak_allocated).c_str(), FormatBytes(r->peak_reserved).c_str(),
                  r->ratio(), static_cast<long long>(r->ooms), static_cast<long long>(r->retries),
                  static_cast<long long>(r->stitches), static_cast<long long>(r->map_calls),
                  static_cast<long long>(r->unmap_calls), r->events_per_second());
      if (absl::GetFlag(FLAGS_explain_peak)) {
        absl::StatusOr<MemoryBreakdown> m = ExplainPeak(*trace, policy, o);
        if (!m.ok()) return Fail(m.status());
        std::printf("  peak at event %zu: %s reserved = %s requested + %s rounding + free: %s small pool, %s whole "
                    "chunks, %s pieces of partly used chunks (%lld segments)\n",
                    m->event, FormatBytes(m->reserved).c_str(), FormatBytes(m->requested).c_str(),
                    FormatBytes(m->rounding).c_str(), FormatBytes(m->free_small).c_str(),
                    FormatBytes(m->free_chunks).c_str(), FormatBytes(m->free_pieces).c_str(),
                    static_cast<long long>(m->segments));
      }
      std::fflush(stdout);
      if (absl::GetFlag(FLAGS_validate_segments) && policy.kind == PolicyKind::kNative) {
        std::vector<std::size_t> recorded;
        for (const TraceEvent& e : trace->events) {
          if (e.op == TraceOp::kSegmentAlloc) recorded.push_back(e.size);
        }
        std::size_t match = 0;
        while (match < recorded.size() && match < r->segment_log.size() && recorded[match] == r->segment_log[match]) ++match;
        std::printf("  segment check: %zu recorded segment allocations, %zu by the model, first %zu identical%s\n",
                    recorded.size(), r->segment_log.size(), match,
                    match == recorded.size() && match == r->segment_log.size() ? " (all match)" : "");
      }
      per_trace.push_back(*std::move(r));
    }
    if (const std::string reported = trace->Meta("reported_reserved_bytes"); !reported.empty()) {
      std::int64_t bytes = 0;
      if (absl::SimpleAtoi(reported, &bytes)) {
        std::printf("  (the snapshot itself reports %s reserved at its end)\n", FormatBytes(bytes).c_str());
      }
    }
    results.push_back(std::move(per_trace));
    traces.push_back(*std::move(trace));
  }

  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    std::ofstream out(path);
    if (!out) return Fail(absl::PermissionDeniedError(absl::StrCat("cannot create ", path)));
    out << "{\"device_memory_bytes\":" << options.device_memory << ",\"driver\":" << JsonString(driver)
        << ",\"host_backing\":" << (options.host_backing ? "true" : "false") << ",\"repeat\":" << repeat
        << ",\"traces\":[";
    for (std::size_t t = 0; t < results.size(); ++t) {
      const TraceSummary sum = Summarize(traces[t]);
      out << (t ? "," : "") << "\n {\"trace\":" << JsonString(traces[t].name) << ",\"events\":" << sum.events
          << ",\"allocs\":" << sum.allocs << ",\"live_at_end\":" << sum.live_at_end;
      if (const std::string rep = traces[t].Meta("reported_reserved_bytes"); !rep.empty()) {
        out << ",\"reported_reserved_bytes\":" << rep;
      }
      out << ",\"policies\":[";
      for (std::size_t p = 0; p < results[t].size(); ++p) {
        const ReplayResult& r = results[t][p];
        out << (p ? "," : "") << "\n  {\"policy\":" << JsonString(r.policy)
            << ",\"peak_allocated_bytes\":" << r.peak_allocated << ",\"peak_reserved_bytes\":" << r.peak_reserved
            << absl::StrFormat(",\"ratio\":%.6f", r.ratio()) << ",\"ooms\":" << r.ooms << ",\"retries\":" << r.retries
            << ",\"stitches\":" << r.stitches << ",\"map_calls\":" << r.map_calls
            << ",\"unmap_calls\":" << r.unmap_calls << ",\"segment_allocs\":" << r.segment_allocs
            << ",\"policy_peak_allocated_bytes\":" << r.policy_peak_allocated << ",\"events\":" << r.events
            << absl::StrFormat(",\"seconds\":%.6f,\"events_per_second\":%.0f}", r.seconds, r.events_per_second());
      }
      out << "]}";
    }
    out << "\n]}\n";
    if (!out) return Fail(absl::DataLossError(absl::StrCat("writing ", path, " failed")));
  }
  if (const std::string path = absl::GetFlag(FLAGS_timeline); !path.empty()) {
    std::ofstream out(path);
    if (!out) return Fail(absl::PermissionDeniedError(absl::StrCat("cannot create ", path)));
    out << "trace,policy,event,allocated_bytes,reserved_bytes\n";
    for (const auto& per_trace : results) {
      for (const ReplayResult& r : per_trace) {
        for (const TimelinePoint& pt : r.timeline) {
          out << r.trace << "," << r.policy << "," << pt.event << "," << pt.allocated << "," << pt.reserved << "\n";
        }
      }
    }
  }
  return 0;
}

}  // namespace
}  // namespace stitchalloc::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "replays allocator traces against allocator policies.\n"
      "usage: stitchalloc-replay [--compare | --policy=P,...] [--json FILE] TRACE...\n"
      "TRACE: a stitchalloc trace file (docs/trace-format.md), gen:<name> or gen:all\n"
      "generated: llama-varlen llama-varlen-ckpt lora-varlen growing-batch adversarial");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  return stitchalloc::bench::Run(args);
}
