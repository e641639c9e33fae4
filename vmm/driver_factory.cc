#include "vmm/driver_factory.h"

#include <utility>

namespace stitchalloc {

absl::StatusOr<CreatedDriver> CreateDriver(const DriverOptions& options) {
  CreatedDriver out;
  if (options.choice != DriverChoice::kHost) {
    auto cuda = CudaDriver::Create(options.cuda);
    if (cuda.ok()) {
      out.driver = *std::move(cuda);
      return out;
    }
    if (options.choice == DriverChoice::kCuda) return cuda.status();
    out.fallback_reason = std::string(cuda.status().message());
  }
  auto host = HostDriver::Create(options.host);
  if (!host.ok()) return host.status();
  out.driver = *std::move(host);
  return out;
}

}  // namespace stitchalloc
