#include "torch_plugin/pool_set.h"

#include <algorithm>
#include <iterator>
#include <tuple>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vmm/nvtx.h"

namespace stitchalloc {
namespace {

std::string Name(PoolId id) { return absl::StrFormat("(%d, %d)", id.first, id.second); }

absl::Status DefaultPoolError(const char* op) {
  return absl::InvalidArgumentError(
      absl::StrFormat("%s: pool (0, 0) is the default pool, not a private pool", op));
}

}  // namespace

absl::StatusOr<std::unique_ptr<PoolSet>> PoolSet::Create(const Config& config) {
  auto main = CachingAllocator::Create(config);
  if (!main.ok()) return main.status();
  return std::unique_ptr<PoolSet>(new PoolSet(config, *std::move(main)));
}

PoolSet::PoolSet(const Config& config, std::unique_ptr<CachingAllocator> main)
    : config_(config),
      main_(std::move(main)),
      arena_(std::make_unique<arena::PlannedAllocator>(main_.get())),
      fraction_(config.memory_fraction) {
  main_->ShareMemoryLimit(reserved_);
}

PoolSet::~PoolSet() = default;

absl::StatusOr<void*> PoolSet::Malloc(std::size_t size, Stream stream) {
  if (routing_.load(std::memory_order_acquire) > 0) {
    MutexLock lock(&mu_);
    for (const Capture& c : captures_) {
      if (!c.filter(stream)) continue;
      Pool* pool = pools_.at(c.id).get();
      auto p = pool->allocator->Malloc(size, stream);
      if (!p.ok()) return p.status();
      Record(*p, c.id, pool);
      return p;
    }
  }
  auto p = arena_->Malloc(size, stream);
  if (p.ok() || !absl::IsResourceExhausted(p.status()) || oom_pools_.load(std::memory_order_acquire) == 0) return p;
  return MallocOnOom(size, stream, p.status());
}

void PoolSet::Record(void* p, PoolId id, Pool* pool) {
  pool_of_.emplace(p, id);
  ++pool->live;
  pooled_.fetch_add(1, std::memory_order_release);
}

absl::StatusOr<void*> PoolSet::MallocOnOom(std::size_t size, Stream stream, absl::Status oom) {
  STITCHALLOC_NVTX_RANGE("stitchalloc::PoolSet::MallocOnOom");
  MutexLock lock(&mu_);
  for (auto& [id, pool] : pools_) {
    if (!pool->use_on_oom || pool->users == 0) continue;
    auto p = pool->allocator->Malloc(size, stream);
    if (!p.ok()) continue;
    Record(*p, id, pool.get());
    return p;
  }
  return oom;
}

absl::Status PoolSet::SetUseOnOom(PoolId id, bool use) {
  if (id == kDefaultPool) return DefaultPoolError("setUseOnOOM");
  MutexLock lock(&mu_);
  auto it = pools_.find(id);
  if (it == pools_.end()) {
    return absl::FailedPreconditionError(absl::StrCat("setUseOnOOM: no private pool ", Name(id)));
  }
  Pool& pool = *it->second;
  if (pool.use_on_oom != use) oom_pools_.fetch_add(use ? 1 : -1, std::memory_order_release);
  pool.use_on_oom = use;
  return absl::OkStatus();
}

PoolAllocator* PoolSet::OwnerOf(const void* ptr) const {
  auto it = pool_of_.find(ptr);
  if (it == pool_of_.end()) return nullptr;
  return pools_.at(it->second)->allocator.get();
}

absl::Status PoolSet::Free(void* ptr) {
  if (ptr != nullptr && pooled_.load(std::memory_order_acquire) > 0) {
    MutexLock lock(&mu_);
    auto it = pool_of_.find(ptr);
    if (it != pool_of_.end()) {
      const PoolId id = it->second;
      Pool* pool = pools_.at(id).get();
      absl::Status s = pool->allocator->Free(ptr);
      if (!s.ok()) return s;
      pool_of_.erase(it);
      pooled_.fetch_sub(1, std::memory_order_release);
      --pool->live;
      MaybeErase(id);
      return absl::OkStatus();
    }
  }
  return arena_->Free(ptr);
}

absl::Status PoolSet::RecordStream(void* ptr, Stream stream) {
  if (pooled_.load(std::memory_order_acquire) > 0) {
    MutexLock lock(&mu_);
    if (PoolAllocator* owner = OwnerOf(ptr)) return owner->RecordStream(ptr, stream);
  }
  return arena_->RecordStream(ptr, stream);
}

absl::StatusOr<BlockInfo> PoolSet::Describe(const void* ptr) const {
  if (pooled_.load(std::memory_order_acquire) > 0) {
    MutexLock lock(&mu_);
    if (PoolAllocator* owner = OwnerOf(ptr)) return owner->Describe(ptr);
  }
  return arena_->Describe(ptr);
}

absl::StatusOr<SharedRange> PoolSet::Share(const void* ptr) {
  if (pooled_.load(std::memory_order_acquire) > 0) {
    MutexLock lock(&mu_);
    if (PoolAllocator* owner = OwnerOf(ptr)) return owner->Share(ptr);
  }
  return arena_->Share(ptr);
}

PoolId PoolSet::PoolOf(const void* ptr) const {
  if (pooled_.load(std::memory_order_acquire) == 0) return kDefaultPool;
  MutexLock lock(&mu_);
  auto it = pool_of_.find(ptr);
  return it == pool_of_.end() ? kDefaultPool : it->second;
}

PoolAllocator::SegmentObserver PoolSet::ObserverFor(PoolId id) const {
  if (!segment_observer_) return nullptr;
  return [observer = segment_observer_, id](const std::vector<SegmentEvent>& events) { observer(id, events); };
}

void PoolSet::SetSegmentObserver(SegmentObserver observer) {
  MutexLock lock(&mu_);
  segment_observer_ = std::move(observer);
  main_->SetSegmentObserver(ObserverFor(kDefaultPool));
  for (auto& [id, pool] : pools_) pool->allocator->SetSegmentObserver(ObserverFor(id));
}

absl::StatusOr<PoolSet::Pool*> PoolSet::GetOrCreate(PoolId id, std::shared_ptr<SegmentSource> source) {
  if (id == kDefaultPool) return DefaultPoolError("private pool");
  auto it = pools_.find(id);
  if (it != pools_.end()) {
    if (source != nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          "createOrIncrefPool: pool ", Name(id), " exists already; a pool's own allocator is given when it is created"));
    }
    return it->second.get();
  }
  STITCHALLOC_NVTX_RANGE("stitchalloc::PoolSet::CreatePool");
  auto allocator = MakeAllocator(source, /*no_split=*/false);
  if (!allocator.ok()) return allocator.status();
  auto pool = std::make_unique<Pool>();
  pool->allocator = *std::move(allocator);
  pool->source = std::move(source);
  Pool* p = pools_.emplace(id, std::move(pool)).first->second.get();
  Attach(id, p);
  return p;
}

