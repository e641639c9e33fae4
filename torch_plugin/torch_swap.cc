// Swap entry points of libstitchalloc_torch.so (declared in include/stitchalloc/torch.h).
//
// One SwapSession per device: a pinned host pool, a copy engine and a swap manager over the
// device's default pool, created by the first stitchalloc_torch_swap_begin on that device from
// the installed configuration's swap_* settings, with PyTorch's current stream at that moment as
// the compute stream. Sessions live as long as the process, like the allocator.
//
// Every block handed to the manager stays the caller's in the sense of PyTorch: wherever the
// manager gives it back, the stream still reading it is recorded on the PoolSet and then either
// the caller's release callback runs (a PyTorch storage drops its reference) or, without one,
// the block is freed the way PyTorch's deleter frees it. The manager's own prefetch blocks are
// traced in PyTorch's memory history through its block hooks (allocated; freed unclaimed), so a
// trace pairs every free with its alloc. No exception crosses the C boundary.
#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "swap/copy_engine.h"
#include "swap/pinned_pool.h"
#include "swap/swap_manager.h"
#include "torch_plugin/torch_internal.h"

namespace stitchalloc {
namespace {

constexpr int kMaxSwapDevices = 64;

struct SwapSession {
  PoolSet* set = nullptr;
  std::unique_ptr<swap::PinnedPool> pool;
  std::unique_ptr<swap::CopyEngine> engine;
  std::unique_ptr<swap::SwapManager> manager;
};

std::array<std::atomic<SwapSession*>, kMaxSwapDevices> g_sessions{};
std::mutex g_sessions_mu;

int Fail(const char* what, const absl::Status& s) {
  torch_internal::SetLastError(absl::StrCat(what, ": ", s.message()));
  return -1;
}

// The session of `device`; created only when `create` (swap_begin), otherwise FailedPrecondition.
absl::StatusOr<SwapSession*> Session(int device, bool create) {
  int d = 0;
  auto set = torch_internal::InstalledPoolSet(device, &d);
  if (!set.ok()) return set.status();
  if (d < 0 || d >= kMaxSwapDevices) return absl::InvalidArgumentError(absl::StrCat("invalid device index ", d));
  if (SwapSession* s = g_sessions[d].load(std::memory_order_acquire)) return s;
  if (!create) {
    return absl::FailedPreconditionError(
        absl::StrCat("no swap session on device ", d, " (call stitchalloc_torch_swap_begin first)"));
  }
  std::lock_guard<std::mutex> lock(g_sessions_mu);
  if (SwapSession* s = g_sessions[d].load()) return s;
  const SwapSettings& cfg = (*set)->config().swap;
  auto session = std::make_unique<SwapSession>();
  session->set = *set;
  Driver* driver = &(*set)->main().driver();
  auto pool = swap::PinnedPool::Create(driver, {.slab_bytes = cfg.slab, .capacity = cfg.host_limit});
  if (!pool.ok()) return pool.status();
  session->pool = *std::move(pool);
  auto engine = swap::CopyEngine::Create(driver, {.chunk_bytes = cfg.copy_chunk});
  if (!engine.ok()) return engine.status();
  session->engine = *std::move(engine);
  auto manager = swap::SwapManager::Create(
      &(*set)->main(), session->pool.get(), session->engine.get(), torch_internal::CurrentStream(d),
      {.lookahead = cfg.lookahead,
       .keep_last_layers = cfg.keep_last_layers,
       .min_bytes = cfg.min_bytes,
       .hooks = {.allocated = [d](void* p, Stream s) { torch_internal::TraceSwapBlock(true, d, p, s); },
                 .freeing = [d](void* p, Stream s) { torch_internal::TraceSwapBlock(false, d, p, s); }}});
  if (!manager.ok()) return manager.status();
  session->manager = *std::move(manager);
  SwapSession* raw = session.release();  // lives as long as the process
  g_sessions[d].store(raw, std::memory_order_release);
  return raw;
}

template <typename Fn>
int OnSession(const char* what, int device, bool create, Fn&& fn) {
  try {
    auto s = Session(device, create);
    if (!s.ok()) return Fail(what, s.status());
    const absl::Status st = fn(**s);
    return st.ok() ? 0 : Fail(what, st);
  } catch (const std::exception& e) {
    torch_internal::SetLastError(absl::StrCat(what, ": ", e.what()));
    return -1;
  }
}

}  // namespace
}  // namespace stitchalloc

