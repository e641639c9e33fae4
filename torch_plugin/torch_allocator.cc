// TorchAllocator: stitchalloc as PyTorch's CUDA allocator. A subclass of
// c10::cuda::CUDACachingAllocator::CUDAAllocator that delegates every request to one PoolSet
// per device (created when the device is first used) and translates statistics, snapshots,
// history, CUDA IPC handles (allocator/ipc.h) and errors into PyTorch's types, so
// torch.cuda.memory_*, torch.cuda.memory._* and torch.multiprocessing keep working unchanged.
//
// Installed by stitchalloc_torch_install() (below): it refuses once PyTorch's current CUDA
// allocator is initialised (torch.cuda has been used), otherwise it stores the instance where
// c10 looks the CUDA allocator up (CUDACachingAllocator::allocator) and registers it as the
// kCUDA device allocator (at::getAllocator, torch.accelerator). The instance lives for the
// rest of the process, as PyTorch's own does. It also listens, behind PyTorch's own device hook,
// to allocator settings given at run time (torch._C._accelerator_setAllocatorSettings), which
// PyTorch applies to its configuration only, and warns once for each that does not reach
// stitchalloc (RunTimeSettingNotes in alloc_conf.h).
//
// Invariants: devices_[d] is set once and never changes; history entries and pointer contexts
// are guarded by history_mu_, which is never held while calling into a PoolSet or Python.
// Segment entries are recorded from inside the allocators (OnSegments, under their locks), so
// the lock order is create_mu_ -> PoolSet -> CachingAllocator -> history_mu_, and contexts
// (which may take the GIL) are gathered before any of them is taken.
// Errors: out-of-memory raises c10::OutOfMemoryError (torch.OutOfMemoryError) whose message
// starts "CUDA out of memory." followed by stitchalloc's report; any other failure raises
// c10::Error naming the operation.
#include <c10/core/Allocator.h>
#if __has_include(<c10/core/AllocatorConfig.h>)
#include <c10/core/AllocatorConfig.h>
#define STITCHALLOC_HAVE_ALLOCATOR_CONFIG 1
#endif
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/ApproximateClock.h>
#include <c10/util/Exception.h>
#include <c10/util/env.h>
#include <torch/headeronly/version.h>

#include <unistd.h>

#include <array>
#include <atomic>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "absl/base/const_init.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "allocator/arena/arena.h"
#include "allocator/config.h"
#include "allocator/ipc.h"
#include "allocator/segment_pool.h"
#include "torch_plugin/alloc_conf.h"
#include "torch_plugin/pool_set.h"
#include "torch_plugin/torch_internal.h"
#include "torch_plugin/uncached.h"

// What differs between the torch versions the plugin supports (2.11 to 2.15, checked by compiling).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 12)
#define STITCHALLOC_TORCH_HAS_OOM_REJECTION 1  // CUDAAllocator::attachOomRejectionObserver
#endif
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
#define STITCHALLOC_TORCH_HAS_POOL_STATS 1  // DeviceStats::reserved_bytes_by_private_pools
#endif
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 14)
#define STITCHALLOC_TORCH_HAS_ANNOTATIONS 1  // annotateMemory, supportsUserMetadata, TraceEntry::ANNOTATE
#endif

namespace stitchalloc {
namespace {

namespace cca = c10::cuda::CUDACachingAllocator;
namespace cda = c10::CachingDeviceAllocator;
using c10::DeviceIndex;

constexpr int kMaxDevices = 64;

void RawDelete(void* ptr);
void UncachedDelete(void* ptr);

[[noreturn]] void Raise(const char* op, const absl::Status& s) {
  if (s.code() == absl::StatusCode::kResourceExhausted) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, "CUDA out of memory. stitchalloc: ", std::string(s.message()));
  }
  TORCH_CHECK(false, "stitchalloc ", op, ": ", std::string(s.message()));
}

void Check(const char* op, const absl::Status& s) {
  if (!s.ok()) Raise(op, s);
}

// getCheckpointState's answer: a private pool's live allocations when it was taken.
struct PoolCheckpoint final : cca::AllocatorState {
  PoolCheckpoint(DeviceIndex d, PoolId p, std::vector<CachingAllocator::LiveAllocation> b)
      : device(d), pool(p), blocks(std::move(b)) {}
  DeviceIndex device;
  PoolId pool;
  std::vector<CachingAllocator::LiveAllocation> blocks;
};

// The allocator of a torch.cuda.MemPool(allocator) (a CUDAPluggableAllocator: NCCL's ncclMemAlloc,
// vLLM's cuMem allocator, ...): its raw_alloc / raw_delete make the pool's segments, which a
// SegmentPool sub-allocates, as PyTorch's allocator uses a pool's allocator. Called with the
// pool's lock held, as PyTorch calls it with its own; its exceptions become Statuses there.
class MemPoolSource final : public SegmentSource {
 public:
  explicit MemPoolSource(std::shared_ptr<cca::CUDAAllocator> allocator)
      : allocator_(std::move(allocator)), name_(absl::StrCat("the MemPool's own allocator (", allocator_->name(), ")")) {}
  absl::StatusOr<Segment> Allocate(std::size_t bytes) override {
    try {
      void* p = allocator_->raw_alloc(bytes);
      if (p == nullptr) return absl::ResourceExhaustedError(absl::StrCat(name_, " returned no memory for ", bytes, " bytes"));
      return Segment{reinterpret_cast<DevicePtr>(p), bytes};
    } catch (const c10::OutOfMemoryError& e) {
      return absl::ResourceExhaustedError(absl::StrCat(name_, ": ", e.what_without_backtrace()));
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat(name_, " failed: ", e.what_without_backtrace()));
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat(name_, " failed: ", e.what()));
    }
  }
  absl::Status Release(const Segment& segment) override {
    try {
      allocator_->raw_delete(reinterpret_cast<void*>(segment.ptr));
      return absl::OkStatus();
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat(name_, " failed to free a segment: ", e.what_without_backtrace()));
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat(name_, " failed to free a segment: ", e.what()));
    }
  }
  std::string name() const override { return name_; }

 private:
  const std::shared_ptr<cca::CUDAAllocator> allocator_;
  const std::string name_;
};

// PyTorch's uncached mode under CUDA (uncached.h): each allocation a cudaMalloc of its own, as
// PyTorch's allocator then makes them, so that compute-sanitizer sees each tensor's exact bounds.
// cudaFree waits for the device itself.
class CudaMallocSource final : public SegmentSource {
 public:
  explicit CudaMallocSource(DeviceIndex device) : device_(device) {}
  absl::StatusOr<Segment> Allocate(std::size_t bytes) override {
    c10::cuda::CUDAGuard guard(device_);
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e == cudaSuccess) return Segment{reinterpret_cast<DevicePtr>(p), bytes};
    (void)cudaGetLastError();  // not sticky: the report follows
    const std::string why = absl::StrCat("cudaMalloc: ", cudaGetErrorString(e));
    return e == cudaErrorMemoryAllocation ? absl::ResourceExhaustedError(why) : absl::InternalError(why);
  }
  absl::Status Release(const Segment& segment) override {
    c10::cuda::CUDAGuard guard(device_);
    const cudaError_t e = cudaFree(reinterpret_cast<void*>(segment.ptr));
    if (e == cudaSuccess) return absl::OkStatus();
    (void)cudaGetLastError();
    return absl::InternalError(absl::StrCat("cudaFree: ", cudaGetErrorString(e)));
  }
  std::string name() const override { return absl::StrCat("cudaMalloc on device ", static_cast<int>(device_)); }

 private:
  const DeviceIndex device_;
};

