// CudaDriver end to end without a GPU: libcuda is replaced by tests/fake_cuda (the host
// emulation behind the CUDA driver API, enforcing the driver's rules), so loading through
// cuGetProcAddress, primary-context handling, the VMM call sequence and error translation all
// run, and the whole conformance suite runs on CudaDriver, a second time with every byte moved
// by the driver's copies as on a GPU.
#include <dlfcn.h>

#include "tests/conformance.h"
#include "vmm/cuda_driver.h"

namespace stitchalloc::testing {
namespace {

absl::StatusOr<std::unique_ptr<Driver>> MakeFake() {
  auto d = CudaDriver::Create({0, FAKE_LIBCUDA_PATH});
  if (!d.ok()) return d.status();
  return std::unique_ptr<Driver>(*std::move(d));
}

INSTANTIATE_TEST_SUITE_P(FakeCudaDriver, Conformance,
                         // Twice: with the test touching blocks directly, and through the
                         // driver's copies only, as on a GPU (the path gpu_conformance_test takes).
                         ::testing::Values(DriverFactory{"fake_cuda", MakeFake, /*direct_access=*/true},
                                           DriverFactory{"fake_cuda_copies", MakeFake, /*direct_access=*/false}),
                         [](const auto& p) { return p.param.name; });

struct Hooks {
  void (*push_foreign)() = nullptr;
  void (*pop)() = nullptr;
  void* (*current)() = nullptr;
  void (*refuse_shareable)(int) = nullptr;
};

Hooks LoadHooks() {
  Hooks h;
  void* lib = dlopen(FAKE_LIBCUDA_PATH, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return h;
  h.push_foreign = reinterpret_cast<void (*)()>(dlsym(lib, "fake_cuda_push_foreign_context"));
  h.pop = reinterpret_cast<void (*)()>(dlsym(lib, "fake_cuda_pop_context"));
  h.current = reinterpret_cast<void* (*)()>(dlsym(lib, "fake_cuda_current_context"));
  h.refuse_shareable = reinterpret_cast<void (*)(int)>(dlsym(lib, "fake_cuda_refuse_shareable"));
  return h;
}

TEST(FakeCudaDriver, LoadsEveryEntryPointAndDescribesTheDevice) {
  SA_ASSIGN_OR_FAIL(d, MakeFake());
  EXPECT_EQ(d->kind(), DriverKind::kCuda);
  EXPECT_EQ(d->granularity(), 2 * kMiB);
  EXPECT_NE(d->name().find("Fake VMM device"), std::string::npos) << d->name();
  EXPECT_NE(d->name().find("driver API 13.0"), std::string::npos) << d->name();
  SA_ASSIGN_OR_FAIL(info, d->GetMemInfo());
  EXPECT_GT(info.total_bytes, 0u);
}

TEST(FakeCudaDriver, WorkRunsInThePrimaryContextAndTheCallersContextIsRestored) {
  Hooks hooks = LoadHooks();
  ASSERT_NE(hooks.push_foreign, nullptr);
  SA_ASSIGN_OR_FAIL(alloc, MakeAllocator(*MakeFake()));
  EXPECT_EQ(hooks.current(), nullptr);
  hooks.push_foreign();  // e.g. a thread where another library made its own context current
  void* foreign = hooks.current();
  SA_ASSIGN_OR_FAIL(p, alloc->Malloc(8 * kMiB));
  EXPECT_EQ(hooks.current(), foreign);
  const auto bytes = Pattern(4096, 9);
  SA_ASSERT_OK(Upload(alloc->driver(), p, bytes.data(), bytes.size()));
  EXPECT_EQ(hooks.current(), foreign);
  SA_ASSERT_OK(alloc->Free(p));
  SA_ASSERT_OK(alloc->EmptyCache());
  EXPECT_EQ(hooks.current(), foreign);
  hooks.pop();
  EXPECT_EQ(hooks.current(), nullptr) << "a pushed context was left behind";
}

// Chunks are created with the POSIX file descriptor handle type; where the driver refuses it
// (some virtualised GPUs), allocation goes on without it and sharing fails naming the refusal;
// ipc:false never asks for it.
TEST(FakeCudaDriver, SharingFallsBackWhereTheHandleTypeIsRefused) {
  Hooks hooks = LoadHooks();
  ASSERT_NE(hooks.refuse_shareable, nullptr);
  {
    SA_ASSIGN_OR_FAIL(alloc, MakeAllocator(*MakeFake()));
    EXPECT_TRUE(alloc->driver().shareable());
    SA_ASSIGN_OR_FAIL(p, alloc->Malloc(4 * kMiB));
    SA_ASSIGN_OR_FAIL(shared, alloc->Share(p));
    EXPECT_EQ(shared.fds.size(), 2u);
    SA_ASSERT_OK(alloc->Free(p));
  }
  hooks.refuse_shareable(1);
  {
    SA_ASSIGN_OR_FAIL(alloc, MakeAllocator(*MakeFake()));
    SA_ASSIGN_OR_FAIL(p, alloc->Malloc(4 * kMiB));  // allocation is unaffected
    EXPECT_FALSE(alloc->driver().shareable());
    auto shared = alloc->Share(p);
    EXPECT_TRUE(absl::IsFailedPrecondition(shared.status())) << shared.status();
    EXPECT_NE(shared.status().message().find("CUDA_ERROR_NOT_SUPPORTED"), std::string::npos) << shared.status();
    SA_ASSERT_OK(alloc->Free(p));
  }
  hooks.refuse_shareable(0);
  {
    CudaDriverOptions o{0, FAKE_LIBCUDA_PATH};
    o.shareable = false;  // what the config key ipc:false sets
    SA_ASSIGN_OR_FAIL(driver, CudaDriver::Create(o));
    SA_ASSIGN_OR_FAIL(alloc, MakeAllocator(std::move(driver)));
    EXPECT_FALSE(alloc->driver().shareable());
    SA_ASSIGN_OR_FAIL(p, alloc->Malloc(4 * kMiB));
    auto shared = alloc->Share(p);
    EXPECT_TRUE(absl::IsFailedPrecondition(shared.status())) << shared.status();
    EXPECT_NE(shared.status().message().find("ipc:false"), std::string::npos) << shared.status();
    SA_ASSERT_OK(alloc->Free(p));
  }
}

TEST(FakeCudaDriver, DriverErrorsBecomeStatusesNamingTheCall) {
  SA_ASSIGN_OR_FAIL(d, MakeFake());
  SA_ASSIGN_OR_FAIL(va, d->Reserve(4 * kMiB));
  SA_ASSIGN_OR_FAIL(h, d->CreateChunk(2 * kMiB));
  const absl::Status twice = [&] {
    if (auto s = d->Map(va, 2 * kMiB, h); !s.ok()) return s;
    return d->Map(va, 2 * kMiB, h);  // already mapped there
  }();
  EXPECT_FALSE(twice.ok());
  EXPECT_NE(twice.message().find("cuMemMap"), std::string::npos) << twice;
  auto huge = d->CreateChunk(std::size_t{1} << 50);
  EXPECT_TRUE(absl::IsResourceExhausted(huge.status())) << huge.status();
  EXPECT_NE(huge.status().message().find("CUDA_ERROR_OUT_OF_MEMORY"), std::string::npos) << huge.status();
  SA_ASSIGN_OR_FAIL(e, d->CreateEvent());
  SA_ASSIGN_OR_FAIL(done, d->QueryEvent(e));
  EXPECT_TRUE(done);
  SA_ASSERT_OK(d->RecordEvent(e, kDefaultStream));
  SA_ASSERT_OK(d->SynchronizeEvent(e));
  SA_ASSERT_OK(d->DestroyEvent(e));
  SA_ASSERT_OK(d->Unmap(va, 2 * kMiB));
  SA_ASSERT_OK(d->ReleaseChunk(h));
  SA_ASSERT_OK(d->FreeReservation(va, 4 * kMiB));
  EXPECT_TRUE(absl::IsInvalidArgument(d->DestroyStream(kDefaultStream)));
}

}  // namespace
}  // namespace stitchalloc::testing
