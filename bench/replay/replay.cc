#include "bench/replay/replay.h"

#include <chrono>
#include <cstdio>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/policy.h"

namespace stitchalloc::bench {
namespace {

class StitchallocReplay final : public ReplayAllocator {
 public:
  explicit StitchallocReplay(std::unique_ptr<CachingAllocator> alloc) : alloc_(std::move(alloc)) {}
  ~StitchallocReplay() override {
    for (const auto& [trace_stream, stream] : streams_) {
      if (stream != kDefaultStream) (void)alloc_->driver().DestroyStream(stream);
    }
  }

  absl::StatusOr<std::uint64_t> Malloc(std::size_t size, std::uint64_t trace_stream) override {
    Stream stream = kDefaultStream;
    if (trace_stream != 0) {
      auto it = streams_.find(trace_stream);
      if (it == streams_.end()) {
        absl::StatusOr<Stream> s = alloc_->driver().CreateStream();
        if (!s.ok()) return s.status();
        it = streams_.emplace(trace_stream, *s).first;
      }
      stream = it->second;
    }
    absl::StatusOr<void*> p = alloc_->Malloc(size, stream);
    if (!p.ok()) return p.status();
    return reinterpret_cast<std::uint64_t>(*p);
  }
  absl::Status Free(std::uint64_t handle) override { return alloc_->Free(reinterpret_cast<void*>(handle)); }
  std::int64_t Reserved() const override { return alloc_->GetStats().reserved_bytes.pools[kPoolAll].current; }
  void Report(ReplayResult& r) const override {
    const Stats s = alloc_->GetStats();
    r.peak_reserved = s.reserved_bytes.pools[kPoolAll].peak;
    r.policy_peak_allocated = s.allocated_bytes.pools[kPoolAll].peak;
    r.ooms = s.num_ooms;
    r.retries = s.num_alloc_retries;
    r.stitches = s.num_stitches;
    r.map_calls = s.num_map_calls;
    r.unmap_calls = s.num_unmap_calls;
    r.segment_allocs = s.num_device_alloc;
  }
  absl::Status CheckInvariants() const override { return alloc_->CheckInvariants(); }
  MemoryBreakdown Breakdown() const override {
    MemoryBreakdown m;
    m.reserved = alloc_->GetStats().reserved_bytes.pools[kPoolAll].current;
    const std::size_t chunk = alloc_->chunk_size();
    for (const SegmentInfo& seg : alloc_->Snapshot()) {
      ++m.segments;
      for (const SegmentInfo::BlockSummary& b : seg.blocks) {
        const auto size = static_cast<std::int64_t>(b.size);
        if (b.state == BlockState::kAllocated || b.state == BlockState::kPending) {
          m.requested += static_cast<std::int64_t>(b.requested);
          m.rounding += size - static_cast<std::int64_t>(b.requested);
        } else if (b.state == BlockState::kFree && seg.small_pool) {
          m.free_small += size;
        } else if (b.state == BlockState::kFree) {
          // Whole chunk slots inside the block, counted from the mapping's base.
          const DevicePtr first = seg.va + (b.ptr - seg.va + chunk - 1) / chunk * chunk;
          const DevicePtr last = seg.va + (b.ptr + b.size - seg.va) / chunk * chunk;
          const std::int64_t whole = last > first ? static_cast<std::int64_t>(last - first) : 0;
          m.free_chunks += whole;
          m.free_pieces += size - whole;
        }
      }
    }
    return m;
  }

 private:
  std::unique_ptr<CachingAllocator> alloc_;
  absl::flat_hash_map<std::uint64_t, Stream> streams_;
};

class TorchReplay final : public ReplayAllocator {
 public:
  explicit TorchReplay(const TorchModelOptions& options) : model_(options), expandable_(options.expandable_segments) {}
  absl::StatusOr<std::uint64_t> Malloc(std::size_t size, std::uint64_t stream) override {
    return model_.Malloc(size, stream);
  }
  absl::Status Free(std::uint64_t handle) override { return model_.Free(handle); }
  std::int64_t Reserved() const override { return model_.counters().reserved; }
  void Report(ReplayResult& r) const override {
    const TorchModelCounters& c = model_.counters();
    r.peak_reserved = c.reserved_peak;
    r.policy_peak_allocated = c.allocated_peak;
    r.ooms = c.ooms;
    r.retries = c.retries;
    r.segment_allocs = c.segment_allocs;
    if (expandable_) {
      r.map_calls = c.segment_allocs;
      r.unmap_calls = c.segment_frees;
    }
    r.segment_log = model_.segment_log();
  }
  absl::Status CheckInvariants() const override { return model_.CheckInvariants(); }
  MemoryBreakdown Breakdown() const override {
    const TorchModelMemory t = model_.Memory();
    MemoryBreakdown m;
    m.reserved = model_.counters().reserved;
    m.requested = t.requested;
    m.rounding = t.rounding;
    m.free_small = t.free_small;
    m.free_chunks = t.free_pages;
    m.free_pieces = t.free_pieces;
    m.segments = t.segments;
    return m;
  }

