// CudaDriver implementation: the function table, its loading, and thin checked wrappers.
#include "vmm/cuda_driver.h"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <dlfcn.h>
#include <unistd.h>

#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "vmm/format.h"
#include "vmm/nvtx.h"

namespace stitchalloc {

// Each entry is requested at the version of its typedef, so the ABI matches the prototype.
struct CudaDriver::Api {
  void* lib = nullptr;
  PFN_cuGetErrorName_v6000 cuGetErrorName = nullptr;
  PFN_cuGetErrorString_v6000 cuGetErrorString = nullptr;
  PFN_cuInit_v2000 cuInit = nullptr;
  PFN_cuDriverGetVersion_v2020 cuDriverGetVersion = nullptr;
  PFN_cuDeviceGetCount_v2000 cuDeviceGetCount = nullptr;
  PFN_cuDeviceGet_v2000 cuDeviceGet = nullptr;
  PFN_cuDeviceGetName_v2000 cuDeviceGetName = nullptr;
  PFN_cuDeviceGetAttribute_v2000 cuDeviceGetAttribute = nullptr;
  PFN_cuDevicePrimaryCtxRetain_v7000 cuDevicePrimaryCtxRetain = nullptr;
  PFN_cuDevicePrimaryCtxRelease_v11000 cuDevicePrimaryCtxRelease = nullptr;
  PFN_cuCtxGetCurrent_v4000 cuCtxGetCurrent = nullptr;
  PFN_cuCtxPushCurrent_v4000 cuCtxPushCurrent = nullptr;
  PFN_cuCtxPopCurrent_v4000 cuCtxPopCurrent = nullptr;
  PFN_cuMemGetAllocationGranularity_v10020 cuMemGetAllocationGranularity = nullptr;
  PFN_cuMemCreate_v10020 cuMemCreate = nullptr;
  PFN_cuMemRelease_v10020 cuMemRelease = nullptr;
  PFN_cuMemAddressReserve_v10020 cuMemAddressReserve = nullptr;
  PFN_cuMemAddressFree_v10020 cuMemAddressFree = nullptr;
  PFN_cuMemMap_v10020 cuMemMap = nullptr;
  PFN_cuMemUnmap_v10020 cuMemUnmap = nullptr;
  PFN_cuMemSetAccess_v10020 cuMemSetAccess = nullptr;
  PFN_cuStreamCreate_v2000 cuStreamCreate = nullptr;
  PFN_cuStreamDestroy_v4000 cuStreamDestroy = nullptr;
  PFN_cuStreamSynchronize_v2000 cuStreamSynchronize = nullptr;
  PFN_cuStreamWaitEvent_v3020 cuStreamWaitEvent = nullptr;
  PFN_cuEventCreate_v2000 cuEventCreate = nullptr;
  PFN_cuEventDestroy_v4000 cuEventDestroy = nullptr;
  PFN_cuEventRecord_v2000 cuEventRecord = nullptr;
  PFN_cuEventQuery_v2000 cuEventQuery = nullptr;
  PFN_cuEventSynchronize_v2000 cuEventSynchronize = nullptr;
  PFN_cuMemcpyAsync_v4000 cuMemcpyAsync = nullptr;
  PFN_cuMemGetInfo_v3020 cuMemGetInfo = nullptr;
  PFN_cuEventElapsedTime_v2000 cuEventElapsedTime = nullptr;
  PFN_cuMemHostAlloc_v2020 cuMemHostAlloc = nullptr;
  PFN_cuMemFreeHost_v2000 cuMemFreeHost = nullptr;
  PFN_cuMemExportToShareableHandle_v10020 cuMemExportToShareableHandle = nullptr;
  PFN_cuMemImportFromShareableHandle_v10020 cuMemImportFromShareableHandle = nullptr;
  PFN_cuCtxSynchronize_v2000 cuCtxSynchronize = nullptr;
};

namespace {

absl::StatusCode CodeFor(CUresult r) {
  switch (r) {
    case CUDA_ERROR_OUT_OF_MEMORY: return absl::StatusCode::kResourceExhausted;
    case CUDA_ERROR_INVALID_VALUE:
    case CUDA_ERROR_INVALID_HANDLE: return absl::StatusCode::kInvalidArgument;
    case CUDA_ERROR_NOT_FOUND: return absl::StatusCode::kNotFound;
    case CUDA_ERROR_NO_DEVICE:
    case CUDA_ERROR_STUB_LIBRARY:
    case CUDA_ERROR_NOT_SUPPORTED:
    case CUDA_ERROR_SYSTEM_DRIVER_MISMATCH:
    case CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE: return absl::StatusCode::kUnavailable;
    default: return absl::StatusCode::kInternal;
  }
}

template <typename Fn>
absl::Status Lookup(PFN_cuGetProcAddress_v12000 get_v2, PFN_cuGetProcAddress_v11030 get_v1,
                    const char* symbol, int version, Fn* out) {
  void* fn = nullptr;
  CUresult r;
  if (get_v2 != nullptr) {
    CUdriverProcAddressQueryResult found = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    r = get_v2(symbol, &fn, version, CU_GET_PROC_ADDRESS_LEGACY_STREAM, &found);
  } else {
    r = get_v1(symbol, &fn, version, CU_GET_PROC_ADDRESS_LEGACY_STREAM);
  }
  if (r != CUDA_SUCCESS || fn == nullptr) {
    return absl::UnavailableError(absl::StrFormat(
        "CUDA driver: cuGetProcAddress(\"%s\", version %d) failed (error %d): driver too old?",
        symbol, version, static_cast<int>(r)));
  }
  *out = reinterpret_cast<Fn>(fn);
  return absl::OkStatus();
}

}  // namespace

// Makes the primary context current for the duration of one call, restoring the caller's.
class CudaDriver::ContextScope {
 public:
  explicit ContextScope(const CudaDriver& d) : api_(*d.api_) {
    CUcontext current = nullptr;
    api_.cuCtxGetCurrent(&current);
    if (current != static_cast<CUcontext>(d.context_)) {
      pushed_ = api_.cuCtxPushCurrent(static_cast<CUcontext>(d.context_)) == CUDA_SUCCESS;
    }
  }
  ~ContextScope() {
    if (pushed_) {
      CUcontext popped = nullptr;
      api_.cuCtxPopCurrent(&popped);
    }
  }
  ContextScope(const ContextScope&) = delete;
  ContextScope& operator=(const ContextScope&) = delete;

