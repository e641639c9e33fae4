// HostDriver implementation; see host_driver.h for the data structures and invariants.
#include "vmm/host_driver.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "vmm/format.h"
#include "vmm/nvtx.h"

namespace stitchalloc {

struct HostDriver::Token {
  bool done = false;  // guarded by HostDriver::done_mu_
  absl::Time when;    // completion time, set with done
};

struct HostDriver::HostEvent {
  std::shared_ptr<Token> last;  // guarded by HostDriver::events_mu_; null: never recorded
};

struct HostDriver::HostStream {
  Mutex mu;
  CondVar cv;
  std::deque<absl::AnyInvocable<void() &&>> queue ABSL_GUARDED_BY(mu);
  bool stopping ABSL_GUARDED_BY(mu) = false;
  std::thread worker;
};

namespace {

absl::Status Errno(const char* what) {
  return absl::InternalError(absl::StrFormat("host driver: %s failed: %s", what, std::strerror(errno)));
}

// Free ranges (start -> length, coalesced) of the memfd and of the address-space region.
using FreeRanges = absl::btree_map<std::size_t, std::size_t>;

// The lowest range start of `bytes` (first fit), taken out of `free`; nullopt if none fits.
std::optional<std::size_t> TakeFirstFit(FreeRanges& free, std::size_t bytes) {
  for (auto it = free.begin(); it != free.end(); ++it) {
    if (it->second < bytes) continue;
    const std::size_t start = it->first;
    const std::size_t rest = it->second - bytes;
    free.erase(it);
    if (rest > 0) free.emplace(start + bytes, rest);
    return start;
  }
  return std::nullopt;
}

// Puts [start, start + bytes) back, merged with its free neighbours.
void ReturnRange(FreeRanges& free, std::size_t start, std::size_t bytes) {
  auto next = free.lower_bound(start);
  if (next != free.end() && start + bytes == next->first) {
    bytes += next->second;
    next = free.erase(next);
  }
  if (next != free.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      prev->second += bytes;
      return;
    }
  }
  free.emplace(start, bytes);
}

}  // namespace

absl::StatusOr<std::unique_ptr<HostDriver>> HostDriver::Create(const HostDriverOptions& options) {
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  if (options.granularity == 0 || options.granularity % page != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host driver: granularity %d is not a positive multiple of the page size %d",
        options.granularity, page));
  }
  if (options.capacity == 0 || options.capacity % options.granularity != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host driver: capacity %d is not a positive multiple of the granularity %d",
        options.capacity, options.granularity));
  }
  if (!options.backed) return std::unique_ptr<HostDriver>(new HostDriver(options, -1));
  int fd = memfd_create("stitchalloc-host-device", MFD_CLOEXEC);
  if (fd < 0) return Errno("memfd_create");
  // Twice the capacity, sparse: see the header.
  if (ftruncate(fd, static_cast<off_t>(2 * options.capacity)) != 0) {
    absl::Status s = Errno("ftruncate of the device memfd");
    close(fd);
    return s;
  }
  return std::unique_ptr<HostDriver>(new HostDriver(options, fd));
}

