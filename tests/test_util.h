// Helpers shared by the test suites: building allocators over a given driver, moving bytes
// through the driver (so the same test body runs on host and CUDA drivers), and patterns.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "allocator/caching_allocator.h"
#include "gtest/gtest.h"
#include "vmm/driver.h"

namespace stitchalloc::testing {

#define SA_ASSERT_OK(expr)                                  \
  do {                                                      \
    const ::absl::Status sa_status_ = (expr);               \
    ASSERT_TRUE(sa_status_.ok()) << sa_status_.ToString();  \
  } while (0)

#define SA_EXPECT_OK(expr)                                  \
  do {                                                      \
    const ::absl::Status sa_status_ = (expr);               \
    EXPECT_TRUE(sa_status_.ok()) << sa_status_.ToString();  \
  } while (0)

#define SA_ASSIGN_OR_FAIL(lhs, expr)                                  \
  auto lhs##_or = (expr);                                             \
  ASSERT_TRUE(lhs##_or.ok()) << lhs##_or.status().ToString();         \
  auto lhs = *std::move(lhs##_or)

// A named way to make a driver: the conformance suite is instantiated once per factory.
struct DriverFactory {
  std::string name;
  std::function<absl::StatusOr<std::unique_ptr<Driver>>()> make;
  bool direct_access = false;  // device memory is host-addressable (the host driver)
};
inline void PrintTo(const DriverFactory& f, std::ostream* os) { *os << f.name; }

// An allocator over `driver` configured by `config` ("key:value,...").
absl::StatusOr<std::unique_ptr<CachingAllocator>> MakeAllocator(std::unique_ptr<Driver> driver,
                                                                const std::string& config = "");
// A host-driver allocator: capacity and granularity from the config keys host_capacity_mb /
// host_granularity_kb, the rest as MakeAllocator.
absl::StatusOr<std::unique_ptr<CachingAllocator>> MakeHostAllocator(const std::string& config = "");

// A 3-chunk allocation stitched from two freed 2-chunk mappings (the allocator needs
// mapping_headroom_mb:0, or growing in place would serve it from one mapping instead);
// FailedPrecondition if it did not stitch.
absl::StatusOr<void*> MallocStitchedThreeChunks(CachingAllocator& alloc);

// Deterministic bytes for (seed, offset).
std::vector<std::uint8_t> Pattern(std::size_t n, std::uint64_t seed);
// Writes Pattern(n, seed) to host-addressable memory at `p` (the host driver's device memory
// is), and whether `p` holds it.
void FillPattern(void* p, std::size_t n, std::uint64_t seed);
bool HoldsPattern(const void* p, std::size_t n, std::uint64_t seed);

// Copies through the driver on `stream` and waits: works for device and host memory alike.
absl::Status Upload(Driver& d, void* device_dst, const void* host_src, std::size_t n, Stream s = kDefaultStream);
absl::Status Download(Driver& d, void* host_dst, const void* device_src, std::size_t n, Stream s = kDefaultStream);

}  // namespace stitchalloc::testing
