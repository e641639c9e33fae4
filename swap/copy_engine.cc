// CopyEngine: chunked copies on per-direction streams, completion and bandwidth by timing
// events (see copy_engine.h).
#include "swap/copy_engine.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "vmm/nvtx.h"

namespace stitchalloc::swap {

absl::StatusOr<std::unique_ptr<CopyEngine>> CopyEngine::Create(Driver* driver, const CopyEngineOptions& options) {
  if (driver == nullptr) return absl::InvalidArgumentError("copy engine: no driver");
  if (options.chunk_bytes == 0) return absl::InvalidArgumentError("copy engine: chunk size must be positive");
  std::unique_ptr<CopyEngine> e(new CopyEngine(driver, options));
  auto d2h = driver->CreateStream();
  if (!d2h.ok()) return d2h.status();
  e->d2h_ = *d2h;
  auto h2d = driver->CreateStream();
  if (!h2d.ok()) {
    driver->DestroyStream(e->d2h_).IgnoreError();
    return h2d.status();
  }
  e->h2d_ = *h2d;
  auto order = driver->CreateEvent();
  if (!order.ok()) return order.status();
  MutexLock l(&e->mu_);
  e->order_ = *order;
  return e;
}

CopyEngine::~CopyEngine() {
  driver_->SynchronizeStream(d2h_).IgnoreError();
  driver_->SynchronizeStream(h2d_).IgnoreError();
  MutexLock l(&mu_);
  for (auto& [id, c] : copies_) {
    driver_->DestroyEvent(c.start).IgnoreError();
    driver_->DestroyEvent(c.end).IgnoreError();
  }
  for (Event e : spare_) driver_->DestroyEvent(e).IgnoreError();
  if (order_ != 0) driver_->DestroyEvent(order_).IgnoreError();
  driver_->DestroyStream(d2h_).IgnoreError();
  driver_->DestroyStream(h2d_).IgnoreError();
}

absl::StatusOr<Event> CopyEngine::TakeEvent() {
  if (!spare_.empty()) {
    const Event e = spare_.back();
    spare_.pop_back();
    return e;
  }
  return driver_->CreateTimingEvent();
}

absl::StatusOr<CopyEngine::CopyId> CopyEngine::Issue(Direction direction, void* dst, const void* src,
                                                     std::size_t bytes, Stream after) {
  if (dst == nullptr || src == nullptr) return absl::InvalidArgumentError("copy engine: copy with a null pointer");
  if (bytes == 0) return absl::InvalidArgumentError("copy engine: copy of 0 bytes");
  STITCHALLOC_NVTX_RANGE(direction == Direction::kDeviceToHost ? "swap: issue offload" : "swap: issue prefetch");
  const Stream s = stream(direction);
  MutexLock l(&mu_);
  auto start = TakeEvent();
  if (!start.ok()) return start.status();
  auto end = TakeEvent();
  if (!end.ok()) {
    spare_.push_back(*start);
    return end.status();
  }
  auto fail = [&](absl::Status st) {
    spare_.push_back(*start);
    spare_.push_back(*end);
    return st;
  };
  // Order after the producer's queued work, then bracket the chunks with timing events.
  if (auto st = driver_->RecordEvent(order_, after); !st.ok()) return fail(st);
  if (auto st = driver_->StreamWaitEvent(s, order_); !st.ok()) return fail(st);
  if (auto st = driver_->RecordEvent(*start, s); !st.ok()) return fail(st);
  auto* d = static_cast<unsigned char*>(dst);
  const auto* from = static_cast<const unsigned char*>(src);
  std::int64_t chunks = 0;
  for (std::size_t off = 0; off < bytes; off += options_.chunk_bytes) {
    const std::size_t n = std::min(options_.chunk_bytes, bytes - off);
    if (auto st = driver_->MemcpyAsync(d + off, from + off, n, s); !st.ok()) {
      // Chunks already queued complete on their own; wait so no event is reused mid-copy.
      driver_->SynchronizeStream(s).IgnoreError();
      return fail(st);
    }
    ++chunks;
  }
  if (auto st = driver_->RecordEvent(*end, s); !st.ok()) {
    driver_->SynchronizeStream(s).IgnoreError();
    return fail(st);
  }
  const CopyId id = next_++;
  copies_.emplace(id, Copy{direction, bytes, *start, *end, false});
  DirectionStats& ds = StatsFor(direction);
  ++ds.copies;
  ds.chunks += chunks;
  ds.bytes += static_cast<std::int64_t>(bytes);
  return id;
}

void CopyEngine::Account(Copy& c) {
  if (c.accounted) return;
  c.accounted = true;
  DirectionStats& ds = StatsFor(c.direction);
  ++ds.completed;
  ds.completed_bytes += static_cast<std::int64_t>(c.bytes);
  if (auto sec = driver_->ElapsedSeconds(c.start, c.end); sec.ok()) ds.seconds += *sec;
}

absl::StatusOr<bool> CopyEngine::Done(CopyId id) {
  MutexLock l(&mu_);
  auto it = copies_.find(id);
  if (it == copies_.end()) return absl::NotFoundError(absl::StrFormat("copy engine: no copy %d", id));
  auto done = driver_->QueryEvent(it->second.end);
  if (!done.ok()) return done.status();
  if (*done) Account(it->second);
  return *done;
}

absl::Status CopyEngine::StreamWait(Stream stream, CopyId id) {
  MutexLock l(&mu_);
  auto it = copies_.find(id);
  if (it == copies_.end()) return absl::NotFoundError(absl::StrFormat("copy engine: no copy %d", id));
  return driver_->StreamWaitEvent(stream, it->second.end);
}

absl::Status CopyEngine::Synchronize(CopyId id) {
  Event end = 0;
  {
    MutexLock l(&mu_);
    auto it = copies_.find(id);
    if (it == copies_.end()) return absl::NotFoundError(absl::StrFormat("copy engine: no copy %d", id));
    end = it->second.end;
  }
  STITCHALLOC_NVTX_RANGE("swap: host waits for a copy");
  if (auto s = driver_->SynchronizeEvent(end); !s.ok()) return s;
  MutexLock l(&mu_);
  if (auto it = copies_.find(id); it != copies_.end()) Account(it->second);
  return absl::OkStatus();
}

absl::Status CopyEngine::Release(CopyId id) {
  if (auto s = Synchronize(id); !s.ok()) return s;
  MutexLock l(&mu_);
  auto it = copies_.find(id);
  if (it == copies_.end()) return absl::NotFoundError(absl::StrFormat("copy engine: no copy %d", id));
  spare_.push_back(it->second.start);
  spare_.push_back(it->second.end);
  copies_.erase(it);
  return absl::OkStatus();
}

CopyEngineStats CopyEngine::GetStats() const {
  MutexLock l(&mu_);
  return stats_;
}

}  // namespace stitchalloc::swap