HostDriver::HostDriver(const HostDriverOptions& options, int fd) : options_(options), fd_(fd) {
  {
    MutexLock l(&mem_mu_);
    free_phys_.emplace(0, 2 * options.capacity);
    file_size_ = 2 * options.capacity;
    // The device's own address space (see the header); halve until the process can map it.
    const std::size_t gran = options.granularity;
    std::size_t want = std::min(std::max(16 * options.capacity, kTiB), 64 * kTiB);
    for (; want >= 2 * options.capacity && want >= 64 * gran; want /= 2) {
      void* raw = mmap(nullptr, want + gran, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (raw == MAP_FAILED) continue;
      const DevicePtr base = reinterpret_cast<DevicePtr>(raw);
      const DevicePtr aligned = RoundUp(base, gran);
      if (aligned > base) munmap(raw, aligned - base);
      const DevicePtr end = base + want + gran;
      if (end > aligned + want) munmap(reinterpret_cast<void*>(aligned + want), end - (aligned + want));
      va_base_ = aligned;
      va_size_ = want;
      free_va_.emplace(aligned, want);
      break;
    }
  }
  MutexLock l(&streams_mu_);
  streams_.emplace(kDefaultStream, StartStream());
}

HostDriver::~HostDriver() {
  absl::flat_hash_map<Stream, std::unique_ptr<HostStream>> streams;
  {
    MutexLock l(&streams_mu_);
    streams.swap(streams_);
  }
  for (auto& [id, s] : streams) {
    if (!s->worker.joinable()) continue;  // inline streams
    {
      MutexLock l(&s->mu);
      s->stopping = true;
      s->cv.Signal();
    }
    s->worker.join();
  }
  MutexLock l(&mem_mu_);
  for (const auto& [va, size] : reservations_) {
    if (!InRegion(va)) munmap(reinterpret_cast<void*>(va), size);
  }
  if (va_size_ > 0) munmap(reinterpret_cast<void*>(va_base_), va_size_);
  for (const auto& [ptr, size] : pinned_) munmap(ptr, size);
  for (const auto& [h, c] : chunks_) {
    if (c.imported) close(c.fd);
    if (c.export_fd >= 0) close(c.export_fd);
  }
  if (fd_ >= 0) close(fd_);
}

std::string HostDriver::name() const {
  return absl::StrFormat("host (capacity %s, granularity %s%s)", FormatBytes(options_.capacity),
                         FormatBytes(options_.granularity), options_.backed ? "" : ", unbacked");
}

absl::Status HostDriver::CheckAligned(const char* what, DevicePtr va, std::size_t bytes) const {
  if (bytes == 0 || bytes % options_.granularity != 0 || va % options_.granularity != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host driver: %s(%s, %d): address and size must be non-zero multiples of the granularity %d",
        what, FormatAddress(va), bytes, options_.granularity));
  }
  return absl::OkStatus();
}

absl::StatusOr<PhysHandle> HostDriver::CreateChunk(std::size_t bytes) {
  if (bytes == 0 || bytes % options_.granularity != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host driver: CreateChunk(%d): size must be a non-zero multiple of the granularity %d",
        bytes, options_.granularity));
  }
  MutexLock l(&mem_mu_);
  if (bytes > options_.capacity - used_) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "host driver: out of device memory: chunk of %s requested, %s of %s in use",
        FormatBytes(bytes), FormatBytes(used_), FormatBytes(options_.capacity)));
  }
  std::optional<std::size_t> offset = TakeFirstFit(free_phys_, bytes);
  if (!offset) {
    // Retired (exported) ranges took the room: grow the sparse file.
    const std::size_t grow = std::max(bytes, options_.capacity);
    if (fd_ >= 0 && ftruncate(fd_, static_cast<off_t>(file_size_ + grow)) != 0) {
      return Errno("ftruncate growing the device memfd");
    }
    ReturnRange(free_phys_, file_size_, grow);
    file_size_ += grow;
    offset = TakeFirstFit(free_phys_, bytes);
  }
  const PhysHandle h = next_handle_++;
  ChunkRec rec;
  rec.offset = *offset;
  rec.size = bytes;
  rec.fd = fd_;
  chunks_.emplace(h, rec);
  used_ += bytes;
  return h;
}

void HostDriver::FreePhysical(const ChunkRec& chunk) {
  if (chunk.imported) {  // the exporter's memory: only this process's reference goes
    close(chunk.fd);
    if (chunk.export_fd >= 0) close(chunk.export_fd);
    return;
  }
  used_ -= chunk.size;
  if (chunk.export_fd >= 0) {  // importers may still map it: retire the range (see the header)
    close(chunk.export_fd);
    return;
  }
  // Return the pages to the system; the range reads as zeros if reused.
  if (fd_ >= 0) {
    fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(chunk.offset),
              static_cast<off_t>(chunk.size));
  }
  ReturnRange(free_phys_, chunk.offset, chunk.size);
}