void CopyStat(const Stat& from, c10::CachingAllocator::Stat& to) {
  to.current = from.current;
  to.peak = from.peak;
  to.allocated = from.allocated;
  to.freed = from.freed;
}

void CopyArray(const StatArray& from, c10::CachingAllocator::StatArray& to) {
  for (int i = 0; i < 3; ++i) CopyStat(from.pools[i], to[i]);
}

// A context for one history entry (TorchAllocator::Gather): the stacks, whether the entry
// carries them (in_trace) and whether they describe a live allocation (keep_state).
struct Gathered {
  std::shared_ptr<c10::GatheredContext> context;
  bool keep_state = false;
  bool in_trace = false;
};

// The context of the call (malloc, free, emptyCache) running on this thread, for
// the segments it maps or unmaps (OnSegments).
thread_local const Gathered* t_call_context = nullptr;

// What torch.cuda.memory._set_memory_metadata set on this thread, and the compiled regions
// (torch.compile) this thread is inside while the history records their names: every history
// entry this thread makes carries the metadata and the innermost region, as PyTorch's do.
thread_local std::string t_user_metadata;
thread_local std::vector<std::string> t_compile_context;

class CallContext {
 public:
  explicit CallContext(const Gathered* g) : saved_(t_call_context) { t_call_context = g; }
  ~CallContext() { t_call_context = saved_; }
  CallContext(const CallContext&) = delete;
  CallContext& operator=(const CallContext&) = delete;

 private:
  const Gathered* saved_;
};

class TorchAllocator final : public cca::CUDAAllocator {
 public:
  explicit TorchAllocator(Config base) : base_(std::move(base)) {}

