// Sharing allocations between processes (allocator/ipc.h): the handle format byte for byte
// against PyTorch's layout, rejection of malformed handles, imports that fail without leaving
// anything behind, and the real protocol across two processes (tests/ipc_child.cc opens what
// this process exports, checks the bytes and writes its own).
#include "allocator/ipc.h"

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "vmm/host_driver.h"

namespace stitchalloc::testing {
namespace {

// PyTorch's expandable-segment handle for pid 1234, 2 MiB chunks, descriptors 7 and 9: version,
// type, ShareHeader {int32 pid, 4 zero bytes, uint64 segment_size, uint64 num_handles}, ints.
TEST(IpcFormat, EncodesPyTorchsExpandableSegmentLayout) {
  const std::string h = EncodeIpcHandle(SharedRange{0, 2 * kMiB, {7, 9}}, 1234);
  const std::string want = absl::HexStringToBytes(
      "02" "65"                    // version 2, 'e'
      "d2040000" "00000000"        // pid 1234, padding
      "0000200000000000"           // 2 MiB
      "0200000000000000"           // 2 chunks
      "07000000" "09000000");      // descriptors
  EXPECT_EQ(absl::BytesToHexString(h), absl::BytesToHexString(want));
}

TEST(IpcFormat, DecodesItsOwnAndPyTorchsCudaMallocHandles) {
  SA_ASSIGN_OR_FAIL(e, DecodeIpcHandle(EncodeIpcHandle(SharedRange{4096, 20 * kMiB, {3, 4, 5}}, 77)));
  EXPECT_EQ(e.kind, IpcHandle::Kind::kChunks);
  EXPECT_EQ(e.pid, 77);
  EXPECT_EQ(e.chunk_size, 20 * kMiB);
  EXPECT_EQ(e.fds, (std::vector<int>{3, 4, 5}));

  const std::string cuda_handle(64, '\x5a');
  SA_ASSIGN_OR_FAIL(c, DecodeIpcHandle(std::string("\x02" "c", 2) + cuda_handle));
  EXPECT_EQ(c.kind, IpcHandle::Kind::kCudaMalloc);
  EXPECT_EQ(c.cuda_ipc_handle, cuda_handle);
  SA_ASSIGN_OR_FAIL(old, DecodeIpcHandle(cuda_handle));  // unversioned, from an older PyTorch
  EXPECT_EQ(old.kind, IpcHandle::Kind::kCudaMalloc);
  EXPECT_EQ(old.cuda_ipc_handle, cuda_handle);

  // stitchalloc writes the same bytes for memory a MemPool's own allocator made.
  SA_ASSIGN_OR_FAIL(written, EncodeCudaMallocHandle(cuda_handle));
  EXPECT_EQ(written, std::string("\x02" "c", 2) + cuda_handle);
  SA_ASSIGN_OR_FAIL(back, DecodeIpcHandle(written));
  EXPECT_EQ(back.kind, IpcHandle::Kind::kCudaMalloc);
  EXPECT_EQ(back.cuda_ipc_handle, cuda_handle);
  const auto short_handle = EncodeCudaMallocHandle(cuda_handle.substr(1));
  EXPECT_TRUE(absl::IsInvalidArgument(short_handle.status())) << short_handle.status();
}

TEST(IpcFormat, RejectsMalformedHandles) {
  const std::string good = EncodeIpcHandle(SharedRange{0, 2 * kMiB, {7, 9}}, 1234);
  auto expect_bad = [](const std::string& bytes, const std::string& says) {
    auto r = DecodeIpcHandle(bytes);
    EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << absl::BytesToHexString(bytes) << ": " << r.status();
    EXPECT_NE(r.status().message().find(says), std::string::npos) << r.status();
  };
  expect_bad("", "too short");
  expect_bad(std::string("\x03" "e", 2) + good.substr(2), "version 3");
  expect_bad(std::string("\x02" "x", 2) + good.substr(2), "unknown handle type 0x78");
  expect_bad(good.substr(0, 20), "too short for its header");
  expect_bad(good.substr(0, good.size() - 1), "do not hold the 2 descriptors");
  expect_bad(good + "xxxx", "do not hold the 2 descriptors");
  expect_bad(EncodeIpcHandle(SharedRange{0, 0, {7}}, 1234), "no memory");
  expect_bad(EncodeIpcHandle(SharedRange{0, 2 * kMiB, {}}, 1234), "no memory");
  expect_bad(EncodeIpcHandle(SharedRange{0, 2 * kMiB, {7}}, 0), "pid 0");
  expect_bad(std::string("\x02" "c", 2) + std::string(10, 'x'), "cudaMalloc handle has 12 bytes");
  std::string fabric = EncodeIpcHandle(SharedRange{0, 2 * kMiB, {7, 9}}, 1234).substr(0, 2 + 24);
  fabric += std::string(2 * 64, '\x01');  // two CUmemFabricHandles
  expect_bad(fabric, "fabric handles");
}

// A process that has exited (and been reaped).
pid_t ExitedPid() {
  const pid_t pid = fork();
  if (pid == 0) _exit(0);
  int status = 0;
  waitpid(pid, &status, 0);
  return pid;
}

TEST(IpcImport, FailuresLeaveNothingBehind) {
  SA_ASSIGN_OR_FAIL(exporter, MakeHostAllocator());
  SA_ASSIGN_OR_FAIL(p, exporter->Malloc(4 * kMiB));
  SA_ASSIGN_OR_FAIL(shared, exporter->Share(p));
  ASSERT_EQ(shared.fds.size(), 2u);
  SA_ASSIGN_OR_FAIL(driver, HostDriver::Create({1 * kGiB, 2 * kMiB}));
  auto open = [&](IpcHandle h) { return ImportedRange::Open(*driver, h); };
  SA_ASSIGN_OR_FAIL(good, DecodeIpcHandle(EncodeIpcHandle(shared, getpid())));

  IpcHandle cuda = good;
  cuda.kind = IpcHandle::Kind::kCudaMalloc;
  EXPECT_TRUE(absl::IsInvalidArgument(open(cuda).status()));
  IpcHandle gone = good;
  gone.pid = ExitedPid();
  auto exited = open(gone);
  EXPECT_TRUE(absl::IsNotFound(exited.status())) << exited.status();
  EXPECT_NE(exited.status().message().find("has exited"), std::string::npos) << exited.status();
  IpcHandle closed = good;
  closed.fds[1] = 999999;  // the first chunk imports, the second cannot: the first is released again
  auto half = open(closed);
  EXPECT_TRUE(absl::IsFailedPrecondition(half.status())) << half.status();
  EXPECT_NE(half.status().message().find("is closed"), std::string::npos) << half.status();
  IpcHandle odd = good;
  odd.chunk_size = 3 * kMiB;
  EXPECT_TRUE(absl::IsInvalidArgument(open(odd).status()));
  EXPECT_EQ(driver->live_chunks(), 0u);
  EXPECT_EQ(driver->live_reservations(), 0u);
  EXPECT_EQ(driver->live_mappings(), 0u);

  SA_ASSIGN_OR_FAIL(ok, open(good));  // and the driver still works
  EXPECT_EQ(ok->size(), 4 * kMiB);
  ok.reset();
  EXPECT_EQ(driver->live_chunks(), 0u);
  EXPECT_EQ(driver->live_reservations(), 0u);
  SA_ASSERT_OK(exporter->Free(p));
}

// Shares and opens from several threads while others allocate, free and empty the cache: every
// import reads exactly what its exporter wrote (also run under TSan).
TEST(IpcImport, ConcurrentSharesOpensAndFrees) {
  SA_ASSIGN_OR_FAIL(alloc, MakeHostAllocator("host_capacity_mb:2048"));
  SA_ASSIGN_OR_FAIL(importer, HostDriver::Create({2 * kGiB, 2 * kMiB}));
  const std::size_t c = alloc->chunk_size();
  std::atomic<int> mismatches{0}, failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 40; ++i) {
        const std::size_t n = (1 + rng() % 4) * c - (rng() % 2) * 4096;
        auto p = alloc->Malloc(n);
        if (!p.ok()) {
          failures.fetch_add(1);
          continue;
        }
        const auto bytes = Pattern(n, 1000 * t + i);
        std::memcpy(*p, bytes.data(), n);
        auto shared = alloc->Share(*p);
        auto handle = shared.ok() ? DecodeIpcHandle(EncodeIpcHandle(*shared, getpid())) : shared.status();
        auto range = handle.ok() ? ImportedRange::Open(*importer, *handle) : handle.status();
        if (!range.ok()) {
          failures.fetch_add(1);
        } else if (std::memcmp(reinterpret_cast<char*>((*range)->ptr()) + shared->offset, bytes.data(), n) != 0) {
          mismatches.fetch_add(1);
        }
        if (!alloc->Free(*p).ok()) failures.fetch_add(1);
        if (i % 10 == 9 && !alloc->EmptyCache().ok()) failures.fetch_add(1);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(mismatches.load(), 0);
  SA_EXPECT_OK(alloc->CheckInvariants());
  EXPECT_EQ(importer->live_chunks(), 0u);
  EXPECT_EQ(importer->live_reservations(), 0u);
}

struct ChildResult {
  int exit_code = -1;
  std::string out;
};

ChildResult RunChild(const std::string& handle, std::size_t offset, std::size_t bytes, int seed_in, int seed_out) {
  const std::string cmd = absl::StrCat(IPC_CHILD, " ", absl::BytesToHexString(handle), " ", offset, " ", bytes, " ",
                                       seed_in, " ", seed_out);
  ChildResult r;
  FILE* f = popen(cmd.c_str(), "r");
  if (f == nullptr) return r;
  char buf[256];
  while (std::fgets(buf, sizeof(buf), f) != nullptr) r.out += buf;
  const int status = pclose(f);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// The protocol across two processes: the child takes this process's descriptors (pidfd_getfd),
// maps a range that starts inside the first of three chunks of a stitched allocation, reads
// this process's bytes and writes its own, which this process then reads.
TEST(IpcCrossProcess, ChildOpensTheParentsAllocationBothWays) {
  SA_ASSIGN_OR_FAIL(alloc, MakeHostAllocator("mapping_headroom_mb:0"));
  const std::size_t c = alloc->chunk_size();
  SA_ASSIGN_OR_FAIL(s, MallocStitchedThreeChunks(*alloc));
  const DevicePtr begin = reinterpret_cast<DevicePtr>(s) + 4096;
  const std::size_t bytes = 2 * c;
  const auto mine = Pattern(bytes, 21);
  std::memcpy(reinterpret_cast<void*>(begin), mine.data(), bytes);
  SA_ASSIGN_OR_FAIL(shared, alloc->ShareRange(s, begin, bytes));
  ASSERT_EQ(shared.offset, 4096u);
  ASSERT_EQ(shared.fds.size(), 3u);

  const ChildResult r = RunChild(EncodeIpcHandle(shared, getpid()), shared.offset, bytes, 21, 22);
  ASSERT_EQ(r.exit_code, 0) << "child output: " << r.out;
  const auto theirs = Pattern(bytes, 22);
  EXPECT_EQ(0, std::memcmp(reinterpret_cast<void*>(begin), theirs.data(), bytes)) << "the child's writes";
  SA_ASSERT_OK(alloc->Free(s));
  SA_EXPECT_OK(alloc->CheckInvariants());
}

// What the other process reports when it may not have the memory: a handle naming an exited
// exporter, and one whose descriptor the exporter does not hold.
TEST(IpcCrossProcess, ChildNamesWhyItCannotOpen) {
  SA_ASSIGN_OR_FAIL(alloc, MakeHostAllocator());
  SA_ASSIGN_OR_FAIL(p, alloc->Malloc(2 * kMiB));
  SA_ASSIGN_OR_FAIL(shared, alloc->Share(p));
  const ChildResult exited = RunChild(EncodeIpcHandle(shared, ExitedPid()), 0, 1, 0, 0);
  EXPECT_EQ(exited.exit_code, 3);
  EXPECT_EQ(exited.out, "NOT_FOUND\n");
  SharedRange bogus = shared;
  bogus.fds = {999999};
  const ChildResult closed = RunChild(EncodeIpcHandle(bogus, getpid()), 0, 1, 0, 0);
  EXPECT_EQ(closed.exit_code, 3);
  EXPECT_EQ(closed.out, "FAILED_PRECONDITION\n");
  SA_ASSERT_OK(alloc->Free(p));
}

}  // namespace
}  // namespace stitchalloc::testing