extern "C" {

__attribute__((visibility("default"))) int stitchalloc_torch_swap_begin_pass(int device, int num_layers, uint64_t pass) {
  return stitchalloc::OnSession("stitchalloc_torch_swap_begin", device, true, [&](stitchalloc::SwapSession& s) {
    return s.manager->BeginIteration(num_layers, pass);
  });
}

__attribute__((visibility("default"))) int stitchalloc_torch_swap_begin(int device, int num_layers) {
  return stitchalloc_torch_swap_begin_pass(device, num_layers, 0);
}

__attribute__((visibility("default"))) int stitchalloc_torch_swap_offload_pass(int device, void* ptr, uint64_t bytes,
                                                                               int layer, uint64_t pass,
                                                                               void (*release)(void*), void* context,
                                                                               uint64_t* ticket) {
  using namespace stitchalloc;
  if (ticket == nullptr) return Fail("stitchalloc_torch_swap_offload", absl::InvalidArgumentError("ticket is NULL"));
  return OnSession("stitchalloc_torch_swap_offload", device, false, [&](SwapSession& s) -> absl::Status {
    PoolSet* set = s.set;
    Driver* driver = &set->main().driver();
    // Memory stitchalloc did not make (opened from another process, PyTorch's uncached mode,
    // another library's) stays on the device: its owner frees it, not the swap manager.
    bool foreign = false;
    if (ptr != nullptr) {
      auto info = set->Describe(ptr);
      foreign = !info.ok();
      if (!foreign && info->size < bytes) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%d bytes at %p overrun its allocation of %d bytes", bytes, ptr, info->size));
      }
    }
    auto give_back = [set, driver, ptr, release, context](std::optional<Stream> in_use_by) {
      if (in_use_by.has_value() && !set->RecordStream(ptr, *in_use_by).ok()) {
        driver->SynchronizeStream(*in_use_by).IgnoreError();  // not recorded: wait for the reader
      }
      try {
        if (release != nullptr) release(context);
        else torch_internal::FreeThroughTorch(ptr);
      } catch (...) {
        // A failing free must not unwind through the swap manager; the block is then leaked.
      }
    };
    auto t = foreign ? s.manager->Keep(ptr, bytes, layer, std::move(give_back), pass)
                     : s.manager->Offload(ptr, bytes, layer, std::move(give_back), pass);
    if (!t.ok()) return t.status();
    *ticket = *t;
    return absl::OkStatus();
  });
}

__attribute__((visibility("default"))) int stitchalloc_torch_swap_offload(int device, void* ptr, uint64_t bytes,
                                                                          int layer, void (*release)(void*),
                                                                          void* context, uint64_t* ticket) {
  return stitchalloc_torch_swap_offload_pass(device, ptr, bytes, layer, 0, release, context, ticket);
}

__attribute__((visibility("default"))) int stitchalloc_torch_swap_forward_end_pass(int device, int layer, uint64_t pass) {
  return stitchalloc::OnSession("stitchalloc_torch_swap_forward_end", device, false,
                                [&](stitchalloc::SwapSession& s) { return s.manager->ForwardEnd(layer, pass); });
}

__attribute__((visibility("default"))) int stitchalloc_torch_swap_forward_end(int device, int layer) {
  return stitchalloc_torch_swap_forward_end_pass(device, layer, 0);
}

__attribute__((visibility("default"))) int stitchalloc_torch_swap_backward_begin_pass(int device, int layer,
                                                                                      uint64_t pass) {
  return stitchalloc::OnSession("stitchalloc_torch_swap_backward_begin", device, false,
                                [&](stitchalloc::SwapSession& s) { return s.manager->BackwardBegin(layer, pass); });
}

__attribute__((visibility("default"))) int stitchalloc_torch_swap_backward_begin(int device, int layer) {
  return stitchalloc_torch_swap_backward_begin_pass(device, layer, 0);
}

