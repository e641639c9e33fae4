// A fake libcuda for testing CudaDriver on machines without a GPU.
//
// It exports cuGetProcAddress(_v2) and serves the driver entry points CudaDriver uses, backed by
// a HostDriver (real memory mappings), and checks the rules the real driver enforces and that
// CudaDriver must therefore follow: cuInit first; the device's primary context current on the
// calling thread for every memory, stream and event call (CUDA_ERROR_INVALID_CONTEXT otherwise);
// pinned device allocation properties; whole-chunk maps at offset 0 with zero flags; access set
// for the device with read-write protection. So the same conformance suite that runs on the host
// driver exercises CudaDriver's loading, symbol lookup, context handling and error translation.
//
// Sharing follows CUDA too: only chunks created with the POSIX file descriptor handle type can be
// exported, each export is a new descriptor the caller owns, and an import does not take the
// caller's descriptor. The chunk's size, which CUDA knows from the handle, is taken at its
// first cuMemMap (the host driver needs it to import).
//
// Test hooks (C symbols): fake_cuda_push_foreign_context() makes another context current on the
// calling thread, fake_cuda_pop_context() removes it, fake_cuda_current_context() reads it,
// fake_cuda_set_capacity_mb() sizes device memory before cuInit, fake_cuda_refuse_shareable(1)
// makes cuMemCreate refuse the POSIX file descriptor handle type (CUDA_ERROR_NOT_SUPPORTED), as
// some virtualised GPUs do.
#include <cuda.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "vmm/host_driver.h"

