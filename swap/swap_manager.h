// SwapManager: moves saved activations to pinned host memory at layer boundaries and brings
// them back before their layer's backward (design.md, swap and recompute).
//
// A ticket is one saved tensor: a device block the manager owns from Offload() until Wait()
// hands a (possibly different) device block back. States:
//   kRegistered   on the device, waiting for its layer's forward to end
//   kKept         stays on the device (Entry::why): one of the last `keep_last_layers` layers
//                 (their backward follows at once), smaller than `min_bytes`, no pinned memory
//                 was left, the copy could not be issued, or memory the allocator did not make
//                 (Keep: how it is owned and freed is not the manager's to know)
//   kOffloading   device-to-host copy in flight; the device block was freed with a stream use
//                 on the copy stream, so the allocator reuses it only once the copy completed
//   kOnHost       in pinned memory only
//   kPrefetching  host-to-device copy in flight into a block allocated on the copy stream
// Schedule: ForwardEnd(i) issues layer i's offloads (after the work queued on the compute
// stream); BackwardBegin(j) issues the prefetches of layers j-1 .. j-lookahead; Wait(t) makes
// the compute stream wait for the tensor (prefetching it first if that never happened) and
// returns its device address; Cancel(t) (the tensor was freed) drops whatever is pending.
// Host blocks whose copy may still be running go to deferred_ and are freed once it completed.
// Under memory pressure the allocator calls Evict(): registered tensors of the earliest layers
// (the latest backward), and kept ones that found no pinned memory before (the pool may have
// room again), then the last layers kept, newest first (with several passes in flight only the
// oldest one's backward follows at once), are offloaded at once and their device blocks freed;
// Evict also says what still holds device memory, which ends the out-of-memory report if the
// request fails anyway.
//
// Passes: a ticket belongs to the forward pass that saved it (a Pass id the caller picks; 0
// unless it says otherwise), and each layer boundary concerns one pass's tickets only. Several
// passes in flight at once (micro-batches of a pipeline schedule, two forwards before one
// backward, two models on one device) then each prefetch their own tensors: a backward does not
// bring back the layers of passes whose backward comes later. Each pass has its own layer count
// (BeginIteration(num_layers, pass)), so passes over models of different depth coexist. The
// manager remembers the layer counts of at least the kMaxPasses / 2 passes begun last; a pass
// forgotten has no tickets left (those of a pass with tickets are never forgotten).
//
// Borrowed blocks: Offload() with a `release` callback leaves the block with its owner (a
// PyTorch storage): wherever the manager would free it, it calls release(stream) instead, with
// the stream whose queued work still reads the block (the device-to-host copy) or nullopt; the
// owner records that use with the allocator and drops its reference. Claim() says whether the
// block handed back is the one offloaded (never released) or a new one the caller now owns.
//
// Locking: mu_ guards the tickets; it is never held across CachingAllocator::Malloc (which may
// call Evict through the pressure handler).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/caching_allocator.h"
#include "swap/copy_engine.h"
#include "swap/pinned_pool.h"
#include "vmm/mutex.h"

