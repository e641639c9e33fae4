// Generators: deterministic synthetic allocator traces (the same seed gives the same trace),
// the embedded default inputs of the main job. They emit the requests an eager PyTorch training
// loop makes on one GPU, at the granularity of tensors:
//   - parameters, gradients (allocated during backward, freed by zero_grad(set_to_none)),
//     AdamW states (allocated at the first step) and the optimizer's per-tensor temporaries;
//   - per decoder layer (Llama-style: RMSNorm, q/k/v with grouped-query attention, rotary,
//     flash attention, o_proj, SwiGLU MLP) the activations saved for backward, the temporaries
//     freed inside the layer, and in backward the gradient temporaries in reverse order;
//   - with activation checkpointing only each layer's input is saved, and the layer's forward
//     is recomputed before its backward;
//   - the logits, their float copy and the cross-entropy buffers.
// Layer marks (layer_begin/layer_end with "decoder:forward" / "decoder:backward") and step
// marks are emitted for the arena work. Every request keeps the shape arithmetic of the real
// operator, so sizes vary with batch and sequence length the way a real trace's do.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "bench/trace/trace.h"

namespace stitchalloc::bench {

struct LlamaShape {
  int layers = 16;
  int hidden = 2048;
  int ffn = 5632;
  int heads = 16;
  int kv_heads = 4;
  int vocab = 32000;
};

struct TrainingOptions {
  LlamaShape shape;
  int steps = 8;
  std::uint64_t seed = 1;
  // Per step: batch and sequence length drawn uniformly from [min, max] (sequence lengths in
  // multiples of 128), or growing linearly from min to max when `grow_batch` is set.
  int batch_min = 1, batch_max = 1;
  int seq_min = 2048, seq_max = 2048;
  bool grow_batch = false;
  bool checkpointing = false;
  // LoRA: base weights frozen (no gradients, no optimizer state); rank-r adapters on q and v.
  bool lora = false;
  int lora_rank = 16;
};

Trace GenerateTraining(const TrainingOptions& options, absl::string_view name);

struct AdversarialTraceOptions {
  int cycles = 24;
  std::uint64_t first_segment = 64ull << 20;
  std::uint64_t growth = 8ull << 20;
  std::uint64_t small = 3ull << 19;  // 1.5 MiB
};
// The core issue's adversarial pattern (bench/patterns.h) as a trace.
Trace GenerateAdversarial(const AdversarialTraceOptions& options, absl::string_view name);

// The named default inputs of the main job: llama-varlen, llama-varlen-ckpt, lora-varlen,
// growing-batch, adversarial.
std::vector<std::string> GeneratedTraceNames();
// steps > 0 overrides the trace's default number of training steps.
absl::StatusOr<Trace> GenerateNamed(absl::string_view name, std::uint64_t seed = 1, int steps = 0);

}  // namespace stitchalloc::bench
