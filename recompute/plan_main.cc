// stitchalloc-offload-plan: prints the token-wise swap/recompute plan (alpha) for a model shape
// and hardware figures (recompute/policy.h). Sizes in GiB, bandwidth in GB/s, time in ms.
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "recompute/policy.h"

ABSL_FLAG(int, layers, 32, "number of transformer layers (n)");
ABSL_FLAG(double, input_gib, 1.0, "per layer and GPU: bytes of the layer input (GiB)");
ABSL_FLAG(double, attention_gib, 1.0, "per layer and GPU: bytes of the attention output (GiB)");
ABSL_FLAG(double, other_gib, 14.0, "per layer and GPU: bytes of the other saved tensors (GiB)");
ABSL_FLAG(double, host_gib, 256.0, "host memory available to this GPU (GiB)");
ABSL_FLAG(double, bandwidth_gbs, 1e6, "measured device-to-host copy bandwidth (GB/s); default: ample");
ABSL_FLAG(double, layer_ms, 1e3, "measured forward time of one layer (ms)");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "stitchalloc-offload-plan [--layers N] [--input_gib G] [--attention_gib G] [--other_gib G] "
      "[--host_gib G] [--bandwidth_gbs B] [--layer_ms T]: prints alpha (the fraction of tokens swapped) and the "
      "per-layer plan");
  absl::ParseCommandLine(argc, argv);
  constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
  const stitchalloc::recompute::LayerShape shape{absl::GetFlag(FLAGS_layers), absl::GetFlag(FLAGS_input_gib) * kGiB,
                                                 absl::GetFlag(FLAGS_attention_gib) * kGiB,
                                                 absl::GetFlag(FLAGS_other_gib) * kGiB};
  const stitchalloc::recompute::Hardware hw{absl::GetFlag(FLAGS_bandwidth_gbs) * 1e9,
                                            absl::GetFlag(FLAGS_layer_ms) / 1e3, absl::GetFlag(FLAGS_host_gib) * kGiB};
  auto plan = stitchalloc::recompute::PlanOffload(shape, hw);
  if (!plan.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(plan.status().message()).c_str());
    return 2;
  }
  std::fputs(stitchalloc::recompute::FormatPlan(shape, hw, *plan).c_str(), stdout);
  return 0;
}
