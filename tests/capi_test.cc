// The C API: round trips, errors with messages, statistics by name, sharing between processes.
#include "stitchalloc/stitchalloc.h"

#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace {

TEST(CApi, MallocFreeStatsAndErrors) {
  EXPECT_EQ(stitchalloc_abi_version(), STITCHALLOC_ABI_VERSION);
  EXPECT_STRNE(stitchalloc_version(), "");
  stitchalloc_allocator* a = nullptr;
  ASSERT_EQ(stitchalloc_create("driver:host,host_capacity_mb:256", &a), STITCHALLOC_OK) << stitchalloc_last_error();
  EXPECT_NE(std::string(stitchalloc_driver_name(a)).find("host"), std::string::npos);

  void* p = nullptr;
  ASSERT_EQ(stitchalloc_malloc(a, 3 << 20, 0, &p), STITCHALLOC_OK);
  ASSERT_NE(p, nullptr);
  int64_t v = -1;
  ASSERT_EQ(stitchalloc_get_stat(a, "allocated_bytes.all.current", &v), STITCHALLOC_OK);
  EXPECT_EQ(v, 3 << 20);  // carved from a 20 MiB mapping (medium requests pack), rest split off
  ASSERT_EQ(stitchalloc_get_stat(a, "requested_bytes.all.current", &v), STITCHALLOC_OK);
  EXPECT_EQ(v, 3 << 20);

  const size_t n = stitchalloc_stat_count();
  ASSERT_GT(n, 100u);
  std::vector<int64_t> values(n);
  size_t written = 0;
  ASSERT_EQ(stitchalloc_stats(a, values.data(), n, &written), STITCHALLOC_OK);
  EXPECT_EQ(written, n);
  bool found = false;
  for (size_t i = 0; i < n; ++i) {
    if (std::string(stitchalloc_stat_name(i)) == "reserved_bytes.all.current") {
      found = true;
      EXPECT_EQ(values[i], 20 << 20);
    }
  }
  EXPECT_TRUE(found);
  EXPECT_EQ(stitchalloc_stat_name(n), nullptr);

  EXPECT_EQ(stitchalloc_get_stat(a, "no.such.stat", &v), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(stitchalloc_last_error()).find("no.such.stat"), std::string::npos);
  EXPECT_EQ(stitchalloc_free(a, static_cast<char*>(p) + 512), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(stitchalloc_last_error()).find("interior pointer"), std::string::npos);
  void* q = nullptr;
  EXPECT_EQ(stitchalloc_malloc(a, size_t{1} << 40, 0, &q), STITCHALLOC_ERROR_OUT_OF_MEMORY);
  EXPECT_NE(std::string(stitchalloc_last_error()).find("out of memory"), std::string::npos);
  EXPECT_EQ(q, nullptr);
  EXPECT_EQ(stitchalloc_malloc(a, 0, 0, &q), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(stitchalloc_record_stream(a, p, 0), STITCHALLOC_OK);
  EXPECT_EQ(stitchalloc_free(a, p), STITCHALLOC_OK);
  EXPECT_EQ(stitchalloc_free(a, p), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(stitchalloc_free(a, nullptr), STITCHALLOC_OK);
  EXPECT_EQ(stitchalloc_set_memory_fraction(a, 2.0), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(stitchalloc_reset_peak_stats(a), STITCHALLOC_OK);
  EXPECT_EQ(stitchalloc_reset_accumulated_stats(a), STITCHALLOC_OK);
  EXPECT_EQ(stitchalloc_empty_cache(a), STITCHALLOC_OK);
  ASSERT_EQ(stitchalloc_get_stat(a, "reserved_bytes.all.current", &v), STITCHALLOC_OK);
  EXPECT_EQ(v, 0);
  stitchalloc_destroy(a);
}

TEST(CApi, BadConfigurationAndNullHandles) {
  stitchalloc_allocator* a = reinterpret_cast<stitchalloc_allocator*>(0x1);
  EXPECT_EQ(stitchalloc_create("driver:host,chunk_size_mb:zero", &a), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(a, nullptr);
  EXPECT_NE(std::string(stitchalloc_last_error()).find("chunk_size_mb"), std::string::npos);
  EXPECT_EQ(stitchalloc_create("driver:host", nullptr), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  void* p = nullptr;
  EXPECT_EQ(stitchalloc_malloc(nullptr, 16, 0, &p), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(stitchalloc_last_error()).find("null allocator"), std::string::npos);
  EXPECT_EQ(stitchalloc_free(nullptr, p), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(stitchalloc_empty_cache(nullptr), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  stitchalloc_destroy(nullptr);
}

}  // namespace

namespace {

// The arena through the C API: record one iteration, serve the next from the plan.
TEST(CApi, ArenaIterationsAndLayerMarks) {
  stitchalloc_allocator* a = nullptr;
  ASSERT_EQ(stitchalloc_create("driver:host,host_capacity_mb:256", &a), STITCHALLOC_OK) << stitchalloc_last_error();
  auto iteration = [&] {
    ASSERT_EQ(stitchalloc_iteration_begin(a, 42), STITCHALLOC_OK) << stitchalloc_last_error();
    for (int l = 0; l < 3; ++l) {
      ASSERT_EQ(stitchalloc_layer_begin(a, "block", l, STITCHALLOC_PHASE_FORWARD), STITCHALLOC_OK);
      void *x = nullptr, *y = nullptr;
      ASSERT_EQ(stitchalloc_malloc(a, 1 << 20, 0, &x), STITCHALLOC_OK);
      ASSERT_EQ(stitchalloc_malloc(a, 2 << 20, 0, &y), STITCHALLOC_OK);
      ASSERT_EQ(stitchalloc_free(a, x), STITCHALLOC_OK);
      ASSERT_EQ(stitchalloc_free(a, y), STITCHALLOC_OK);
      ASSERT_EQ(stitchalloc_layer_end(a), STITCHALLOC_OK);
    }
    ASSERT_EQ(stitchalloc_iteration_end(a), STITCHALLOC_OK);
  };
  iteration();
  iteration();
  int64_t v = -1;
  ASSERT_EQ(stitchalloc_arena_stat(a, "arena.hits", &v), STITCHALLOC_OK);
  EXPECT_EQ(v, 6);
  ASSERT_EQ(stitchalloc_arena_stat(a, "arena.misses", &v), STITCHALLOC_OK);
  EXPECT_EQ(v, 0);
  ASSERT_EQ(stitchalloc_arena_stat(a, "arena.arena_bytes", &v), STITCHALLOC_OK);
  EXPECT_EQ(v, 3 << 20);
  EXPECT_EQ(stitchalloc_arena_stat(a, "arena.nope", &v), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(stitchalloc_last_error()).find("arena.nope"), std::string::npos);
  EXPECT_EQ(stitchalloc_layer_begin(a, "", 0, STITCHALLOC_PHASE_FORWARD), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(stitchalloc_layer_begin(a, "x", 0, static_cast<stitchalloc_phase>(7)), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(stitchalloc_iteration_end(a), STITCHALLOC_ERROR_INVALID_ARGUMENT);  // none open
  // record_stream goes through the arena (its own stream: nothing to defer); a freed pointer is
  // rejected by name.
  ASSERT_EQ(stitchalloc_iteration_begin(a, 42), STITCHALLOC_OK);
  ASSERT_EQ(stitchalloc_layer_begin(a, "block", 0, STITCHALLOC_PHASE_FORWARD), STITCHALLOC_OK);
  void* x = nullptr;
  ASSERT_EQ(stitchalloc_malloc(a, 1 << 20, 0, &x), STITCHALLOC_OK);
  EXPECT_EQ(stitchalloc_record_stream(a, x, 0), STITCHALLOC_OK);
  ASSERT_EQ(stitchalloc_free(a, x), STITCHALLOC_OK);
  EXPECT_EQ(stitchalloc_record_stream(a, x, 0), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  ASSERT_EQ(stitchalloc_layer_end(a), STITCHALLOC_OK);
  ASSERT_EQ(stitchalloc_iteration_end(a), STITCHALLOC_OK);
  ASSERT_EQ(stitchalloc_arena_drop_plans(a), STITCHALLOC_OK);
  ASSERT_EQ(stitchalloc_arena_stat(a, "arena.arena_bytes", &v), STITCHALLOC_OK);
  EXPECT_EQ(v, 0);
  stitchalloc_destroy(a);
}

// Sharing through the C API: a handle written by one allocator opens in another (standing for
// another process; ipc_test does two) and maps the same bytes; the opened range outlives the
// sender's allocation and is unmapped by close or destroy; misuse fails with a message.
TEST(CApi, ShareOpenAndClose) {
  stitchalloc_allocator* sender = nullptr;
  stitchalloc_allocator* receiver = nullptr;
  ASSERT_EQ(stitchalloc_create("driver:host,host_capacity_mb:256", &sender), STITCHALLOC_OK) << stitchalloc_last_error();
  ASSERT_EQ(stitchalloc_create("driver:host,host_capacity_mb:256", &receiver), STITCHALLOC_OK);
  void* p = nullptr;
  const size_t n = (5 << 20) + 4096;
  ASSERT_EQ(stitchalloc_malloc(sender, n, 0, &p), STITCHALLOC_OK);
  std::memset(p, 0x6b, n);  // host driver: host-addressable

  char handle[256];
  size_t size = 0, offset = 0;
  EXPECT_EQ(stitchalloc_share(sender, p, handle, 8, &size, &offset), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(stitchalloc_last_error()).find("the buffer has 8"), std::string::npos);
  ASSERT_GT(size, 8u);
  ASSERT_EQ(stitchalloc_share(sender, p, handle, sizeof(handle), &size, &offset), STITCHALLOC_OK)
      << stitchalloc_last_error();
  EXPECT_EQ(handle[1], 'e');
  void* base = nullptr;
  ASSERT_EQ(stitchalloc_open_shared(receiver, handle, size, &base), STITCHALLOC_OK) << stitchalloc_last_error();
  auto* view = static_cast<unsigned char*>(base) + offset;
  EXPECT_EQ(view[0], 0x6b);
  EXPECT_EQ(view[n - 1], 0x6b);
  view[n - 1] = 0x01;
  EXPECT_EQ(static_cast<unsigned char*>(p)[n - 1], 0x01);
  ASSERT_EQ(stitchalloc_free(sender, p), STITCHALLOC_OK);
  ASSERT_EQ(stitchalloc_empty_cache(sender), STITCHALLOC_OK);
  EXPECT_EQ(view[n - 1], 0x01) << "the opened range keeps the memory";
  ASSERT_EQ(stitchalloc_close_shared(receiver, base), STITCHALLOC_OK);
  EXPECT_EQ(stitchalloc_close_shared(receiver, base), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(stitchalloc_last_error()).find("already closed"), std::string::npos);

  int local = 0;
  EXPECT_EQ(stitchalloc_share(sender, &local, handle, sizeof(handle), &size, &offset),
            STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(stitchalloc_last_error()).find("foreign pointer"), std::string::npos);
  EXPECT_EQ(stitchalloc_share(sender, p, handle, sizeof(handle), nullptr, &offset), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(stitchalloc_open_shared(receiver, "garbage", 7, &base), STITCHALLOC_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(stitchalloc_last_error()).find("IPC handle"), std::string::npos);
  EXPECT_EQ(stitchalloc_open_shared(receiver, nullptr, 0, &base), STITCHALLOC_ERROR_INVALID_ARGUMENT);

  // One left open: destroy unmaps it.
  ASSERT_EQ(stitchalloc_malloc(sender, n, 0, &p), STITCHALLOC_OK);
  ASSERT_EQ(stitchalloc_share(sender, p, handle, sizeof(handle), &size, &offset), STITCHALLOC_OK);
  ASSERT_EQ(stitchalloc_open_shared(receiver, handle, size, &base), STITCHALLOC_OK);
  stitchalloc_destroy(receiver);
  stitchalloc_destroy(sender);
}

}  // namespace
