// HostDriver: the Driver contract emulated on the CPU with real memory mappings, so that
// stitching, aliasing and stream ordering are testable byte for byte without a GPU.
//
// Data structures (all under mem_mu_):
// - One memfd is the device's physical memory. A chunk is a contiguous range of it
//   (chunks_: handle -> offset, size, number of live mappings). free_phys_ holds the unused
//   file ranges, coalesced. Releasing a chunk punches a hole (fallocate) so its pages really
//   return to the system; a chunk released while mapped is kept until its last Unmap.
// - The device's address space is one mmap(PROT_NONE, MAP_NORESERVE) region made at creation
//   (va_base_, va_size_: 16x the capacity, at least 1 TiB, at most 64 TiB; smaller where the
//   process cannot map that much, e.g. under a sanitizer). A reservation is a range of it
//   chosen first-fit from the lowest address (free_va_: coalesced free ranges), so a program
//   that makes the same calls gets the same addresses relative to va_base_ in every run, as on
//   a GPU whose virtual address space is its own; replays are then repeatable. Should the
//   region run out, a reservation falls back to its own mmap outside it.
//   reservations_: base -> size of every reservation, in or outside the region.
// - Map records the chunk at an address of a reservation (maps_: address -> size, chunk, file
//   offset; entries never overlap); the range stays inaccessible (the reservation's PROT_NONE)
//   until SetAccess, as CUDA requires cuMemSetAccess. SetAccess materializes the pending
//   chunks with mmap(MAP_SHARED | MAP_FIXED) of their file ranges, one call per run of chunks
//   consecutive in both the address space and the file, so two mappings of one chunk alias
//   the same pages. Unmap puts the PROT_NONE placeholder back.
// - The file is twice the capacity (sparse) so that chunk placement never fails for lack of a
//   contiguous file range while less than `capacity` bytes are in use; `used_` enforces the
//   capacity. Should retired ranges (below) leave no fitting range, the file grows.
// - Sharing between processes, emulated with the memfd itself. ExportChunk opens the file anew
//   (/proc/self/fd: a descriptor with its own file position) and seeks it to the chunk's
//   offset; the importer, which received a duplicate of that descriptor through pidfd_getfd,
//   reads the offset back with lseek and maps the same pages (ChunkRec::fd is then its own
//   duplicate, `imported`, and does not count towards `used_`). Since importers may still map
//   it, an exported chunk's file range is retired when released: its pages are neither
//   punched out nor handed to another chunk, as CUDA keeps exported memory alive for its
//   importers. Retired ranges stay in the file until the driver goes.
//
// Unbacked mode (HostDriverOptions::backed = false) keeps every structure and check above but
// creates no memfd and materializes nothing: reservations are still real PROT_NONE ranges (so
// addresses are unique and never collide with process memory), chunks are offsets of a file
// that does not exist, SetAccess and Unmap only update maps_. Device memory is then neither
// readable nor writable and MemcpyAsync refuses any range inside a reservation. It serves
// stitchalloc-replay, whose traces never touch bytes and whose speed should measure the
// allocator rather than the kernel's mmap.
//
// Streams are worker threads, each running its queue in order; an event record enqueues the
// completion of a fresh token, so Query/Synchronize/StreamWaitEvent look at exactly the work
// that preceded the most recent Record (as CUDA does). With inline_streams there are no
// threads: work runs when it is submitted, so every event has completed when Record returns,
// as on a GPU with no kernels queued. A replay (no kernels) is then deterministic: the
// allocator's event-gated steps no longer depend on when a worker thread got scheduled.
// A call naming a destroyed stream (undefined behaviour on a GPU: cuStreamSynchronize on one
// crashed the H100 run of 2026-11-23) fails and is counted process-wide
// (DestroyedStreamUses), so tests can check that nothing touches a stream after its end.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/driver.h"
#include "vmm/mutex.h"

namespace stitchalloc {

struct HostDriverOptions {
  std::size_t capacity = 16 * kGiB;    // emulated device memory
  std::size_t granularity = 2 * kMiB;  // a multiple of the system page size
  bool backed = true;                  // false: bookkeeping only, no memory behind the chunks
  bool inline_streams = false;         // true: stream work runs at submission, on the caller's thread
};

class HostDriver final : public Driver {
 public:
  // Fails with InvalidArgument for a zero capacity, a granularity that is not a multiple of
  // the page size, or a capacity that is not a multiple of the granularity.
  static absl::StatusOr<std::unique_ptr<HostDriver>> Create(const HostDriverOptions& options);
  ~HostDriver() override;

  DriverKind kind() const override { return DriverKind::kHost; }
  std::string name() const override;
  int device() const override { return 0; }
  std::size_t granularity() const override { return options_.granularity; }

  absl::StatusOr<PhysHandle> CreateChunk(std::size_t bytes) override;
  absl::Status ReleaseChunk(PhysHandle handle) override;
  absl::StatusOr<DevicePtr> Reserve(std::size_t bytes) override;
  absl::Status FreeReservation(DevicePtr va, std::size_t bytes) override;
  absl::Status Map(DevicePtr va, std::size_t bytes, PhysHandle handle) override;
  absl::Status Unmap(DevicePtr va, std::size_t bytes) override;
  absl::Status SetAccess(DevicePtr va, std::size_t bytes) override;
  bool shareable() const override { return options_.backed; }
  absl::StatusOr<int> ExportChunk(PhysHandle handle) override;
  absl::StatusOr<PhysHandle> ImportChunk(int fd, std::size_t bytes) override;

  // Calls, by any HostDriver of this process, that named a destroyed stream.
  static std::int64_t DestroyedStreamUses();

