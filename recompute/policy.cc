// PlanOffload: the alpha formula of policy.h and its report.
#include "recompute/policy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace stitchalloc::recompute {
namespace {

absl::Status CheckFigure(const char* name, double v) {
  if (!std::isfinite(v) || v < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("offload plan: %s = %g must be finite and >= 0", name, v));
  }
  return absl::OkStatus();
}

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

}  // namespace

absl::StatusOr<OffloadPlan> PlanOffload(const LayerShape& shape, const Hardware& hw) {
  if (shape.layers < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("offload plan: %d layers; at least 1 is needed", shape.layers));
  }
  for (auto [name, v] : {std::pair<const char*, double>{"input bytes", shape.input_bytes},
                         {"attention bytes", shape.attention_bytes},
                         {"other bytes", shape.other_bytes},
                         {"copy bandwidth", hw.copy_bytes_per_second},
                         {"layer forward time", hw.layer_forward_seconds},
                         {"host memory", hw.host_bytes}}) {
    if (absl::Status s = CheckFigure(name, v); !s.ok()) return s;
  }
  if (hw.copy_bytes_per_second <= 0) return absl::InvalidArgumentError("offload plan: copy bandwidth must be positive");
  if (shape.other_bytes <= 0) {
    return absl::InvalidArgumentError("offload plan: other saved bytes must be positive (nothing to split by tokens)");
  }
  OffloadPlan p;
  const double mandatory = shape.input_bytes + shape.attention_bytes;
  p.swapped_layers = std::max(shape.layers - 2, 0);
  p.alpha_bandwidth = (hw.copy_bytes_per_second * hw.layer_forward_seconds - mandatory) / shape.other_bytes;
  p.alpha_host = p.swapped_layers > 0 ? (hw.host_bytes / p.swapped_layers - mandatory) / shape.other_bytes
                                      : std::numeric_limits<double>::infinity();
  const double raw = std::min(p.alpha_bandwidth, p.alpha_host);
  p.alpha = std::clamp(raw, 0.0, 1.0);
  if (raw < 1.0) p.bound = p.alpha_bandwidth <= p.alpha_host ? Bound::kBandwidth : Bound::kHostMemory;
  p.mandatory_hidden = mandatory <= hw.copy_bytes_per_second * hw.layer_forward_seconds;
  p.mandatory_fits = p.swapped_layers == 0 || mandatory * p.swapped_layers <= hw.host_bytes;
  if (p.swapped_layers == 0) {
    p.alpha = 0;  // every layer's backward follows at once: nothing is swapped
    p.bound = Bound::kNone;
    p.swapped_bytes_per_layer = 0;
    p.recomputed_bytes_per_layer = 0;
  } else {
    p.swapped_bytes_per_layer = mandatory + p.alpha * shape.other_bytes;
    p.recomputed_bytes_per_layer = (1.0 - p.alpha) * shape.other_bytes;
  }
  p.copy_seconds_per_layer = p.swapped_bytes_per_layer / hw.copy_bytes_per_second;
  p.host_bytes_needed = p.swapped_bytes_per_layer * p.swapped_layers;
  return p;
}

std::string FormatPlan(const LayerShape& shape, const Hardware& hw, const OffloadPlan& p) {
  const char* bound = p.bound == Bound::kBandwidth ? "bandwidth-bound" : p.bound == Bound::kHostMemory ? "host-bound" : "unbound";
  std::string out = absl::StrFormat(
      "layers %d  per layer: input %.3f GiB  attention %.3f GiB  other %.3f GiB\n"
      "bandwidth %.2f GB/s  layer forward %.3f ms  host memory %.2f GiB\n"
      "alpha %.3f (%s; bandwidth term %.3f, host term %.3f)\n"
      "per layer: swapped %.3f GiB, recomputed %.3f GiB; copy %.3f ms vs layer %.3f ms\n"
      "host memory needed %.2f GiB over %d swapped layers (the last layers stay on the device)\n",
      shape.layers, shape.input_bytes / kGiB, shape.attention_bytes / kGiB, shape.other_bytes / kGiB,
      hw.copy_bytes_per_second / 1e9, hw.layer_forward_seconds * 1e3, hw.host_bytes / kGiB, p.alpha, bound,
      p.alpha_bandwidth, p.alpha_host, p.swapped_bytes_per_layer / kGiB, p.recomputed_bytes_per_layer / kGiB,
      p.copy_seconds_per_layer * 1e3, hw.layer_forward_seconds * 1e3, p.host_bytes_needed / kGiB, p.swapped_layers);
  if (!p.mandatory_hidden) {
    absl::StrAppend(&out, "WARNING: the layer input and attention output alone take ",
                    absl::StrFormat("%.3f ms", (shape.input_bytes + shape.attention_bytes) / hw.copy_bytes_per_second * 1e3),
                    " to copy, longer than the layer's forward: copies will not be hidden\n");
  }
  if (!p.mandatory_fits) {
    absl::StrAppend(&out, "WARNING: the layer inputs and attention outputs of the swapped layers need ",
                    absl::StrFormat("%.2f GiB", (shape.input_bytes + shape.attention_bytes) * p.swapped_layers / kGiB),
                    " of host memory, more than is available: the pinned pool will refuse some and they stay on the device\n");
  }
  return out;
}

}  // namespace stitchalloc::recompute
