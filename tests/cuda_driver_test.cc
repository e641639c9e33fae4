// CudaDriver on a machine without a usable GPU: loading fails cleanly, with a reason, and the
// library itself never needed libcuda to load. (tests/gpu covers a real device.)
#include "vmm/cuda_driver.h"

#include <filesystem>

#include "gtest/gtest.h"
#include "vmm/driver_factory.h"

namespace stitchalloc {
namespace {

TEST(CudaDriver, MissingLibraryIsUnavailableAndNamesIt) {
  auto d = CudaDriver::Create({0, "/nonexistent/libcuda.so.1"});
  ASSERT_FALSE(d.ok());
  EXPECT_TRUE(absl::IsUnavailable(d.status())) << d.status();
  EXPECT_NE(d.status().message().find("/nonexistent/libcuda.so.1"), std::string::npos);
}

TEST(CudaDriver, StubLibraryIsUnavailable) {
  const char* stub = "/usr/local/cuda/lib64/stubs/libcuda.so";
  if (!std::filesystem::exists(stub)) GTEST_SKIP() << "no CUDA stub library at " << stub;
  auto d = CudaDriver::Create({0, stub});
  ASSERT_FALSE(d.ok());
  EXPECT_TRUE(absl::IsUnavailable(d.status())) << d.status();
}

TEST(CudaDriver, ForcingCudaWithoutADeviceFailsWithTheReason) {
  DriverOptions o;
  o.choice = DriverChoice::kCuda;
  auto d = CreateDriver(o);
  if (d.ok()) GTEST_SKIP() << "a CUDA device is present: " << d->driver->name();
  EXPECT_TRUE(absl::IsUnavailable(d.status())) << d.status();
  EXPECT_NE(d.status().message().find("CUDA driver"), std::string::npos);
}

TEST(CudaDriver, MissingDeviceOrdinalIsUnavailable) {
  auto d = CudaDriver::Create({4096, "libcuda.so.1"});
  ASSERT_FALSE(d.ok());
  EXPECT_TRUE(absl::IsUnavailable(d.status())) << d.status();
}

}  // namespace
}  // namespace stitchalloc
