// The C API (include/stitchalloc/stitchalloc.h) over CachingAllocator: status translation,
// per-thread error messages, and argument checks. No torch header is involved.
#include <unistd.h>

#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "allocator/arena/arena.h"
#include "absl/strings/str_join.h"
#include "allocator/caching_allocator.h"
#include "allocator/ipc.h"
#include "torch_plugin/alloc_conf.h"
#include "allocator/config.h"
#include "recompute/policy.h"
#include <algorithm>
#include "stitchalloc/stitchalloc.h"

struct stitchalloc_conf_split {
  stitchalloc::AllocConfSplit split;
  std::string notes;
};

struct stitchalloc_allocator {
  std::unique_ptr<stitchalloc::CachingAllocator> impl;
  std::unique_ptr<stitchalloc::arena::PlannedAllocator> arena;  // in front of impl
  std::string driver_name;
  // Handles opened with stitchalloc_open_shared, by base address; unmapped before impl's driver goes.
  stitchalloc::Mutex shared_mu;
  absl::flat_hash_map<void*, std::unique_ptr<stitchalloc::ImportedRange>> opened ABSL_GUARDED_BY(shared_mu);
};

namespace {

thread_local std::string last_error;

stitchalloc_status Fail(stitchalloc_status code, std::string message) {
  last_error = std::move(message);
  return code;
}

stitchalloc_status Translate(const absl::Status& s) {
  if (s.ok()) return STITCHALLOC_OK;
  stitchalloc_status code = STITCHALLOC_ERROR_INTERNAL;
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange: code = STITCHALLOC_ERROR_INVALID_ARGUMENT; break;
    case absl::StatusCode::kResourceExhausted: code = STITCHALLOC_ERROR_OUT_OF_MEMORY; break;
    case absl::StatusCode::kUnavailable: code = STITCHALLOC_ERROR_UNAVAILABLE; break;
    case absl::StatusCode::kInternal: code = STITCHALLOC_ERROR_DRIVER; break;
    default: break;
  }
  return Fail(code, std::string(s.message()));
}

#define STITCHALLOC_CHECK_HANDLE(a)                                                        \
  if ((a) == nullptr || (a)->impl == nullptr)                                              \
    return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT, std::string(__func__) + ": null allocator handle")

const absl::flat_hash_map<std::string, std::size_t>& StatIndex() {
  static const auto* index = [] {
    auto* m = new absl::flat_hash_map<std::string, std::size_t>();
    const auto& names = stitchalloc::StatNames();
    for (std::size_t i = 0; i < names.size(); ++i) m->emplace(names[i], i);
    return m;
  }();
  return *index;
}

}  // namespace

extern "C" {

int stitchalloc_abi_version(void) { return STITCHALLOC_ABI_VERSION; }
const char* stitchalloc_version(void) { return STITCHALLOC_VERSION; }
const char* stitchalloc_last_error(void) { return last_error.c_str(); }

stitchalloc_status stitchalloc_create(const char* config, stitchalloc_allocator** out) {
  if (out == nullptr) return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT, "stitchalloc_create: null output pointer");
  *out = nullptr;
  auto cfg = stitchalloc::ConfigFromEnvironment(config == nullptr ? "" : config);
  if (!cfg.ok()) return Translate(cfg.status());
  auto impl = stitchalloc::CachingAllocator::Create(*cfg);
  if (!impl.ok()) return Translate(impl.status());
  auto* a = new stitchalloc_allocator();
  a->impl = *std::move(impl);
  a->arena = std::make_unique<stitchalloc::arena::PlannedAllocator>(a->impl.get());
  a->driver_name = a->impl->driver().name();
  *out = a;
  return STITCHALLOC_OK;
}

void stitchalloc_destroy(stitchalloc_allocator* a) {
  if (a == nullptr) return;
  a->arena.reset();  // before the caching allocator it frees into
  {
    stitchalloc::MutexLock l(&a->shared_mu);
    a->opened.clear();  // before the driver they are mapped with
  }
  delete a;
}

stitchalloc_status stitchalloc_malloc(stitchalloc_allocator* a, size_t size, uintptr_t stream, void** out) {
  STITCHALLOC_CHECK_HANDLE(a);
  if (out == nullptr) return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT, "stitchalloc_malloc: null output pointer");
  *out = nullptr;
  auto p = a->arena->Malloc(size, stream);
  if (!p.ok()) return Translate(p.status());
  *out = *p;
  return STITCHALLOC_OK;
}

stitchalloc_status stitchalloc_free(stitchalloc_allocator* a, void* ptr) {
  STITCHALLOC_CHECK_HANDLE(a);
  return Translate(a->arena->Free(ptr));
}