  // ---- c10::Allocator ------------------------------------------------------------------
  c10::DataPtr allocate(size_t n) override {
    const DeviceIndex device = CurrentDevice();
    if (Uncached()) {
      void* p = n == 0 ? nullptr : UncachedMalloc(device, n);
      return {p, p, &UncachedDelete, c10::Device(c10::DeviceType::CUDA, device)};
    }
    void* p = n == 0 ? nullptr : Malloc(device, n, reinterpret_cast<cudaStream_t>(CurrentStreamOf(device)));
    return {p, p, &RawDelete, c10::Device(c10::DeviceType::CUDA, device)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return Uncached() ? &UncachedDelete : &RawDelete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    C10_CUDA_CHECK(cudaMemcpy(dest, src, count, cudaMemcpyDeviceToDevice));
  }

  // ---- c10::DeviceAllocator --------------------------------------------------------------
  bool initialized() override { return initialized_.load(); }
  void emptyCache(c10::MempoolId_t mempool_id) override {
    const Gathered context = ReleaseContext();
    CallContext scope(&context);
    for (int d = 0; d < kMaxDevices; ++d) {
      if (PoolSet* set = devices_[d].load()) Check("emptyCache", set->EmptyCache(ToPool(mempool_id)));
    }
  }
  cda::DeviceStats getDeviceStats(DeviceIndex device) override {
    cda::DeviceStats out;
    PoolSet& set = Device(device);
    const Stats s = set.GetStats();
    CopyArray(s.allocation, out.allocation);
    CopyArray(s.segment, out.segment);
    CopyArray(s.active, out.active);
    CopyArray(s.inactive_split, out.inactive_split);
    CopyArray(s.allocated_bytes, out.allocated_bytes);
    CopyArray(s.reserved_bytes, out.reserved_bytes);
    CopyArray(s.active_bytes, out.active_bytes);
    CopyArray(s.inactive_split_bytes, out.inactive_split_bytes);
    CopyArray(s.requested_bytes, out.requested_bytes);
    CopyStat(s.oversize_allocations, out.oversize_allocations);
    CopyStat(s.oversize_segments, out.oversize_segments);
    out.num_alloc_retries = s.num_alloc_retries;
    out.num_ooms = s.num_ooms;
    out.num_sync_all_streams = s.num_sync_all_streams;
    out.num_device_alloc = s.num_device_alloc;
    out.num_device_free = s.num_device_free;
    out.max_split_size = s.max_split_size;
#ifdef STITCHALLOC_TORCH_HAS_POOL_STATS
    for (const auto& [id, ps] : set.PrivatePoolStats()) {
      CopyArray(ps.reserved_bytes, out.reserved_bytes_by_private_pools[c10::MempoolId_t{id.first, id.second}]);
    }
#endif
    return out;
  }
  void resetAccumulatedStats(DeviceIndex device) override { Device(device).ResetAccumulatedStats(); }
  void resetPeakStats(DeviceIndex device) override { Device(device).ResetPeakStats(); }

  // ---- CUDAAllocator ---------------------------------------------------------------------
  void* raw_alloc(size_t nbytes) override {
    if (nbytes == 0) return nullptr;
    const DeviceIndex device = CurrentDevice();
    if (Uncached()) return UncachedMalloc(device, nbytes);
    return Malloc(device, nbytes, reinterpret_cast<cudaStream_t>(CurrentStreamOf(device)));
  }
  void* raw_alloc_with_stream(size_t nbytes, cudaStream_t stream) override {
    if (nbytes == 0) return nullptr;
    if (Uncached()) return UncachedMalloc(CurrentDevice(), nbytes);
    return Malloc(CurrentDevice(), nbytes, stream);
  }
  void raw_delete(void* ptr) override { Free(ptr); }
  void init(int device_count) override {
    TORCH_CHECK(device_count >= 0 && device_count <= kMaxDevices, "stitchalloc: unsupported device count ",
                device_count, " (at most ", kMaxDevices, ")");
    device_count_ = device_count;
    initialized_.store(true);
  }
  double getMemoryFraction(DeviceIndex device) override { return Device(device).memory_fraction(); }
  void setMemoryFraction(double fraction, DeviceIndex device) override {
    Check("setMemoryFraction", Device(device).SetMemoryFraction(fraction));
  }
  std::vector<cca::StreamSegmentSize> getExpandableSegmentSizes(DeviceIndex) override { return {}; }
  // torch.cuda.memory.caching_allocator_enable: while disabled (or with
  // PYTORCH_NO_CUDA_MEMORY_CACHING=1 from the start), PyTorch's uncached mode (uncached.h).
  // Memory keeps the mode it was allocated in: a pointer is freed the way it was made, whatever
  // the mode is by then.
  void enable(bool value) override { enabled_.store(value, std::memory_order_relaxed); }
  bool isEnabled() const override { return enabled_.load(std::memory_order_relaxed); }
  void cacheInfo(DeviceIndex device, size_t* largest) override {
    PoolSet& set = Device(device);
    const Stats s = set.GetStats();
    const std::int64_t fresh =
        static_cast<std::int64_t>(set.memory_limit()) - s.reserved_bytes.all().current;
    *largest = std::max({*largest, set.LargestFreeBlock(), static_cast<size_t>(std::max<std::int64_t>(fresh, 0))});
  }
  void* getBaseAllocation(void* ptr, size_t* size) override {
    if (uncached_.live() != 0) {
      if (std::optional<UncachedAllocations::Live> live = uncached_.Find(ptr)) {
        if (size != nullptr) *size = live->segment.size;
        return ptr;
      }
    }
    for (int d = 0; d < kMaxDevices; ++d) {
      PoolSet* set = devices_[d].load();
      if (set == nullptr) continue;
      auto info = set->Describe(ptr);
      if (!info.ok()) continue;
      if (size != nullptr) *size = info->mapping_size;
      return reinterpret_cast<void*>(info->mapping_va);
    }
    TORCH_CHECK(false, "stitchalloc getBaseAllocation: ", ptr, " is not an allocation of stitchalloc");
  }
  void recordStream(const c10::DataPtr& ptr, c10::cuda::CUDAStream stream) override {
    if (ptr.get() == nullptr || ptr.get_deleter() != &RawDelete) return;
    PoolSet& set = Device(ptr.device().index());
    Check("recordStream", set.RecordStream(ptr.get(), ToStream(stream.stream())));
  }
  cca::SnapshotInfo snapshot(c10::MempoolId_t mempool_id, bool include_traces) override;
  void beginAllocateToPool(DeviceIndex device, c10::MempoolId_t mempool_id,
                           std::function<bool(cudaStream_t)> filter) override {
    Check("beginAllocateToPool",
          Device(device).BeginAllocateToPool(ToPool(mempool_id), [filter = std::move(filter)](Stream s) {
            return filter(reinterpret_cast<cudaStream_t>(s));
          }));
    captures_.fetch_add(1);
  }
  void endAllocateToPool(DeviceIndex device, c10::MempoolId_t mempool_id) override {
    Check("endAllocateToPool", Device(device).EndAllocateToPool(ToPool(mempool_id)));
    captures_.fetch_sub(1);
  }
  void releasePool(DeviceIndex device, c10::MempoolId_t mempool_id) override {
    Check("releasePool", Device(device).ReleasePool(ToPool(mempool_id)));
  }
  void setUseOnOOM(DeviceIndex device, c10::MempoolId_t mempool_id, bool use_on_oom) override {
    Check("setUseOnOOM", Device(device).SetUseOnOom(ToPool(mempool_id), use_on_oom));
  }
  int getPoolUseCount(DeviceIndex device, c10::MempoolId_t mempool_id) override {
    return Device(device).PoolUseCount(ToPool(mempool_id));
  }
  void createOrIncrefPool(DeviceIndex device, c10::MempoolId_t mempool_id,
                          std::shared_ptr<cca::CUDAAllocator> allocator) override {
    std::shared_ptr<SegmentSource> source;
    if (allocator != nullptr && allocator.get() != this) source = std::make_shared<MemPoolSource>(std::move(allocator));
    Check("createOrIncrefPool", Device(device).CreateOrIncrefPool(ToPool(mempool_id), std::move(source)));
  }
  void setNoSplit(DeviceIndex device, c10::MempoolId_t mempool_id) override {
    Check("setNoSplit", Device(device).SetNoSplit(ToPool(mempool_id)));
  }
  bool checkPoolLiveAllocations(DeviceIndex device, c10::MempoolId_t mempool_id,
                                const std::unordered_set<void*>& expected_live_allocations) override {
    std::unordered_set<void*> live;
    for (const PoolSet::Segment& seg : Device(device).Snapshot(ToPool(mempool_id))) {
      if (seg.pool != ToPool(mempool_id)) continue;
      for (const auto& b : seg.info.blocks) {
        if (b.state == BlockState::kAllocated) live.insert(reinterpret_cast<void*>(b.ptr));
      }
    }
    return live == expected_live_allocations;
  }
  // ---- CUDA IPC (torch.multiprocessing), in PyTorch's expandable-segment format (ipc.h) ------
  cca::ShareableHandle shareIpcHandle(void* ptr) override {
    if (uncached_.live() != 0 && uncached_.Find(ptr).has_value()) return ShareUncached(ptr);
    const int device = DeviceIndexOf(ptr);
    TORCH_CHECK(device >= 0, "stitchalloc shareIpcHandle: ", ptr, " is not an allocation of stitchalloc");
    PoolSet& set = *devices_[device].load();
    absl::StatusOr<SharedRange> shared = set.Share(ptr);
    if (shared.ok()) return {static_cast<ptrdiff_t>(shared->offset), EncodeIpcHandle(*shared, getpid())};
    if (absl::IsFailedPrecondition(shared.status()) && !HostDriver()) {
      // Memory stitchalloc did not make (a MemPool's own allocator): the CUDA runtime may share
      // it, as PyTorch's allocator shares its cudaMalloc segments ('c' handle, segment offset).
      absl::StatusOr<BlockInfo> info = set.Describe(ptr);
      cudaIpcMemHandle_t h;
      c10::cuda::CUDAGuard guard(static_cast<DeviceIndex>(device));
      if (info.ok() && cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(info->mapping_va)) == cudaSuccess) {
        absl::StatusOr<std::string> handle =
            EncodeCudaMallocHandle(std::string_view(reinterpret_cast<const char*>(&h), sizeof(h)));
        if (!handle.ok()) Raise("shareIpcHandle", handle.status());
        return {static_cast<ptrdiff_t>(reinterpret_cast<DevicePtr>(ptr) - info->mapping_va), *std::move(handle)};
      }
      (void)cudaGetLastError();  // the runtime's refusal is not a sticky error; the report follows
    }
    Raise("shareIpcHandle", shared.status());
  }
  std::shared_ptr<void> getIpcDevPtr(std::string handle) override;
  bool isHistoryEnabled() override { return record_history_.load(); }
  void recordHistory(bool enabled, cda::CreateContextFn context_recorder, size_t alloc_trace_max_entries,
                     cda::RecordContext when, bool clear_history,
                     const std::vector<std::string>& skip_actions) override {
    {
      std::lock_guard<std::mutex> lock(history_mu_);
      context_recorder_ = enabled ? context_recorder : nullptr;
      when_ = enabled ? when : cda::RecordContext::NEVER;
      max_entries_ = std::max<size_t>(alloc_trace_max_entries, 1);
      skip_.clear();
      for (const std::string& a : skip_actions) skip_.insert(cda::parseTraceEntryAction(a));
      if (clear_history) {
        for (auto& t : traces_) t.clear();
      }
      while (true) {
        bool trimmed = false;
        for (auto& t : traces_) {
          while (t.size() > max_entries_) {
            t.pop_front();
            trimmed = true;
          }
        }
        if (!trimmed) break;
      }
      if (!enabled) contexts_.clear();
      record_history_.store(enabled);
    }
    UpdateSegmentObservers();  // outside history_mu_: their events take it
  }
  void recordAnnotation(const std::vector<std::pair<std::string, std::string>>& md) override {
    if (!record_history_.load()) return;
    cda::AnnotationEntry entry(CurrentDeviceOrZero(), c10::getApproximateTime());
    for (const auto& [k, v] : md) entry.recordUserMetadata(k, v);
    std::lock_guard<std::mutex> lock(history_mu_);
    annotations_.push_back(std::move(entry));
  }
  // torch.cuda.memory._set_memory_metadata / _get_memory_metadata: per thread, as PyTorch
  // documents it, on every entry the thread makes on any device.
  void setUserMetadata(const std::string& metadata) override { t_user_metadata = metadata; }
  std::string getUserMetadata() override { return t_user_metadata; }
  // _record_memory_history(compile_context=True): torch pushes the name of each compiled region
  // the thread enters and pops it on leaving; entries carry the innermost one.
  void pushCompileContext(std::string& md) override { t_compile_context.push_back(md); }
  void popCompileContext() override {
    if (!t_compile_context.empty()) t_compile_context.pop_back();
  }
#ifdef STITCHALLOC_TORCH_HAS_ANNOTATIONS
  bool supportsUserMetadata() override { return true; }
  // torch.cuda.memory._annotate_tensor: an "annotate" entry for live allocation `ptr` (its base
  // address), with the stacks the history keeps for allocations. Nothing while no history
  // records and no tracker listens; a pointer that is not a live allocation is an error, as in
  // PyTorch.
  void annotateMemory(const void* ptr, const std::string& metadata) override {
    if (!record_history_.load() && !has_trackers_.load()) return;
    const int device = DeviceIndexOf(ptr);
    TORCH_CHECK(device >= 0, "stitchalloc annotateMemory: no live allocation found at pointer ", ptr,
                " (a tensor's storage from stitchalloc is needed, at its base address)");
    PoolSet& set = *devices_[device].load();
    absl::StatusOr<BlockInfo> info = set.Describe(ptr);
    TORCH_CHECK(info.ok(), "stitchalloc annotateMemory: no live allocation found at pointer ", ptr);
    Gathered context = Gather(cda::TraceEntry::ALLOC, /*freeing=*/false);
    context.keep_state = false;  // the allocation keeps the stacks of its malloc
    Record(cda::TraceEntry::ANNOTATE, static_cast<DeviceIndex>(device), const_cast<void*>(ptr), info->size,
           reinterpret_cast<cudaStream_t>(info->stream), set.PoolOf(ptr), /*freeing=*/false, context, &metadata);
  }
#endif
  void attachOutOfMemoryObserver(cca::OutOfMemoryObserver observer) override {
    std::lock_guard<std::mutex> lock(history_mu_);
    oom_observers_.push_back(std::move(observer));
  }
#ifdef STITCHALLOC_TORCH_HAS_OOM_REJECTION
  void attachOomRejectionObserver(cca::OomRejectionObserver) override {}  // stitchalloc never pre-empts
#endif
  void attachAllocatorTraceTracker(cda::AllocatorTraceTracker tracker) override {
    {
      std::lock_guard<std::mutex> lock(history_mu_);
      trackers_.push_back(std::move(tracker));
      has_trackers_.store(true);
    }
    UpdateSegmentObservers();
  }
  void enablePeerAccess(DeviceIndex, DeviceIndex) override {
    // VMM mappings are accessible from their own device only; copies between devices use the
    // peer copy path (memcpyAsync below), which needs no access rights.
  }
  cudaError_t memcpyAsync(void* dst, int dstDevice, const void* src, int srcDevice, size_t count,
                          cudaStream_t stream, bool /*p2p_enabled*/) override {
    if (dstDevice == srcDevice) return cudaMemcpyAsync(dst, src, count, cudaMemcpyDeviceToDevice, stream);
    return cudaMemcpyPeerAsync(dst, dstDevice, src, srcDevice, count, stream);
  }
  // CUDA graph trees (torch.compile mode="reduce-overhead") checkpoint a private pool after
  // each recording and may restore it before the next one.
  std::shared_ptr<cca::AllocatorState> getCheckpointState(DeviceIndex device, c10::MempoolId_t id) override {
    auto blocks = Device(device).PoolAllocations(ToPool(id));
    Check("getCheckpointState", blocks.status());
    return std::make_shared<PoolCheckpoint>(device, ToPool(id), *std::move(blocks));
  }
  cca::CheckpointDelta setCheckpointPoolState(DeviceIndex device, std::shared_ptr<cca::AllocatorState> as) override {
    auto state = std::dynamic_pointer_cast<PoolCheckpoint>(as);
    TORCH_CHECK(state != nullptr, "stitchalloc setCheckpointPoolState: the state was not made by stitchalloc's "
                                  "getCheckpointState");
    TORCH_CHECK(state->device == device, "stitchalloc setCheckpointPoolState: the state is of device ",
                static_cast<int>(state->device), ", not ", static_cast<int>(device));
    auto restored = Device(device).RestorePool(state->pool, state->blocks);
    Check("setCheckpointPoolState", restored.status());
    if (record_history_.load() || has_trackers_.load()) {
      // In the trace, as the allocator's own frees and allocations: what went and what came.
      for (const auto& b : restored->dropped) {
        TraceFree(device, reinterpret_cast<void*>(b.ptr), b.size, reinterpret_cast<cudaStream_t>(b.stream), state->pool);
      }
      for (const auto& b : restored->made) {
        Trace(cda::TraceEntry::ALLOC, device, reinterpret_cast<void*>(b.ptr), b.size,
              reinterpret_cast<cudaStream_t>(b.stream), state->pool, /*freeing=*/false);
      }
    }
    cca::CheckpointDelta delta;
    delta.ptrs_freed = std::move(restored->freed);
    for (const auto& b : state->blocks) {
      void* p = reinterpret_cast<void*>(b.ptr);
      delta.dataptrs_allocd.emplace_back(p, p, &RawDelete, c10::Device(c10::DeviceType::CUDA, device));
    }
    return delta;
  }
  std::string name() override { return "stitchalloc"; }