 private:
  const Api& api_;
  bool pushed_ = false;
};

absl::Status CudaDriver::Check(int result, const char* call) const {
  const CUresult r = static_cast<CUresult>(result);
  if (r == CUDA_SUCCESS) return absl::OkStatus();
  const char* err_name = "unknown";
  const char* err_text = "";
  if (api_ && api_->cuGetErrorName) api_->cuGetErrorName(r, &err_name);
  if (api_ && api_->cuGetErrorString) api_->cuGetErrorString(r, &err_text);
  return absl::Status(CodeFor(r), absl::StrFormat("CUDA driver: %s failed: %s (%s)", call,
                                                  err_name ? err_name : "?", err_text ? err_text : ""));
}

absl::StatusOr<std::unique_ptr<CudaDriver>> CudaDriver::Create(const CudaDriverOptions& options) {
  void* lib = dlopen(options.libcuda_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = dlerror();
    return absl::UnavailableError(absl::StrFormat(
        "CUDA driver: cannot open %s (is an NVIDIA driver installed?): %s", options.libcuda_path,
        why ? why : "unknown error"));
  }
  auto get_v2 = reinterpret_cast<PFN_cuGetProcAddress_v12000>(dlsym(lib, "cuGetProcAddress_v2"));
  auto get_v1 = reinterpret_cast<PFN_cuGetProcAddress_v11030>(dlsym(lib, "cuGetProcAddress"));
  if (get_v2 == nullptr && get_v1 == nullptr) {
    return absl::UnavailableError(absl::StrFormat(
        "CUDA driver: %s has no cuGetProcAddress: a driver for CUDA 11.3 or newer is required",
        options.libcuda_path));
  }

  std::unique_ptr<CudaDriver> d(new CudaDriver());
  d->api_ = std::make_unique<Api>();
  Api& a = *d->api_;
  a.lib = lib;
#define STITCHALLOC_LOAD(sym, ver) \
  if (auto s = Lookup(get_v2, get_v1, #sym, ver, &a.sym); !s.ok()) return s
  STITCHALLOC_LOAD(cuGetErrorName, 6000);
  STITCHALLOC_LOAD(cuGetErrorString, 6000);
  STITCHALLOC_LOAD(cuInit, 2000);
  STITCHALLOC_LOAD(cuDriverGetVersion, 2020);
  STITCHALLOC_LOAD(cuDeviceGetCount, 2000);
  STITCHALLOC_LOAD(cuDeviceGet, 2000);
  STITCHALLOC_LOAD(cuDeviceGetName, 2000);
  STITCHALLOC_LOAD(cuDeviceGetAttribute, 2000);
  STITCHALLOC_LOAD(cuDevicePrimaryCtxRetain, 7000);
  STITCHALLOC_LOAD(cuDevicePrimaryCtxRelease, 11000);
  STITCHALLOC_LOAD(cuCtxGetCurrent, 4000);
  STITCHALLOC_LOAD(cuCtxPushCurrent, 4000);
  STITCHALLOC_LOAD(cuCtxPopCurrent, 4000);
  STITCHALLOC_LOAD(cuMemGetAllocationGranularity, 10020);
  STITCHALLOC_LOAD(cuMemCreate, 10020);
  STITCHALLOC_LOAD(cuMemRelease, 10020);
  STITCHALLOC_LOAD(cuMemAddressReserve, 10020);
  STITCHALLOC_LOAD(cuMemAddressFree, 10020);
  STITCHALLOC_LOAD(cuMemMap, 10020);
  STITCHALLOC_LOAD(cuMemUnmap, 10020);
  STITCHALLOC_LOAD(cuMemSetAccess, 10020);
  STITCHALLOC_LOAD(cuStreamCreate, 2000);
  STITCHALLOC_LOAD(cuStreamDestroy, 4000);
  STITCHALLOC_LOAD(cuStreamSynchronize, 2000);
  STITCHALLOC_LOAD(cuStreamWaitEvent, 3020);
  STITCHALLOC_LOAD(cuEventCreate, 2000);
  STITCHALLOC_LOAD(cuEventDestroy, 4000);
  STITCHALLOC_LOAD(cuEventRecord, 2000);
  STITCHALLOC_LOAD(cuEventQuery, 2000);
  STITCHALLOC_LOAD(cuEventSynchronize, 2000);
  STITCHALLOC_LOAD(cuMemcpyAsync, 4000);
  STITCHALLOC_LOAD(cuMemGetInfo, 3020);
  STITCHALLOC_LOAD(cuEventElapsedTime, 2000);
  STITCHALLOC_LOAD(cuMemHostAlloc, 2020);
  STITCHALLOC_LOAD(cuMemFreeHost, 2000);
  STITCHALLOC_LOAD(cuMemExportToShareableHandle, 10020);
  STITCHALLOC_LOAD(cuMemImportFromShareableHandle, 10020);
  STITCHALLOC_LOAD(cuCtxSynchronize, 2000);
#undef STITCHALLOC_LOAD

  if (auto s = d->Check(a.cuInit(0), "cuInit"); !s.ok()) {
    return absl::UnavailableError(std::string(s.message()));
  }
  int count = 0;
  if (auto s = d->Check(a.cuDeviceGetCount(&count), "cuDeviceGetCount"); !s.ok()) return s;
  if (options.device < 0 || options.device >= count) {
    return absl::UnavailableError(absl::StrFormat(
        "CUDA driver: device %d requested but %d device(s) present", options.device, count));
  }
  CUdevice dev = 0;
  if (auto s = d->Check(a.cuDeviceGet(&dev, options.device), "cuDeviceGet"); !s.ok()) return s;
  int vmm = 0;
  if (auto s = d->Check(a.cuDeviceGetAttribute(
                            &vmm, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev),
                        "cuDeviceGetAttribute(VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)");
      !s.ok()) {
    return s;
  }
  if (!vmm) {
    return absl::UnavailableError(absl::StrFormat(
        "CUDA driver: device %d does not support virtual memory management (cuMemMap)", options.device));
  }
  CUcontext ctx = nullptr;
  if (auto s = d->Check(a.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain"); !s.ok()) return s;
  d->ordinal_ = options.device;
  d->device_handle_ = dev;
  d->context_ = ctx;

  ContextScope scope(*d);
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = dev;
  std::size_t gran = 0;
  if (auto s = d->Check(a.cuMemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
                        "cuMemGetAllocationGranularity");
      !s.ok()) {
    return s;
  }
  d->granularity_ = gran;
  d->shareable_.store(options.shareable);
  if (!options.shareable) {
    MutexLock l(&d->export_mu_);
    d->unshareable_reason_ = "sharing is off in the configuration (ipc:false)";
  }
  char dev_name[256] = {};
  a.cuDeviceGetName(dev_name, sizeof(dev_name) - 1, dev);
  int version = 0;
  a.cuDriverGetVersion(&version);
  d->name_ = absl::StrFormat("cuda:%d %s (driver API %d.%d, granularity %s)", options.device, dev_name,
                             version / 1000, (version % 1000) / 10, FormatBytes(gran));
  return d;
}

CudaDriver::~CudaDriver() {
  {
    MutexLock l(&export_mu_);
    for (const auto& [h, fd] : exported_) close(fd);
  }
  if (api_ && context_ != nullptr) api_->cuDevicePrimaryCtxRelease(static_cast<CUdevice>(device_handle_));
  // libcuda stays loaded: the process (and PyTorch) keeps using it.
}

absl::StatusOr<PhysHandle> CudaDriver::CreateChunk(std::size_t bytes) {
  if (bytes == 0 || bytes % granularity_ != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "CUDA driver: CreateChunk(%d): size must be a non-zero multiple of the granularity %d", bytes,
        granularity_));
  }
  STITCHALLOC_NVTX_RANGE("cuMemCreate");
  ContextScope scope(*this);
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = static_cast<CUdevice>(device_handle_);
  CUmemGenericAllocationHandle h = 0;
  if (shareable()) {
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    const CUresult r = api_->cuMemCreate(&h, bytes, &prop, 0);
    if (r == CUDA_SUCCESS) return static_cast<PhysHandle>(h);
    if (r == CUDA_ERROR_OUT_OF_MEMORY) return Check(r, "cuMemCreate");
    // The handle type is refused here: share nothing from now on, and try without it.
    MutexLock l(&export_mu_);
    shareable_.store(false);
    unshareable_reason_ = std::string(
        absl::StripPrefix(Check(r, "cuMemCreate with a POSIX file descriptor handle type").message(), "CUDA driver: "));
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
  }
  if (auto s = Check(api_->cuMemCreate(&h, bytes, &prop, 0), "cuMemCreate"); !s.ok()) return s;
  return static_cast<PhysHandle>(h);
}

absl::Status CudaDriver::ReleaseChunk(PhysHandle handle) {
  ContextScope scope(*this);
  absl::Status s = Check(api_->cuMemRelease(static_cast<CUmemGenericAllocationHandle>(handle)), "cuMemRelease");
  if (s.ok()) {
    MutexLock l(&export_mu_);
    if (auto it = exported_.find(handle); it != exported_.end()) {
      close(it->second);
      exported_.erase(it);
    }
  }
  return s;
}

absl::StatusOr<int> CudaDriver::ExportChunk(PhysHandle handle) {
  MutexLock l(&export_mu_);
  if (auto it = exported_.find(handle); it != exported_.end()) return it->second;
  ContextScope scope(*this);
  int fd = -1;
  const CUresult r = api_->cuMemExportToShareableHandle(&fd, static_cast<CUmemGenericAllocationHandle>(handle),
                                                        CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
  if (r != CUDA_SUCCESS) {
    absl::Status s = Check(r, "cuMemExportToShareableHandle");
    if (!unshareable_reason_.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "CUDA driver: device memory cannot be shared with other processes: ", unshareable_reason_));
    }
    return s;
  }
  exported_.emplace(handle, fd);
  return fd;
}

absl::StatusOr<PhysHandle> CudaDriver::ImportChunk(int fd, std::size_t bytes) {
  if (bytes == 0 || bytes % granularity_ != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "CUDA driver: ImportChunk(%d, %d): size must be a non-zero multiple of the granularity %d", fd, bytes,
        granularity_));
  }
  ContextScope scope(*this);
  CUmemGenericAllocationHandle h = 0;
  if (auto s = Check(api_->cuMemImportFromShareableHandle(&h, reinterpret_cast<void*>(static_cast<std::intptr_t>(fd)),
                                                          CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
                     "cuMemImportFromShareableHandle");
      !s.ok()) {
    return s;
  }
  return static_cast<PhysHandle>(h);
}

absl::StatusOr<DevicePtr> CudaDriver::Reserve(std::size_t bytes) {
  if (bytes == 0 || bytes % granularity_ != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "CUDA driver: Reserve(%d): size must be a non-zero multiple of the granularity %d", bytes, granularity_));
  }
  ContextScope scope(*this);
  CUdeviceptr va = 0;
  if (auto s = Check(api_->cuMemAddressReserve(&va, bytes, granularity_, 0, 0), "cuMemAddressReserve"); !s.ok()) {
    return s;
  }
  return static_cast<DevicePtr>(va);
}