stitchalloc_status stitchalloc_share(stitchalloc_allocator* a, void* ptr, void* handle, size_t capacity, size_t* size,
                                     size_t* offset) {
  STITCHALLOC_CHECK_HANDLE(a);
  if (size == nullptr || offset == nullptr || (handle == nullptr && capacity > 0)) {
    return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT, "stitchalloc_share: null output pointer");
  }
  absl::StatusOr<stitchalloc::SharedRange> shared = a->arena->Share(ptr);
  if (!shared.ok()) return Translate(shared.status());
  const std::string bytes = stitchalloc::EncodeIpcHandle(*shared, getpid());
  *size = bytes.size();
  if (bytes.size() > capacity) {
    return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT,
                absl::StrFormat("stitchalloc_share: the handle needs %d bytes, the buffer has %d", bytes.size(),
                                capacity));
  }
  std::memcpy(handle, bytes.data(), bytes.size());
  *offset = shared->offset;
  return STITCHALLOC_OK;
}

stitchalloc_status stitchalloc_open_shared(stitchalloc_allocator* a, const void* handle, size_t size, void** base) {
  STITCHALLOC_CHECK_HANDLE(a);
  if (handle == nullptr || base == nullptr) {
    return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT, "stitchalloc_open_shared: null handle or output pointer");
  }
  absl::StatusOr<stitchalloc::IpcHandle> decoded =
      stitchalloc::DecodeIpcHandle(std::string_view(static_cast<const char*>(handle), size));
  if (!decoded.ok()) return Translate(decoded.status());
  absl::StatusOr<std::unique_ptr<stitchalloc::ImportedRange>> range =
      stitchalloc::ImportedRange::Open(a->impl->driver(), *decoded);
  if (!range.ok()) return Translate(range.status());
  void* p = reinterpret_cast<void*>((*range)->ptr());
  stitchalloc::MutexLock l(&a->shared_mu);
  a->opened.emplace(p, *std::move(range));
  *base = p;
  return STITCHALLOC_OK;
}

stitchalloc_status stitchalloc_close_shared(stitchalloc_allocator* a, void* base) {
  STITCHALLOC_CHECK_HANDLE(a);
  std::unique_ptr<stitchalloc::ImportedRange> range;
  {
    stitchalloc::MutexLock l(&a->shared_mu);
    auto it = a->opened.find(base);
    if (it == a->opened.end()) {
      return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT,
                  absl::StrFormat("stitchalloc_close_shared(%p): not a base stitchalloc_open_shared returned (or "
                                  "already closed)",
                                  base));
    }
    range = std::move(it->second);
    a->opened.erase(it);
  }
  range.reset();  // waits for the device, then unmaps (outside the lock)
  return STITCHALLOC_OK;
}

stitchalloc_status stitchalloc_record_stream(stitchalloc_allocator* a, void* ptr, uintptr_t stream) {
  STITCHALLOC_CHECK_HANDLE(a);
  return Translate(a->arena->RecordStream(ptr, stream));
}

stitchalloc_status stitchalloc_empty_cache(stitchalloc_allocator* a) {
  STITCHALLOC_CHECK_HANDLE(a);
  return Translate(a->impl->EmptyCache());
}

stitchalloc_status stitchalloc_set_memory_fraction(stitchalloc_allocator* a, double fraction) {
  STITCHALLOC_CHECK_HANDLE(a);
  return Translate(a->impl->SetMemoryFraction(fraction));
}

size_t stitchalloc_stat_count(void) { return stitchalloc::StatNames().size(); }

const char* stitchalloc_stat_name(size_t index) {
  const auto& names = stitchalloc::StatNames();
  return index < names.size() ? names[index].c_str() : nullptr;
}

stitchalloc_status stitchalloc_stats(stitchalloc_allocator* a, int64_t* values, size_t capacity, size_t* written) {
  STITCHALLOC_CHECK_HANDLE(a);
  if (values == nullptr && capacity > 0) {
    return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT, "stitchalloc_stats: null values with a non-zero capacity");
  }
  const auto v = stitchalloc::StatValues(a->impl->GetStats());
  const size_t n = capacity < v.size() ? capacity : v.size();
  if (n > 0) std::memcpy(values, v.data(), n * sizeof(int64_t));
  if (written != nullptr) *written = n;
  return STITCHALLOC_OK;
}

stitchalloc_status stitchalloc_get_stat(stitchalloc_allocator* a, const char* name, int64_t* out) {
  STITCHALLOC_CHECK_HANDLE(a);
  if (name == nullptr || out == nullptr) {
    return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT, "stitchalloc_get_stat: null name or output pointer");
  }
  auto it = StatIndex().find(name);
  if (it == StatIndex().end()) {
    return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT,
                absl::StrFormat("stitchalloc_get_stat: unknown statistic '%s'", name));
  }
  *out = stitchalloc::StatValues(a->impl->GetStats())[it->second];
  return STITCHALLOC_OK;
}

stitchalloc_status stitchalloc_reset_peak_stats(stitchalloc_allocator* a) {
  STITCHALLOC_CHECK_HANDLE(a);
  a->impl->ResetPeakStats();
  return STITCHALLOC_OK;
}

stitchalloc_status stitchalloc_reset_accumulated_stats(stitchalloc_allocator* a) {
  STITCHALLOC_CHECK_HANDLE(a);
  a->impl->ResetAccumulatedStats();
  return STITCHALLOC_OK;
}

