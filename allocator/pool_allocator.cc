// PoolAllocator (pool_allocator.h): the accounting every pool of a device keeps the same way.
#include "allocator/pool_allocator.h"

#include <utility>

#include "allocator/policy.h"

namespace stitchalloc {

PoolAllocator::PoolAllocator(const Config& config, std::size_t total_memory) : total_memory_(total_memory) {
  MutexLock l(&mu_);
  limit_ = static_cast<std::size_t>(static_cast<double>(total_memory_) * config.memory_fraction);
  stats_.max_split_size =
      config.max_split_size == SIZE_MAX ? -1 : static_cast<std::int64_t>(config.max_split_size);
}

absl::Status PoolAllocator::SetMemoryFraction(double fraction) {
  if (absl::Status bad = Policy::CheckFraction(fraction); !bad.ok()) return bad;
  MutexLock l(&mu_);
  limit_ = static_cast<std::size_t>(static_cast<double>(total_memory_) * fraction);
  return absl::OkStatus();
}

void PoolAllocator::ShareMemoryLimit(std::shared_ptr<std::atomic<std::int64_t>> total) {
  MutexLock l(&mu_);
  if (shared_reserved_ != nullptr) shared_reserved_->fetch_sub(stats_.reserved_bytes.all().current);
  shared_reserved_ = std::move(total);
  if (shared_reserved_ != nullptr) shared_reserved_->fetch_add(stats_.reserved_bytes.all().current);
  SharedReservedChanged();
}

std::size_t PoolAllocator::memory_limit() const {
  MutexLock l(&mu_);
  return limit_;
}

std::size_t PoolAllocator::LimitedReserved() const {
  const std::int64_t r = shared_reserved_ != nullptr ? shared_reserved_->load() : stats_.reserved_bytes.all().current;
  return r > 0 ? static_cast<std::size_t>(r) : 0;
}

Stats PoolAllocator::GetStats() const {
  MutexLock l(&mu_);
  return stats_;
}

void PoolAllocator::ResetPeakStats() {
  MutexLock l(&mu_);
  stats_.ResetPeak();
}

void PoolAllocator::ResetAccumulatedStats() {
  MutexLock l(&mu_);
  stats_.ResetAccumulated();
}

}  // namespace stitchalloc