absl::StatusOr<std::unique_ptr<PoolAllocator>> PoolSet::MakeAllocator(const std::shared_ptr<SegmentSource>& source,
                                                                      bool no_split) {
  Config config = config_;
  config.memory_fraction = fraction_.load(std::memory_order_relaxed);
  if (source == nullptr && !no_split) {
    // A graph captured into the pool replays at the addresses it was captured with, freed ones
    // included: the pool never remaps (no stitching: its mappings are never retired, dissolved or
    // refilled) and keeps its cache while it has users (see the file comment).
    config.stitching = false;
    auto a = CachingAllocator::Create(config);
    if (!a.ok()) return a.status();
    return std::unique_ptr<PoolAllocator>(*std::move(a));
  }
  SegmentPool::Options options;
  options.no_split = no_split;
  // As PyTorch's allocator releases its cached blocks when a pool's allocator fails: the default
  // pool's cache goes back to the device, where the pool's allocator can find it; not while a
  // graph is being captured (SetCaptureProbe). Runs under mu_ (Malloc holds it) and takes only
  // the default pool's own lock.
  options.on_source_exhausted = [main = main_.get(), probe = capture_probe_] {
    if (probe != nullptr && (*probe)()) return;
    main->EmptyCache().IgnoreError();
  };
  std::shared_ptr<SegmentSource> from =
      source != nullptr ? source : std::make_shared<DriverSegmentSource>(&main_->driver());
  auto a = SegmentPool::Create(config, &main_->driver(), std::move(from), std::move(options));
  if (!a.ok()) return a.status();
  return std::unique_ptr<PoolAllocator>(*std::move(a));
}

