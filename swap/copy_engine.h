// CopyEngine: asynchronous copies between device memory and pinned host memory, one
// device-to-host and one host-to-device stream per device.
//
// A copy is issued after the work already queued on a producer stream (the copy stream waits
// on an event recorded there: no host-side synchronisation) and split into chunks of at most
// `chunk_bytes`, so that on GPUs where both directions share copy hardware, and between
// streams of equal priority, a prefetch waits for at most one chunk of a long offload. Each copy
// is bracketed by two timing events on its stream; when the copy is seen complete its bytes and
// duration feed the direction's running bandwidth figure (total bytes / total copy time).
//
// Data structures (under mu_): copies_: id -> in-flight copy (direction, bytes, events).
// Events are recycled through spare_. Copy ids are never reused.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/driver.h"
#include "vmm/mutex.h"

namespace stitchalloc::swap {

enum class Direction : std::uint8_t { kDeviceToHost = 0, kHostToDevice = 1 };

struct CopyEngineOptions {
  std::size_t chunk_bytes = std::size_t{8} << 20;
};

struct DirectionStats {
  std::int64_t copies = 0;       // issued
  std::int64_t chunks = 0;       // driver copy calls
  std::int64_t bytes = 0;        // issued
  std::int64_t completed = 0;    // copies seen complete
  double seconds = 0;            // copy time of the completed copies (stream time)
  double bandwidth() const { return seconds > 0 ? static_cast<double>(completed_bytes) / seconds : 0; }
  std::int64_t completed_bytes = 0;
};

struct CopyEngineStats {
  DirectionStats d2h, h2d;
};

class CopyEngine {
 public:
  using CopyId = std::uint64_t;

  // Creates the two copy streams. InvalidArgument for a zero chunk size.
  static absl::StatusOr<std::unique_ptr<CopyEngine>> Create(Driver* driver, const CopyEngineOptions& options);
  // Waits for in-flight copies, then destroys the streams and events.
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  // Queues a copy of `bytes` from `src` to `dst` on the direction's stream, after the work
  // queued so far on `after` (a producer or consumer stream). InvalidArgument for null
  // pointers or zero bytes.
  absl::StatusOr<CopyId> Issue(Direction direction, void* dst, const void* src, std::size_t bytes, Stream after);
  // True once the copy finished (and then accounts its bandwidth once). NotFound for an id that
  // was never issued or already released.
  absl::StatusOr<bool> Done(CopyId id);
  // Makes `stream` wait for the copy (no host blocking).
  absl::Status StreamWait(Stream stream, CopyId id);
  // Blocks the host until the copy finished (slow paths only: pressure, shutdown, tests).
  absl::Status Synchronize(CopyId id);
  // Forgets a copy (its events return to the spare list). A copy still in flight is waited for
  // first, so a released id never refers to memory still being written.
  absl::Status Release(CopyId id);

  Stream stream(Direction d) const { return d == Direction::kDeviceToHost ? d2h_ : h2d_; }
  CopyEngineStats GetStats() const;
  Driver& driver() const { return *driver_; }

 private:
  struct Copy {
    Direction direction;
    std::size_t bytes = 0;
    Event start = 0, end = 0;
    bool accounted = false;
  };
  CopyEngine(Driver* driver, const CopyEngineOptions& options) : driver_(driver), options_(options) {}
  absl::StatusOr<Event> TakeEvent() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Account(Copy& c) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  DirectionStats& StatsFor(Direction d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return d == Direction::kDeviceToHost ? stats_.d2h : stats_.h2d;
  }

  Driver* const driver_;
  const CopyEngineOptions options_;
  Stream d2h_ = 0, h2d_ = 0;
  mutable Mutex mu_;
  Event order_ ABSL_GUARDED_BY(mu_) = 0;  // recorded on the producer stream per Issue
  absl::flat_hash_map<CopyId, Copy> copies_ ABSL_GUARDED_BY(mu_);
  std::vector<Event> spare_ ABSL_GUARDED_BY(mu_);
  CopyId next_ ABSL_GUARDED_BY(mu_) = 1;
  CopyEngineStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace stitchalloc::swap
