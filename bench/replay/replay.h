// Replay: runs a trace (bench/trace/trace.h) against one allocator policy and measures it.
//
// Policies (docs/policies.md):
//   stitchalloc            the CachingAllocator with its default configuration
//   stitchalloc-nostitch   the same with stitching:false
//   native                 TorchAllocatorModel: PyTorch's caching allocator, default settings
//   expandable             TorchAllocatorModel with expandable_segments
// stitchalloc policies run on a real driver (the host driver unless the CUDA driver is asked
// for), so their reserved bytes are physical chunks actually created; the torch models are
// pure bookkeeping.
//
// Accounting: peak_allocated is a property of the trace, the same for every policy: the peak
// of the live requests, each rounded up to 512 bytes as every policy here rounds it.
// peak_reserved is the policy's own peak of reserved bytes; ratio = peak_reserved /
// peak_allocated. An allocation that fails with out-of-memory is counted and skipped (its
// free too), so a run always completes and OOM counts are comparable.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "bench/models/torch_model.h"
#include "bench/trace/trace.h"

namespace stitchalloc::bench {

enum class PolicyKind { kStitchalloc, kStitchallocNoStitch, kNative, kExpandable };

struct PolicySpec {
  PolicyKind kind = PolicyKind::kStitchalloc;
  std::string name;  // as printed and written to JSON
};

// "stitchalloc", "stitchalloc-nostitch", "native", "expandable".
absl::StatusOr<PolicySpec> ParsePolicy(absl::string_view name);
std::vector<PolicySpec> AllPolicies();

struct ReplayOptions {
  std::size_t device_memory = std::size_t{80} << 30;  // capacity of the simulated device
  std::string stitchalloc_config;                     // extra "key:value,..." for stitchalloc
  TorchModelOptions torch;                             // settings of the torch models (device_memory overridden)
  bool cuda_driver = false;                            // stitchalloc on the real CUDA driver
  bool host_backing = false;                           // host driver with real memory behind the chunks
  std::size_t timeline_points = 0;                     // 0: no timeline
  bool progress = true;                                // progress on stderr past 2 s
  bool check_invariants = false;                       // CheckInvariants after the replay
  bool check_every_event = false;                      // ... and after every event (slow; tests)
  // Stop after this many events (0: the whole trace). With it a replay can be paused at a
  // chosen moment and the policy's memory inspected (ExplainPeak).
  std::size_t stop_after = 0;
  bool track_peak_event = false;                       // find the event of peak reserved
};

// Where a policy's reserved bytes sit at one moment. Every reserved byte is in exactly one
// field: requested + rounding + free_* == reserved.
struct MemoryBreakdown {
  std::size_t event = 0;           // after this many events
  std::int64_t reserved = 0;
  std::int64_t requested = 0;      // bytes the live allocations asked for
  std::int64_t rounding = 0;       // allocated blocks beyond the request (512 B rounding, unsplit tails)
  std::int64_t free_small = 0;     // cached in the small pool
  std::int64_t free_chunks = 0;    // large pool: free whole chunks (stitchalloc may borrow them)
  std::int64_t free_pieces = 0;    // large pool: free bytes in chunks that are partly in use
  std::int64_t segments = 0;
};

struct TimelinePoint {
  std::size_t event = 0;
  std::int64_t allocated = 0;  // the trace's live bytes (max over the interval)
  std::int64_t reserved = 0;   // the policy's reserved bytes (max over the interval)
};

struct ReplayResult {
  std::string trace;
  std::string policy;
  std::int64_t peak_allocated = 0;
  std::int64_t peak_reserved = 0;
  std::int64_t policy_peak_allocated = 0;  // the policy's own allocated_bytes peak
  std::int64_t ooms = 0;
  std::int64_t retries = 0;
  std::int64_t stitches = 0;
  std::int64_t map_calls = 0;
  std::int64_t unmap_calls = 0;
  std::int64_t segment_allocs = 0;  // cudaMalloc / map calls of the policy (chunks for stitchalloc)
  std::size_t events = 0;           // alloc and free events replayed
  double seconds = 0;
  std::vector<TimelinePoint> timeline;
  std::vector<std::size_t> segment_log;  // torch models: sizes of their segment allocations
  std::size_t peak_reserved_event = 0;
  MemoryBreakdown breakdown;             // with stop_after: the policy's memory where it stopped   // with track_peak_event: events replayed when the peak was reached
  absl::Status check_status;             // CheckInvariants' verdict when asked for

  double ratio() const { return peak_allocated > 0 ? double(peak_reserved) / double(peak_allocated) : 0.0; }
  double events_per_second() const { return seconds > 0 ? double(events) / seconds : 0.0; }
};

// A policy behind one interface. Handles are addresses.
class ReplayAllocator {
 public:
  virtual ~ReplayAllocator() = default;
  virtual absl::StatusOr<std::uint64_t> Malloc(std::size_t size, std::uint64_t stream) = 0;
  virtual absl::Status Free(std::uint64_t handle) = 0;
  virtual std::int64_t Reserved() const = 0;
  // Fills the counters of `result` (everything but the trace-level fields).
  virtual void Report(ReplayResult& result) const = 0;
  virtual absl::Status CheckInvariants() const = 0;
  // The current breakdown of reserved memory (event left 0).
  virtual MemoryBreakdown Breakdown() const = 0;
};

absl::StatusOr<std::unique_ptr<ReplayAllocator>> MakeReplayAllocator(const PolicySpec& policy,
                                                                    const ReplayOptions& options);

absl::StatusOr<ReplayResult> Replay(const Trace& trace, const PolicySpec& policy, const ReplayOptions& options);

// Replays the trace twice: once to find the event at which reserved memory peaks, once up to
// that event, and returns the breakdown of reserved memory there.
absl::StatusOr<MemoryBreakdown> ExplainPeak(const Trace& trace, const PolicySpec& policy, const ReplayOptions& options);

}  // namespace stitchalloc::bench