void PoolSet::Attach(PoolId id, Pool* pool) {
  pool->allocator->SetKeepCached(true);
  pool->allocator->ShareMemoryLimit(reserved_);
  if (segment_observer_) pool->allocator->SetSegmentObserver(ObserverFor(id));
}

void PoolSet::SetCaptureProbe(std::function<bool()> probe) {
  MutexLock lock(&mu_);
  capture_probe_ = probe ? std::make_shared<const std::function<bool()>>(std::move(probe)) : nullptr;
}

absl::Status PoolSet::SetNoSplit(PoolId id) {
  if (id == kDefaultPool) return DefaultPoolError("setNoSplit");
  MutexLock lock(&mu_);
  auto it = pools_.find(id);
  if (it == pools_.end()) return absl::FailedPreconditionError(absl::StrCat("setNoSplit: no private pool ", Name(id)));
  Pool* pool = it->second.get();
  if (pool->no_split) return absl::OkStatus();
  const Stats now = pool->allocator->GetStats();
  if (now.reserved_bytes.all().current != 0 || pool->live != 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "setNoSplit: pool %s holds memory already (%d bytes reserved, %d allocations); no_split is set when the "
        "pool is created",
        Name(id), now.reserved_bytes.all().current, pool->live));
  }
  auto allocator = MakeAllocator(pool->source, /*no_split=*/true);
  if (!allocator.ok()) return allocator.status();
  Stats gone = now;
  gone.ReleaseAll();
  retired_.Accumulate(gone);
  pool->allocator = *std::move(allocator);  // the old one held nothing
  pool->no_split = true;
  Attach(id, pool);
  pool->allocator->SetKeepCached(pool->users > 0);
  return absl::OkStatus();
}

void PoolSet::MaybeErase(PoolId id) {
  auto it = pools_.find(id);
  if (it == pools_.end() || it->second->users > 0 || it->second->live > 0) return;
  for (const Capture& c : captures_) {
    if (c.id == id) return;
  }
  Stats gone = it->second->allocator->GetStats();
  gone.ReleaseAll();
  retired_.Accumulate(gone);
  if (it->second->use_on_oom) oom_pools_.fetch_sub(1, std::memory_order_release);
  pools_.erase(it);  // the allocator returns all its memory
}

absl::Status PoolSet::CreateOrIncrefPool(PoolId id, std::shared_ptr<SegmentSource> source) {
  MutexLock lock(&mu_);
  auto pool = GetOrCreate(id, std::move(source));
  if (!pool.ok()) return pool.status();
  ++(*pool)->users;
  (*pool)->allocator->SetKeepCached(true);
  return absl::OkStatus();
}

absl::Status PoolSet::BeginAllocateToPool(PoolId id, StreamFilter filter) {
  if (!filter) return absl::InvalidArgumentError("beginAllocateToPool: empty stream filter");
  MutexLock lock(&mu_);
  for (const Capture& c : captures_) {
    if (c.id == id) {
      return absl::FailedPreconditionError(
          absl::StrCat("beginAllocateToPool: pool ", Name(id), " is already being allocated to"));
    }
  }
  auto pool = GetOrCreate(id);
  if (!pool.ok()) return pool.status();
  ++(*pool)->users;
  (*pool)->allocator->SetKeepCached(true);
  captures_.push_back({id, std::move(filter)});
  routing_.fetch_add(1, std::memory_order_release);
  return absl::OkStatus();
}

absl::Status PoolSet::EndAllocateToPool(PoolId id) {
  MutexLock lock(&mu_);
  auto it = std::find_if(captures_.begin(), captures_.end(), [&](const Capture& c) { return c.id == id; });
  if (it == captures_.end()) {
    return absl::FailedPreconditionError(
        absl::StrCat("endAllocateToPool: pool ", Name(id), " is not being allocated to"));
  }
  captures_.erase(it);
  routing_.fetch_sub(1, std::memory_order_release);
  return absl::OkStatus();
}