__attribute__((visibility("default"))) int stitchalloc_torch_swap_wait(int device, uint64_t ticket, void** ptr,
                                                                       int* same_block) {
  using namespace stitchalloc;
  if (ptr == nullptr) return Fail("stitchalloc_torch_swap_wait", absl::InvalidArgumentError("ptr is NULL"));
  return OnSession("stitchalloc_torch_swap_wait", device, false, [&](SwapSession& s) -> absl::Status {
    auto c = s.manager->Claim(ticket);
    if (!c.ok()) return c.status();
    *ptr = c->ptr;
    if (same_block != nullptr) *same_block = c->same_block ? 1 : 0;
    return absl::OkStatus();
  });
}

__attribute__((visibility("default"))) int stitchalloc_torch_swap_cancel(int device, uint64_t ticket) {
  return stitchalloc::OnSession("stitchalloc_torch_swap_cancel", device, false,
                                [&](stitchalloc::SwapSession& s) { return s.manager->Cancel(ticket); });
}

__attribute__((visibility("default"))) int stitchalloc_torch_swap_state(int device, uint64_t ticket) {
  int state = -1;
  const int rc = stitchalloc::OnSession("stitchalloc_torch_swap_state", device, false,
                                        [&](stitchalloc::SwapSession& s) -> absl::Status {
                                          auto st = s.manager->State(ticket);
                                          if (!st.ok()) return st.status();
                                          state = static_cast<int>(*st);
                                          return absl::OkStatus();
                                        });
  return rc == 0 ? state : -1;
}

__attribute__((visibility("default"))) int stitchalloc_torch_swap_synchronize(int device) {
  return stitchalloc::OnSession("stitchalloc_torch_swap_synchronize", device, false,
                                [](stitchalloc::SwapSession& s) -> absl::Status {
                                  stitchalloc::Driver& d = s.engine->driver();
                                  for (stitchalloc::Stream st : {s.manager->compute_stream(),
                                                                 s.engine->stream(stitchalloc::swap::Direction::kDeviceToHost),
                                                                 s.engine->stream(stitchalloc::swap::Direction::kHostToDevice)}) {
                                    if (auto r = d.SynchronizeStream(st); !r.ok()) return r;
                                  }
                                  s.manager->Poll();
                                  return absl::OkStatus();
                                });
}

__attribute__((visibility("default"))) const char* stitchalloc_torch_swap_stats(int device) {
  using namespace stitchalloc;
  thread_local std::string text;
  text.clear();
  const int rc = OnSession("stitchalloc_torch_swap_stats", device, false, [](SwapSession& s) {
    const swap::SwapStats m = s.manager->GetStats();
    const swap::PinnedPoolStats p = s.pool->GetStats();
    const swap::CopyEngineStats c = s.engine->GetStats();
    auto line = [](absl::string_view name, auto value) { absl::StrAppend(&text, name, " ", value, "\n"); };
    line("swap.registered", m.registered);
    line("swap.offloads", m.offloads);
    line("swap.prefetches", m.prefetches);
    line("swap.kept_last_layers", m.kept_last_layers);
    line("swap.kept_small", m.kept_small);
    line("swap.kept_foreign", m.kept_foreign);
    line("swap.kept_no_host_memory", m.kept_no_host_memory);
    line("swap.prefetch_failures", m.prefetch_failures);
    line("swap.waits", m.waits);
    line("swap.late_prefetches", m.late_prefetches);
    line("swap.cancelled", m.cancelled);
    line("swap.evicted", m.evicted);
    line("swap.evicted_bytes", m.evicted_bytes);
    line("swap.bytes_offloaded", m.bytes_offloaded);
    line("swap.bytes_prefetched", m.bytes_prefetched);
    line("swap.live_tickets", m.live_tickets);
    line("pinned.capacity_bytes", s.pool->options().capacity);
    line("pinned.pinned_bytes", p.pinned_bytes);
    line("pinned.in_use_bytes", p.in_use_bytes);
    line("pinned.peak_in_use_bytes", p.peak_in_use_bytes);
    line("copy.d2h_bytes", c.d2h.completed_bytes);
    line("copy.d2h_seconds", c.d2h.seconds);
    line("copy.d2h_bytes_per_second", c.d2h.bandwidth());
    line("copy.h2d_bytes", c.h2d.completed_bytes);
    line("copy.h2d_seconds", c.h2d.seconds);
    line("copy.h2d_bytes_per_second", c.h2d.bandwidth());
    return absl::OkStatus();
  });
  return rc == 0 ? text.c_str() : nullptr;
}

}  // extern "C"