absl::StatusOr<int> HostDriver::ExportChunk(PhysHandle handle) {
  MutexLock l(&mem_mu_);
  auto it = chunks_.find(handle);
  if (it == chunks_.end() || it->second.released) {
    return absl::NotFoundError(absl::StrFormat("host driver: ExportChunk(%d): no such chunk", handle));
  }
  if (!options_.backed) {
    return absl::FailedPreconditionError("host driver: ExportChunk: an unbacked host driver has no memory to share");
  }
  ChunkRec& c = it->second;
  if (c.export_fd < 0) {
    // A descriptor with a file position of its own, which carries the chunk's offset.
    const std::string path = absl::StrFormat("/proc/self/fd/%d", c.fd);
    const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return Errno("open of /proc/self/fd for ExportChunk");
    if (lseek(fd, static_cast<off_t>(c.offset), SEEK_SET) < 0) {
      absl::Status s = Errno("lseek for ExportChunk");
      close(fd);
      return s;
    }
    c.export_fd = fd;
  }
  return c.export_fd;
}

absl::StatusOr<PhysHandle> HostDriver::ImportChunk(int fd, std::size_t bytes) {
  if (bytes == 0 || bytes % options_.granularity != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host driver: ImportChunk(%d, %d): size must be a non-zero multiple of the granularity %d", fd, bytes,
        options_.granularity));
  }
  if (!options_.backed) {
    return absl::FailedPreconditionError("host driver: ImportChunk: an unbacked host driver cannot map memory");
  }
  const off_t offset = lseek(fd, 0, SEEK_CUR);
  struct stat st = {};
  if (offset < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) ||
      static_cast<std::size_t>(offset) % options_.granularity != 0 ||
      static_cast<std::size_t>(st.st_size) < static_cast<std::size_t>(offset) + bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host driver: ImportChunk(%d, %d): not a descriptor of a chunk that size exported by a host driver", fd,
        bytes));
  }
  const int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) return Errno("dup for ImportChunk");
  MutexLock l(&mem_mu_);
  const PhysHandle h = next_handle_++;
  ChunkRec rec;
  rec.offset = static_cast<std::size_t>(offset);
  rec.size = bytes;
  rec.fd = own;
  rec.imported = true;
  chunks_.emplace(h, rec);
  return h;
}

absl::Status HostDriver::ReleaseChunk(PhysHandle handle) {
  MutexLock l(&mem_mu_);
  auto it = chunks_.find(handle);
  if (it == chunks_.end() || it->second.released) {
    return absl::NotFoundError(absl::StrFormat("host driver: ReleaseChunk(%d): no such chunk", handle));
  }
  if (it->second.map_count > 0) {
    it->second.released = true;  // freed by the last Unmap, as cuMemRelease
    return absl::OkStatus();
  }
  FreePhysical(it->second);
  chunks_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<DevicePtr> HostDriver::Reserve(std::size_t bytes) {
  if (auto s = CheckAligned("Reserve", 0, bytes); !s.ok()) return s;
  {
    MutexLock l(&mem_mu_);
    if (const std::optional<std::size_t> va = TakeFirstFit(free_va_, bytes)) {
      reservations_.emplace(*va, bytes);
      return *va;  // already PROT_NONE: the region's, or the placeholder a previous Unmap left
    }
  }
  const std::size_t gran = options_.granularity;
  void* raw = mmap(nullptr, bytes + gran, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) {
    if (errno == ENOMEM) {
      return absl::ResourceExhaustedError(absl::StrFormat(
          "host driver: no virtual address space left for a %s reservation", FormatBytes(bytes)));
    }
    return Errno("mmap of a reservation");
  }
  const DevicePtr base = reinterpret_cast<DevicePtr>(raw);
  const DevicePtr aligned = RoundUp(base, gran);
  if (aligned > base) munmap(raw, aligned - base);
  const DevicePtr end = base + bytes + gran;
  if (end > aligned + bytes) munmap(reinterpret_cast<void*>(aligned + bytes), end - (aligned + bytes));
  MutexLock l(&mem_mu_);
  reservations_.emplace(aligned, bytes);
  return aligned;
}

bool HostDriver::InsideReservation(DevicePtr va, std::size_t bytes) const {
  auto it = reservations_.upper_bound(va);
  if (it == reservations_.begin()) return false;
  --it;
  return va >= it->first && va + bytes <= it->first + it->second;
}

absl::Status HostDriver::FreeReservation(DevicePtr va, std::size_t bytes) {
  MutexLock l(&mem_mu_);
  auto it = reservations_.find(va);
  if (it == reservations_.end() || it->second != bytes) {
    return absl::NotFoundError(absl::StrFormat(
        "host driver: FreeReservation(%s, %d): not a reservation made by Reserve", FormatAddress(va), bytes));
  }
  auto m = maps_.lower_bound(va);
  if (m != maps_.end() && m->first < va + bytes) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "host driver: FreeReservation(%s, %d): chunk still mapped at %s", FormatAddress(va), bytes, FormatAddress(m->first)));
  }
  if (InRegion(va)) {
    ReturnRange(free_va_, va, bytes);
  } else {
    munmap(reinterpret_cast<void*>(va), bytes);
  }
  reservations_.erase(it);
  return absl::OkStatus();
}