  // ---- used by RawDelete and the C entry points ----------------------------------------
  void Free(void* ptr) {
    if (ptr == nullptr) return;
    if (uncached_.live() != 0) [[unlikely]] {
      // raw_alloc's memory from the uncached mode, freed by raw_delete (even after the mode ended).
      if (absl::Status s = uncached_.Free(ptr); !absl::IsNotFound(s)) return Check("free", s);
    }
    DeviceIndex device = 0;
    if (device_count_in_use_.load() > 1) device = DeviceOf(ptr);
    PoolSet* set = devices_[device].load();
    TORCH_CHECK(set != nullptr, "stitchalloc free: ", ptr, " was not allocated by stitchalloc");
    const bool history = record_history_.load() || has_trackers_.load();
    const std::size_t size = history ? SizeOf(*set, ptr) : 0;
    const PoolId pool = history ? set->PoolOf(ptr) : kDefaultPool;
    Gathered context;
    if (history) context = Gather(cda::TraceEntry::FREE_REQUESTED, /*freeing=*/true);
    {
      CallContext scope(history ? &context : nullptr);
      Check("free", set->Free(ptr));
    }
    if (history) TraceFree(device, ptr, size, nullptr, pool, context);
  }
  // The deleter of allocate()'s uncached memory (a deleter of its own, so that recordStream
  // leaves it alone, as PyTorch's does: cudaFree waits for every stream). raw_deleter() gives it
  // out while the mode is on; a cached pointer freed with it goes where it came from.
  void FreeUncached(void* ptr) {
    if (ptr == nullptr) return;
    if (absl::Status s = uncached_.Free(ptr); !absl::IsNotFound(s)) return Check("free", s);
    Free(ptr);
  }
  // A block of the swap manager's own (a prefetch), allocated or about to be freed by it: in the
  // memory history like PyTorch's allocations, so that a trace pairs every free with its alloc.
  void TraceSwapBlock(bool allocated, DeviceIndex device, void* ptr, Stream stream) {
    if (!record_history_.load() && !has_trackers_.load()) return;
    PoolSet* set = devices_[device].load();
    if (set == nullptr) return;
    const std::size_t size = SizeOf(*set, ptr);
    const PoolId pool = set->PoolOf(ptr);
    auto* s = reinterpret_cast<cudaStream_t>(stream);
    if (allocated) {
      Trace(cda::TraceEntry::ALLOC, device, ptr, size, s, pool, /*freeing=*/false);
    } else {
      TraceFree(device, ptr, size, s, pool);
    }
  }
  const Config& base() const { return base_; }
  // The PoolSet that arena marks address: `device`, or the current device when it is -1.
  PoolSet& MarkTarget(int device) { return Device(static_cast<DeviceIndex>(device < 0 ? CurrentDeviceOrZero() : device)); }
  int Resolve(int device) const { return device < 0 ? CurrentDeviceOrZero() : device; }
  Stream CurrentStreamOf(int device) const {
    if (HostDriver()) return 0;
    return ToStream(c10::cuda::getCurrentCUDAStream(static_cast<DeviceIndex>(device)).stream());
  }