namespace stitchalloc::swap {

// Observers of the device blocks the manager allocates itself (prefetches): `allocated` right
// after the allocation, `freeing` right before the manager frees one it never handed out (a
// cancelled or failed prefetch, or one still pending when the manager goes). A block handed out
// by Claim() is the caller's from then on. The torch plugin keeps PyTorch's memory history this
// way. Either may be empty; they must not call back into the manager.
struct BlockHooks {
  std::function<void(void* block, Stream stream)> allocated;
  std::function<void(void* block, Stream stream)> freeing;
};

struct SwapOptions {
  int lookahead = 1;          // layers prefetched ahead of the backward
  int keep_last_layers = 1;   // the last layers keep their tensors on the device
  std::size_t min_bytes = 0;  // smaller tensors stay on the device
  BlockHooks hooks = {};
};

enum class TicketState : std::uint8_t { kRegistered, kKept, kOffloading, kOnHost, kPrefetching };
// Why a kKept ticket stays on the device.
enum class KeptWhy : std::uint8_t { kNot, kLastLayers, kSmall, kNoHostMemory, kCopyFailed, kForeign };

struct SwapStats {
  std::int64_t registered = 0;
  std::int64_t offloads = 0;            // device-to-host copies issued
  std::int64_t prefetches = 0;          // host-to-device copies issued
  std::int64_t kept_last_layers = 0;
  std::int64_t kept_small = 0;
  std::int64_t kept_no_host_memory = 0;  // pinned pool exhausted: stayed on the device
  std::int64_t kept_foreign = 0;         // memory the allocator did not make (Keep)
  std::int64_t prefetch_failures = 0;    // no device memory for a prefetch (retried at Wait)
  std::int64_t waits = 0;
  std::int64_t late_prefetches = 0;      // Wait found the tensor still on the host
  std::int64_t cancelled = 0;
  std::int64_t evicted = 0;              // offloaded under memory pressure
  std::int64_t evicted_bytes = 0;
  std::int64_t bytes_offloaded = 0;
  std::int64_t bytes_prefetched = 0;
  std::int64_t live_tickets = 0;
};

class SwapManager {
 public:
  using Ticket = std::uint64_t;
  using Pass = std::uint64_t;
  // Passes remembered before the oldest without tickets are forgotten (see the top of this file).
  static constexpr std::size_t kMaxPasses = 256;
  using Release = std::function<void(std::optional<Stream> in_use_by)>;
  struct Claimed {
    void* ptr = nullptr;
    bool same_block = false;  // the block given to Offload (it never left the device)
  };

  // The allocator, pool and engine must outlive the manager and share one driver. `compute`
  // is the stream the model runs on. Registers Evict as the allocator's pressure handler.
  static absl::StatusOr<std::unique_ptr<SwapManager>> Create(CachingAllocator* allocator, PinnedPool* pool,
                                                             CopyEngine* engine, Stream compute,
                                                             const SwapOptions& options);
  // Removes the pressure handler, waits for copies and frees what the manager still owns.
  ~SwapManager();
  SwapManager(const SwapManager&) = delete;
  SwapManager& operator=(const SwapManager&) = delete;

  // Starts forward pass `pass` over `num_layers` layers (fixes which of its layers are "last").
  // Begun again, a pass takes the new layer count.
  absl::Status BeginIteration(int num_layers, Pass pass = 0);
  // Hands a device block (from the allocator, `bytes` long) saved by layer `layer` to the
  // manager, in pass `pass`. InvalidArgument for a null pointer, zero bytes or a layer outside
  // the pass (or a pass not begun). With `release`, the block is borrowed (see the top of this
  // file) and called at most once.
  absl::StatusOr<Ticket> Offload(void* device_ptr, std::size_t bytes, int layer, Release release = nullptr,
                                 Pass pass = 0);
  // A saved tensor in memory the allocator did not make (another process's, opened by CUDA IPC;
  // an allocation of PyTorch's uncached mode; another library's): a ticket like Offload's that
  // keeps it on the device (kKept, kForeign), since how that memory is owned and freed is not
  // the manager's to know. Validates as Offload does.
  absl::StatusOr<Ticket> Keep(void* device_ptr, std::size_t bytes, int layer, Release release = nullptr,
                              Pass pass = 0);
  // Layer `layer`'s forward ended in pass `pass`: issues its offloads.
  absl::Status ForwardEnd(int layer, Pass pass = 0);
  // Pass `pass`'s backward reached layer `layer`: issues the prefetches of that pass's
  // `lookahead` layers below it.
  absl::Status BackwardBegin(int layer, Pass pass = 0);
  // The tensor's device address, usable on the compute stream in order (the stream waits for
  // the prefetch; the host never blocks unless the tensor is still being offloaded and has to
  // come straight back). The ticket ends; the caller owns the block (free it with the allocator).
  absl::StatusOr<void*> Wait(Ticket ticket);
  // Wait() that also says whether the block is the one offloaded.
  absl::StatusOr<Claimed> Claim(Ticket ticket);
  // The tensor was freed before its backward: pending copies are dropped, memory returned.
  absl::Status Cancel(Ticket ticket);
  // Pressure handler: frees at least `bytes` of device memory if it can; returns the bytes
  // freed and a note on what of the manager's still holds device memory, and why.
  CachingAllocator::PressureRelief Evict(std::size_t bytes);
  // Frees host blocks whose copies have completed (also done by every other call).
  void Poll();

