#include "bench/trace/generators.h"

#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace stitchalloc::bench {
namespace {

constexpr std::uint64_t kBf16 = 2;
constexpr std::uint64_t kFp32 = 4;

// Emits allocations and frees with fresh ids and a monotonic clock.
class Emitter {
 public:
  explicit Emitter(Trace& trace) : trace_(trace) {}
  std::uint64_t Alloc(std::uint64_t size) {
    const std::uint64_t id = next_id_++;
    sizes_.push_back(size);
    trace_.Alloc(id, size, 0, Tick());
    return id;
  }
  void Free(std::uint64_t id) { trace_.Free(id, sizes_[id], 0, Tick()); }
  void FreeAll(std::vector<std::uint64_t>& ids) {
    for (std::uint64_t id : ids) Free(id);
    ids.clear();
  }
  void Mark(TraceOp op, std::uint64_t id, absl::string_view label) { trace_.Mark(op, id, label, Tick()); }

 private:
  std::int64_t Tick() { return clock_ += 3; }
  Trace& trace_;
  std::uint64_t next_id_ = 0;
  std::int64_t clock_ = 0;
  std::vector<std::uint64_t> sizes_;
};

struct Param {
  std::uint64_t elems;
  bool trainable;
};

class TrainingGenerator {
 public:
  TrainingGenerator(const TrainingOptions& o, Trace& trace) : o_(o), e_(trace) {
    const LlamaShape& s = o.shape;
    const std::uint64_t h = s.hidden, f = s.ffn, kv = std::uint64_t(s.hidden) / s.heads * s.kv_heads;
    const bool base_trainable = !o.lora;
    params_.push_back({std::uint64_t(s.vocab) * h, base_trainable});  // embedding
    for (int l = 0; l < s.layers; ++l) {
      for (std::uint64_t n : {h, h * h, h * kv, h * kv, h * h, h, h * f, h * f, f * h}) {
        params_.push_back({n, base_trainable});
      }
      if (o.lora) {
        for (int k = 0; k < 2; ++k) {  // q and v adapters: A (r x h), B (out x r)
          params_.push_back({std::uint64_t(o.lora_rank) * h, true});
          params_.push_back({(k == 0 ? h : kv) * std::uint64_t(o.lora_rank), true});
        }
      }
    }
    params_.push_back({h, base_trainable});                            // final norm
    params_.push_back({std::uint64_t(s.vocab) * h, base_trainable});  // lm_head
  }

  void Run() {
    for (const Param& p : params_) weights_.push_back(e_.Alloc(p.elems * kBf16));
    std::mt19937_64 rng(o_.seed);
    for (int step = 0; step < o_.steps; ++step) {
      int batch = o_.batch_min, seq = o_.seq_min;
      if (o_.grow_batch) {
        batch = o_.steps > 1 ? o_.batch_min + (o_.batch_max - o_.batch_min) * step / (o_.steps - 1) : o_.batch_max;
      } else {
        batch = std::uniform_int_distribution<int>(o_.batch_min, o_.batch_max)(rng);
      }
      seq = 128 * std::uniform_int_distribution<int>(o_.seq_min / 128, o_.seq_max / 128)(rng);
      e_.Mark(TraceOp::kStep, static_cast<std::uint64_t>(step), "");
      Step(std::uint64_t(batch), std::uint64_t(seq));
    }
  }