 private:
  static Stream ToStream(cudaStream_t s) { return reinterpret_cast<Stream>(s); }
  static PoolId ToPool(c10::MempoolId_t id) {
    return {static_cast<std::uint64_t>(id.first), static_cast<std::uint64_t>(id.second)};
  }

  bool HostDriver() const { return base_.driver.choice == DriverChoice::kHost; }

  // The host driver (tests without a GPU) emulates one device and must not touch CUDA.
  DeviceIndex CurrentDevice() const {
    if (HostDriver()) return 0;
    DeviceIndex device = 0;
    C10_CUDA_CHECK(c10::cuda::GetDevice(&device));
    return device;
  }
  DeviceIndex CurrentDeviceOrZero() const {
    if (HostDriver()) return 0;
    DeviceIndex device = 0;
    return c10::cuda::GetDevice(&device) == cudaSuccess ? device : 0;
  }

  PoolSet& Device(DeviceIndex device) {
    TORCH_CHECK(device >= 0 && device < kMaxDevices, "stitchalloc: invalid device index ", int(device));
    if (PoolSet* set = devices_[device].load(std::memory_order_acquire)) return *set;
    std::lock_guard<std::mutex> lock(create_mu_);
    if (PoolSet* set = devices_[device].load()) return *set;
    Config config = base_;
    config.driver.cuda.device = device;
    auto created = PoolSet::Create(config);
    if (!created.ok()) Raise("device initialisation", created.status());
    PoolSet* set = created->release();  // lives as long as the process, like the allocator
    if (!HostDriver()) {
      set->SetCaptureProbe(
          [] { return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None; });
    }
    ObserveSegments(device, *set);
    devices_[device].store(set, std::memory_order_release);
    device_count_in_use_.fetch_add(1);
    return *set;
  }

  // PyTorch's uncached mode (uncached.h): on, or off from caching_allocator_enable.
  bool Uncached() const { return force_uncached_ || !enabled_.load(std::memory_order_relaxed); }
  void* UncachedMalloc(DeviceIndex device, std::size_t n) {
    absl::StatusOr<void*> p = uncached_.Allocate(device, n);
    if (!p.ok()) Raise("malloc", p.status());
    return *p;
  }
  absl::StatusOr<UncachedAllocations::DeviceSource> MakeUncachedSource(int device) {
    Driver* driver = &Device(static_cast<DeviceIndex>(device)).main().driver();
    auto mem_info = [driver] { return driver->GetMemInfo(); };
    if (HostDriver()) {
      return UncachedAllocations::DeviceSource{std::make_unique<DriverSegmentSource>(driver),
                                               [driver] { return driver->SynchronizeDevice(); }, mem_info};
    }
    return UncachedAllocations::DeviceSource{std::make_unique<CudaMallocSource>(static_cast<DeviceIndex>(device)),
                                             nullptr, mem_info};
  }
  // An uncached allocation for another process: a 'c' handle of its cudaMalloc, as PyTorch
  // shares its uncached memory, or on the host driver its segment's chunk.
  cca::ShareableHandle ShareUncached(void* ptr) {
    if (HostDriver()) {
      absl::StatusOr<SharedRange> shared = uncached_.Share(ptr);
      if (!shared.ok()) Raise("shareIpcHandle", shared.status());
      return {static_cast<ptrdiff_t>(shared->offset), EncodeIpcHandle(*shared, getpid())};
    }
    cudaIpcMemHandle_t h;
    C10_CUDA_CHECK(cudaIpcGetMemHandle(&h, ptr));
    absl::StatusOr<std::string> handle =
        EncodeCudaMallocHandle(std::string_view(reinterpret_cast<const char*>(&h), sizeof(h)));
    if (!handle.ok()) Raise("shareIpcHandle", handle.status());
    return {0, *std::move(handle)};
  }

  // The device whose pools serve live allocation `ptr`, or -1.
  int DeviceIndexOf(const void* ptr) const {
    for (int d = 0; d < kMaxDevices; ++d) {
      PoolSet* set = devices_[d].load();
      if (set != nullptr && set->Describe(ptr).ok()) return d;
    }
    return -1;
  }
  // Drops the cache entry of an IPC handle whose memory this process no longer uses.
  void ForgetIpc(const std::string& handle, std::uint64_t id) {
    std::lock_guard<std::mutex> lock(ipc_mu_);
    auto it = ipc_open_.find(handle);
    if (it != ipc_open_.end() && it->second.id == id) ipc_open_.erase(it);
  }

  DeviceIndex DeviceOf(void* ptr) const {
    const int d = DeviceIndexOf(ptr);
    TORCH_CHECK(d >= 0, "stitchalloc free: ", ptr, " was not allocated by stitchalloc");
    return static_cast<DeviceIndex>(d);
  }

  static std::size_t SizeOf(PoolSet& set, void* ptr) {
    auto info = set.Describe(ptr);
    return info.ok() ? info->size : 0;
  }

  void* Malloc(DeviceIndex device, std::size_t n, cudaStream_t stream) {
    PoolSet& set = Device(device);
    // The allocation's context is gathered first (it may take the GIL, so never under a lock):
    // the segments the request maps are recorded with it, as PyTorch's are.
    const bool history = record_history_.load() || has_trackers_.load();
    Gathered context;
    if (history) context = Gather(cda::TraceEntry::ALLOC, /*freeing=*/false);
    absl::StatusOr<void*> p;
    {
      CallContext scope(history ? &context : nullptr);
      if (captures_.load() > 0 && !HostDriver()) {
        // Mapping new memory while a graph is being captured: allowed, as PyTorch's allocator does.
        c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
        p = set.Malloc(n, ToStream(stream));
      } else {
        p = set.Malloc(n, ToStream(stream));
      }
    }
    if (!p.ok()) {
      if (p.status().code() == absl::StatusCode::kResourceExhausted) OnOutOfMemory(device, set, n, stream);
      Raise("malloc", p.status());
    }
    if (history) {
      Record(cda::TraceEntry::ALLOC, device, *p, SizeOf(set, *p), stream, set.PoolOf(*p), /*freeing=*/false, context);
    }
    return *p;
  }

  // Segment events of device `device`'s pool `pool` (PoolSet::SetSegmentObserver): called with
  // an allocator lock held, so the context is the one the current call gathered, if any (as in
  // PyTorch: a malloc's with allocation stacks recorded, a free's or emptyCache's with all).
  void OnSegments(DeviceIndex device, PoolId pool, const std::vector<SegmentEvent>& events) {
    const Gathered* call_context = t_call_context;
    for (const SegmentEvent& e : events) {
      Gathered context;
      if (call_context != nullptr && call_context->in_trace) {
        context.context = call_context->context;
        context.in_trace = true;
      }
      Record(e.mapped ? cda::TraceEntry::SEGMENT_ALLOC : cda::TraceEntry::SEGMENT_FREE, device,
             reinterpret_cast<void*>(e.ptr), e.size, reinterpret_cast<cudaStream_t>(e.stream), pool,
             /*freeing=*/false, context);
    }
  }

