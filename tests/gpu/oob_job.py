"""Reads one element 1 MiB past the end of a tensor (aten._unsafe_index does no bounds check), for
compute-sanitizer's memcheck: in PyTorch's uncached mode (PYTORCH_NO_CUDA_MEMORY_CACHING=1) the
tensor is a cudaMalloc of its own, so memcheck reports the read, under PyTorch's allocator and
under stitchalloc alike; with caching the tensor lies inside a larger segment and it cannot.

On 2026-11-24 (H100, CUDA 13, torch 2.11) a read 400 bytes past the end went unreported under
both allocators (memcheck exited with its error code, so it reported something else; the test
did not keep its output then). A read that close may fall inside the next small cudaMalloc
(the output's), which memcheck rightly accepts; the read is now 1 MiB past the end.

    compute-sanitizer --tool memcheck python tests/gpu/oob_job.py --way native|install
"""

import argparse

p = argparse.ArgumentParser()
p.add_argument("--way", required=True, choices=["native", "install"])
args = p.parse_args()
if args.way == "install":
    import stitchalloc

    stitchalloc.install()

import torch  # noqa: E402

x = torch.arange(1000, dtype=torch.float32, device="cuda")  # 4000 bytes
index = torch.tensor([1000 + (1 << 18)], device="cuda")  # 1 MiB past the end
y = torch.ops.aten._unsafe_index(x, [index])
torch.cuda.synchronize()
print("read", float(y.item()), flush=True)