absl::Status CudaDriver::FreeReservation(DevicePtr va, std::size_t bytes) {
  ContextScope scope(*this);
  return Check(api_->cuMemAddressFree(static_cast<CUdeviceptr>(va), bytes), "cuMemAddressFree");
}

absl::Status CudaDriver::Map(DevicePtr va, std::size_t bytes, PhysHandle handle) {
  STITCHALLOC_NVTX_RANGE("cuMemMap");
  ContextScope scope(*this);
  return Check(api_->cuMemMap(static_cast<CUdeviceptr>(va), bytes, 0,
                              static_cast<CUmemGenericAllocationHandle>(handle), 0),
               "cuMemMap");
}

absl::Status CudaDriver::Unmap(DevicePtr va, std::size_t bytes) {
  STITCHALLOC_NVTX_RANGE("cuMemUnmap");
  ContextScope scope(*this);
  return Check(api_->cuMemUnmap(static_cast<CUdeviceptr>(va), bytes), "cuMemUnmap");
}

absl::Status CudaDriver::SetAccess(DevicePtr va, std::size_t bytes) {
  ContextScope scope(*this);
  CUmemAccessDesc desc = {};
  desc.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  desc.location.id = static_cast<CUdevice>(device_handle_);
  desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  return Check(api_->cuMemSetAccess(static_cast<CUdeviceptr>(va), bytes, &desc, 1), "cuMemSetAccess");
}

