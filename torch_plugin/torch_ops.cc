// libstitchalloc_torch_ops.so: PyTorch operators over the swap entry points of
// libstitchalloc_torch.so, so that Python can hand tensors to the swap manager and get tensors
// back (torch.ops.stitchalloc.*; the Python package's stitchalloc.swap module wraps them). A
// separate library because operators need libtorch_cpu, which the allocator itself (loaded by
// the LD_PRELOAD way in, possibly before libtorch_cpu) must not pull in.
//
// Tickets are storages: swap_offload(t, layer) offloads t's whole storage and keeps a reference
// to it (a Holder) until the swap manager releases the block (after recording the copy stream's
// use, so the allocator reuses it only once the copy has read it). swap_wait(ticket) returns a
// flat uint8 CUDA tensor over the storage that came back (the same storage if it never left);
// views are rebuilt from it in Python. holders_ maps (device, ticket) to its Holder; the mutex
// guards the map and every Holder's storage. Storages are dropped outside the mutex.
#include <ATen/ATen.h>
#include <c10/core/TensorImpl.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/library.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "stitchalloc/torch.h"

namespace stitchalloc_ops {
namespace {

struct Holder {
  c10::Storage storage;
  std::size_t nbytes = 0;
};

std::mutex g_mu;
std::map<std::pair<int64_t, uint64_t>, Holder*> g_holders;

[[noreturn]] void Raise(const char* op) {
  TORCH_CHECK(false, "stitchalloc.", op, ": ", stitchalloc_torch_last_error());
}

void ReleaseHolder(void* context) {
  c10::Storage drop;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    drop = std::move(static_cast<Holder*>(context)->storage);
  }
}  // the last reference goes here, outside the mutex: PyTorch's deleter frees the block

at::Tensor FlatBytes(c10::Storage storage, int64_t nbytes) {
  auto t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CUDA),
                                                    caffe2::TypeMeta::Make<uint8_t>());
  t.unsafeGetTensorImpl()->set_sizes_contiguous({nbytes});
  return t;
}

int64_t Resolve(int64_t device) {
  // The swap entry points resolve -1 themselves; tickets are kept per device as given, so the
  // Python layer always passes a concrete index.
  TORCH_CHECK(device >= 0, "stitchalloc: a concrete device index is needed, got ", device);
  return device;
}

at::Tensor RawEmpty(int64_t nbytes) {
  TORCH_CHECK(nbytes > 0, "stitchalloc.raw_empty: nbytes must be positive, got ", nbytes);
  TORCH_CHECK(stitchalloc_torch_installed() == 1, "stitchalloc.raw_empty: stitchalloc is not PyTorch's CUDA allocator");
  c10::Allocator* alloc = c10::cuda::CUDACachingAllocator::get();
  c10::DataPtr data = alloc->allocate(static_cast<size_t>(nbytes));
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, std::move(data), alloc, /*resizable=*/false);
  return FlatBytes(std::move(storage), nbytes);
}

int64_t SwapOffload(const at::Tensor& t, int64_t layer, int64_t pass) {
  TORCH_CHECK(t.defined() && t.is_cuda(), "stitchalloc.swap_offload: a CUDA tensor is required");
  c10::Storage storage = t.storage();
  const int64_t device = t.device().index();
  TORCH_CHECK(storage.data_ptr().get_deleter() == c10::cuda::CUDACachingAllocator::get()->raw_deleter(),
              "stitchalloc.swap_offload: the tensor's memory was not allocated by stitchalloc");
  auto* holder = new Holder{storage, storage.nbytes()};
  uint64_t ticket = 0;
  if (stitchalloc_torch_swap_offload_pass(static_cast<int>(device), storage.mutable_data(), holder->nbytes,
                                          static_cast<int>(layer), static_cast<uint64_t>(pass), &ReleaseHolder, holder,
                                          &ticket) != 0) {
    delete holder;
    Raise("swap_offload");
  }
  std::lock_guard<std::mutex> lock(g_mu);
  g_holders[{device, ticket}] = holder;
  return static_cast<int64_t>(ticket);
}

Holder* Take(int64_t device, int64_t ticket) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_holders.find({device, static_cast<uint64_t>(ticket)});
  if (it == g_holders.end()) return nullptr;
  Holder* h = it->second;
  g_holders.erase(it);
  return h;
}

at::Tensor SwapWait(int64_t ticket, int64_t device) {
  device = Resolve(device);
  void* ptr = nullptr;
  int same = 0;
  if (stitchalloc_torch_swap_wait(static_cast<int>(device), static_cast<uint64_t>(ticket), &ptr, &same) != 0) {
    Raise("swap_wait");
  }
  // The ticket has ended: the manager will not call ReleaseHolder for it any more, so the
  // holder is ours alone once taken out of the map.
  std::unique_ptr<Holder> h(Take(device, ticket));
  TORCH_CHECK(h != nullptr, "stitchalloc.swap_wait: ticket ", ticket, " was not issued by swap_offload");
  c10::Storage storage = std::move(h->storage);
  const int64_t nbytes = static_cast<int64_t>(h->nbytes);
  if (!same) {
    // A new block from stitchalloc: PyTorch frees it through the installed allocator.
    c10::Allocator* alloc = c10::cuda::CUDACachingAllocator::get();
    c10::DataPtr data(ptr, ptr, alloc->raw_deleter(), c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
    storage = c10::Storage(c10::Storage::use_byte_size_t(), nbytes, std::move(data), alloc, /*resizable=*/false);
  }
  TORCH_CHECK(storage, "stitchalloc.swap_wait: ticket ", ticket, " lost its storage");
  return FlatBytes(std::move(storage), nbytes);
}

void SwapCancel(int64_t ticket, int64_t device) {
  device = Resolve(device);
  if (stitchalloc_torch_swap_cancel(static_cast<int>(device), static_cast<uint64_t>(ticket)) != 0) Raise("swap_cancel");
  delete Take(device, ticket);  // its storage was released by the cancel (if it was still held)
}

}  // namespace
}  // namespace stitchalloc_ops

TORCH_LIBRARY(stitchalloc, m) {
  m.def("raw_empty(int nbytes) -> Tensor", &stitchalloc_ops::RawEmpty);
  m.def("swap_offload(Tensor t, int layer, int pass_id=0) -> int", &stitchalloc_ops::SwapOffload);
  m.def("swap_wait(int ticket, int device) -> Tensor", &stitchalloc_ops::SwapWait);
  m.def("swap_cancel(int ticket, int device) -> ()", &stitchalloc_ops::SwapCancel);
}