 private:
  // One decoder layer's forward (its input is saved by the caller). Returns the output; `saved` receives what backward needs
  // (nothing but the input when `keep` is false: the checkpointed first pass).
  std::uint64_t LayerForward(bool keep, std::vector<std::uint64_t>& saved) {
    const LlamaShape& s = o_.shape;
    const std::uint64_t T = tokens_, h = s.hidden, f = s.ffn;
    const std::uint64_t kv = h / s.heads * s.kv_heads;
    std::vector<std::uint64_t> temps;
    auto save = [&](std::uint64_t id) { (keep ? saved : temps).push_back(id); };
    save(e_.Alloc(T * h * kBf16));   // norm1 out
    save(e_.Alloc(T * kFp32));       // norm1 rstd
    std::uint64_t q = e_.Alloc(T * h * kBf16);
    std::uint64_t k = e_.Alloc(T * kv * kBf16);
    std::uint64_t v = e_.Alloc(T * kv * kBf16);
    if (o_.lora) {  // x @ A then @ B for q and v: small rank-r intermediates are saved
      save(e_.Alloc(T * std::uint64_t(o_.lora_rank) * kBf16));
      save(e_.Alloc(T * std::uint64_t(o_.lora_rank) * kBf16));
    }
    save(e_.Alloc(T * h * kBf16));   // q after rotary
    save(e_.Alloc(T * kv * kBf16));  // k after rotary
    e_.Free(q);
    e_.Free(k);
    save(v);
    std::uint64_t ws = e_.Alloc(8ull << 20);  // attention workspace
    save(e_.Alloc(T * h * kBf16));             // attention out
    save(e_.Alloc(batch_ * std::uint64_t(s.heads) * seq_ * kFp32));  // logsumexp
    e_.Free(ws);
    std::uint64_t o = e_.Alloc(T * h * kBf16);  // o_proj
    std::uint64_t h1 = e_.Alloc(T * h * kBf16); // residual
    e_.Free(o);
    save(h1);
    save(e_.Alloc(T * h * kBf16));  // norm2 out
    save(e_.Alloc(T * kFp32));      // norm2 rstd
    save(e_.Alloc(T * f * kBf16));  // gate
    save(e_.Alloc(T * f * kBf16));  // up
    save(e_.Alloc(T * f * kBf16));  // silu(gate)
    save(e_.Alloc(T * f * kBf16));  // silu(gate) * up
    std::uint64_t down = e_.Alloc(T * h * kBf16);
    std::uint64_t out = e_.Alloc(T * h * kBf16);  // residual
    e_.Free(down);
    e_.FreeAll(temps);
    return out;
  }

  // One layer's backward: consumes grad_out and the saved tensors, returns grad_in.
  std::uint64_t LayerBackward(std::uint64_t grad_out, std::vector<std::uint64_t>& saved, int layer) {
    const LlamaShape& s = o_.shape;
    const std::uint64_t T = tokens_, h = s.hidden, f = s.ffn;
    const std::uint64_t kv = h / s.heads * s.kv_heads;
    // MLP
    std::uint64_t g_prod = e_.Alloc(T * f * kBf16);
    WeightGrad(layer, 8);  // down
    std::uint64_t g_up = e_.Alloc(T * f * kBf16);
    std::uint64_t g_silu = e_.Alloc(T * f * kBf16);
    e_.Free(g_prod);
    std::uint64_t g_gate = e_.Alloc(T * f * kBf16);
    e_.Free(g_silu);
    WeightGrad(layer, 7);  // up
    WeightGrad(layer, 6);  // gate
    std::uint64_t g_n2 = e_.Alloc(T * h * kBf16);
    std::uint64_t g_n2b = e_.Alloc(T * h * kBf16);
    e_.Free(g_up);
    e_.Free(g_gate);
    e_.Free(g_n2b);
    std::uint64_t g_h1 = e_.Alloc(T * h * kBf16);
    WeightGrad(layer, 5);  // norm2
    e_.Free(g_n2);
    std::uint64_t g_h1sum = e_.Alloc(T * h * kBf16);
    e_.Free(g_h1);
    // Attention
    std::uint64_t g_attn = e_.Alloc(T * h * kBf16);
    WeightGrad(layer, 4);  // o
    std::uint64_t ws = e_.Alloc(16ull << 20);
    std::uint64_t g_q = e_.Alloc(T * h * kBf16);
    std::uint64_t g_k = e_.Alloc(T * kv * kBf16);
    std::uint64_t g_v = e_.Alloc(T * kv * kBf16);
    e_.Free(ws);
    e_.Free(g_attn);
    std::uint64_t g_qr = e_.Alloc(T * h * kBf16);
    std::uint64_t g_kr = e_.Alloc(T * kv * kBf16);
    e_.Free(g_q);
    e_.Free(g_k);
    WeightGrad(layer, 1);  // q
    WeightGrad(layer, 2);  // k
    WeightGrad(layer, 3);  // v
    std::uint64_t g_n1 = e_.Alloc(T * h * kBf16);
    e_.Free(g_qr);
    e_.Free(g_kr);
    e_.Free(g_v);
    std::uint64_t g_x = e_.Alloc(T * h * kBf16);
    WeightGrad(layer, 0);  // norm1
    e_.Free(g_n1);
    e_.Free(g_h1sum);
    e_.Free(grad_out);
    e_.FreeAll(saved);
    return g_x;
  }