  // Segment events are reported to the memory history while it records or a tracker listens.
  void UpdateSegmentObservers() {
    std::lock_guard<std::mutex> lock(create_mu_);
    for (int d = 0; d < kMaxDevices; ++d) {
      if (PoolSet* set = devices_[d].load()) ObserveSegments(static_cast<DeviceIndex>(d), *set);
    }
  }
  void ObserveSegments(DeviceIndex device, PoolSet& set) {
    if (record_history_.load() || has_trackers_.load()) {
      set.SetSegmentObserver([this, device](PoolId pool, const std::vector<SegmentEvent>& events) {
        OnSegments(device, pool, events);
      });
    } else {
      set.SetSegmentObserver(nullptr);
    }
  }

  void OnOutOfMemory(DeviceIndex device, PoolSet& set, std::size_t n, cudaStream_t stream) {
    const Stats s = set.GetStats();
    const std::size_t total = set.memory_limit();
    const std::size_t reserved = static_cast<std::size_t>(s.reserved_bytes.all().current);
    const std::size_t free_bytes = total > reserved ? total - reserved : 0;
    Trace(cda::TraceEntry::OOM, device, reinterpret_cast<void*>(free_bytes), n, stream, kDefaultPool, false);
    std::vector<cca::OutOfMemoryObserver> observers;
    {
      std::lock_guard<std::mutex> lock(history_mu_);
      observers = oom_observers_;
    }
    for (const auto& o : observers) {
      o(device, static_cast<std::size_t>(s.allocated_bytes.all().current), total, free_bytes);
    }
  }

  // A free in the trace: PyTorch's pair of entries, requested then completed, with one context.
  void TraceFree(DeviceIndex device, void* addr, std::size_t size, cudaStream_t stream, PoolId pool) {
    TraceFree(device, addr, size, stream, pool, Gather(cda::TraceEntry::FREE_REQUESTED, /*freeing=*/true));
  }
  void TraceFree(DeviceIndex device, void* addr, std::size_t size, cudaStream_t stream, PoolId pool,
                 const Gathered& context) {
    Record(cda::TraceEntry::FREE_REQUESTED, device, addr, size, stream, pool, /*freeing=*/true, context);
    Record(cda::TraceEntry::FREE_COMPLETED, device, addr, size, stream, pool, /*freeing=*/true, context);
  }
  // The context of emptyCache, gathered when the history wants stacks of frees (as PyTorch's;
  // its releasePool gathers none, nor does this one).
  Gathered ReleaseContext() {
    if (!record_history_.load() && !has_trackers_.load()) return {};
    return Gather(cda::TraceEntry::SEGMENT_FREE, /*freeing=*/true);
  }

  void Trace(cda::TraceEntry::Action action, DeviceIndex device, void* addr, std::size_t size, cudaStream_t stream,
             PoolId pool, bool freeing) {
    Record(action, device, addr, size, stream, pool, freeing, Gather(action, freeing));
  }

  // A context (Python and C++ stacks) as the history's settings ask for one: gathered outside
  // every lock, as it may take the GIL.
  Gathered Gather(cda::TraceEntry::Action action, bool freeing) {
    cda::CreateContextFn recorder = nullptr;
    cda::RecordContext when = cda::RecordContext::NEVER;
    {
      std::lock_guard<std::mutex> lock(history_mu_);
      recorder = context_recorder_;
      when = when_;
    }
    Gathered g;
    g.keep_state = action == cda::TraceEntry::ALLOC && when >= cda::RecordContext::STATE;
    g.in_trace = (action == cda::TraceEntry::ALLOC && when >= cda::RecordContext::ALLOC) ||
                 (freeing && when >= cda::RecordContext::ALL);
    if (recorder != nullptr && (g.keep_state || g.in_trace)) g.context = recorder();
    return g;
  }

  // The entry in the history (unless its action is skipped) and to every tracker. Takes only
  // history_mu_ and calls no Python: safe under an allocator lock (OnSegments).
  // `metadata`: the entry's user metadata when not the thread's (an annotation's own).
  void Record(cda::TraceEntry::Action action, DeviceIndex device, void* addr, std::size_t size, cudaStream_t stream,
              PoolId pool, bool freeing, const Gathered& g, const std::string* metadata = nullptr) {
    const std::shared_ptr<c10::GatheredContext>& context = g.context;
    const bool keep_state = g.keep_state;
    cda::TraceEntry entry(action, device, reinterpret_cast<std::size_t>(addr), size, stream,
                          c10::MempoolId_t{static_cast<c10::CaptureId_t>(pool.first),
                                           static_cast<c10::CaptureId_t>(pool.second)},
                          c10::getApproximateTime(), g.in_trace ? context : nullptr,
                          t_compile_context.empty() ? std::string("N/A") : t_compile_context.back(),
                          metadata != nullptr ? *metadata : t_user_metadata);
    std::vector<cda::AllocatorTraceTracker> trackers;
    {
      std::lock_guard<std::mutex> lock(history_mu_);
      if (keep_state && context) contexts_[addr] = context;
      if (freeing && action == cda::TraceEntry::FREE_COMPLETED) contexts_.erase(addr);
      if (record_history_.load() && !skip_.count(action)) {
        auto& trace = traces_[device];
        trace.push_back(entry);
        if (trace.size() > max_entries_) trace.pop_front();
      }
      trackers = trackers_;
    }
    for (const auto& t : trackers) t(entry);
  }

  const Config base_;
  std::atomic<bool> initialized_{false};
  std::atomic<int> device_count_{0};
  std::atomic<int> device_count_in_use_{0};
  std::atomic<int> captures_{0};
  std::atomic<bool> enabled_{true};
  const bool force_uncached_ = c10::utils::check_env("PYTORCH_NO_CUDA_MEMORY_CACHING") == true;
  UncachedAllocations uncached_{[this](int device) { return MakeUncachedSource(device); }};
  std::array<std::atomic<PoolSet*>, kMaxDevices> devices_{};
  std::mutex create_mu_;

  // IPC handles this process has opened, by handle bytes, as PyTorch caches them: a handle opens
  // once, and opening it again while its memory is in use returns the same pointer. An entry goes
  // when the last user of the memory does (ForgetIpc; `id` tells a reopened entry apart).
  struct OpenedIpc {
    std::uint64_t id = 0;
    std::weak_ptr<void> memory;
  };
  std::mutex ipc_mu_;
  std::unordered_map<std::string, OpenedIpc> ipc_open_;
  std::uint64_t ipc_next_id_ = 0;

  std::atomic<bool> record_history_{false};
  std::atomic<bool> has_trackers_{false};
  std::mutex history_mu_;
  cda::CreateContextFn context_recorder_ = nullptr;
  cda::RecordContext when_ = cda::RecordContext::NEVER;
  std::size_t max_entries_ = 1;
  std::unordered_set<int> skip_;
  std::array<std::deque<cda::TraceEntry>, kMaxDevices> traces_;
  std::unordered_map<void*, std::shared_ptr<c10::GatheredContext>> contexts_;
  std::vector<cda::AnnotationEntry> annotations_;
  std::vector<cca::OutOfMemoryObserver> oom_observers_;
  std::vector<cda::AllocatorTraceTracker> trackers_;
  c10::ApproximateClockToUnixTimeConverter clock_;
};

