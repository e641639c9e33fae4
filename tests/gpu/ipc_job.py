"""A CUDA tensor sent to another process with torch.multiprocessing (CUDA IPC), with each side
under stitchalloc or PyTorch's native allocator, in a fresh process (tests/gpu/test_torch_gpu.py).

    python ipc_job.py --sender stitchalloc --receiver native

Senders: stitchalloc, native (cudaMalloc segments: 'c' handles), native-expandable (expandable
segments: 'e' handles, the format stitchalloc writes), stitchalloc-pluggable (stitchalloc, the
tensor in a MemPool whose own allocator is cuMemAlloc: 'c' handles, as PyTorch writes for its
cudaMalloc segments). Receivers: stitchalloc, native. The
receiver reads the tensor (a view that starts inside its storage), checks every element, adds
one in place and reports; the sender checks that it sees the additions. Prints one JSON line.
"""

import argparse
import json
import os

import torch
import torch.multiprocessing as mp

N = 6 * 1024 * 1024 + 123  # floats: several chunks, not chunk-aligned
SKIP = 1000                # the view sent starts this many elements into its storage


def setup(kind):
    if kind in ("stitchalloc", "stitchalloc-pluggable"):
        import stitchalloc

        stitchalloc.install()
    elif kind == "native-expandable":
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def pluggable_pool():
    """A MemPool whose own allocator is cuMemAlloc / cuMemFree (what a CUDAPluggableAllocator gives)."""
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    alloc_t = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p)
    free_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p)

    def alloc(size, device, stream):
        p = ctypes.c_uint64()
        return p.value if cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(size)) == 0 else None

    def free(ptr, size, device, stream):
        cuda.cuMemFree_v2(ctypes.c_uint64(ptr))

    fns = (alloc_t(alloc), free_t(free))  # kept alive with the pool
    allocator = torch._C._cuda_customAllocator(ctypes.cast(fns[0], ctypes.c_void_p).value,
                                               ctypes.cast(fns[1], ctypes.c_void_p).value)
    return torch.cuda.MemPool(allocator), fns


def using_stitchalloc():
    try:
        import stitchalloc

        return stitchalloc.installed()
    except ImportError:
        return False


def receive(kind, inbox, outbox):
    setup(kind)
    try:
        t = inbox.get(timeout=120)
        want = torch.arange(SKIP, N, device="cuda", dtype=torch.float32)
        equal = bool(torch.equal(t, want))
        t.add_(1)
        torch.cuda.synchronize()
        del t
        outbox.put({"equal": equal, "stitchalloc": using_stitchalloc(), "error": None})
    except Exception as e:  # reported to the sender, which fails the test with it
        outbox.put({"equal": False, "stitchalloc": using_stitchalloc(), "error": repr(e)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sender", choices=["stitchalloc", "native", "native-expandable", "stitchalloc-pluggable"],
                    required=True)
    ap.add_argument("--receiver", choices=["stitchalloc", "native"], required=True)
    args = ap.parse_args()
    os.environ.pop("STITCHALLOC_AUTO_INSTALL", None)  # the receiver installs only when told
    setup(args.sender)
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=receive, args=(args.receiver, inbox, outbox))
    child.start()
    if args.sender == "stitchalloc-pluggable":
        pool, keep = pluggable_pool()
        with torch.cuda.use_mem_pool(pool):
            base = torch.arange(N, device="cuda", dtype=torch.float32)
    else:
        base = torch.arange(N, device="cuda", dtype=torch.float32)
    inbox.put(base[SKIP:])
    got = outbox.get(timeout=300)
    child.join(timeout=120)
    torch.cuda.synchronize()
    want = torch.arange(N, device="cuda", dtype=torch.float32)
    want[SKIP:] += 1
    print(json.dumps({
        "sender_stitchalloc": using_stitchalloc(),
        "receiver_stitchalloc": got["stitchalloc"],
        "receiver_equal": got["equal"],
        "receiver_error": got["error"],
        "sender_sees_writes": bool(torch.equal(base, want)),
        "child_exit": child.exitcode,
    }))


if __name__ == "__main__":
    main()