absl::StatusOr<Stream> CudaDriver::CreateStream() {
  ContextScope scope(*this);
  CUstream s = nullptr;
  if (auto st = Check(api_->cuStreamCreate(&s, CU_STREAM_NON_BLOCKING), "cuStreamCreate"); !st.ok()) return st;
  return reinterpret_cast<Stream>(s);
}

absl::Status CudaDriver::DestroyStream(Stream stream) {
  if (stream == kDefaultStream) return absl::InvalidArgumentError("CUDA driver: the default stream cannot be destroyed");
  ContextScope scope(*this);
  return Check(api_->cuStreamDestroy(reinterpret_cast<CUstream>(stream)), "cuStreamDestroy");
}

absl::Status CudaDriver::SynchronizeStream(Stream stream) {
  ContextScope scope(*this);
  return Check(api_->cuStreamSynchronize(reinterpret_cast<CUstream>(stream)), "cuStreamSynchronize");
}

absl::Status CudaDriver::SynchronizeDevice() {
  ContextScope scope(*this);
  return Check(api_->cuCtxSynchronize(), "cuCtxSynchronize");
}

absl::StatusOr<Event> CudaDriver::CreateEvent() {
  ContextScope scope(*this);
  CUevent e = nullptr;
  if (auto s = Check(api_->cuEventCreate(&e, CU_EVENT_DISABLE_TIMING), "cuEventCreate"); !s.ok()) return s;
  return reinterpret_cast<Event>(e);
}