absl::Status HostDriver::Map(DevicePtr va, std::size_t bytes, PhysHandle handle) {
  if (auto s = CheckAligned("Map", va, bytes); !s.ok()) return s;
  STITCHALLOC_NVTX_RANGE("host map");
  MutexLock l(&mem_mu_);
  auto c = chunks_.find(handle);
  if (c == chunks_.end() || c->second.released) {
    return absl::NotFoundError(absl::StrFormat("host driver: Map: no such chunk %d", handle));
  }
  if (c->second.size != bytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host driver: Map: size %d differs from the chunk's size %d (chunks map whole)", bytes,
        c->second.size));
  }
  if (!InsideReservation(va, bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "host driver: Map(%s, %d): range is not inside a reservation", FormatAddress(va), bytes));
  }
  auto next = maps_.lower_bound(va);
  bool overlaps = next != maps_.end() && next->first < va + bytes;
  if (next != maps_.begin()) {
    auto prev = std::prev(next);
    overlaps = overlaps || prev->first + prev->second.size > va;
  }
  if (overlaps) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "host driver: Map(%s, %d): range is already mapped", FormatAddress(va), bytes));
  }
  // The mmap itself waits for SetAccess (without which CUDA forbids access too), so that
  // the chunks of one mapping with consecutive memfd offsets become one mmap call.
  maps_.emplace(va, MapRec{bytes, handle, c->second.offset, c->second.fd, false});
  ++c->second.map_count;
  return absl::OkStatus();
}

absl::Status HostDriver::CheckCovered(const char* what, DevicePtr va, std::size_t bytes,
                                      bool exact) const {
  auto it = maps_.upper_bound(va);
  if (it == maps_.begin()) {
    return absl::FailedPreconditionError(absl::StrFormat("host driver: %s(%s, %d): not mapped", what, FormatAddress(va), bytes));
  }
  --it;
  if (it->first + it->second.size <= va || (exact && it->first != va)) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "host driver: %s(%s, %d): range does not start at a mapped chunk", what, FormatAddress(va), bytes));
  }
  DevicePtr cursor = it->first;
  while (cursor < va + bytes) {
    if (it == maps_.end() || it->first != cursor) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "host driver: %s(%s, %d): range has an unmapped gap at %s", what, FormatAddress(va), bytes, FormatAddress(cursor)));
    }
    cursor += it->second.size;
    ++it;
  }
  if (exact && cursor != va + bytes) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "host driver: %s(%s, %d): range ends inside a mapped chunk", what, FormatAddress(va), bytes));
  }
  return absl::OkStatus();
}

