// HostDriver: the emulation must behave like the CUDA VMM API where the allocator relies on it.
#include "vmm/host_driver.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include <unistd.h>

#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace stitchalloc::testing {
namespace {

constexpr std::size_t kGran = 64 * kKiB;

std::unique_ptr<HostDriver> Make(std::size_t capacity = 16 * kMiB) {
  auto d = HostDriver::Create({capacity, kGran});
  EXPECT_TRUE(d.ok()) << d.status();
  return *std::move(d);
}

TEST(HostDriver, RejectsBadOptions) {
  EXPECT_TRUE(absl::IsInvalidArgument(HostDriver::Create({16 * kMiB, 1000}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(HostDriver::Create({0, kGran}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(HostDriver::Create({kGran + 1, kGran}).status()));
}

TEST(HostDriver, TwoMappingsOfOneChunkAlias) {
  auto d = Make();
  SA_ASSIGN_OR_FAIL(h, d->CreateChunk(kGran));
  SA_ASSIGN_OR_FAIL(a, d->Reserve(kGran));
  SA_ASSIGN_OR_FAIL(b, d->Reserve(2 * kGran));
  SA_ASSERT_OK(d->Map(a, kGran, h));
  SA_ASSERT_OK(d->Map(b + kGran, kGran, h));
  SA_ASSERT_OK(d->SetAccess(a, kGran));
  SA_ASSERT_OK(d->SetAccess(b + kGran, kGran));
  std::memset(reinterpret_cast<void*>(a), 0x5a, kGran);
  EXPECT_EQ(reinterpret_cast<unsigned char*>(b + kGran)[kGran - 1], 0x5a);
  reinterpret_cast<unsigned char*>(b + kGran)[7] = 0x11;
  EXPECT_EQ(reinterpret_cast<unsigned char*>(a)[7], 0x11);
  SA_ASSERT_OK(d->Unmap(a, kGran));
  SA_ASSERT_OK(d->Unmap(b + kGran, kGran));
  SA_ASSERT_OK(d->ReleaseChunk(h));
  SA_ASSERT_OK(d->FreeReservation(a, kGran));
  SA_ASSERT_OK(d->FreeReservation(b, 2 * kGran));
  EXPECT_EQ(d->live_chunks(), 0u);
  EXPECT_EQ(d->live_mappings(), 0u);
  EXPECT_EQ(d->live_reservations(), 0u);
}

TEST(HostDriver, CapacityIsEnforcedAndReleaseReturnsMemory) {
  auto d = Make(4 * kGran);
  SA_ASSIGN_OR_FAIL(h, d->CreateChunk(3 * kGran));
  auto too_much = d->CreateChunk(2 * kGran);
  EXPECT_TRUE(absl::IsResourceExhausted(too_much.status())) << too_much.status();
  SA_ASSIGN_OR_FAIL(info, d->GetMemInfo());
  EXPECT_EQ(info.free_bytes, kGran);
  EXPECT_EQ(info.total_bytes, 4 * kGran);
  SA_ASSERT_OK(d->ReleaseChunk(h));
  EXPECT_EQ(d->physical_bytes_in_use(), 0u);
  SA_ASSIGN_OR_FAIL(h2, d->CreateChunk(4 * kGran));
  SA_ASSERT_OK(d->ReleaseChunk(h2));
}

TEST(HostDriver, ReleaseWhileMappedTakesEffectAtUnmapAndZeroes) {
  auto d = Make();
  SA_ASSIGN_OR_FAIL(h, d->CreateChunk(kGran));
  SA_ASSIGN_OR_FAIL(va, d->Reserve(kGran));
  SA_ASSERT_OK(d->Map(va, kGran, h));
  SA_ASSERT_OK(d->SetAccess(va, kGran));
  std::memset(reinterpret_cast<void*>(va), 0x7f, kGran);
  SA_ASSERT_OK(d->ReleaseChunk(h));
  EXPECT_EQ(d->physical_bytes_in_use(), kGran);  // still mapped
  EXPECT_EQ(reinterpret_cast<unsigned char*>(va)[100], 0x7f);
  SA_ASSERT_OK(d->Unmap(va, kGran));
  EXPECT_EQ(d->physical_bytes_in_use(), 0u);
  // The punched range is handed out again, zeroed.
  SA_ASSIGN_OR_FAIL(h2, d->CreateChunk(kGran));
  SA_ASSERT_OK(d->Map(va, kGran, h2));
  SA_ASSERT_OK(d->SetAccess(va, kGran));
  EXPECT_EQ(reinterpret_cast<unsigned char*>(va)[100], 0);
  SA_ASSERT_OK(d->Unmap(va, kGran));
  SA_ASSERT_OK(d->ReleaseChunk(h2));
  SA_ASSERT_OK(d->FreeReservation(va, kGran));
}

TEST(HostDriver, RejectsInvalidMappings) {
  auto d = Make();
  SA_ASSIGN_OR_FAIL(h, d->CreateChunk(kGran));
  SA_ASSIGN_OR_FAIL(va, d->Reserve(2 * kGran));
  EXPECT_TRUE(absl::IsInvalidArgument(d->Map(va + 1, kGran, h)));            // misaligned
  EXPECT_TRUE(absl::IsInvalidArgument(d->Map(va, 2 * kGran, h)));            // size != chunk
  EXPECT_TRUE(absl::IsNotFound(d->Map(va, kGran, h + 100)));                  // no such chunk
  EXPECT_TRUE(absl::IsInvalidArgument(d->Map(va + 2 * kGran, kGran, h)));    // outside reservation
  SA_ASSERT_OK(d->Map(va, kGran, h));
  EXPECT_TRUE(absl::IsFailedPrecondition(d->Map(va, kGran, h)));             // already mapped
  EXPECT_TRUE(absl::IsFailedPrecondition(d->SetAccess(va, 2 * kGran)));      // gap
  EXPECT_TRUE(absl::IsFailedPrecondition(d->Unmap(va + kGran, kGran)));      // not mapped
  EXPECT_TRUE(absl::IsFailedPrecondition(d->FreeReservation(va, 2 * kGran)));  // still mapped
  EXPECT_TRUE(absl::IsNotFound(d->FreeReservation(va, kGran)));              // wrong size
  SA_ASSERT_OK(d->Unmap(va, kGran));
  SA_ASSERT_OK(d->ReleaseChunk(h));
  EXPECT_TRUE(absl::IsNotFound(d->ReleaseChunk(h)));
  SA_ASSERT_OK(d->FreeReservation(va, 2 * kGran));
}

TEST(HostDriver, StreamsRunInOrderAndEventsTrackTheirRecord) {
  auto d = Make();
  SA_ASSIGN_OR_FAIL(s1, d->CreateStream());
  SA_ASSIGN_OR_FAIL(s2, d->CreateStream());
  SA_ASSIGN_OR_FAIL(e, d->CreateEvent());
  SA_ASSIGN_OR_FAIL(never, d->QueryEvent(e));
  EXPECT_TRUE(never) << "an event never recorded counts as complete";

  std::atomic<bool> gate{false};
  std::atomic<int> order{0};
  int first = -1, second = -1;
  SA_ASSERT_OK(d->Enqueue(s1, [&]() {
    while (!gate.load()) std::this_thread::yield();
    first = order.fetch_add(1);
  }));
  SA_ASSERT_OK(d->RecordEvent(e, s1));
  SA_ASSERT_OK(d->StreamWaitEvent(s2, e));
  SA_ASSERT_OK(d->Enqueue(s2, [&]() { second = order.fetch_add(1); }));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  SA_ASSIGN_OR_FAIL(done_early, d->QueryEvent(e));
  EXPECT_FALSE(done_early);
  EXPECT_EQ(second, -1) << "s2 ran past its wait on s1's event";
  gate = true;
  SA_ASSERT_OK(d->SynchronizeEvent(e));
  SA_ASSERT_OK(d->SynchronizeStream(s2));
  EXPECT_EQ(first, 0);
  EXPECT_EQ(second, 1);
  SA_ASSIGN_OR_FAIL(done, d->QueryEvent(e));
  EXPECT_TRUE(done);
  SA_ASSERT_OK(d->DestroyEvent(e));
  EXPECT_TRUE(absl::IsNotFound(d->QueryEvent(e).status()));
  SA_ASSERT_OK(d->DestroyStream(s1));
  SA_ASSERT_OK(d->DestroyStream(s2));
  // A destroyed stream is not an unknown one: using it is undefined behaviour on a GPU, and
  // counted here.
  const std::int64_t uses = HostDriver::DestroyedStreamUses();
  EXPECT_TRUE(absl::IsFailedPrecondition(d->SynchronizeStream(s1)));
  EXPECT_TRUE(absl::IsFailedPrecondition(d->DestroyStream(s2)));
  EXPECT_EQ(HostDriver::DestroyedStreamUses(), uses + 2);
  EXPECT_TRUE(absl::IsNotFound(d->SynchronizeStream(s2 + 1000)));
  EXPECT_EQ(HostDriver::DestroyedStreamUses(), uses + 2);
  EXPECT_TRUE(absl::IsInvalidArgument(d->DestroyStream(kDefaultStream)));
}

TEST(HostDriver, MemcpyAsyncCopiesInStreamOrder) {
  auto d = Make();
  std::vector<std::uint8_t> src = Pattern(4096, 3), mid(4096), dst(4096);
  SA_ASSERT_OK(d->MemcpyAsync(mid.data(), src.data(), src.size(), kDefaultStream));
  SA_ASSERT_OK(d->MemcpyAsync(dst.data(), mid.data(), mid.size(), kDefaultStream));
  SA_ASSERT_OK(d->SynchronizeStream(kDefaultStream));
  EXPECT_EQ(dst, src);
  EXPECT_TRUE(absl::IsInvalidArgument(d->MemcpyAsync(nullptr, src.data(), 1, kDefaultStream)));
  EXPECT_TRUE(absl::IsNotFound(d->MemcpyAsync(dst.data(), src.data(), 1, 12345)));
}


TEST(HostDriver, ReservationsGetTheSameAddressesInEveryRun) {
  // Two drivers given the same calls place every reservation at the same offset from the first
  // one, lowest address first, and a freed range is the first reused: replays repeat exactly.
  std::vector<std::size_t> offsets[2];
  for (int run = 0; run < 2; ++run) {
    auto d = Make();
    SA_ASSIGN_OR_FAIL(a, d->Reserve(3 * kGran));
    SA_ASSIGN_OR_FAIL(b, d->Reserve(kGran));
    SA_ASSIGN_OR_FAIL(c, d->Reserve(5 * kGran));
    EXPECT_EQ(b, a + 3 * kGran);
    EXPECT_EQ(c, b + kGran);
    SA_ASSERT_OK(d->FreeReservation(b, kGran));
    SA_ASSIGN_OR_FAIL(b2, d->Reserve(kGran));
    EXPECT_EQ(b2, b) << "the freed range is the lowest fit";
    SA_ASSERT_OK(d->FreeReservation(a, 3 * kGran));
    SA_ASSERT_OK(d->FreeReservation(b2, kGran));
    SA_ASSIGN_OR_FAIL(big, d->Reserve(4 * kGran));
    EXPECT_EQ(big, a) << "freed neighbours coalesce";
    // The recycled range works like a new one: map, write, read back through an alias.
    SA_ASSIGN_OR_FAIL(h, d->CreateChunk(kGran));
    SA_ASSERT_OK(d->Map(big + 3 * kGran, kGran, h));
    SA_ASSERT_OK(d->Map(c, kGran, h));
    SA_ASSERT_OK(d->SetAccess(big + 3 * kGran, kGran));
    SA_ASSERT_OK(d->SetAccess(c, kGran));
    reinterpret_cast<unsigned char*>(big + 3 * kGran)[5] = 0x77;
    EXPECT_EQ(reinterpret_cast<unsigned char*>(c)[5], 0x77);
    SA_ASSERT_OK(d->Unmap(big + 3 * kGran, kGran));
    SA_ASSERT_OK(d->Unmap(c, kGran));
    SA_ASSERT_OK(d->ReleaseChunk(h));
    offsets[run] = {b - a, c - a, b2 - a, big - a};
    SA_ASSERT_OK(d->FreeReservation(big, 4 * kGran));
    SA_ASSERT_OK(d->FreeReservation(c, 5 * kGran));
    EXPECT_EQ(d->live_reservations(), 0u);
  }
  EXPECT_EQ(offsets[0], offsets[1]);
}

TEST(HostDriver, UnbackedKeepsEveryCheckButHoldsNoBytes) {
  HostDriverOptions o{4 * kGran, kGran};
  o.backed = false;
  SA_ASSIGN_OR_FAIL(d, HostDriver::Create(o));
  EXPECT_NE(d->name().find("unbacked"), std::string::npos) << d->name();
  SA_ASSIGN_OR_FAIL(h, d->CreateChunk(3 * kGran));
  EXPECT_TRUE(absl::IsResourceExhausted(d->CreateChunk(2 * kGran).status())) << "capacity is still enforced";
  SA_ASSIGN_OR_FAIL(va, d->Reserve(4 * kGran));
  SA_ASSERT_OK(d->Map(va, 3 * kGran, h));
  EXPECT_TRUE(absl::IsFailedPrecondition(d->Map(va + kGran, 3 * kGran, h))) << "overlap is still rejected";
  EXPECT_TRUE(absl::IsFailedPrecondition(d->SetAccess(va, 4 * kGran))) << "the unmapped gap is still seen";
  SA_ASSERT_OK(d->SetAccess(va, 3 * kGran));
  // Device memory holds nothing: copies in or out are refused, host-to-host copies still run.
  std::vector<std::uint8_t> src = Pattern(256, 9), dst(256);
  absl::Status in = d->MemcpyAsync(reinterpret_cast<void*>(va + 100), src.data(), src.size(), kDefaultStream);
  EXPECT_TRUE(absl::IsFailedPrecondition(in)) << in;
  EXPECT_NE(std::string(in.message()).find("unbacked"), std::string::npos) << in;
  EXPECT_TRUE(absl::IsFailedPrecondition(
      d->MemcpyAsync(dst.data(), reinterpret_cast<void*>(va + 3 * kGran - 1), 1, kDefaultStream)));
  SA_ASSERT_OK(d->MemcpyAsync(dst.data(), src.data(), src.size(), kDefaultStream));
  SA_ASSERT_OK(d->SynchronizeStream(kDefaultStream));
  EXPECT_EQ(dst, src);
  // Release while mapped still waits for the last Unmap.
  SA_ASSERT_OK(d->ReleaseChunk(h));
  EXPECT_EQ(d->physical_bytes_in_use(), 3 * kGran);
  SA_ASSERT_OK(d->Unmap(va, 3 * kGran));
  EXPECT_EQ(d->physical_bytes_in_use(), 0u);
  EXPECT_EQ(d->live_chunks(), 0u);
  SA_ASSERT_OK(d->FreeReservation(va, 4 * kGran));
}

TEST(HostDriver, InlineStreamsFinishWorkBeforeSubmissionReturns) {
  HostDriverOptions o{16 * kMiB, kGran};
  o.inline_streams = true;
  SA_ASSIGN_OR_FAIL(d, HostDriver::Create(o));
  SA_ASSIGN_OR_FAIL(s, d->CreateStream());
  SA_ASSIGN_OR_FAIL(e, d->CreateEvent());
  const std::thread::id caller = std::this_thread::get_id();
  std::vector<int> order;
  std::thread::id ran_on;
  SA_ASSERT_OK(d->Enqueue(s, [&]() {
    order.push_back(1);
    ran_on = std::this_thread::get_id();
  }));
  EXPECT_EQ(order, std::vector<int>{1}) << "work ran at submission";
  EXPECT_EQ(ran_on, caller);
  SA_ASSERT_OK(d->RecordEvent(e, s));
  SA_ASSIGN_OR_FAIL(done, d->QueryEvent(e));
  EXPECT_TRUE(done);
  SA_ASSERT_OK(d->StreamWaitEvent(kDefaultStream, e));
  SA_ASSERT_OK(d->Enqueue(kDefaultStream, [&]() { order.push_back(2); }));
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
  std::vector<std::uint8_t> src = Pattern(64, 4), dst(64);
  SA_ASSERT_OK(d->MemcpyAsync(dst.data(), src.data(), src.size(), s));
  EXPECT_EQ(dst, src);
  SA_ASSERT_OK(d->DestroyStream(s));
  EXPECT_TRUE(absl::IsFailedPrecondition(d->Enqueue(s, []() {})));
  EXPECT_TRUE(absl::IsFailedPrecondition(d->RecordEvent(e, s)));
}

// Sharing (Driver::ExportChunk / ImportChunk): a second driver, standing for another process,
// maps the same pages; the import is not this device's memory; an exported chunk's pages outlive
// its release (importers may map them) and are never handed to a new chunk, however many chunks
// are exported and released after it.
TEST(HostDriver, ExportedChunksMapInAnotherDriverAndOutliveTheirRelease) {
  auto exporter = Make();
  auto importer = Make();
  SA_ASSIGN_OR_FAIL(h, exporter->CreateChunk(2 * kGran));
  SA_ASSIGN_OR_FAIL(va, exporter->Reserve(2 * kGran));
  SA_ASSERT_OK(exporter->Map(va, 2 * kGran, h));
  SA_ASSERT_OK(exporter->SetAccess(va, 2 * kGran));
  auto* mine = reinterpret_cast<unsigned char*>(va);
  std::memset(mine, 0x3c, 2 * kGran);
  SA_ASSIGN_OR_FAIL(fd, exporter->ExportChunk(h));
  SA_ASSIGN_OR_FAIL(fd_again, exporter->ExportChunk(h));
  EXPECT_EQ(fd, fd_again);

  SA_ASSIGN_OR_FAIL(imp, importer->ImportChunk(fd, 2 * kGran));
  EXPECT_EQ(importer->physical_bytes_in_use(), 0u) << "an import is the exporter's memory";
  SA_ASSIGN_OR_FAIL(iva, importer->Reserve(2 * kGran));
  SA_ASSERT_OK(importer->Map(iva, 2 * kGran, imp));
  SA_ASSERT_OK(importer->SetAccess(iva, 2 * kGran));
  auto* theirs = reinterpret_cast<unsigned char*>(iva);
  EXPECT_EQ(theirs[2 * kGran - 1], 0x3c);
  theirs[5] = 0x77;
  EXPECT_EQ(mine[5], 0x77);

  SA_ASSERT_OK(exporter->Unmap(va, 2 * kGran));
  SA_ASSERT_OK(exporter->ReleaseChunk(h));
  EXPECT_EQ(exporter->physical_bytes_in_use(), 0u);
  // Many more chunks than the file holds, each exported and released: the file grows rather
  // than reuse a retired range, and every new chunk starts zeroed.
  for (int i = 0; i < 600; ++i) {
    SA_ASSIGN_OR_FAIL(c, exporter->CreateChunk(kGran));
    SA_ASSIGN_OR_FAIL(cva, exporter->Reserve(kGran));
    SA_ASSERT_OK(exporter->Map(cva, kGran, c));
    SA_ASSERT_OK(exporter->SetAccess(cva, kGran));
    auto* p = reinterpret_cast<unsigned char*>(cva);
    ASSERT_EQ(p[0], 0) << "chunk " << i << " reused memory an importer still maps";
    std::memset(p, 0xee, kGran);
    SA_ASSERT_OK(exporter->ExportChunk(c).status());
    SA_ASSERT_OK(exporter->Unmap(cva, kGran));
    SA_ASSERT_OK(exporter->ReleaseChunk(c));
    SA_ASSERT_OK(exporter->FreeReservation(cva, kGran));
  }
  EXPECT_EQ(theirs[0], 0x3c);
  EXPECT_EQ(theirs[5], 0x77);
  EXPECT_EQ(theirs[2 * kGran - 1], 0x3c);
  SA_ASSERT_OK(importer->Unmap(iva, 2 * kGran));
  SA_ASSERT_OK(importer->ReleaseChunk(imp));
  EXPECT_EQ(importer->live_chunks(), 0u);
  EXPECT_TRUE(absl::IsNotFound(exporter->ExportChunk(h).status())) << "a released chunk";
}

TEST(HostDriver, ImportRejectsWhatNoHostDriverExported) {
  auto d = Make();
  int pipe_fds[2];
  ASSERT_EQ(pipe(pipe_fds), 0);
  EXPECT_TRUE(absl::IsInvalidArgument(d->ImportChunk(pipe_fds[0], kGran).status()));
  close(pipe_fds[0]);
  close(pipe_fds[1]);
  SA_ASSIGN_OR_FAIL(h, d->CreateChunk(kGran));
  SA_ASSIGN_OR_FAIL(fd, d->ExportChunk(h));
  EXPECT_TRUE(absl::IsInvalidArgument(d->ImportChunk(fd, kGran / 2).status())) << "not a granularity multiple";
  EXPECT_TRUE(absl::IsInvalidArgument(d->ImportChunk(fd, 4 * 16 * kMiB).status())) << "beyond the file";
  EXPECT_TRUE(absl::IsInvalidArgument(d->ImportChunk(-1, kGran).status()));
  EXPECT_EQ(d->live_chunks(), 1u) << "failed imports leave nothing behind";
  SA_ASSERT_OK(d->ReleaseChunk(h));

  HostDriverOptions o{16 * kMiB, kGran};
  o.backed = false;
  SA_ASSIGN_OR_FAIL(unbacked, HostDriver::Create(o));
  EXPECT_FALSE(unbacked->shareable());
  SA_ASSIGN_OR_FAIL(u, unbacked->CreateChunk(kGran));
  EXPECT_TRUE(absl::IsFailedPrecondition(unbacked->ExportChunk(u).status()));
}

TEST(HostDriver, SynchronizeDeviceWaitsForEveryStream) {
  auto d = Make();
  SA_ASSIGN_OR_FAIL(s1, d->CreateStream());
  SA_ASSIGN_OR_FAIL(s2, d->CreateStream());
  std::atomic<int> done{0};
  for (Stream s : {kDefaultStream, s1, s2}) {
    SA_ASSERT_OK(d->Enqueue(s, [&done] {
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
      done.fetch_add(1);
    }));
  }
  SA_ASSERT_OK(d->SynchronizeDevice());
  EXPECT_EQ(done.load(), 3);
  const std::int64_t misuses = HostDriver::DestroyedStreamUses();
  SA_ASSERT_OK(d->DestroyStream(s1));
  SA_ASSERT_OK(d->SynchronizeDevice());  // a destroyed stream is not waited for, nor counted as used
  EXPECT_EQ(HostDriver::DestroyedStreamUses(), misuses);
}

}  // namespace
}  // namespace stitchalloc::testing
