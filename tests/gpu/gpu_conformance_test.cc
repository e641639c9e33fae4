// The conformance suite on the CUDA driver, plus a kernel that writes through a stitched range
// while the test reads each chunk back through its home mapping. Skipped, with the reason,
// when no CUDA device is usable.
#include <vector>

#include "tests/conformance.h"
#include "tests/gpu/kernels.h"
#include "vmm/cuda_driver.h"

namespace stitchalloc::testing {
namespace {

absl::StatusOr<std::unique_ptr<Driver>> MakeCuda() {
  auto d = CudaDriver::Create({});
  if (!d.ok()) return d.status();
  return std::unique_ptr<Driver>(*std::move(d));
}

INSTANTIATE_TEST_SUITE_P(CudaDriver, Conformance,
                         ::testing::Values(DriverFactory{"cuda", MakeCuda, /*direct_access=*/false}),
                         [](const auto& p) { return p.param.name; });

TEST(GpuStitch, KernelWritesThroughAStitchedRangeLandInTheChunks) {
  auto driver = MakeCuda();
  if (!driver.ok()) GTEST_SKIP() << "no usable CUDA device: " << driver.status().message();
  if (gpu::DeviceCount() == 0) GTEST_SKIP() << "the CUDA runtime sees no device";
  // Without headroom, as in StitchedRangeAliasesItsChunksBothWays: with it the three blocks
  // share one mapping and the 5-chunk request needs no stitch (failed so on 2026-11-23).
  SA_ASSIGN_OR_FAIL(alloc, MakeAllocator(*std::move(driver), "mapping_headroom_mb:0"));
  Driver& d = alloc->driver();
  const std::size_t c = alloc->chunk_size();
  // Three 2-chunk mappings, freed: a 5-chunk request must be stitched from all three.
  std::vector<void*> parts;
  for (int i = 0; i < 3; ++i) {
    SA_ASSIGN_OR_FAIL(p, alloc->Malloc(2 * c));
    parts.push_back(p);
  }
  for (void* p : parts) SA_ASSERT_OK(alloc->Free(p));
  SA_ASSIGN_OR_FAIL(s, alloc->Malloc(5 * c));
  SA_ASSIGN_OR_FAIL(info, alloc->Describe(s));
  ASSERT_TRUE(info.stitched);
  ASSERT_EQ(info.chunks.size(), 5u);

  const std::size_t words = 5 * c / 4;
  ASSERT_EQ(gpu::LaunchFill(s, words, 42, kDefaultStream), 0);
  SA_ASSERT_OK(d.SynchronizeStream(kDefaultStream));
  const std::size_t chunk_words = c / 4;
  std::vector<std::uint32_t> got(chunk_words);
  for (std::size_t k = 0; k < info.chunks.size(); ++k) {
    SA_ASSERT_OK(Download(d, got.data(), reinterpret_cast<void*>(info.chunks[k].home_address), c));
    for (std::size_t i = 0; i < chunk_words; i += 997) {
      ASSERT_EQ(got[i], gpu::Mix(42, k * chunk_words + i)) << "chunk " << k << " word " << i;
    }
    ASSERT_EQ(got.back(), gpu::Mix(42, (k + 1) * chunk_words - 1));
  }
  // And the reverse: a kernel writing through each chunk's home, read through the stitched range.
  for (std::size_t k = 0; k < info.chunks.size(); ++k) {
    ASSERT_EQ(gpu::LaunchFill(reinterpret_cast<void*>(info.chunks[k].home_address), chunk_words,
                              static_cast<std::uint32_t>(100 + k), kDefaultStream),
              0);
  }
  SA_ASSERT_OK(d.SynchronizeStream(kDefaultStream));
  std::vector<std::uint32_t> all(words);
  SA_ASSERT_OK(Download(d, all.data(), s, 5 * c));
  for (std::size_t k = 0; k < info.chunks.size(); ++k) {
    ASSERT_EQ(all[k * chunk_words + 5], gpu::Mix(static_cast<std::uint32_t>(100 + k), 5)) << "chunk " << k;
  }
  SA_ASSERT_OK(alloc->Free(s));
  SA_EXPECT_OK(alloc->CheckInvariants());
}

}  // namespace
}  // namespace stitchalloc::testing