  // Gradient of parameter `slot` of `layer` (slot -1: the non-layer parameters by index).
  void WeightGrad(int layer, int slot) {
    const std::size_t per_layer = o_.lora ? 13 : 9;
    const std::size_t index = 1 + std::size_t(layer) * per_layer + std::size_t(slot);
    GradFor(index);
    if (o_.lora && (slot == 1 || slot == 3)) {  // the adapters of q (slot 1) and v (slot 3)
      const std::size_t base = 1 + std::size_t(layer) * per_layer + 9 + (slot == 1 ? 0 : 2);
      GradFor(base);
      GradFor(base + 1);
    }
  }
  void GradFor(std::size_t index) {
    if (!params_[index].trainable || grads_[index] != kNone) return;
    grads_[index] = e_.Alloc(params_[index].elems * kBf16);
  }

  void Step(std::uint64_t batch, std::uint64_t seq) {
    const LlamaShape& s = o_.shape;
    batch_ = batch;
    seq_ = seq;
    tokens_ = batch * seq;
    const std::uint64_t T = tokens_, h = s.hidden, V = s.vocab;
    grads_.assign(params_.size(), kNone);
    std::uint64_t ids = e_.Alloc(T * 8);  // input ids, labels
    std::uint64_t labels = e_.Alloc(T * 8);
    std::uint64_t x = e_.Alloc(T * h * kBf16);  // embedding
    std::vector<std::vector<std::uint64_t>> saved(std::size_t(s.layers));
    for (int l = 0; l < s.layers; ++l) {
      e_.Mark(TraceOp::kLayerBegin, std::uint64_t(l), "decoder:forward");
      std::uint64_t out = LayerForward(!o_.checkpointing, saved[std::size_t(l)]);
      saved[std::size_t(l)].push_back(x);  // the layer input is always kept
      e_.Mark(TraceOp::kLayerEnd, std::uint64_t(l), "decoder:forward");
      x = out;
    }
    // Head and loss.
    std::uint64_t normed = e_.Alloc(T * h * kBf16);
    std::uint64_t rstd = e_.Alloc(T * kFp32);
    std::uint64_t logits = e_.Alloc(T * V * kBf16);
    std::uint64_t logits32 = e_.Alloc(T * V * kFp32);
    e_.Free(logits);
    std::uint64_t logp = e_.Alloc(T * V * kFp32);
    std::uint64_t loss = e_.Alloc(4);
    // Backward of the loss and the head.
    std::uint64_t g_logp = e_.Alloc(T * V * kFp32);
    e_.Free(logp);
    e_.Free(logits32);
    std::uint64_t g_logits = e_.Alloc(T * V * kBf16);
    e_.Free(g_logp);
    GradFor(params_.size() - 1);  // lm_head
    std::uint64_t g_norm = e_.Alloc(T * h * kBf16);
    e_.Free(g_logits);
    GradFor(params_.size() - 2);  // final norm
    std::uint64_t grad = e_.Alloc(T * h * kBf16);
    e_.Free(g_norm);
    e_.Free(normed);
    e_.Free(rstd);
    e_.Free(x);
    for (int l = s.layers - 1; l >= 0; --l) {
      e_.Mark(TraceOp::kLayerBegin, std::uint64_t(l), "decoder:backward");
      std::vector<std::uint64_t>& sv = saved[std::size_t(l)];
      if (o_.checkpointing) {  // recompute the forward from the saved input
        std::uint64_t input = sv.back();
        sv.pop_back();
        std::vector<std::uint64_t> re;
        std::uint64_t out = LayerForward(true, re);
        e_.Free(out);
        re.push_back(input);
        sv = std::move(re);
      }
      grad = LayerBackward(grad, sv, l);
      e_.Mark(TraceOp::kLayerEnd, std::uint64_t(l), "decoder:backward");
    }
    GradFor(0);  // embedding
    e_.Free(grad);
    e_.Free(loss);
    e_.Free(ids);
    e_.Free(labels);
    Optimizer();
  }