absl::Status HostDriver::SetAccess(DevicePtr va, std::size_t bytes) {
  if (auto s = CheckAligned("SetAccess", va, bytes); !s.ok()) return s;
  MutexLock l(&mem_mu_);
  if (auto s = CheckCovered("SetAccess", va, bytes, /*exact=*/false); !s.ok()) return s;
  if (!options_.backed) return absl::OkStatus();
  // Materialize pending chunks, one MAP_SHARED mmap per run of chunks that are consecutive
  // both in the address space and in the memfd; chunks mapped earlier only change protection.
  bool any_materialized = false;
  auto it = maps_.upper_bound(va);
  --it;  // CheckCovered guarantees a chunk starting at or before va
  while (it != maps_.end() && it->first < va + bytes) {
    if (it->second.materialized) {
      any_materialized = true;
      ++it;
      continue;
    }
    const DevicePtr run_va = it->first;
    const std::size_t run_offset = it->second.offset;
    const int run_fd = it->second.fd;
    std::size_t run_bytes = 0;
    auto run_end = it;
    while (run_end != maps_.end() && run_end->first == run_va + run_bytes && !run_end->second.materialized &&
           run_end->second.fd == run_fd && run_end->second.offset == run_offset + run_bytes) {
      run_bytes += run_end->second.size;
      ++run_end;
    }
    void* p = mmap(reinterpret_cast<void*>(run_va), run_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                   run_fd, static_cast<off_t>(run_offset));
    if (p == MAP_FAILED) return Errno("mmap of a chunk");
    for (; it != run_end; ++it) it->second.materialized = true;
  }
  if (any_materialized && mprotect(reinterpret_cast<void*>(va), bytes, PROT_READ | PROT_WRITE) != 0) {
    return Errno("mprotect");
  }
  return absl::OkStatus();
}

absl::Status HostDriver::Unmap(DevicePtr va, std::size_t bytes) {
  if (auto s = CheckAligned("Unmap", va, bytes); !s.ok()) return s;
  STITCHALLOC_NVTX_RANGE("host unmap");
  MutexLock l(&mem_mu_);
  if (auto s = CheckCovered("Unmap", va, bytes, /*exact=*/true); !s.ok()) return s;
  // Put the reservation's PROT_NONE placeholder back over the whole range at once.
  if (options_.backed) {
    void* p = mmap(reinterpret_cast<void*>(va), bytes, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return Errno("mmap of an unmap placeholder");
  }
  auto it = maps_.find(va);
  while (it != maps_.end() && it->first < va + bytes) {
    auto c = chunks_.find(it->second.handle);
    if (--c->second.map_count == 0 && c->second.released) {
      FreePhysical(c->second);
      chunks_.erase(c);
    }
    it = maps_.erase(it);
  }
  return absl::OkStatus();
}

absl::StatusOr<MemInfo> HostDriver::GetMemInfo() {
  MutexLock l(&mem_mu_);
  return MemInfo{options_.capacity - used_, options_.capacity};
}

std::size_t HostDriver::physical_bytes_in_use() const {
  MutexLock l(&mem_mu_);
  return used_;
}
std::size_t HostDriver::live_chunks() const {
  MutexLock l(&mem_mu_);
  return chunks_.size();
}
std::size_t HostDriver::live_mappings() const {
  MutexLock l(&mem_mu_);
  return maps_.size();
}
std::size_t HostDriver::live_reservations() const {
  MutexLock l(&mem_mu_);
  return reservations_.size();
}

std::size_t HostDriver::pinned_host_bytes() const {
  MutexLock l(&mem_mu_);
  std::size_t total = 0;
  for (const auto& [ptr, size] : pinned_) total += size;
  return total;
}

// ---- pinned host memory: plain anonymous mappings (the CPU is the "device" here) ----------

absl::StatusOr<void*> HostDriver::AllocateHostPinned(std::size_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("host driver: AllocateHostPinned of 0 bytes");
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("host driver: AllocateHostPinned(%s): %s", FormatBytes(bytes), std::strerror(errno)));
  }
  MutexLock l(&mem_mu_);
  pinned_.emplace(p, bytes);
  return p;
}

absl::Status HostDriver::FreeHostPinned(void* ptr) {
  MutexLock l(&mem_mu_);
  auto it = pinned_.find(ptr);
  if (it == pinned_.end()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("host driver: FreeHostPinned(%p): not pinned host memory of this driver", ptr));
  }
  munmap(ptr, it->second);
  pinned_.erase(it);
  return absl::OkStatus();
}

// ---- streams and events ----------------------------------------------------------------

std::unique_ptr<HostDriver::HostStream> HostDriver::StartStream() {
  auto s = std::make_unique<HostStream>();
  if (!options_.inline_streams) s->worker = std::thread(&HostDriver::WorkerLoop, s.get());
  return s;
}