std::shared_ptr<void> TorchAllocator::getIpcDevPtr(std::string handle) {
  std::lock_guard<std::mutex> lock(ipc_mu_);
  if (auto it = ipc_open_.find(handle); it != ipc_open_.end()) {
    if (std::shared_ptr<void> open = it->second.memory.lock()) return open;
  }
  absl::StatusOr<IpcHandle> decoded = DecodeIpcHandle(handle);
  if (!decoded.ok()) Raise("getIpcDevPtr", decoded.status());
  const DeviceIndex device = CurrentDevice();
  const std::uint64_t id = ++ipc_next_id_;
  std::shared_ptr<void> memory;
  if (decoded->kind == IpcHandle::Kind::kCudaMalloc) {
    // From PyTorch's allocator without expandable segments: the CUDA runtime opens it.
    TORCH_CHECK(!HostDriver(), "stitchalloc getIpcDevPtr: the handle is a cudaMalloc one (from PyTorch's own "
                               "allocator), which needs a GPU; this process runs stitchalloc on the host driver");
    c10::cuda::CUDAGuard guard(device);
    cudaIpcMemHandle_t h;
    std::memcpy(&h, decoded->cuda_ipc_handle.data(), sizeof(h));
    void* p = nullptr;
    C10_CUDA_CHECK(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess));
    memory = std::shared_ptr<void>(p, [this, handle, id, device](void* q) {
      ForgetIpc(handle, id);
      c10::cuda::CUDAGuard g(device);
      C10_CUDA_CHECK_WARN(cudaIpcCloseMemHandle(q));
    });
  } else {
    absl::StatusOr<std::unique_ptr<ImportedRange>> range = ImportedRange::Open(Device(device).main().driver(), *decoded);
    if (!range.ok()) Raise("getIpcDevPtr", range.status());
    ImportedRange* r = range->release();
    memory = std::shared_ptr<void>(reinterpret_cast<void*>(r->ptr()), [this, handle, id, r](void*) {
      ForgetIpc(handle, id);
      delete r;  // waits for the device, then unmaps
    });
  }
  ipc_open_[handle] = OpenedIpc{id, memory};
  return memory;
}

cca::SnapshotInfo TorchAllocator::snapshot(c10::MempoolId_t mempool_id, bool include_traces) {
  cca::SnapshotInfo info;
  std::unordered_map<void*, std::shared_ptr<c10::GatheredContext>> contexts;
  {
    std::lock_guard<std::mutex> lock(history_mu_);
    contexts = contexts_;
  }
  for (int d = 0; d < kMaxDevices; ++d) {
    PoolSet* set = devices_[d].load();
    if (set == nullptr) continue;
    for (const PoolSet::Segment& seg : set->Snapshot(ToPool(mempool_id))) {
      // PyTorch's segments have no holes (blocks tile them from their address): a mapping
      // with absent slots (chunks lent to another mapping, or trimmed) is reported as one
      // segment per run of present blocks, so that the segments sum to reserved memory.
      cda::SegmentInfo s;
      bool open = false;
      auto flush = [&] {
        if (open) info.segments.push_back(std::move(s));
        s = cda::SegmentInfo{};
        open = false;
      };
      for (const auto& b : seg.info.blocks) {
        if (b.state == BlockState::kAbsent) {
          flush();
          continue;
        }
        if (!open) {
          open = true;
          s.device = static_cast<DeviceIndex>(d);
          s.address = b.ptr;
          s.stream = reinterpret_cast<void*>(seg.info.stream);
          s.is_large = !seg.info.small_pool;
          s.is_expandable = false;
          s.owner_private_pool_id = {static_cast<c10::CaptureId_t>(seg.pool.first),
                                      static_cast<c10::CaptureId_t>(seg.pool.second)};
        }
        cda::BlockInfo bi;
        bi.size = b.size;
        bi.requested_size = b.requested;
        bi.allocated = b.state == BlockState::kAllocated;
        bi.active = b.state != BlockState::kFree;
        if (bi.allocated) {
          auto it = contexts.find(reinterpret_cast<void*>(b.ptr));
          if (it != contexts.end()) bi.context_when_allocated = it->second;
          s.allocated_size += b.size;
          s.requested_size += b.requested;
        }
        if (bi.active) s.active_size += b.size;
        s.total_size += b.size;
        s.blocks.push_back(std::move(bi));
      }
      flush();
    }
  }
  std::lock_guard<std::mutex> lock(history_mu_);
  if (include_traces) {
    auto to_us = clock_.makeConverter();
    int last = -1;
    for (int d = 0; d < kMaxDevices; ++d) {
      if (!traces_[d].empty() || devices_[d].load() != nullptr) last = d;
    }
    info.device_traces.resize(static_cast<std::size_t>(last + 1));
    for (int d = 0; d <= last; ++d) {
      for (const cda::TraceEntry& e : traces_[d]) {
        cda::TraceEntry copy = e;
        copy.time_.t_ = to_us(e.time_.approx_t_) / 1000;
        info.device_traces[d].push_back(std::move(copy));
      }
    }
  }
  for (const cda::AnnotationEntry& a : annotations_) {
    cda::AnnotationEntry copy = a;
    info.external_annotations.push_back(std::move(copy));
  }
  info.config_metadata.max_split_size = base_.max_split_size;
  info.config_metadata.last_allocator_settings = ConfigToString(base_);
  return info;
}

std::atomic<TorchAllocator*> g_allocator{nullptr};
std::mutex g_install_mu;
thread_local std::string g_last_error;

// Allocator settings given at run time: PyTorch parses them into its own configuration and then
// calls the one device hook (c10's AcceleratorAllocatorConfig::getConfigParserHook, CUDA's parser
// in PyTorch's builds); Listen puts ListenToSettings behind it. A setting PyTorch rejects throws
// before the hook runs. Each note is given once per process (frameworks toggle
// expandable_segments around every weight transfer). Where c10 defines getConfigParserHook inline
// in its header (torch 2.11), its static is copied into this library and kept local by the
// version script (cmake/c_abi_only.map): the hook set is then this library's own and never called.
void ListenToSettings(const std::string& settings) {
  TorchAllocator* mine = g_allocator.load();
  if (mine == nullptr || cca::allocator.load() != mine) return;
  static absl::Mutex mu(absl::kConstInit);
  static auto* given = new absl::flat_hash_set<std::string>();  // never freed: may run at exit
  for (std::string& note : RunTimeSettingNotes(settings, mine->base())) {
    bool first = false;
    {
      absl::MutexLock lock(&mu);
      first = given->insert(note).second;
    }
    if (first) TORCH_WARN("stitchalloc: ", note);
  }
}

template <typename C>
void Listen() {
  if constexpr (requires { C::getConfigParserHook(); }) {
    static std::once_flag once;
    std::call_once(once, [] {
      auto& hook = C::getConfigParserHook();
      hook = [before = hook](const std::string& settings) {
        if (before) before(settings);
        ListenToSettings(settings);
      };
    });
  }
}

void ListenToRunTimeSettings() {
#ifdef STITCHALLOC_HAVE_ALLOCATOR_CONFIG
  Listen<c10::CachingAllocator::AcceleratorAllocatorConfig>();
#endif
}

void RawDelete(void* ptr) { g_allocator.load()->Free(ptr); }
void UncachedDelete(void* ptr) { g_allocator.load()->FreeUncached(ptr); }

}  // namespace
}  // namespace stitchalloc