 private:
  TorchAllocatorModel model_;
  const bool expandable_;
};

}  // namespace

absl::StatusOr<PolicySpec> ParsePolicy(absl::string_view name) {
  for (const PolicySpec& p : AllPolicies()) {
    if (p.name == name) return p;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown policy \"", name, "\"; known: stitchalloc, stitchalloc-nostitch, native, expandable"));
}

std::vector<PolicySpec> AllPolicies() {
  return {{PolicyKind::kStitchalloc, "stitchalloc"},
          {PolicyKind::kStitchallocNoStitch, "stitchalloc-nostitch"},
          {PolicyKind::kNative, "native"},
          {PolicyKind::kExpandable, "expandable"}};
}

absl::StatusOr<std::unique_ptr<ReplayAllocator>> MakeReplayAllocator(const PolicySpec& policy,
                                                                    const ReplayOptions& options) {
  switch (policy.kind) {
    case PolicyKind::kStitchalloc:
    case PolicyKind::kStitchallocNoStitch: {
      std::string text = options.cuda_driver
                             ? std::string("driver:cuda")
                             : absl::StrFormat("driver:host,host_capacity_mb:%d", options.device_memory >> 20);
      absl::StrAppend(&text, ",stitching:", policy.kind == PolicyKind::kStitchalloc ? "true" : "false");
      if (!options.stitchalloc_config.empty()) absl::StrAppend(&text, ",", options.stitchalloc_config);
      absl::StatusOr<Config> config = ParseConfig(text);
      if (!config.ok()) return config.status();
      absl::StatusOr<std::unique_ptr<CachingAllocator>> alloc;
      if (config->driver.choice == DriverChoice::kHost) {
        // The replay launches no kernels and touches no bytes: streams complete at once
        // (deterministic) and, unless asked for, no memory backs the chunks (host_driver.h).
        HostDriverOptions host = config->driver.host;
        host.backed = options.host_backing;
        host.inline_streams = true;
        absl::StatusOr<std::unique_ptr<HostDriver>> driver = HostDriver::Create(host);
        if (!driver.ok()) return driver.status();
        alloc = CachingAllocator::Create(*config, *std::move(driver));
      } else {
        alloc = CachingAllocator::Create(*config);
      }
      if (!alloc.ok()) return alloc.status();
      return std::unique_ptr<ReplayAllocator>(new StitchallocReplay(*std::move(alloc)));
    }
    case PolicyKind::kNative:
    case PolicyKind::kExpandable: {
      TorchModelOptions o = options.torch;
      o.device_memory = options.device_memory;
      o.expandable_segments = policy.kind == PolicyKind::kExpandable;
      return std::unique_ptr<ReplayAllocator>(new TorchReplay(o));
    }
  }
  return absl::InternalError("unreachable policy kind");
}