absl::Status PoolSet::ReleasePool(PoolId id) {
  if (id == kDefaultPool) return DefaultPoolError("releasePool");
  MutexLock lock(&mu_);
  auto it = pools_.find(id);
  if (it == pools_.end() || it->second->users == 0) {
    return absl::FailedPreconditionError(absl::StrCat("releasePool: pool ", Name(id), " has no users"));
  }
  Pool* pool = it->second.get();
  if (--pool->users == 0) {
    pool->allocator->SetKeepCached(false);  // no graph replays from it any more
    absl::Status s = pool->allocator->EmptyCache();
    if (!s.ok()) return s;
    MaybeErase(id);
  }
  return absl::OkStatus();
}

int PoolSet::PoolUseCount(PoolId id) const {
  MutexLock lock(&mu_);
  auto it = pools_.find(id);
  return it == pools_.end() ? 0 : it->second->users;
}

absl::StatusOr<std::vector<CachingAllocator::LiveAllocation>> PoolSet::PoolAllocations(PoolId id) const {
  if (id == kDefaultPool) return DefaultPoolError("getCheckpointState");
  MutexLock lock(&mu_);
  auto it = pools_.find(id);
  if (it == pools_.end()) return absl::NotFoundError(absl::StrCat("getCheckpointState: no private pool ", Name(id)));
  return it->second->allocator->LiveAllocations();
}

absl::StatusOr<PoolSet::Restored> PoolSet::RestorePool(PoolId id, std::vector<CachingAllocator::LiveAllocation> state) {
  using Live = CachingAllocator::LiveAllocation;
  if (id == kDefaultPool) return DefaultPoolError("setCheckpointPoolState");
  STITCHALLOC_NVTX_RANGE("stitchalloc::PoolSet::RestorePool");
  // Both lists in address order, each address once: what differs is a set difference.
  const auto by_ptr = [](const Live& a, const Live& b) { return a.ptr < b.ptr; };
  std::sort(state.begin(), state.end(), by_ptr);
  if (auto twice = std::adjacent_find(state.begin(), state.end(), [](const Live& a, const Live& b) { return a.ptr == b.ptr; });
      twice != state.end()) {
    return absl::InvalidArgumentError(absl::StrFormat("setCheckpointPoolState: the state lists %#x twice", twice->ptr));
  }
  MutexLock lock(&mu_);
  auto it = pools_.find(id);
  if (it == pools_.end()) return absl::NotFoundError(absl::StrCat("setCheckpointPoolState: no private pool ", Name(id)));
  Pool* pool = it->second.get();
  PoolAllocator& a = *pool->allocator;
  const std::vector<Live> now = a.LiveAllocations();
  const auto whole = [](const Live& x, const Live& y) {
    return std::tie(x.ptr, x.size, x.requested, x.stream) < std::tie(y.ptr, y.size, y.requested, y.stream);
  };
  Restored r;
  std::set_difference(now.begin(), now.end(), state.begin(), state.end(), std::back_inserter(r.dropped), whole);
  std::set_difference(state.begin(), state.end(), now.begin(), now.end(), std::back_inserter(r.made), whole);
  auto unroute = [&](const Live& l) {
    pool_of_.erase(reinterpret_cast<void*>(l.ptr));
    pooled_.fetch_sub(1, std::memory_order_release);
    --pool->live;
  };
  auto route = [&](const Live& l) {
    pool_of_.emplace(reinterpret_cast<void*>(l.ptr), id);
    pooled_.fetch_add(1, std::memory_order_release);
    ++pool->live;
  };
  // Every request to the pool goes through this class under mu_, so the allocations listed
  // above are live until freed here.
  for (const Live& l : r.dropped) {
    if (absl::Status s = a.Free(reinterpret_cast<void*>(l.ptr)); !s.ok()) {
      return absl::InternalError(absl::StrCat("setCheckpointPoolState: ", s.message()));
    }
    unroute(l);
  }
  for (std::size_t k = 0; k < r.made.size(); ++k) {
    auto p = a.AllocateAt(r.made[k]);
    if (p.ok()) {
      route(r.made[k]);
      continue;
    }
    // Undo: what was made goes, what was dropped comes back where it was (its bytes are free:
    // nothing else allocated from the pool meanwhile, under the lock).
    for (std::size_t m = 0; m < k; ++m) {
      (void)a.Free(reinterpret_cast<void*>(r.made[m].ptr));
      unroute(r.made[m]);
    }
    for (const Live& d : r.dropped) {
      if (!a.AllocateAt(d).ok()) {
        return absl::InternalError(absl::StrFormat(
            "setCheckpointPoolState: %s, and %#x could not be restored either (the pool lost it)",
            p.status().message(), d.ptr));
      }
      route(d);
    }
    return absl::FailedPreconditionError(
        absl::StrCat("setCheckpointPoolState: pool ", Name(id), " cannot hold the checkpoint again: ",
                     p.status().message()));
  }
  for (const Live& l : now) r.freed.push_back(reinterpret_cast<void*>(l.ptr));
  MaybeErase(id);
  return r;
}