namespace {

using stitchalloc::HostDriver;

std::size_t g_capacity = std::size_t{16} << 30;
std::unique_ptr<HostDriver> g_driver;
std::once_flag g_once;
bool g_initialized = false;
int g_primary_refs = 0;
CUcontext const kPrimary = reinterpret_cast<CUcontext>(0x1000);
CUcontext const kForeign = reinterpret_cast<CUcontext>(0x2000);
thread_local std::vector<CUcontext> t_stack;

constexpr std::size_t kGranularity = std::size_t{2} << 20;

// Sharing state (under g_share_mu).
std::mutex g_share_mu;
bool g_refuse_shareable = false;
absl::flat_hash_set<CUmemGenericAllocationHandle> g_shareable;  // created with the POSIX fd type
struct Import {
  int fd = -1;                                   // our duplicate of the importer's descriptor
  CUmemGenericAllocationHandle chunk = 0;        // the host driver's chunk, once the size is known
};
constexpr CUmemGenericAllocationHandle kImportBit = CUmemGenericAllocationHandle{1} << 62;
CUmemGenericAllocationHandle g_next_import = kImportBit;
absl::flat_hash_map<CUmemGenericAllocationHandle, Import> g_imports;

CUresult Translate(const absl::Status& s) {
  if (s.ok()) return CUDA_SUCCESS;
  switch (s.code()) {
    case absl::StatusCode::kResourceExhausted: return CUDA_ERROR_OUT_OF_MEMORY;
    case absl::StatusCode::kInvalidArgument: return CUDA_ERROR_INVALID_VALUE;
    case absl::StatusCode::kNotFound: return CUDA_ERROR_INVALID_HANDLE;
    default: return CUDA_ERROR_UNKNOWN;
  }
}

CUresult Ready() {
  if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
  if (t_stack.empty() || t_stack.back() != kPrimary) return CUDA_ERROR_INVALID_CONTEXT;
  return CUDA_SUCCESS;
}
#define FAKE_READY()                      \
  if (CUresult r = Ready(); r != CUDA_SUCCESS) return r

bool ValidProp(const CUmemAllocationProp* p) {
  return p != nullptr && p->type == CU_MEM_ALLOCATION_TYPE_PINNED && p->location.type == CU_MEM_LOCATION_TYPE_DEVICE &&
         p->location.id == 0 &&
         (p->requestedHandleTypes == CU_MEM_HANDLE_TYPE_NONE ||
          p->requestedHandleTypes == CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
}

CUresult CUDAAPI fInit(unsigned int flags) {
  if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
  std::call_once(g_once, [] { g_driver = *HostDriver::Create({g_capacity, kGranularity}); });
  g_initialized = true;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fDriverGetVersion(int* v) { *v = 13000; return CUDA_SUCCESS; }
CUresult CUDAAPI fDeviceGetCount(int* n) {
  if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
  *n = 1;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fDeviceGet(CUdevice* d, int ordinal) {
  if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
  *d = 0;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fDeviceGetName(char* name, int len, CUdevice) {
  std::strncpy(name, "Fake VMM device", static_cast<std::size_t>(len));
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice) {
  *v = a == CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED ? 1 : 0;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fPrimaryCtxRetain(CUcontext* c, CUdevice) {
  ++g_primary_refs;
  *c = kPrimary;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fPrimaryCtxRelease(CUdevice) {
  return g_primary_refs-- > 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_CONTEXT;
}
CUresult CUDAAPI fCtxGetCurrent(CUcontext* c) {
  *c = t_stack.empty() ? nullptr : t_stack.back();
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fCtxPushCurrent(CUcontext c) {
  t_stack.push_back(c);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fCtxPopCurrent(CUcontext* c) {
  if (t_stack.empty()) return CUDA_ERROR_INVALID_CONTEXT;
  if (c != nullptr) *c = t_stack.back();
  t_stack.pop_back();
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fMemGetAllocationGranularity(size_t* g, const CUmemAllocationProp* p, CUmemAllocationGranularity_flags) {
  FAKE_READY();
  if (!ValidProp(p)) return CUDA_ERROR_INVALID_VALUE;
  *g = kGranularity;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fMemCreate(CUmemGenericAllocationHandle* h, size_t size, const CUmemAllocationProp* p,
                            unsigned long long flags) {
  FAKE_READY();
  if (!ValidProp(p) || flags != 0) return CUDA_ERROR_INVALID_VALUE;
  const bool shareable = p->requestedHandleTypes == CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  std::lock_guard<std::mutex> l(g_share_mu);
  if (shareable && g_refuse_shareable) return CUDA_ERROR_NOT_SUPPORTED;
  auto r = g_driver->CreateChunk(size);
  if (!r.ok()) return Translate(r.status());
  *h = *r;
  if (shareable) g_shareable.insert(*h);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fMemRelease(CUmemGenericAllocationHandle h) {
  FAKE_READY();
  std::lock_guard<std::mutex> l(g_share_mu);
  if (auto it = g_imports.find(h); it != g_imports.end()) {
    absl::Status s = it->second.chunk != 0 ? g_driver->ReleaseChunk(it->second.chunk) : absl::OkStatus();
    close(it->second.fd);
    g_imports.erase(it);
    return Translate(s);
  }
  CUresult r = Translate(g_driver->ReleaseChunk(h));
  if (r == CUDA_SUCCESS) g_shareable.erase(h);
  return r;
}
CUresult CUDAAPI fMemExportToShareableHandle(void* out, CUmemGenericAllocationHandle h, CUmemAllocationHandleType type,
                                             unsigned long long flags) {
  FAKE_READY();
  std::lock_guard<std::mutex> l(g_share_mu);
  if (out == nullptr || flags != 0 || type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR || !g_shareable.contains(h)) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  auto fd = g_driver->ExportChunk(h);
  if (!fd.ok()) return Translate(fd.status());
  const int own = fcntl(*fd, F_DUPFD_CLOEXEC, 0);  // the caller's to close, as CUDA's
  if (own < 0) return CUDA_ERROR_OPERATING_SYSTEM;
  *static_cast<int*>(out) = own;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fMemImportFromShareableHandle(CUmemGenericAllocationHandle* h, void* os_handle,
                                               CUmemAllocationHandleType type) {
  FAKE_READY();
  if (h == nullptr || type != CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) return CUDA_ERROR_INVALID_VALUE;
  const int fd = static_cast<int>(reinterpret_cast<std::intptr_t>(os_handle));
  const int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (own < 0) return CUDA_ERROR_INVALID_VALUE;
  std::lock_guard<std::mutex> l(g_share_mu);
  *h = g_next_import++;
  g_imports.emplace(*h, Import{own, 0});
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fCtxSynchronize() {
  FAKE_READY();
  return Translate(g_driver->SynchronizeDevice());
}
CUresult CUDAAPI fMemAddressReserve(CUdeviceptr* p, size_t size, size_t alignment, CUdeviceptr addr,
                                    unsigned long long flags) {
  FAKE_READY();
  if (flags != 0 || addr != 0 || (alignment & (alignment - 1)) != 0 || alignment > kGranularity) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  auto r = g_driver->Reserve(size);
  if (!r.ok()) return Translate(r.status());
  *p = *r;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fMemAddressFree(CUdeviceptr p, size_t size) {
  FAKE_READY();
  return Translate(g_driver->FreeReservation(p, size));
}
CUresult CUDAAPI fMemMap(CUdeviceptr p, size_t size, size_t offset, CUmemGenericAllocationHandle h,
                         unsigned long long flags) {
  FAKE_READY();
  if (offset != 0 || flags != 0) return CUDA_ERROR_INVALID_VALUE;
  {
    std::lock_guard<std::mutex> l(g_share_mu);
    if (auto it = g_imports.find(h); it != g_imports.end()) {
      if (it->second.chunk == 0) {
        auto chunk = g_driver->ImportChunk(it->second.fd, size);
        if (!chunk.ok()) return Translate(chunk.status());
        it->second.chunk = *chunk;
      }
      h = it->second.chunk;
    }
  }
  return Translate(g_driver->Map(p, size, h));
}
CUresult CUDAAPI fMemUnmap(CUdeviceptr p, size_t size) {
  FAKE_READY();
  return Translate(g_driver->Unmap(p, size));
}
CUresult CUDAAPI fMemSetAccess(CUdeviceptr p, size_t size, const CUmemAccessDesc* desc, size_t count) {
  FAKE_READY();
  if (count != 1 || desc == nullptr || desc->location.type != CU_MEM_LOCATION_TYPE_DEVICE || desc->location.id != 0 ||
      desc->flags != CU_MEM_ACCESS_FLAGS_PROT_READWRITE) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  return Translate(g_driver->SetAccess(p, size));
}
CUresult CUDAAPI fStreamCreate(CUstream* s, unsigned int) {
  FAKE_READY();
  auto r = g_driver->CreateStream();
  if (!r.ok()) return Translate(r.status());
  *s = reinterpret_cast<CUstream>(*r);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fStreamDestroy(CUstream s) {
  FAKE_READY();
  return Translate(g_driver->DestroyStream(reinterpret_cast<stitchalloc::Stream>(s)));
}
CUresult CUDAAPI fStreamSynchronize(CUstream s) {
  FAKE_READY();
  return Translate(g_driver->SynchronizeStream(reinterpret_cast<stitchalloc::Stream>(s)));
}
CUresult CUDAAPI fStreamWaitEvent(CUstream s, CUevent e, unsigned int flags) {
  FAKE_READY();
  if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
  return Translate(g_driver->StreamWaitEvent(reinterpret_cast<stitchalloc::Stream>(s), reinterpret_cast<stitchalloc::Event>(e)));
}
CUresult CUDAAPI fEventCreate(CUevent* e, unsigned int) {
  FAKE_READY();
  auto r = g_driver->CreateEvent();
  if (!r.ok()) return Translate(r.status());
  *e = reinterpret_cast<CUevent>(*r);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fEventDestroy(CUevent e) {
  FAKE_READY();
  return Translate(g_driver->DestroyEvent(reinterpret_cast<stitchalloc::Event>(e)));
}
CUresult CUDAAPI fEventRecord(CUevent e, CUstream s) {
  FAKE_READY();
  return Translate(g_driver->RecordEvent(reinterpret_cast<stitchalloc::Event>(e), reinterpret_cast<stitchalloc::Stream>(s)));
}
CUresult CUDAAPI fEventQuery(CUevent e) {
  FAKE_READY();
  auto r = g_driver->QueryEvent(reinterpret_cast<stitchalloc::Event>(e));
  if (!r.ok()) return Translate(r.status());
  return *r ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}
CUresult CUDAAPI fEventSynchronize(CUevent e) {
  FAKE_READY();
  return Translate(g_driver->SynchronizeEvent(reinterpret_cast<stitchalloc::Event>(e)));
}
CUresult CUDAAPI fMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
  FAKE_READY();
  return Translate(g_driver->MemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n,
                                         reinterpret_cast<stitchalloc::Stream>(s)));
}
CUresult CUDAAPI fEventElapsedTime(float* ms, CUevent a, CUevent b) {
  FAKE_READY();
  auto r = g_driver->ElapsedSeconds(reinterpret_cast<stitchalloc::Event>(a), reinterpret_cast<stitchalloc::Event>(b));
  if (!r.ok()) return r.status().code() == absl::StatusCode::kFailedPrecondition ? CUDA_ERROR_NOT_READY : Translate(r.status());
  *ms = static_cast<float>(*r * 1000.0);
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fMemHostAlloc(void** p, size_t n, unsigned int) {
  FAKE_READY();
  auto r = g_driver->AllocateHostPinned(n);
  if (!r.ok()) return Translate(r.status());
  *p = *r;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fMemFreeHost(void* p) {
  FAKE_READY();
  return Translate(g_driver->FreeHostPinned(p));
}
CUresult CUDAAPI fMemGetInfo(size_t* free_b, size_t* total_b) {
  FAKE_READY();
  auto r = g_driver->GetMemInfo();
  if (!r.ok()) return Translate(r.status());
  *free_b = r->free_bytes;
  *total_b = r->total_bytes;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fGetErrorName(CUresult e, const char** s) {
  switch (e) {
    case CUDA_ERROR_OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; break;
    case CUDA_ERROR_INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
    default: *s = "CUDA_ERROR_UNKNOWN"; break;
  }
  return CUDA_SUCCESS;
}
CUresult CUDAAPI fGetErrorString(CUresult, const char** s) {
  *s = "fake driver error";
  return CUDA_SUCCESS;
}

const absl::flat_hash_map<std::string, void*>& Table() {
  static const auto* t = new absl::flat_hash_map<std::string, void*>{
      {"cuInit", reinterpret_cast<void*>(&fInit)},
      {"cuDriverGetVersion", reinterpret_cast<void*>(&fDriverGetVersion)},
      {"cuDeviceGetCount", reinterpret_cast<void*>(&fDeviceGetCount)},
      {"cuDeviceGet", reinterpret_cast<void*>(&fDeviceGet)},
      {"cuDeviceGetName", reinterpret_cast<void*>(&fDeviceGetName)},
      {"cuDeviceGetAttribute", reinterpret_cast<void*>(&fDeviceGetAttribute)},
      {"cuDevicePrimaryCtxRetain", reinterpret_cast<void*>(&fPrimaryCtxRetain)},
      {"cuDevicePrimaryCtxRelease", reinterpret_cast<void*>(&fPrimaryCtxRelease)},
      {"cuCtxGetCurrent", reinterpret_cast<void*>(&fCtxGetCurrent)},
      {"cuCtxPushCurrent", reinterpret_cast<void*>(&fCtxPushCurrent)},
      {"cuCtxPopCurrent", reinterpret_cast<void*>(&fCtxPopCurrent)},
      {"cuMemGetAllocationGranularity", reinterpret_cast<void*>(&fMemGetAllocationGranularity)},
      {"cuMemCreate", reinterpret_cast<void*>(&fMemCreate)},
      {"cuMemRelease", reinterpret_cast<void*>(&fMemRelease)},
      {"cuMemAddressReserve", reinterpret_cast<void*>(&fMemAddressReserve)},
      {"cuMemAddressFree", reinterpret_cast<void*>(&fMemAddressFree)},
      {"cuMemMap", reinterpret_cast<void*>(&fMemMap)},
      {"cuMemUnmap", reinterpret_cast<void*>(&fMemUnmap)},
      {"cuMemSetAccess", reinterpret_cast<void*>(&fMemSetAccess)},
      {"cuStreamCreate", reinterpret_cast<void*>(&fStreamCreate)},
      {"cuStreamDestroy", reinterpret_cast<void*>(&fStreamDestroy)},
      {"cuStreamSynchronize", reinterpret_cast<void*>(&fStreamSynchronize)},
      {"cuStreamWaitEvent", reinterpret_cast<void*>(&fStreamWaitEvent)},
      {"cuEventCreate", reinterpret_cast<void*>(&fEventCreate)},
      {"cuEventDestroy", reinterpret_cast<void*>(&fEventDestroy)},
      {"cuEventRecord", reinterpret_cast<void*>(&fEventRecord)},
      {"cuEventQuery", reinterpret_cast<void*>(&fEventQuery)},
      {"cuEventSynchronize", reinterpret_cast<void*>(&fEventSynchronize)},
      {"cuMemcpyAsync", reinterpret_cast<void*>(&fMemcpyAsync)},
      {"cuMemGetInfo", reinterpret_cast<void*>(&fMemGetInfo)},
      {"cuEventElapsedTime", reinterpret_cast<void*>(&fEventElapsedTime)},
      {"cuMemHostAlloc", reinterpret_cast<void*>(&fMemHostAlloc)},
      {"cuMemFreeHost", reinterpret_cast<void*>(&fMemFreeHost)},
      {"cuMemExportToShareableHandle", reinterpret_cast<void*>(&fMemExportToShareableHandle)},
      {"cuMemImportFromShareableHandle", reinterpret_cast<void*>(&fMemImportFromShareableHandle)},
      {"cuCtxSynchronize", reinterpret_cast<void*>(&fCtxSynchronize)},
      {"cuGetErrorName", reinterpret_cast<void*>(&fGetErrorName)},
      {"cuGetErrorString", reinterpret_cast<void*>(&fGetErrorString)},
  };
  return *t;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int, cuuint64_t,
                                                                     CUdriverProcAddressQueryResult* status) {
  auto it = Table().find(symbol);
  if (it == Table().end()) {
    if (status != nullptr) *status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    *pfn = nullptr;
    return CUDA_ERROR_NOT_FOUND;
  }
  if (status != nullptr) *status = CU_GET_PROC_ADDRESS_SUCCESS;
  *pfn = it->second;
  return CUDA_SUCCESS;
}

__attribute__((visibility("default"))) void fake_cuda_push_foreign_context() { t_stack.push_back(kForeign); }
__attribute__((visibility("default"))) void fake_cuda_pop_context() {
  if (!t_stack.empty()) t_stack.pop_back();
}
__attribute__((visibility("default"))) void* fake_cuda_current_context() {
  return t_stack.empty() ? nullptr : t_stack.back();
}
__attribute__((visibility("default"))) void fake_cuda_set_capacity_mb(std::size_t mb) { g_capacity = mb << 20; }
__attribute__((visibility("default"))) void fake_cuda_refuse_shareable(int refuse) {
  std::lock_guard<std::mutex> l(g_share_mu);
  g_refuse_shareable = refuse != 0;
}

}  // extern "C"
