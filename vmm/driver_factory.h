// CreateDriver: picks the driver named by the configuration. With DriverChoice::kAuto it uses
// CUDA when libcuda opens and the device exists, and the host driver otherwise (the reason the
// GPU was not used is returned alongside, so callers can report it).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "vmm/cuda_driver.h"
#include "vmm/driver.h"
#include "vmm/host_driver.h"

namespace stitchalloc {

enum class DriverChoice { kAuto, kCuda, kHost };

struct DriverOptions {
  DriverChoice choice = DriverChoice::kAuto;
  CudaDriverOptions cuda;
  HostDriverOptions host;
};

struct CreatedDriver {
  std::unique_ptr<Driver> driver;
  std::string fallback_reason;  // non-empty when kAuto fell back to the host driver
};

absl::StatusOr<CreatedDriver> CreateDriver(const DriverOptions& options);

}  // namespace stitchalloc