absl::Status CudaDriver::DestroyEvent(Event event) {
  ContextScope scope(*this);
  return Check(api_->cuEventDestroy(reinterpret_cast<CUevent>(event)), "cuEventDestroy");
}

absl::Status CudaDriver::RecordEvent(Event event, Stream stream) {
  ContextScope scope(*this);
  return Check(api_->cuEventRecord(reinterpret_cast<CUevent>(event), reinterpret_cast<CUstream>(stream)),
               "cuEventRecord");
}

absl::StatusOr<bool> CudaDriver::QueryEvent(Event event) {
  ContextScope scope(*this);
  const CUresult r = api_->cuEventQuery(reinterpret_cast<CUevent>(event));
  if (r == CUDA_SUCCESS) return true;
  if (r == CUDA_ERROR_NOT_READY) return false;
  return Check(r, "cuEventQuery");
}

absl::Status CudaDriver::SynchronizeEvent(Event event) {
  ContextScope scope(*this);
  return Check(api_->cuEventSynchronize(reinterpret_cast<CUevent>(event)), "cuEventSynchronize");
}

absl::Status CudaDriver::StreamWaitEvent(Stream stream, Event event) {
  ContextScope scope(*this);
  return Check(api_->cuStreamWaitEvent(reinterpret_cast<CUstream>(stream), reinterpret_cast<CUevent>(event), 0),
               "cuStreamWaitEvent");
}

