// Plan-guided arena on the host driver: a recorded-then-replayed synthetic training loop is
// served from the arena with zero fallbacks and byte-exact contents; a changed loop falls back
// and re-plans; shapes alternate without re-planning; plans return their memory; a plan serves one
// stream, so work queued on another never sees its bytes reused; record_stream defers a free.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "allocator/arena/arena.h"
#include "allocator/arena/bilevel.h"
#include "allocator/plan/problem.h"
#include "gtest/gtest.h"
#include "test_util.h"
#include "vmm/host_driver.h"

namespace stitchalloc::arena {
namespace {

using testing::MakeHostAllocator;
using testing::Pattern;

// Waits (at most 5 s) for a flag that work on another stream sets.
void await(const std::atomic<bool>& flag) {
  for (int i = 0; i < 5000 && !flag.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

// A caching allocator on the host driver and two streams of its own, whose queued host functions
// stand for kernels.
struct TwoStreams {
  std::unique_ptr<CachingAllocator> backing;
  HostDriver* host = nullptr;
  Stream compute = 0;
  Stream side = 0;
};

TwoStreams MakeTwoStreams() {
  TwoStreams t;
  auto backing = MakeHostAllocator("host_capacity_mb:512");
  EXPECT_TRUE(backing.ok()) << backing.status();
  if (!backing.ok()) return t;
  t.backing = *std::move(backing);
  t.host = dynamic_cast<HostDriver*>(&t.backing->driver());
  auto compute = t.backing->driver().CreateStream();
  auto side = t.backing->driver().CreateStream();
  EXPECT_TRUE(compute.ok() && side.ok());
  if (!compute.ok() || !side.ok()) t.host = nullptr;
  else t.compute = *compute, t.side = *side;
  return t;
}

// Allocations carry a pattern written at malloc and checked at free: any aliasing of two live
// allocations shows up as a mismatch.
class Loop {
 public:
  Loop(PlannedAllocator* a, CachingAllocator* backing) : a_(a), backing_(backing) {}

  void* Alloc(std::size_t size) {
    auto p = a_->Malloc(size);
    EXPECT_TRUE(p.ok()) << p.status();
    if (!p.ok()) return nullptr;
    const std::vector<std::uint8_t> bytes = Pattern(size, ++seed_);
    EXPECT_TRUE(testing::Upload(backing_->driver(), *p, bytes.data(), size).ok());
    live_[*p] = {size, seed_};
    return *p;
  }
  void Free(void* p) {
    auto it = live_.find(p);
    ASSERT_NE(it, live_.end());
    std::vector<std::uint8_t> got(it->second.first);
    ASSERT_TRUE(testing::Download(backing_->driver(), got.data(), p, got.size()).ok());
    EXPECT_EQ(got, Pattern(got.size(), it->second.second)) << "contents changed while allocated";
    ++checked_;
    live_.erase(it);
    SA_EXPECT_OK(a_->Free(p));
  }

  // One training iteration: embedding, `layers` decoder layers forward (saving two tensors
  // each, two temporaries), loss, backward in reverse, and a gradient buffer that lives into
  // the next iteration. `extra` adds one request inside layer 1's forward.
  void Iteration(std::uint64_t signature, std::size_t seq, bool extra = false) {
    SA_EXPECT_OK(a_->BeginIteration(signature));
    const std::size_t h = 4096;
    void* x = Alloc(seq * h);
    std::vector<std::vector<void*>> saved(kLayers);
    for (int l = 0; l < kLayers; ++l) {
      SA_EXPECT_OK(a_->LayerBegin("decoder", l, Phase::kForward));
      void* t1 = Alloc(seq * 4 * h);
      if (extra && l == 1) Free(Alloc(3 * seq * h + 512));
      void* attn = Alloc(seq * h);
      Free(t1);
      void* t2 = Alloc(seq * 2 * h);
      void* out = Alloc(seq * h);
      Free(t2);
      saved[l] = {x, attn};
      x = out;
      SA_EXPECT_OK(a_->LayerEnd());
    }
    void* loss = Alloc(512);
    void* grad = Alloc(seq * h);
    Free(x);
    Free(loss);
    for (int l = kLayers - 1; l >= 0; --l) {
      SA_EXPECT_OK(a_->LayerBegin("decoder", l, Phase::kBackward));
      void* g1 = Alloc(seq * 4 * h);
      Free(saved[l][1]);
      void* g2 = Alloc(seq * h);
      Free(g1);
      Free(saved[l][0]);
      Free(grad);
      grad = g2;
      SA_EXPECT_OK(a_->LayerEnd());
    }
    Free(grad);
    if (carry_ != nullptr) Free(carry_);
    carry_ = Alloc(8192);  // outlives the iteration: never planned
    SA_EXPECT_OK(a_->EndIteration());
  }

  void Finish() {
    if (carry_ != nullptr) Free(carry_);
    carry_ = nullptr;
  }
  std::int64_t checked() const { return checked_; }
  static constexpr int kLayers = 4;

 private:
  PlannedAllocator* a_;
  CachingAllocator* backing_;
  absl::flat_hash_map<void*, std::pair<std::size_t, std::uint64_t>> live_;
  std::uint64_t seed_ = 0;
  std::int64_t checked_ = 0;
  void* carry_ = nullptr;
};

TEST(Arena, RecordedLoopIsServedFromTheArena) {
  SA_ASSIGN_OR_FAIL(backing, MakeHostAllocator("host_capacity_mb:2048"));
  PlannedAllocator arena(backing.get());
  Loop loop(&arena, backing.get());
  loop.Iteration(128, 128);
  ArenaStats s = arena.GetStats();
  EXPECT_EQ(s.recorded_iterations, 1);
  EXPECT_EQ(s.plans_built, 1);
  EXPECT_EQ(s.hits, 0);
  const ArenaPlan* plan = arena.FindPlan(128);
  ASSERT_NE(plan, nullptr);
  EXPECT_EQ(plan->layer_plans, 2);  // one per phase, shared by every layer
  EXPECT_EQ(plan->layers_sharing, 2 * (Loop::kLayers - 1));
  EXPECT_GE(plan->arena_bytes, plan->lower_bound);
  EXPECT_LE(static_cast<double>(plan->arena_bytes), 1.01 * static_cast<double>(plan->lower_bound));
  EXPECT_EQ(s.arena_bytes, 0);  // taken when the first served iteration begins

  for (int i = 0; i < 3; ++i) loop.Iteration(128, 128);
  s = arena.GetStats();
  EXPECT_EQ(s.arena_bytes, plan->arena_bytes);
  EXPECT_EQ(s.misses, 0);
  EXPECT_EQ(s.hits, 3 * plan->planned_requests);
  EXPECT_EQ(s.unplanned, 3 * plan->unplanned_requests);
  EXPECT_EQ(s.plans_built, 1);
  EXPECT_EQ(s.served_iterations, 3);
  loop.Finish();
  EXPECT_GT(loop.checked(), 100);
  SA_ASSERT_OK(backing->CheckInvariants());
}

TEST(Arena, AlternatingShapesUseCachedPlans) {
  SA_ASSIGN_OR_FAIL(backing, MakeHostAllocator("host_capacity_mb:2048"));
  PlannedAllocator arena(backing.get());
  Loop loop(&arena, backing.get());
  loop.Iteration(128, 128);
  loop.Iteration(256, 256);
  for (int i = 0; i < 4; ++i) loop.Iteration(i % 2 ? 128 : 256, i % 2 ? 128 : 256);
  const ArenaStats s = arena.GetStats();
  EXPECT_EQ(s.plans_built, 2);
  EXPECT_EQ(s.plans_cached, 2);
  EXPECT_EQ(s.misses, 0);
  EXPECT_EQ(s.served_iterations, 4);
  // One arena serves both shapes: as large as the larger plan.
  EXPECT_EQ(s.arena_bytes, std::max(arena.FindPlan(128)->arena_bytes, arena.FindPlan(256)->arena_bytes));
  loop.Finish();
}

TEST(Arena, ChangedLoopFallsBackThenReplans) {
  SA_ASSIGN_OR_FAIL(backing, MakeHostAllocator("host_capacity_mb:2048"));
  PlannedAllocator arena(backing.get(), {.replan_after = 2, .planning = {}});
  Loop loop(&arena, backing.get());
  loop.Iteration(128, 128);
  loop.Iteration(128, 128, /*extra=*/true);
  ArenaStats s = arena.GetStats();
  EXPECT_GT(s.misses, 0);
  EXPECT_GT(s.hits, 0);  // everything before the extra request still hit
  EXPECT_EQ(s.replans, 0);
  loop.Iteration(128, 128, true);
  s = arena.GetStats();
  EXPECT_EQ(s.replans, 1);
  EXPECT_EQ(s.plans_cached, 0);
  loop.Iteration(128, 128, true);  // recorded again with the extra request
  const std::int64_t misses = arena.GetStats().misses;
  loop.Iteration(128, 128, true);
  s = arena.GetStats();
  EXPECT_EQ(s.recorded_iterations, 2);
  EXPECT_EQ(s.misses, misses);  // the new plan fits the new loop
  loop.Finish();
  SA_ASSERT_OK(backing->CheckInvariants());
}

TEST(Arena, WrongSizeOrStreamFallsBack) {
  SA_ASSIGN_OR_FAIL(backing, MakeHostAllocator("host_capacity_mb:512"));
  PlannedAllocator arena(backing.get());
  auto run = [&](std::size_t size, Stream stream) {
    SA_ASSERT_OK(arena.BeginIteration(1));
    auto a = arena.Malloc(size, stream);
    ASSERT_TRUE(a.ok());
    auto b = arena.Malloc(4096, stream);
    ASSERT_TRUE(b.ok());
    SA_ASSERT_OK(arena.Free(*a));
    SA_ASSERT_OK(arena.Free(*b));
    SA_ASSERT_OK(arena.EndIteration());
  };
  run(1 << 20, 0);
  run(1 << 20, 0);
  EXPECT_EQ(arena.GetStats().hits, 2);
  run(2 << 20, 0);  // another size: the first misses, the second still matches its slot
  EXPECT_EQ(arena.GetStats().misses, 1);
  EXPECT_EQ(arena.GetStats().hits, 3);
  auto s = backing->driver().CreateStream();
  ASSERT_TRUE(s.ok());
  run(1 << 20, *s);  // another stream: both miss
  EXPECT_EQ(arena.GetStats().misses, 3);
  SA_EXPECT_OK(backing->driver().DestroyStream(*s));
}

TEST(Arena, FreeInAnotherOrderNeverAliases) {
  // Recorded: a freed before b is allocated, so the plan may put b on a's bytes. Replayed with
  // a still live when b is requested: b must not be served on top of a.
  SA_ASSIGN_OR_FAIL(backing, MakeHostAllocator("host_capacity_mb:512"));
  PlannedAllocator arena(backing.get());
  SA_ASSERT_OK(arena.BeginIteration(7));
  auto a = arena.Malloc(1 << 20);
  ASSERT_TRUE(a.ok());
  SA_ASSERT_OK(arena.Free(*a));
  auto b = arena.Malloc(1 << 20);
  ASSERT_TRUE(b.ok());
  SA_ASSERT_OK(arena.Free(*b));
  SA_ASSERT_OK(arena.EndIteration());
  const ArenaPlan* plan = arena.FindPlan(7);
  ASSERT_NE(plan, nullptr);
  ASSERT_EQ(plan->outside[0].offset, plan->outside[1].offset);  // the plan reuses the bytes
  SA_ASSERT_OK(arena.BeginIteration(7));
  auto a2 = arena.Malloc(1 << 20);
  auto b2 = arena.Malloc(1 << 20);
  ASSERT_TRUE(a2.ok() && b2.ok());
  EXPECT_NE(*a2, *b2);
  EXPECT_TRUE(arena.IsArenaPointer(*a2));
  EXPECT_FALSE(arena.IsArenaPointer(*b2));
  EXPECT_EQ(arena.GetStats().misses, 1);
  SA_ASSERT_OK(arena.Free(*a2));
  SA_ASSERT_OK(arena.Free(*b2));
  SA_ASSERT_OK(arena.EndIteration());
}

// Recorded: a on a side stream, freed, then b on the compute stream (more bytes) over the same
// time. Served, the side stream's queued work still reads a after its free (in host order)
// while the compute stream writes b at once. Were both planned, b would land on a's bytes under
// that work; a plan serves one stream, so a goes to the caching allocator, whose pools order
// cross-stream reuse.
TEST(Arena, APlanServesOneStreamSoWorkQueuedOnAnotherIsNeverOverwritten) {
  TwoStreams t = MakeTwoStreams();
  ASSERT_NE(t.host, nullptr);
  auto& [backing, host, compute, side] = t;
  PlannedAllocator arena(backing.get());
  static constexpr std::size_t kA = 1 << 20, kB = 2 << 20;
  std::atomic<int> overwritten{0};
  auto iteration = [&] {
    std::atomic<bool> a_written{false}, b_written{false};
    SA_ASSERT_OK(arena.BeginIteration(3));
    SA_ASSIGN_OR_FAIL(a, arena.Malloc(kA, side));
    // The side stream writes a, and reads it back after the compute stream has written b.
    SA_ASSERT_OK(host->Enqueue(side, [&, a] {
      auto* bytes = static_cast<unsigned char*>(a);
      std::memset(bytes, 0xAA, kA);
      a_written.store(true);
      await(b_written);
      if (std::count(bytes, bytes + kA, 0xAA) != static_cast<std::ptrdiff_t>(kA)) overwritten.fetch_add(1);
    }));
    SA_ASSERT_OK(arena.Free(a));
    SA_ASSIGN_OR_FAIL(b, arena.Malloc(kB, compute));
    SA_ASSERT_OK(host->Enqueue(compute, [&, b] {
      await(a_written);
      std::memset(b, 0xBB, kB);
      b_written.store(true);
    }));
    SA_ASSERT_OK(arena.Free(b));
    SA_ASSERT_OK(arena.EndIteration());
    SA_ASSERT_OK(host->SynchronizeStream(side));
    SA_ASSERT_OK(host->SynchronizeStream(compute));
  };
  iteration();  // recorded
  const ArenaPlan* plan = arena.FindPlan(3);
  ASSERT_NE(plan, nullptr);
  EXPECT_EQ(plan->stream, compute);
  EXPECT_EQ(plan->other_stream_requests, 1);
  ASSERT_EQ(plan->outside.size(), 2u);
  EXPECT_FALSE(plan->outside[0].planned);
  EXPECT_TRUE(plan->outside[1].planned);
  for (int i = 0; i < 3; ++i) iteration();  // served
  EXPECT_EQ(overwritten.load(), 0);
  const ArenaStats st = arena.GetStats();
  EXPECT_EQ(st.hits, 3);
  EXPECT_EQ(st.unplanned, 3);
  EXPECT_EQ(st.misses, 0);
  SA_ASSERT_OK(arena.DropAllPlans());
  SA_ASSERT_OK(backing->CheckInvariants());
}

// record_stream on an arena allocation (PyTorch's Tensor.record_stream): its free is deferred
// until the other stream's work queued so far is done; meanwhile its range is occupied (a request
// planned there misses), and once the work is done the range serves hits again. Dropping the
// plan with a free still deferred hands that stream to the caching allocator with the arena
// block, which then does not reuse the block under the stream's work either.
TEST(Arena, RecordStreamDefersTheFreeUntilTheOtherStreamIsDone) {
  TwoStreams t = MakeTwoStreams();
  ASSERT_NE(t.host, nullptr);
  auto& [backing, host, compute, side] = t;
  PlannedAllocator arena(backing.get());
  static constexpr std::size_t kN = 1 << 20;
  auto record = [&] {  // a, freed, then b: the plan puts b on a's bytes
    SA_ASSERT_OK(arena.BeginIteration(5));
    for (int k = 0; k < 2; ++k) {
      SA_ASSIGN_OR_FAIL(p, arena.Malloc(kN, compute));
      SA_ASSERT_OK(arena.Free(p));
    }
    SA_ASSERT_OK(arena.EndIteration());
  };
  record();
  ASSERT_NE(arena.FindPlan(5), nullptr);
  ASSERT_EQ(arena.FindPlan(5)->outside[0].offset, arena.FindPlan(5)->outside[1].offset);

  std::atomic<bool> gate{false};
  std::atomic<int> wrong{0};
  SA_ASSERT_OK(arena.BeginIteration(5));
  SA_ASSIGN_OR_FAIL(a, arena.Malloc(kN, compute));
  ASSERT_TRUE(arena.IsArenaPointer(a));
  SA_ASSIGN_OR_FAIL(info, arena.Describe(a));
  EXPECT_EQ(info.ptr, reinterpret_cast<DevicePtr>(a));
  EXPECT_EQ(info.size, kN);
  EXPECT_EQ(info.stream, compute);
  EXPECT_TRUE(absl::IsInvalidArgument(arena.Describe(static_cast<char*>(a) + 512).status()));
  std::memset(a, 0xAA, kN);
  // The side stream reads a once the gate opens.
  SA_ASSERT_OK(host->Enqueue(side, [&, a] {
    await(gate);
    auto* bytes = static_cast<unsigned char*>(a);
    if (std::count(bytes, bytes + kN, 0xAA) != static_cast<std::ptrdiff_t>(kN)) wrong.fetch_add(1);
  }));
  SA_ASSERT_OK(arena.RecordStream(a, side));
  SA_ASSERT_OK(arena.RecordStream(a, side));  // twice: one stream, one event
  SA_ASSERT_OK(arena.RecordStream(a, compute));  // the arena's own stream: nothing to defer
  SA_ASSERT_OK(arena.Free(a));
  EXPECT_EQ(arena.GetStats().deferred_frees, 1);
  EXPECT_FALSE(arena.IsArenaPointer(a));
  EXPECT_TRUE(absl::IsInvalidArgument(arena.Free(a)));  // freed once already
  EXPECT_TRUE(absl::IsInvalidArgument(arena.RecordStream(a, side)));
  SA_ASSIGN_OR_FAIL(b, arena.Malloc(kN, compute));  // planned on a's bytes, still the side stream's
  EXPECT_NE(b, a);
  EXPECT_FALSE(arena.IsArenaPointer(b));
  EXPECT_EQ(arena.GetStats().misses, 1);
  std::memset(b, 0xBB, kN);
  gate.store(true);
  SA_ASSERT_OK(host->SynchronizeStream(side));
  SA_ASSERT_OK(arena.Free(b));
  SA_ASSERT_OK(arena.EndIteration());
  EXPECT_EQ(wrong.load(), 0);

  // The side stream is done: the range serves hits again.
  SA_ASSERT_OK(arena.BeginIteration(5));
  SA_ASSIGN_OR_FAIL(a2, arena.Malloc(kN, compute));
  EXPECT_EQ(a2, a);
  SA_ASSERT_OK(arena.RecordStream(a2, side));
  gate.store(false);
  SA_ASSERT_OK(host->Enqueue(side, [&] { await(gate); }));
  SA_ASSERT_OK(arena.Free(a2));  // deferred behind the closed gate
  SA_ASSIGN_OR_FAIL(b2, arena.Malloc(kN, compute));
  SA_ASSERT_OK(arena.Free(b2));
  SA_ASSERT_OK(arena.EndIteration());
  // Dropping the plan returns the arena block with the side stream's use recorded on it: the
  // caching allocator does not hand it to the compute stream while the gate is closed.
  SA_ASSERT_OK(arena.DropAllPlans());
  EXPECT_EQ(arena.GetStats().arena_bytes, 0);
  SA_ASSIGN_OR_FAIL(c, backing->Malloc(kN, compute));
  EXPECT_NE(c, a);
  gate.store(true);
  SA_ASSERT_OK(host->SynchronizeStream(side));
  SA_ASSERT_OK(backing->Free(c));
  SA_ASSERT_OK(backing->CheckInvariants());
}

TEST(Arena, DroppingPlansReturnsMemory) {
  SA_ASSIGN_OR_FAIL(backing, MakeHostAllocator("host_capacity_mb:2048"));
  PlannedAllocator arena(backing.get());
  Loop loop(&arena, backing.get());
  loop.Iteration(128, 128);
  loop.Iteration(128, 128);  // served: the arena is taken
  loop.Finish();
  const std::int64_t with_plan = backing->GetStats().allocated_bytes.all().current;
  const std::int64_t arena_bytes = arena.GetStats().arena_bytes;
  ASSERT_GT(arena_bytes, 0);
  // While an arena allocation is live the plan cannot be dropped.
  SA_ASSERT_OK(arena.BeginIteration(128));
  auto p = arena.Malloc(128 * 4096);
  ASSERT_TRUE(p.ok());
  ASSERT_TRUE(arena.IsArenaPointer(*p));
  SA_ASSERT_OK(arena.EndIteration());
  EXPECT_EQ(arena.DropPlan(128).code(), absl::StatusCode::kFailedPrecondition);  // the last plan
  SA_ASSERT_OK(arena.Free(*p));
  SA_ASSERT_OK(arena.DropPlan(128));
  EXPECT_EQ(arena.GetStats().arena_bytes, 0);
  EXPECT_LE(backing->GetStats().allocated_bytes.all().current, with_plan - arena_bytes);
  EXPECT_EQ(arena.DropPlan(128).code(), absl::StatusCode::kNotFound);
  SA_ASSERT_OK(backing->CheckInvariants());
}

TEST(Arena, DoubleFreeOfAnArenaPointerIsRejected) {
  SA_ASSIGN_OR_FAIL(backing, MakeHostAllocator("host_capacity_mb:256"));
  PlannedAllocator arena(backing.get());
  for (int i = 0; i < 2; ++i) {
    SA_ASSERT_OK(arena.BeginIteration(3));
    auto p = arena.Malloc(1 << 20);
    ASSERT_TRUE(p.ok());
    SA_ASSERT_OK(arena.Free(*p));
    if (i == 1) {
      const absl::Status twice = arena.Free(*p);
      EXPECT_EQ(twice.code(), absl::StatusCode::kInvalidArgument) << twice;
      EXPECT_NE(twice.message().find("double free"), absl::string_view::npos) << twice;
      EXPECT_FALSE(arena.Free(static_cast<char*>(*p) + 512).ok());  // interior
    }
    SA_ASSERT_OK(arena.EndIteration());
  }
  EXPECT_EQ(arena.GetStats().hits, 1);
}

TEST(Arena, MarksAreValidated) {
  SA_ASSIGN_OR_FAIL(backing, MakeHostAllocator("host_capacity_mb:256"));
  PlannedAllocator arena(backing.get());
  EXPECT_FALSE(arena.EndIteration().ok());
  SA_EXPECT_OK(arena.LayerBegin("x", 0, Phase::kForward));  // outside an iteration: ignored
  SA_EXPECT_OK(arena.LayerEnd());
  SA_ASSERT_OK(arena.BeginIteration(1));
  EXPECT_FALSE(arena.BeginIteration(2).ok());
  EXPECT_FALSE(arena.LayerEnd().ok());
  SA_ASSERT_OK(arena.LayerBegin("x", 0, Phase::kForward));
  EXPECT_FALSE(arena.LayerBegin("x", 1, Phase::kForward).ok());
  EXPECT_FALSE(arena.EndIteration().ok());
  SA_ASSERT_OK(arena.LayerEnd());
  int foreign = 0;
  EXPECT_FALSE(arena.Free(&foreign).ok());
  SA_EXPECT_OK(arena.EndIteration());
}

TEST(BiLevel, LayerLocalPlansAreReusedAndValid) {
  // Two identical layers; every arena offset combination is validated as a flat solution.
  Recorder r;
  r.Begin();
  std::uintptr_t next = 1;
  std::vector<std::uintptr_t> saved;
  for (int l = 0; l < 2; ++l) {
    SA_ASSERT_OK(r.LayerBegin("block", l, Phase::kForward));
    const std::uintptr_t a = next++, b = next++, c = next++;
    r.OnAlloc(a, 1000, 0);
    r.OnAlloc(b, 3000, 0);
    r.OnFree(a);
    r.OnAlloc(c, 2000, 0);
    r.OnFree(b);
    r.OnFree(c);
    const std::uintptr_t keep = next++;
    r.OnAlloc(keep, 5000, 0);
    saved.push_back(keep);
    SA_ASSERT_OK(r.LayerEnd());
  }
  for (std::uintptr_t s : saved) r.OnFree(s);
  IterationRecording rec;
  SA_ASSERT_OK(r.Finish(&rec));
  SA_ASSIGN_OR_FAIL(plan, PlanIteration(rec));
  EXPECT_EQ(plan.layer_plans, 1);
  EXPECT_EQ(plan.layers_sharing, 1);
  // Rebuild the flat solution from the slots and validate it independently.
  plan::Problem flat = FlatProblem(rec);
  std::vector<std::int64_t> offsets;
  for (const RecordedRequest& q : rec.requests) {
    const LayerSpan& span = rec.layers[q.layer];
    const Slot& slot = plan.layers.at(LayerKey{span.kind, span.index, span.phase, span.occurrence})[q.ordinal];
    ASSERT_TRUE(slot.planned);
    offsets.push_back(slot.offset);
  }
  SA_EXPECT_OK(plan::CheckSolution(flat, offsets, plan.arena_bytes));
  EXPECT_GE(plan.arena_bytes, plan.lower_bound);
}

TEST(BiLevel, OnlyTheStreamWithTheMostBytesIsPlanned) {
  // Stream 7: 3000 bytes in two requests; stream 9: 5000 bytes; stream 11: live at the end.
  Recorder r;
  r.Begin();
  r.OnAlloc(1, 1000, 7);
  r.OnAlloc(2, 5000, 9);
  r.OnFree(1);
  r.OnAlloc(3, 2000, 7);
  r.OnAlloc(4, 90000, 11);  // never freed: not planned, whatever its size
  r.OnFree(2);
  r.OnFree(3);
  IterationRecording rec;
  SA_ASSERT_OK(r.Finish(&rec));
  EXPECT_EQ(ArenaStream(rec), 9);
  SA_ASSIGN_OR_FAIL(plan, PlanIteration(rec));
  EXPECT_EQ(plan.stream, 9);
  EXPECT_EQ(plan.planned_requests, 1);
  EXPECT_EQ(plan.unplanned_requests, 3);
  EXPECT_EQ(plan.other_stream_requests, 2);
  for (const Slot& slot : plan.outside) EXPECT_EQ(slot.planned, slot.stream == 9) << slot.stream;
  EXPECT_EQ(FlatProblem(rec).buffers.size(), 1u);
  EXPECT_EQ(plan.lower_bound, 5120);  // rounded to the 512-byte granule
  // A tie goes to the stream of the earliest request.
  Recorder t;
  t.Begin();
  t.OnAlloc(1, 4096, 5);
  t.OnAlloc(2, 4096, 3);
  t.OnFree(1);
  t.OnFree(2);
  IterationRecording tie;
  SA_ASSERT_OK(t.Finish(&tie));
  EXPECT_EQ(ArenaStream(tie), 5);
}

}  // namespace
}  // namespace stitchalloc::arena