  absl::StatusOr<Stream> CreateStream() override;
  absl::Status DestroyStream(Stream stream) override;
  absl::Status SynchronizeStream(Stream stream) override;
  absl::Status SynchronizeDevice() override;
  absl::StatusOr<Event> CreateEvent() override;
  absl::Status DestroyEvent(Event event) override;
  absl::Status RecordEvent(Event event, Stream stream) override;
  absl::StatusOr<bool> QueryEvent(Event event) override;
  absl::Status SynchronizeEvent(Event event) override;
  absl::Status StreamWaitEvent(Stream stream, Event event) override;
  absl::StatusOr<Event> CreateTimingEvent() override { return CreateEvent(); }
  absl::StatusOr<double> ElapsedSeconds(Event start, Event end) override;
  absl::StatusOr<void*> AllocateHostPinned(std::size_t bytes) override;
  absl::Status FreeHostPinned(void* ptr) override;
  absl::Status MemcpyAsync(void* dst, const void* src, std::size_t bytes, Stream stream) override;
  absl::StatusOr<MemInfo> GetMemInfo() override;

  // Host driver only: runs `fn` on `stream`, in order with the stream's other work. Tests use
  // it where a GPU program would launch a kernel.
  absl::Status Enqueue(Stream stream, absl::AnyInvocable<void() &&> fn);

  // Observability for tests.
  std::size_t physical_bytes_in_use() const;  // chunks not yet returned to the system
  std::size_t live_chunks() const;
  std::size_t live_mappings() const;
  std::size_t live_reservations() const;
  std::size_t pinned_host_bytes() const;  // AllocateHostPinned not yet freed

 private:
  struct ChunkRec {
    std::size_t offset = 0;
    std::size_t size = 0;
    int map_count = 0;
    bool released = false;
    int fd = -1;           // the file holding its pages: fd_, or (imported) a descriptor of its own
    bool imported = false;
    int export_fd = -1;    // ExportChunk's descriptor, or -1
  };
  struct MapRec {
    std::size_t size = 0;
    PhysHandle handle = 0;
    std::size_t offset = 0;     // the chunk's offset in its file
    int fd = -1;                // the chunk's file
    bool materialized = false;  // mmap'ed into the address space (done by SetAccess)
  };
  struct Token;
  struct HostEvent;
  struct HostStream;

  HostDriver(const HostDriverOptions& options, int fd);

  absl::Status CheckAligned(const char* what, DevicePtr va, std::size_t bytes) const;
  // True when [va, va+bytes) lies inside one reservation.
  bool InsideReservation(DevicePtr va, std::size_t bytes) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mem_mu_);
  // OK when [va, va+bytes) is covered by mappings without gaps; with `exact`, it must also
  // start and end on mapping boundaries.
  absl::Status CheckCovered(const char* what, DevicePtr va, std::size_t bytes, bool exact) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mem_mu_);
  void FreePhysical(const ChunkRec& chunk) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mem_mu_);
  bool InRegion(DevicePtr va) const { return va >= va_base_ && va < va_base_ + va_size_; }

  absl::Status Submit(Stream stream, absl::AnyInvocable<void() &&> op);
  absl::StatusOr<std::shared_ptr<Token>> LastToken(Event event);
  void Complete(const std::shared_ptr<Token>& token);
  void WaitToken(const std::shared_ptr<Token>& token);
  static void WorkerLoop(HostStream* stream);
  std::unique_ptr<HostStream> StartStream();

  const HostDriverOptions options_;
  const int fd_;

  mutable Mutex mem_mu_;
  absl::btree_map<std::size_t, std::size_t> free_phys_ ABSL_GUARDED_BY(mem_mu_);
  absl::flat_hash_map<PhysHandle, ChunkRec> chunks_ ABSL_GUARDED_BY(mem_mu_);
  absl::btree_map<DevicePtr, std::size_t> reservations_ ABSL_GUARDED_BY(mem_mu_);
  DevicePtr va_base_ = 0;  // the address-space region; 0 when none could be mapped
  std::size_t va_size_ = 0;
  absl::btree_map<std::size_t, std::size_t> free_va_ ABSL_GUARDED_BY(mem_mu_);  // free ranges of the region
  absl::btree_map<DevicePtr, MapRec> maps_ ABSL_GUARDED_BY(mem_mu_);
  std::size_t used_ ABSL_GUARDED_BY(mem_mu_) = 0;
  std::size_t file_size_ ABSL_GUARDED_BY(mem_mu_) = 0;  // of the memfd (sparse)
  PhysHandle next_handle_ ABSL_GUARDED_BY(mem_mu_) = 1;
  absl::flat_hash_map<void*, std::size_t> pinned_ ABSL_GUARDED_BY(mem_mu_);  // host "pinned" mmaps

  Mutex streams_mu_;
  absl::flat_hash_map<Stream, std::unique_ptr<HostStream>> streams_ ABSL_GUARDED_BY(streams_mu_);
  Stream next_stream_ ABSL_GUARDED_BY(streams_mu_) = 1;  // ids are never reused
  absl::flat_hash_set<Stream> destroyed_streams_ ABSL_GUARDED_BY(streams_mu_);
  absl::Status NoSuchStream(Stream stream) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(streams_mu_);

  Mutex events_mu_;
  absl::flat_hash_map<Event, std::unique_ptr<HostEvent>> events_ ABSL_GUARDED_BY(events_mu_);
  Event next_event_ ABSL_GUARDED_BY(events_mu_) = 1;

  Mutex done_mu_;  // guards Token::done
  CondVar done_cv_;
};

}  // namespace stitchalloc