absl::StatusOr<ReplayResult> Replay(const Trace& trace, const PolicySpec& policy, const ReplayOptions& options) {
  absl::StatusOr<std::unique_ptr<ReplayAllocator>> made = MakeReplayAllocator(policy, options);
  if (!made.ok()) return made.status();
  ReplayAllocator& alloc = **made;

  ReplayResult r;
  r.trace = trace.name;
  r.policy = policy.name;
  absl::flat_hash_map<std::uint64_t, std::pair<std::uint64_t, std::uint64_t>> live;  // id -> (handle, rounded)
  live.reserve(1024);
  std::int64_t allocated = 0;
  const std::size_t n = options.stop_after > 0 ? std::min(options.stop_after, trace.events.size()) : trace.events.size();
  std::int64_t peak_seen = -1;
  const std::size_t stride =
      options.timeline_points > 0 ? std::max<std::size_t>(1, n / options.timeline_points) : 0;
  TimelinePoint window;

  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  Clock::time_point last_progress = start;
  bool progress_shown = false;
  for (std::size_t i = 0; i < n; ++i) {
    const TraceEvent& e = trace.events[i];
    if (e.op == TraceOp::kAlloc) {
      ++r.events;
      absl::StatusOr<std::uint64_t> h = alloc.Malloc(e.size, e.stream);
      if (h.ok()) {
        const std::uint64_t rounded = Policy::RoundSize(e.size);
        live.emplace(e.id, std::make_pair(*h, rounded));
        allocated += static_cast<std::int64_t>(rounded);
        r.peak_allocated = std::max(r.peak_allocated, allocated);
      } else if (!absl::IsResourceExhausted(h.status())) {
        return absl::Status(h.status().code(), absl::StrFormat("replay of %s on %s, event %d: %s", trace.name,
                                                               policy.name, i, h.status().message()));
      }
    } else if (e.op == TraceOp::kFree) {
      ++r.events;
      auto it = live.find(e.id);
      if (it == live.end()) continue;  // its alloc ran out of memory
      if (absl::Status s = alloc.Free(it->second.first); !s.ok()) {
        return absl::Status(s.code(), absl::StrFormat("replay of %s on %s, event %d: %s", trace.name, policy.name, i,
                                                      s.message()));
      }
      allocated -= static_cast<std::int64_t>(it->second.second);
      live.erase(it);
    }
    if (options.check_every_event) {
      if (absl::Status s = alloc.CheckInvariants(); !s.ok()) {
        return absl::Status(s.code(), absl::StrFormat("replay of %s on %s, after event %d: %s", trace.name, policy.name,
                                                      i, s.message()));
      }
    }
    if (options.track_peak_event) {
      if (const std::int64_t reserved = alloc.Reserved(); reserved > peak_seen) {
        peak_seen = reserved;
        r.peak_reserved_event = i + 1;
      }
    }
    if (stride > 0) {
      window.allocated = std::max(window.allocated, allocated);
      window.reserved = std::max(window.reserved, alloc.Reserved());
      if ((i + 1) % stride == 0 || i + 1 == n) {
        window.event = i + 1;
        r.timeline.push_back(window);
        window = TimelinePoint{};
      }
    }
    if (options.progress && (i & 0xFFFF) == 0xFFFF) {
      const Clock::time_point now = Clock::now();
      if (now - start > std::chrono::seconds(2) && now - last_progress > std::chrono::milliseconds(500)) {
        std::fprintf(stderr, "\r  replaying %s on %s: %5.1f%% of %zu events", trace.name.c_str(), policy.name.c_str(),
                     100.0 * double(i + 1) / double(n), n);
        last_progress = now;
        progress_shown = true;
      }
    }
  }
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (progress_shown) std::fprintf(stderr, "\r%*s\r", 100, "");
  alloc.Report(r);
  if (options.check_invariants) r.check_status = alloc.CheckInvariants();
  if (options.stop_after > 0) r.breakdown = alloc.Breakdown();
  return r;
}

absl::StatusOr<MemoryBreakdown> ExplainPeak(const Trace& trace, const PolicySpec& policy, const ReplayOptions& options) {
  ReplayOptions o = options;
  o.timeline_points = 0;
  o.check_invariants = false;
  o.stop_after = 0;
  o.track_peak_event = true;
  absl::StatusOr<ReplayResult> full = Replay(trace, policy, o);
  if (!full.ok()) return full.status();
  if (full->peak_reserved_event == 0) return MemoryBreakdown{};
  o.track_peak_event = false;
  o.stop_after = full->peak_reserved_event;
  absl::StatusOr<ReplayResult> paused = Replay(trace, policy, o);
  if (!paused.ok()) return paused.status();
  MemoryBreakdown m = paused->breakdown;
  m.event = full->peak_reserved_event;
  if (m.reserved != full->peak_reserved) {
    return absl::InternalError(absl::StrFormat(
        "replay of %s on %s is not repeatable: reserved %d at event %d, %d the first time", trace.name, policy.name,
        m.reserved, m.event, full->peak_reserved));
  }
  return m;
}

}  // namespace stitchalloc::bench