std::vector<PoolId> PoolSet::PrivatePools() const {
  MutexLock lock(&mu_);
  std::vector<PoolId> ids;
  for (const auto& [id, pool] : pools_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

absl::Status PoolSet::EmptyCache(PoolId id) {
  MutexLock lock(&mu_);
  if (id != kDefaultPool) {
    auto it = pools_.find(id);
    // A released pool is erased with its last allocation, and has no cache to return: PyTorch's
    // MemPool destructor releases the pool, then empties its cache.
    if (it == pools_.end()) return absl::OkStatus();
    return it->second->allocator->EmptyCache();
  }
  absl::Status s = main_->EmptyCache();
  for (auto& [pid, pool] : pools_) s.Update(pool->allocator->EmptyCache());
  return s;
}

absl::Status PoolSet::SetMemoryFraction(double fraction) {
  MutexLock lock(&mu_);
  absl::Status s = main_->SetMemoryFraction(fraction);
  if (!s.ok()) return s;
  for (auto& [id, pool] : pools_) s.Update(pool->allocator->SetMemoryFraction(fraction));
  fraction_.store(fraction, std::memory_order_relaxed);
  return s;
}

Stats PoolSet::GetStats() const {
  Stats total = main_->GetStats();
  MutexLock lock(&mu_);
  for (const auto& [id, pool] : pools_) total.Accumulate(pool->allocator->GetStats());
  total.Accumulate(retired_);
  return total;
}

absl::flat_hash_map<PoolId, Stats> PoolSet::PrivatePoolStats() const {
  MutexLock lock(&mu_);
  absl::flat_hash_map<PoolId, Stats> out;
  for (const auto& [id, pool] : pools_) out.emplace(id, pool->allocator->GetStats());
  return out;
}

void PoolSet::ResetPeakStats() {
  main_->ResetPeakStats();
  MutexLock lock(&mu_);
  for (auto& [id, pool] : pools_) pool->allocator->ResetPeakStats();
  retired_.ResetPeak();
}

void PoolSet::ResetAccumulatedStats() {
  main_->ResetAccumulatedStats();
  MutexLock lock(&mu_);
  for (auto& [id, pool] : pools_) pool->allocator->ResetAccumulatedStats();
  retired_ = Stats{};
}

std::vector<PoolSet::Segment> PoolSet::Snapshot(std::optional<PoolId> only) const {
  std::vector<Segment> out;
  if (!only || *only == kDefaultPool) {
    for (SegmentInfo& s : main_->Snapshot()) out.push_back({kDefaultPool, std::move(s)});
  }
  MutexLock lock(&mu_);
  for (const auto& [id, pool] : pools_) {
    if (only && *only != kDefaultPool && *only != id) continue;
    for (SegmentInfo& s : pool->allocator->Snapshot()) out.push_back({id, std::move(s)});
  }
  return out;
}

std::size_t PoolSet::LargestFreeBlock() const {
  std::size_t largest = 0;
  for (const Segment& seg : Snapshot()) {
    for (const auto& b : seg.info.blocks) {
      if (b.state == BlockState::kFree) largest = std::max(largest, b.size);
    }
  }
  return largest;
}

}  // namespace stitchalloc
