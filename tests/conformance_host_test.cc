// The conformance suite on the host driver (2 MiB granularity, like current GPUs).
#include "tests/conformance.h"
#include "vmm/host_driver.h"

namespace stitchalloc::testing {

INSTANTIATE_TEST_SUITE_P(
    HostDriver, Conformance,
    ::testing::Values(DriverFactory{
        "host",
        []() -> absl::StatusOr<std::unique_ptr<Driver>> {
          auto d = HostDriver::Create(HostDriverOptions{16 * kGiB, 2 * kMiB});
          if (!d.ok()) return d.status();
          return std::unique_ptr<Driver>(*std::move(d));
        },
        /*direct_access=*/true}),
    [](const auto& p) { return p.param.name; });

}  // namespace stitchalloc::testing
