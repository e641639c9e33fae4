// The token-wise swap/recompute policy (MEMO): which fraction alpha of each saved tensor's
// tokens goes to host memory; the rest is recomputed token-locally before the layer's backward.
//
//   alpha = clamp(min((B*T - S_in - S_attn) / S_other,
//                     (M_host / (n - 2) - S_in - S_attn) / S_other), 0, 1)
//
// B the measured copy bandwidth, T the layer's forward time, n the layer count, M_host the host
// memory available to this GPU, S_in / S_attn / S_other the per-layer bytes of the layer input,
// the attention output and the other saved tensors. The first term keeps each layer's copy
// hidden behind the next layer's compute; the second keeps the n - 2 layers that are on the host
// at once (the last layers' backward follows at once and they stay on the device) within host
// memory. The layer input and the attention output are always swapped (recomputing them would
// mean recomputing attention); when even they cannot be hidden or held, the plan says so.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace stitchalloc::recompute {

struct LayerShape {
  int layers = 0;                // n
  double input_bytes = 0;        // S_in, per layer
  double attention_bytes = 0;    // S_attn, per layer
  double other_bytes = 0;        // S_other, per layer
};

struct Hardware {
  double copy_bytes_per_second = 0;  // B (measured device-to-host bandwidth)
  double layer_forward_seconds = 0;  // T (measured)
  double host_bytes = 0;             // M_host available to this GPU
};

enum class Bound { kNone, kBandwidth, kHostMemory };

struct OffloadPlan {
  double alpha = 0;             // in [0, 1]
  double alpha_bandwidth = 0;   // the first term, unclamped
  double alpha_host = 0;        // the second term, unclamped
  Bound bound = Bound::kNone;   // which term set alpha (kNone: alpha = 1, both allow all)
  double swapped_bytes_per_layer = 0;     // S_in + S_attn + alpha * S_other
  double recomputed_bytes_per_layer = 0;  // (1 - alpha) * S_other
  double copy_seconds_per_layer = 0;      // swapped / B
  double host_bytes_needed = 0;           // (n - 2) * swapped
  bool mandatory_hidden = true;   // S_in + S_attn copy within T
  bool mandatory_fits = true;     // (n - 2) * (S_in + S_attn) within M_host
  int swapped_layers = 0;         // n - 2 (0 when n <= 2: nothing is swapped)
};

// InvalidArgument for a negative or non-finite figure, no layers, or zero bandwidth / layer
// time / other bytes where the formula divides by them.
absl::StatusOr<OffloadPlan> PlanOffload(const LayerShape& shape, const Hardware& hw);

// A human-readable table of the plan: alpha, the binding limit, bytes swapped and recomputed
// per layer, predicted copy time against the layer time, host memory needed, warnings.
std::string FormatPlan(const LayerShape& shape, const Hardware& hw, const OffloadPlan& plan);

}  // namespace stitchalloc::recompute