extern "C" {

// Installs stitchalloc as PyTorch's CUDA allocator with `config` ("key:value,...", on top of
// STITCHALLOC_CONF). 0 on success; otherwise -1 and stitchalloc_torch_last_error() says why.
// Installing again with the same configuration is a no-op.
__attribute__((visibility("default"))) int stitchalloc_torch_install(const char* config) {
  using namespace stitchalloc;
  std::lock_guard<std::mutex> lock(g_install_mu);
  auto parsed = ConfigFromEnvironment(config == nullptr ? "" : config);
  if (!parsed.ok()) {
    g_last_error = std::string(parsed.status().message());
    return -1;
  }
  cca::CUDAAllocator* current = cca::allocator.load();
  if (TorchAllocator* mine = g_allocator.load(); mine != nullptr && current == mine) {
    if (ConfigToString(mine->base()) == ConfigToString(*parsed)) return 0;
    g_last_error = absl::StrCat("stitchalloc is already installed with '", ConfigToString(mine->base()),
                                "'; it cannot be reinstalled with '", ConfigToString(*parsed), "'");
    return -1;
  }
  if (current != nullptr && current->initialized()) {
    g_last_error = absl::StrCat(
        "too late: PyTorch's CUDA allocator '", current->name(),
        "' is already initialised (CUDA was used in this process before install); install stitchalloc before the "
        "first CUDA tensor, torch.cuda call or CUDA initialisation. Nothing was changed.");
    return -1;
  }
  auto* mine = new TorchAllocator(*parsed);  // never freed: PyTorch keeps raw pointers to it
  g_allocator.store(mine);
  cca::allocator.store(mine);
  c10::SetAllocator(c10::DeviceType::CUDA, mine, /*priority=*/1);
  ListenToRunTimeSettings();
  return 0;
}

__attribute__((visibility("default"))) const char* stitchalloc_torch_last_error(void) {
  return stitchalloc::g_last_error.c_str();
}

// 1 when stitchalloc is PyTorch's current CUDA allocator.
__attribute__((visibility("default"))) int stitchalloc_torch_installed(void) {
  auto* mine = stitchalloc::g_allocator.load();
  return mine != nullptr && c10::cuda::CUDACachingAllocator::allocator.load() == mine ? 1 : 0;
}

}  // extern "C"

namespace stitchalloc::torch_internal {

absl::StatusOr<PoolSet*> InstalledPoolSet(int device, int* resolved) {
  TorchAllocator* mine = g_allocator.load();
  if (mine == nullptr || c10::cuda::CUDACachingAllocator::allocator.load() != mine) {
    return absl::FailedPreconditionError("stitchalloc is not PyTorch's CUDA allocator (call stitchalloc.install() first)");
  }
  if (device < -1 || device >= kMaxDevices) return absl::InvalidArgumentError(absl::StrCat("invalid device index ", device));
  try {
    const int d = mine->Resolve(device);
    if (resolved != nullptr) *resolved = d;
    return &mine->MarkTarget(d);
  } catch (const std::exception& e) {
    return absl::InternalError(e.what());
  }
}

void FreeThroughTorch(void* ptr) { RawDelete(ptr); }

void SetLastError(std::string message) { g_last_error = std::move(message); }

Stream CurrentStream(int device) { return g_allocator.load()->CurrentStreamOf(device); }

void TraceSwapBlock(bool allocated, int device, void* ptr, Stream stream) noexcept {
  try {
    if (TorchAllocator* mine = g_allocator.load()) {
      mine->TraceSwapBlock(allocated, static_cast<c10::DeviceIndex>(device), ptr, stream);
    }
  } catch (...) {
    // A history entry that cannot be written is dropped: the swap manager's call goes on.
  }
}

}  // namespace stitchalloc::torch_internal

namespace stitchalloc {
namespace {

// Runs fn(PoolSet&) on the installed allocator's device; 0, or -1 with the reason kept for
// stitchalloc_torch_last_error() (no exception crosses the C boundary).
template <typename Fn>
int OnDevice(const char* what, int device, Fn&& fn) {
  TorchAllocator* mine = g_allocator.load();
  if (mine == nullptr || c10::cuda::CUDACachingAllocator::allocator.load() != mine) {
    g_last_error = absl::StrCat(what, ": stitchalloc is not PyTorch's CUDA allocator (call stitchalloc.install() first)");
    return -1;
  }
  if (device < -1 || device >= kMaxDevices) {
    g_last_error = absl::StrCat(what, ": invalid device index ", device);
    return -1;
  }
  try {
    const absl::Status status = fn(mine->MarkTarget(device));
    if (status.ok()) return 0;
    g_last_error = absl::StrCat(what, ": ", status.message());
  } catch (const std::exception& e) {
    g_last_error = absl::StrCat(what, ": ", e.what());
  }
  return -1;
}

}  // namespace
}  // namespace stitchalloc

extern "C" {

// Plan-guided arena marks on the installed allocator (docs/arena.md); device -1 is the current one.
__attribute__((visibility("default"))) int stitchalloc_torch_iteration_begin(int device, uint64_t signature) {
  return stitchalloc::OnDevice("stitchalloc_torch_iteration_begin", device,
                  [&](stitchalloc::PoolSet& set) { return set.arena().BeginIteration(signature); });
}

__attribute__((visibility("default"))) int stitchalloc_torch_iteration_end(int device) {
  return stitchalloc::OnDevice("stitchalloc_torch_iteration_end", device,
                  [](stitchalloc::PoolSet& set) { return set.arena().EndIteration(); });
}

__attribute__((visibility("default"))) int stitchalloc_torch_layer_begin(int device, const char* kind, int index,
                                                                         int phase) {
  if (kind == nullptr || *kind == '\0') {
    stitchalloc::g_last_error = "stitchalloc_torch_layer_begin: empty layer kind";
    return -1;
  }
  if (phase != 0 && phase != 1) {
    stitchalloc::g_last_error =
        absl::StrCat("stitchalloc_torch_layer_begin: phase ", phase, " is neither forward (0) nor backward (1)");
    return -1;
  }
  return stitchalloc::OnDevice("stitchalloc_torch_layer_begin", device, [&](stitchalloc::PoolSet& set) {
    return set.arena().LayerBegin(kind, index,
                                  phase == 0 ? stitchalloc::arena::Phase::kForward : stitchalloc::arena::Phase::kBackward);
  });
}

__attribute__((visibility("default"))) int stitchalloc_torch_layer_end(int device) {
  return stitchalloc::OnDevice("stitchalloc_torch_layer_end", device, [](stitchalloc::PoolSet& set) { return set.arena().LayerEnd(); });
}

__attribute__((visibility("default"))) int stitchalloc_torch_arena_drop_plans(int device) {
  return stitchalloc::OnDevice("stitchalloc_torch_arena_drop_plans", device,
                  [](stitchalloc::PoolSet& set) { return set.arena().DropAllPlans(); });
}

// "name value" lines, one per arena statistic; NULL on error. Valid until the calling thread's
// next call.
__attribute__((visibility("default"))) const char* stitchalloc_torch_arena_stats(int device) {
  thread_local std::string text;
  text.clear();
  const int rc = stitchalloc::OnDevice("stitchalloc_torch_arena_stats", device, [](stitchalloc::PoolSet& set) {
    stitchalloc::arena::ForEachArenaStat(set.arena().GetStats(), [](const char* name, std::int64_t value) {
      absl::StrAppend(&text, name, " ", value, "\n");
    });
    return absl::OkStatus();
  });
  return rc == 0 ? text.c_str() : nullptr;
}

// The PyTorch version the plugin was compiled against, e.g. "2.15.0".
__attribute__((visibility("default"))) const char* stitchalloc_torch_built_for(void) { return TORCH_VERSION; }

}  // extern "C"
