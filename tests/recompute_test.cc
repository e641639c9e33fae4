// The alpha policy against hand-computed values: the worked example of the issue and docs
// (host-bound, 0.467), a bandwidth-bound case, both limits generous (alpha 1), the cases where
// even the layer input and attention output cannot be hidden or held, too few layers, bad input.
#include <limits>
#include <string>

#include "gtest/gtest.h"
#include "recompute/policy.h"

namespace stitchalloc::recompute {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

TEST(OffloadPolicy, WorkedExampleIsHostBound) {
  // 32 layers; per layer 1 GiB input + 1 GiB attention + 14 GiB other; 256 GiB host; ample
  // bandwidth. Host term: (256/30 - 2) / 14 = 0.46667.
  auto p = PlanOffload({32, 1 * kGiB, 1 * kGiB, 14 * kGiB}, {1e15, 1.0, 256 * kGiB});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_NEAR(p->alpha, (256.0 / 30.0 - 2.0) / 14.0, 1e-12);
  EXPECT_NEAR(p->alpha, 0.467, 5e-4);
  EXPECT_EQ(p->bound, Bound::kHostMemory);
  EXPECT_EQ(p->swapped_layers, 30);
  EXPECT_NEAR(p->swapped_bytes_per_layer, 256.0 / 30.0 * kGiB, 1.0);
  EXPECT_NEAR(p->recomputed_bytes_per_layer, (14.0 - (256.0 / 30.0 - 2.0)) * kGiB, 1.0);
  EXPECT_NEAR(p->host_bytes_needed, 256 * kGiB, 16.0);
  EXPECT_TRUE(p->mandatory_hidden);
  EXPECT_TRUE(p->mandatory_fits);
  const std::string text = FormatPlan({32, 1 * kGiB, 1 * kGiB, 14 * kGiB}, {1e15, 1.0, 256 * kGiB}, *p);
  EXPECT_NE(text.find("alpha 0.467 (host-bound"), std::string::npos) << text;
}

TEST(OffloadPolicy, BandwidthBound) {
  // B = 20 GB/s, T = 0.5 s: 10 GB per layer hideable; mandatory 2 GB; other 16 GB:
  // alpha = (10e9 - 2e9) / 16e9 = 0.5. Host ample.
  auto p = PlanOffload({10, 1e9, 1e9, 16e9}, {20e9, 0.5, 1e15});
  ASSERT_TRUE(p.ok());
  EXPECT_NEAR(p->alpha, 0.5, 1e-12);
  EXPECT_EQ(p->bound, Bound::kBandwidth);
  EXPECT_NEAR(p->copy_seconds_per_layer, 0.5, 1e-12);  // exactly the layer time
  EXPECT_NEAR(p->swapped_bytes_per_layer, 10e9, 1e-3);
}

TEST(OffloadPolicy, AmpleEverythingSwapsAllTokens) {
  auto p = PlanOffload({8, 1e9, 1e9, 4e9}, {1e12, 1.0, 1e15});
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->alpha, 1.0);
  EXPECT_EQ(p->bound, Bound::kNone);
  EXPECT_EQ(p->recomputed_bytes_per_layer, 0.0);
}

TEST(OffloadPolicy, MandatoryPartCannotBeHidden) {
  // 2 GB mandatory at 10 GB/s takes 0.2 s; the layer takes 0.1 s: alpha 0, and the report says
  // the copies will not be hidden.
  auto p = PlanOffload({16, 1e9, 1e9, 8e9}, {10e9, 0.1, 1e15});
  ASSERT_TRUE(p.ok());
  EXPECT_NEAR(p->alpha_bandwidth, (1e9 - 2e9) / 8e9, 1e-12);
  EXPECT_EQ(p->alpha, 0.0);
  EXPECT_FALSE(p->mandatory_hidden);
  EXPECT_TRUE(p->mandatory_fits);
  EXPECT_NEAR(p->swapped_bytes_per_layer, 2e9, 1e-3);  // the mandatory part is still swapped
  const std::string text = FormatPlan({16, 1e9, 1e9, 8e9}, {10e9, 0.1, 1e15}, *p);
  EXPECT_NE(text.find("will not be hidden"), std::string::npos) << text;
}

TEST(OffloadPolicy, MandatoryPartDoesNotFitInHostMemory) {
  // 30 swapped layers x 2 GiB = 60 GiB > 32 GiB of host memory.
  auto p = PlanOffload({32, 1 * kGiB, 1 * kGiB, 14 * kGiB}, {1e15, 1.0, 32 * kGiB});
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->alpha, 0.0);
  EXPECT_EQ(p->bound, Bound::kHostMemory);
  EXPECT_FALSE(p->mandatory_fits);
  EXPECT_NE(FormatPlan({32, 1 * kGiB, 1 * kGiB, 14 * kGiB}, {1e15, 1.0, 32 * kGiB}, *p).find("more than is available"),
            std::string::npos);
}

TEST(OffloadPolicy, TwoLayersOrFewerSwapNothing) {
  auto p = PlanOffload({2, 1e9, 1e9, 4e9}, {1e12, 1.0, 1e12});
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->alpha, 0.0);
  EXPECT_EQ(p->swapped_layers, 0);
  EXPECT_EQ(p->swapped_bytes_per_layer, 0.0);
}

TEST(OffloadPolicy, RejectsBadInput) {
  EXPECT_FALSE(PlanOffload({0, 1, 1, 1}, {1, 1, 1}).ok());
  EXPECT_FALSE(PlanOffload({4, -1, 1, 1}, {1, 1, 1}).ok());
  EXPECT_FALSE(PlanOffload({4, 1, 1, 0}, {1, 1, 1}).ok());
  EXPECT_FALSE(PlanOffload({4, 1, 1, 1}, {0, 1, 1}).ok());
  EXPECT_FALSE(PlanOffload({4, 1, 1, 1}, {1, std::numeric_limits<double>::quiet_NaN(), 1}).ok());
  const auto bad = PlanOffload({4, 1, 1, 1}, {1, 1, -5});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("host memory"), std::string::npos) << bad.status();
}

}  // namespace
}  // namespace stitchalloc::recompute