void HostDriver::WorkerLoop(HostStream* s) {
  for (;;) {
    absl::AnyInvocable<void() &&> op;
    {
      MutexLock l(&s->mu);
      while (s->queue.empty() && !s->stopping) s->mu.Wait(&s->cv);
      if (s->queue.empty()) return;  // stopping, and drained
      op = std::move(s->queue.front());
      s->queue.pop_front();
    }
    std::move(op)();
  }
}

absl::Status HostDriver::Submit(Stream stream, absl::AnyInvocable<void() &&> op) {
  if (options_.inline_streams) {
    {
      MutexLock l(&streams_mu_);
      if (!streams_.contains(stream)) return NoSuchStream(stream);
    }
    std::move(op)();
    return absl::OkStatus();
  }
  MutexLock l(&streams_mu_);
  auto it = streams_.find(stream);
  if (it == streams_.end()) return NoSuchStream(stream);
  HostStream* s = it->second.get();
  MutexLock sl(&s->mu);
  s->queue.push_back(std::move(op));
  s->cv.Signal();
  return absl::OkStatus();
}

absl::Status HostDriver::Enqueue(Stream stream, absl::AnyInvocable<void() &&> fn) {
  return Submit(stream, std::move(fn));
}

absl::StatusOr<Stream> HostDriver::CreateStream() {
  auto s = StartStream();
  MutexLock l(&streams_mu_);
  const Stream id = next_stream_++;
  streams_.emplace(id, std::move(s));
  return id;
}

namespace {
std::atomic<std::int64_t> g_destroyed_stream_uses{0};
}  // namespace

std::int64_t HostDriver::DestroyedStreamUses() { return g_destroyed_stream_uses.load(); }

absl::Status HostDriver::NoSuchStream(Stream stream) const {
  if (destroyed_streams_.contains(stream)) {
    g_destroyed_stream_uses.fetch_add(1);
    return absl::FailedPreconditionError(absl::StrFormat(
        "host driver: stream %d was destroyed (on a GPU, using it is undefined behaviour)", stream));
  }
  return absl::NotFoundError(absl::StrFormat("host driver: no such stream %d", stream));
}

absl::Status HostDriver::DestroyStream(Stream stream) {
  if (stream == kDefaultStream) {
    return absl::InvalidArgumentError("host driver: the default stream cannot be destroyed");
  }
  std::unique_ptr<HostStream> s;
  {
    MutexLock l(&streams_mu_);
    auto it = streams_.find(stream);
    if (it == streams_.end()) {
      if (destroyed_streams_.contains(stream)) return NoSuchStream(stream);
      return absl::NotFoundError(absl::StrFormat("host driver: DestroyStream: no such stream %d", stream));
    }
    s = std::move(it->second);
    streams_.erase(it);
    destroyed_streams_.insert(stream);
  }
  if (!s->worker.joinable()) return absl::OkStatus();  // inline: its work is done
  {
    MutexLock l(&s->mu);
    s->stopping = true;  // the worker drains the queue first, as cuStreamDestroy lets work finish
    s->cv.Signal();
  }
  s->worker.join();
  return absl::OkStatus();
}

void HostDriver::Complete(const std::shared_ptr<Token>& token) {
  MutexLock l(&done_mu_);
  token->when = absl::Now();
  token->done = true;
  done_cv_.SignalAll();
}

void HostDriver::WaitToken(const std::shared_ptr<Token>& token) {
  MutexLock l(&done_mu_);
  while (!token->done) done_mu_.Wait(&done_cv_);
}

absl::Status HostDriver::SynchronizeStream(Stream stream) {
  auto token = std::make_shared<Token>();
  if (auto s = Submit(stream, [this, token]() { Complete(token); }); !s.ok()) return s;
  WaitToken(token);
  return absl::OkStatus();
}

absl::Status HostDriver::SynchronizeDevice() {
  if (options_.inline_streams) return absl::OkStatus();  // work ran when submitted
  // A token at the end of every stream's queue, all enqueued under one lock so that no stream
  // can be destroyed in between; then wait for each.
  std::vector<std::shared_ptr<Token>> tokens;
  {
    MutexLock l(&streams_mu_);
    for (auto& [id, s] : streams_) {
      auto token = std::make_shared<Token>();
      MutexLock sl(&s->mu);
      s->queue.push_back([this, token]() { Complete(token); });
      s->cv.Signal();
      tokens.push_back(std::move(token));
    }
  }
  for (const auto& token : tokens) WaitToken(token);
  return absl::OkStatus();
}