  void Optimizer() {
    // AdamW (foreach): states at the first step; per tensor a float temporary of its size.
    std::vector<std::uint64_t> temps;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      if (!params_[i].trainable) continue;
      if (states_.empty() || states_.size() <= i || states_[i].first == kNone) {
        states_.resize(params_.size(), {kNone, kNone});
        states_[i] = {e_.Alloc(params_[i].elems * kFp32), e_.Alloc(params_[i].elems * kFp32)};
      }
      temps.push_back(e_.Alloc(params_[i].elems * kFp32));
      if (temps.size() == 8) e_.FreeAll(temps);
    }
    e_.FreeAll(temps);
    for (std::uint64_t& g : grads_) {  // zero_grad(set_to_none=True)
      if (g != kNone) e_.Free(g);
      g = kNone;
    }
  }

  static constexpr std::uint64_t kNone = ~std::uint64_t{0};
  const TrainingOptions o_;
  Emitter e_;
  std::vector<Param> params_;
  std::vector<std::uint64_t> weights_;
  std::vector<std::uint64_t> grads_;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> states_;
  std::uint64_t batch_ = 1, seq_ = 1, tokens_ = 1;
};

}  // namespace

Trace GenerateTraining(const TrainingOptions& o, absl::string_view name) {
  Trace trace;
  trace.name = std::string(name);
  trace.meta.emplace_back("source", "stitchalloc generator (bench/trace/generators.cc)");
  trace.meta.emplace_back(
      "shape", absl::StrCat("layers=", o.shape.layers, " hidden=", o.shape.hidden, " ffn=", o.shape.ffn,
                            " heads=", o.shape.heads, " kv_heads=", o.shape.kv_heads, " vocab=", o.shape.vocab));
  trace.meta.emplace_back(
      "run", absl::StrCat("steps=", o.steps, " batch=", o.batch_min, "..", o.batch_max, o.grow_batch ? " (growing)" : "",
                          " seq=", o.seq_min, "..", o.seq_max, " checkpointing=", o.checkpointing ? "on" : "off",
                          " lora=", o.lora ? absl::StrCat("rank ", o.lora_rank) : "off", " seed=", o.seed));
  TrainingGenerator(o, trace).Run();
  return trace;
}

Trace GenerateAdversarial(const AdversarialTraceOptions& o, absl::string_view name) {
  Trace trace;
  trace.name = std::string(name);
  trace.meta.emplace_back("source", "stitchalloc generator: adversarial pattern (bench/patterns.h)");
  Emitter e(trace);
  std::vector<std::uint64_t> smalls;
  for (int i = 0; i < o.cycles; ++i) {
    const std::uint64_t segment = o.first_segment + std::uint64_t(i) * o.growth;
    std::uint64_t large = e.Alloc(segment - o.small);
    smalls.push_back(e.Alloc(o.small));
    e.Free(large);
  }
  e.FreeAll(smalls);
  return trace;
}

std::vector<std::string> GeneratedTraceNames() {
  return {"llama-varlen", "llama-varlen-ckpt", "lora-varlen", "growing-batch", "adversarial"};
}

absl::StatusOr<Trace> GenerateNamed(absl::string_view name, std::uint64_t seed, int steps) {
  TrainingOptions o;
  o.seed = seed;
  if (name == "llama-varlen") {
    o.batch_min = 1, o.batch_max = 2, o.seq_min = 512, o.seq_max = 4096, o.steps = 30;
  } else if (name == "llama-varlen-ckpt") {
    o.batch_min = 1, o.batch_max = 4, o.seq_min = 1024, o.seq_max = 8192, o.steps = 30, o.checkpointing = true;
  } else if (name == "lora-varlen") {
    o.batch_min = 1, o.batch_max = 4, o.seq_min = 512, o.seq_max = 4096, o.steps = 30, o.lora = true;
  } else if (name == "growing-batch") {
    o.batch_min = 1, o.batch_max = 8, o.seq_min = 1024, o.seq_max = 1024, o.steps = 16, o.grow_batch = true;
  } else if (name == "adversarial") {
    return GenerateAdversarial(AdversarialTraceOptions{}, name);
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown generated trace \"", name,
                                                   "\"; known: ", absl::StrJoin(GeneratedTraceNames(), ", ")));
  }
  if (steps > 0) o.steps = steps;
  return GenerateTraining(o, name);
}

}  // namespace stitchalloc::bench
