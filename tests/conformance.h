// The allocator correctness suite that every driver must pass. tests/conformance_host_test.cc
// instantiates it on the host driver; tests/gpu/ instantiates it on the CUDA driver (skipped
// when no device is present). Bytes are moved through Driver::MemcpyAsync so that each test body
// runs unchanged on both.
#pragma once

#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace stitchalloc::testing {

class Conformance : public ::testing::TestWithParam<DriverFactory> {
 protected:
  void SetUp() override;
  // A fresh allocator on the parameter's driver with `config`, its reserved memory capped at
  // `limit` bytes through the memory fraction (0: no cap).
  absl::StatusOr<std::unique_ptr<CachingAllocator>> Make(const std::string& config, std::size_t limit = 0);
};

}  // namespace stitchalloc::testing