const char* stitchalloc_driver_name(stitchalloc_allocator* a) {
  if (a == nullptr || a->impl == nullptr) return "";
  return a->driver_name.c_str();
}

stitchalloc_status stitchalloc_iteration_begin(stitchalloc_allocator* a, uint64_t signature) {
  STITCHALLOC_CHECK_HANDLE(a);
  return Translate(a->arena->BeginIteration(signature));
}

stitchalloc_status stitchalloc_iteration_end(stitchalloc_allocator* a) {
  STITCHALLOC_CHECK_HANDLE(a);
  return Translate(a->arena->EndIteration());
}

stitchalloc_status stitchalloc_layer_begin(stitchalloc_allocator* a, const char* kind, int index,
                                           stitchalloc_phase phase) {
  STITCHALLOC_CHECK_HANDLE(a);
  if (kind == nullptr || *kind == '\0') return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT, "stitchalloc_layer_begin: empty kind");
  if (phase != STITCHALLOC_PHASE_FORWARD && phase != STITCHALLOC_PHASE_BACKWARD) {
    return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT,
                absl::StrFormat("stitchalloc_layer_begin: phase %d is neither forward (0) nor backward (1)",
                                static_cast<int>(phase)));
  }
  return Translate(a->arena->LayerBegin(kind, index,
                                        phase == STITCHALLOC_PHASE_FORWARD ? stitchalloc::arena::Phase::kForward
                                                                           : stitchalloc::arena::Phase::kBackward));
}

stitchalloc_status stitchalloc_layer_end(stitchalloc_allocator* a) {
  STITCHALLOC_CHECK_HANDLE(a);
  return Translate(a->arena->LayerEnd());
}

stitchalloc_status stitchalloc_arena_drop_plans(stitchalloc_allocator* a) {
  STITCHALLOC_CHECK_HANDLE(a);
  return Translate(a->arena->DropAllPlans());
}

stitchalloc_status stitchalloc_arena_stat(stitchalloc_allocator* a, const char* name, int64_t* out) {
  STITCHALLOC_CHECK_HANDLE(a);
  if (name == nullptr || out == nullptr) {
    return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT, "stitchalloc_arena_stat: null name or output pointer");
  }
  bool found = false;
  stitchalloc::arena::ForEachArenaStat(a->arena->GetStats(), [&](const char* n, std::int64_t v) {
    if (std::strcmp(n, name) == 0) {
      *out = v;
      found = true;
    }
  });
  if (found) return STITCHALLOC_OK;
  return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT, absl::StrFormat("stitchalloc_arena_stat: unknown statistic '%s'", name));
}

stitchalloc_status stitchalloc_split_torch_conf(const char* text, stitchalloc_conf_split** out) {
  if (out == nullptr) return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT, "stitchalloc_split_torch_conf: null output pointer");
  *out = nullptr;
  auto split = stitchalloc::SplitTorchAllocConf(text == nullptr ? "" : text);
  if (!split.ok()) return Translate(split.status());
  auto* s = new stitchalloc_conf_split{*std::move(split), ""};
  s->notes = absl::StrJoin(s->split.notes, "\n");
  *out = s;
  return STITCHALLOC_OK;
}

int stitchalloc_conf_split_enabled(const stitchalloc_conf_split* s) { return s != nullptr && s->split.enabled ? 1 : 0; }

const char* stitchalloc_conf_split_part(const stitchalloc_conf_split* s, const char* part) {
  if (s == nullptr || part == nullptr) return nullptr;
  const std::string_view p(part);
  if (p == "stitchalloc") return s->split.stitchalloc.c_str();
  if (p == "torch") return s->split.torch.c_str();
  if (p == "notes") return s->notes.c_str();
  return nullptr;
}

void stitchalloc_conf_split_free(stitchalloc_conf_split* s) { delete s; }

}  // extern "C"

stitchalloc_status stitchalloc_plan_offload(int layers, double input_bytes, double attention_bytes, double other_bytes,
                                            double copy_bytes_per_second, double layer_forward_seconds,
                                            double host_bytes, double* alpha, char* text, size_t capacity,
                                            size_t* needed) {
  if (alpha == nullptr) return Fail(STITCHALLOC_ERROR_INVALID_ARGUMENT, "stitchalloc_plan_offload: alpha is NULL");
  const stitchalloc::recompute::LayerShape shape{layers, input_bytes, attention_bytes, other_bytes};
  const stitchalloc::recompute::Hardware hw{copy_bytes_per_second, layer_forward_seconds, host_bytes};
  auto plan = stitchalloc::recompute::PlanOffload(shape, hw);
  if (!plan.ok()) return Translate(plan.status());
  *alpha = plan->alpha;
  const std::string formatted = stitchalloc::recompute::FormatPlan(shape, hw, *plan);
  if (needed != nullptr) *needed = formatted.size() + 1;
  if (text != nullptr && capacity > 0) {
    const std::size_t n = std::min(capacity - 1, formatted.size());
    std::memcpy(text, formatted.data(), n);
    text[n] = '\0';
  }
  return STITCHALLOC_OK;
}