absl::StatusOr<Event> HostDriver::CreateEvent() {
  MutexLock l(&events_mu_);
  const Event id = next_event_++;
  events_.emplace(id, std::make_unique<HostEvent>());
  return id;
}

absl::Status HostDriver::DestroyEvent(Event event) {
  MutexLock l(&events_mu_);
  if (events_.erase(event) == 0) {
    return absl::NotFoundError(absl::StrFormat("host driver: DestroyEvent: no such event %d", event));
  }
  return absl::OkStatus();
}

absl::Status HostDriver::RecordEvent(Event event, Stream stream) {
  auto token = std::make_shared<Token>();
  {
    MutexLock l(&events_mu_);
    if (!events_.contains(event)) {
      return absl::NotFoundError(absl::StrFormat("host driver: RecordEvent: no such event %d", event));
    }
  }
  if (auto s = Submit(stream, [this, token]() { Complete(token); }); !s.ok()) return s;
  MutexLock l(&events_mu_);
  auto it = events_.find(event);
  if (it != events_.end()) it->second->last = std::move(token);
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<HostDriver::Token>> HostDriver::LastToken(Event event) {
  MutexLock l(&events_mu_);
  auto it = events_.find(event);
  if (it == events_.end()) {
    return absl::NotFoundError(absl::StrFormat("host driver: no such event %d", event));
  }
  return it->second->last;
}

absl::StatusOr<bool> HostDriver::QueryEvent(Event event) {
  auto token = LastToken(event);
  if (!token.ok()) return token.status();
  if (*token == nullptr) return true;
  MutexLock l(&done_mu_);
  return (*token)->done;
}

absl::Status HostDriver::SynchronizeEvent(Event event) {
  auto token = LastToken(event);
  if (!token.ok()) return token.status();
  if (*token != nullptr) WaitToken(*token);
  return absl::OkStatus();
}

absl::Status HostDriver::StreamWaitEvent(Stream stream, Event event) {
  auto token = LastToken(event);
  if (!token.ok()) return token.status();
  if (*token == nullptr) {
    MutexLock l(&streams_mu_);
    if (!streams_.contains(stream)) return NoSuchStream(stream);
    return absl::OkStatus();
  }
  return Submit(stream, [this, t = *std::move(token)]() { WaitToken(t); });
}

absl::StatusOr<double> HostDriver::ElapsedSeconds(Event start, Event end) {
  auto a = LastToken(start);
  if (!a.ok()) return a.status();
  auto b = LastToken(end);
  if (!b.ok()) return b.status();
  if (*a == nullptr || *b == nullptr) {
    return absl::FailedPreconditionError("host driver: ElapsedSeconds on an event that was never recorded");
  }
  MutexLock l(&done_mu_);
  if (!(*a)->done || !(*b)->done) {
    return absl::FailedPreconditionError("host driver: ElapsedSeconds on an event that has not completed");
  }
  return absl::ToDoubleSeconds((*b)->when - (*a)->when);
}

absl::Status HostDriver::MemcpyAsync(void* dst, const void* src, std::size_t bytes, Stream stream) {
  if (bytes == 0) return absl::OkStatus();
  if (dst == nullptr || src == nullptr) {
    return absl::InvalidArgumentError("host driver: MemcpyAsync with a null pointer");
  }
  if (!options_.backed) {
    MutexLock l(&mem_mu_);
    for (const void* p : {static_cast<const void*>(dst), src}) {
      const DevicePtr a = reinterpret_cast<DevicePtr>(p);
      auto it = reservations_.upper_bound(a + bytes - 1);
      if (it != reservations_.begin() && std::prev(it)->first + std::prev(it)->second > a) {
        return absl::FailedPreconditionError(absl::StrFormat(
            "host driver: MemcpyAsync(%p <- %p, %d): device memory of an unbacked host driver (host_backing:false) "
            "holds no bytes",
            dst, src, bytes));
      }
    }
  }
  return Submit(stream, [dst, src, bytes]() { std::memcpy(dst, src, bytes); });
}

}  // namespace stitchalloc
