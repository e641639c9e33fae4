#include "tests/test_util.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "vmm/host_driver.h"

namespace stitchalloc::testing {

absl::StatusOr<std::unique_ptr<CachingAllocator>> MakeAllocator(std::unique_ptr<Driver> driver,
                                                                const std::string& config) {
  auto cfg = ParseConfig(config);
  if (!cfg.ok()) return cfg.status();
  return CachingAllocator::Create(*cfg, std::move(driver));
}

absl::StatusOr<std::unique_ptr<CachingAllocator>> MakeHostAllocator(const std::string& config) {
  auto cfg = ParseConfig(config);
  if (!cfg.ok()) return cfg.status();
  auto driver = HostDriver::Create(cfg->driver.host);
  if (!driver.ok()) return driver.status();
  return CachingAllocator::Create(*cfg, *std::move(driver));
}

absl::StatusOr<void*> MallocStitchedThreeChunks(CachingAllocator& alloc) {
  const std::size_t c = alloc.chunk_size();
  auto a = alloc.Malloc(2 * c);
  if (!a.ok()) return a.status();
  auto b = alloc.Malloc(2 * c);
  if (!b.ok()) return b.status();
  if (auto s = alloc.Free(*a); !s.ok()) return s;
  if (auto s = alloc.Free(*b); !s.ok()) return s;
  auto s = alloc.Malloc(3 * c);
  if (!s.ok()) return s.status();
  auto info = alloc.Describe(*s);
  if (!info.ok()) return info.status();
  if (!info->stitched) return absl::FailedPreconditionError("the 3-chunk allocation was not stitched");
  return *s;
}

std::vector<std::uint8_t> Pattern(std::size_t n, std::uint64_t seed) {
  // Eight bytes per xorshift step: the sanitizers instrument each store, and the tests fill and
  // check gigabytes (a byte per step made one TSan test take 279 s).
  std::vector<std::uint8_t> v(n);
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (std::size_t i = 0; i < n; i += sizeof x) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(v.data() + i, &x, std::min(sizeof x, n - i));
  }
  return v;
}

void FillPattern(void* p, std::size_t n, std::uint64_t seed) {
  const std::vector<std::uint8_t> bytes = Pattern(n, seed);
  std::memcpy(p, bytes.data(), n);
}

bool HoldsPattern(const void* p, std::size_t n, std::uint64_t seed) {
  const std::vector<std::uint8_t> bytes = Pattern(n, seed);
  return std::memcmp(p, bytes.data(), n) == 0;
}

absl::Status Upload(Driver& d, void* device_dst, const void* host_src, std::size_t n, Stream s) {
  if (auto st = d.MemcpyAsync(device_dst, host_src, n, s); !st.ok()) return st;
  return d.SynchronizeStream(s);
}

absl::Status Download(Driver& d, void* host_dst, const void* device_src, std::size_t n, Stream s) {
  if (auto st = d.MemcpyAsync(host_dst, device_src, n, s); !st.ok()) return st;
  return d.SynchronizeStream(s);
}

}  // namespace stitchalloc::testing