  absl::StatusOr<TicketState> State(Ticket ticket) const;
  SwapStats GetStats() const;
  Stream compute_stream() const { return compute_; }

 private:
  struct Entry {
    TicketState state = TicketState::kRegistered;
    KeptWhy why = KeptWhy::kNot;  // set with kKept
    int layer = 0;
    Pass pass = 0;
    std::size_t bytes = 0;
    void* device = nullptr;  // owned while kRegistered / kKept / kPrefetching
    void* host = nullptr;    // pinned copy while kOffloading / kOnHost / kPrefetching
    CopyEngine::CopyId copy = 0;  // the copy in flight (or the last one)
    Release release;              // set while a borrowed block is still the owner's
  };
  struct PassInfo {
    int num_layers = 0;
    std::uint64_t begun = 0;  // begins_ when it was (last) begun
  };
  struct Deferred {
    CopyEngine::CopyId copy;
    void* host;
  };
  SwapManager(CachingAllocator* a, PinnedPool* p, CopyEngine* e, Stream compute, const SwapOptions& o)
      : alloc_(a), pool_(p), engine_(e), compute_(compute), options_(o) {}

  // Offload and Keep: a new ticket, kept on the device at once when `keep` says why.
  absl::StatusOr<Ticket> Register(void* device_ptr, std::size_t bytes, int layer, Release release, KeptWhy keep,
                                  Pass pass);
  // `pass`'s layer count, once `layer` is checked to be one of its layers; `what` names the call.
  absl::StatusOr<int> LayersOfLocked(const char* what, int layer, Pass pass) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Past kMaxPasses remembered: forgets the oldest passes without tickets, down to
  // kMaxPasses / 2 (never `keep`).
  void ForgetPassesLocked(Pass keep) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status OffloadLocked(Ticket t, Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Evict's note: what it moved, and the tickets still on the device by why.
  std::string PressureNoteLocked(std::int64_t moved, std::size_t moved_bytes) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Issues the prefetch of one ticket; takes mu_ itself (allocates without it). A ticket that
  // is gone meanwhile (claimed or cancelled by another thread) is no error: nothing to do.
  absl::Status Prefetch(Ticket t);
  void PollLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Gives the original device block back: release() for a borrowed block, Free otherwise.
  absl::Status ReturnBlock(Entry& e, std::optional<Stream> in_use_by) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DeferHostFree(CopyEngine::CopyId copy, void* host) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Frees a prefetch block the manager allocated and never handed out (hooks.freeing first).
  void FreeOwn(void* block);

  CachingAllocator* const alloc_;
  PinnedPool* const pool_;
  CopyEngine* const engine_;
  const Stream compute_;
  const SwapOptions options_;

  mutable Mutex mu_;
  absl::flat_hash_map<Pass, PassInfo> passes_ ABSL_GUARDED_BY(mu_);
  std::uint64_t begins_ ABSL_GUARDED_BY(mu_) = 0;
  Ticket next_ ABSL_GUARDED_BY(mu_) = 1;
  absl::btree_map<Ticket, Entry> tickets_ ABSL_GUARDED_BY(mu_);
  std::vector<Deferred> deferred_ ABSL_GUARDED_BY(mu_);
  std::vector<CopyEngine::CopyId> finished_ ABSL_GUARDED_BY(mu_);  // copies to release when done
  SwapStats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace stitchalloc::swap