absl::StatusOr<Event> CudaDriver::CreateTimingEvent() {
  ContextScope scope(*this);
  CUevent e = nullptr;
  if (auto s = Check(api_->cuEventCreate(&e, CU_EVENT_DEFAULT), "cuEventCreate"); !s.ok()) return s;
  return reinterpret_cast<Event>(e);
}

absl::StatusOr<double> CudaDriver::ElapsedSeconds(Event start, Event end) {
  ContextScope scope(*this);
  float ms = 0;
  const CUresult r =
      api_->cuEventElapsedTime(&ms, reinterpret_cast<CUevent>(start), reinterpret_cast<CUevent>(end));
  if (r == CUDA_ERROR_NOT_READY) {
    return absl::FailedPreconditionError("CUDA driver: ElapsedSeconds on an event that has not completed");
  }
  if (auto s = Check(r, "cuEventElapsedTime"); !s.ok()) return s;
  return static_cast<double>(ms) / 1000.0;
}

absl::StatusOr<void*> CudaDriver::AllocateHostPinned(std::size_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("CUDA driver: AllocateHostPinned of 0 bytes");
  ContextScope scope(*this);
  void* p = nullptr;
  // Portable: usable from every context, as PyTorch's pinned memory is.
  if (auto s = Check(api_->cuMemHostAlloc(&p, bytes, CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc"); !s.ok()) {
    return s;
  }
  return p;
}

absl::Status CudaDriver::FreeHostPinned(void* ptr) {
  if (ptr == nullptr) return absl::InvalidArgumentError("CUDA driver: FreeHostPinned(nullptr)");
  ContextScope scope(*this);
  return Check(api_->cuMemFreeHost(ptr), "cuMemFreeHost");
}

absl::Status CudaDriver::MemcpyAsync(void* dst, const void* src, std::size_t bytes, Stream stream) {
  if (bytes == 0) return absl::OkStatus();
  ContextScope scope(*this);
  return Check(api_->cuMemcpyAsync(reinterpret_cast<CUdeviceptr>(dst), reinterpret_cast<CUdeviceptr>(src), bytes,
                                   reinterpret_cast<CUstream>(stream)),
               "cuMemcpyAsync");
}

absl::StatusOr<MemInfo> CudaDriver::GetMemInfo() {
  ContextScope scope(*this);
  std::size_t free_b = 0, total_b = 0;
  if (auto s = Check(api_->cuMemGetInfo(&free_b, &total_b), "cuMemGetInfo"); !s.ok()) return s;
  return MemInfo{free_b, total_b};
}

}  // namespace stitchalloc
