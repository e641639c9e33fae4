"""Exercises the torch.cuda memory APIs a training script uses, one after another, and prints one
JSON line of what it observed; tests/gpu/test_torch_gpu.py runs it under PyTorch's native
allocator and under stitchalloc and compares (issue 3, item 2, on a real device).

    python tests/gpu/api_job.py --way native|install

Every observation is a plain value, so a failure shows what differed. A step that raises is
recorded as "error: ..." under its name instead of stopping the job.
"""

import argparse
import json
import traceback

p = argparse.ArgumentParser()
p.add_argument("--way", required=True, choices=["native", "install"])
args = p.parse_args()

if args.way == "install":
    import stitchalloc

    stitchalloc.install()

import torch  # noqa: E402

MiB = 1 << 20
dev = torch.device("cuda")
out = {"way": args.way}


def step(name):
    def wrap(fn):
        try:
            out[name] = fn()
        except Exception as e:  # recorded, compared by the test
            out[name] = f"error: {type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
        return fn

    return wrap


torch.cuda.init()
torch.empty(1, device=dev)  # the context, and the allocator's first use


@step("allocated_delta")
def _():
    # Block sizes as PyTorch rounds them: 10 MiB, 1000 B (-> 1024), 3 MiB + 1 (-> next 512 B)
    a0 = torch.cuda.memory_allocated()
    xs = [torch.empty(n, dtype=torch.uint8, device=dev) for n in (10 * MiB, 1000, 3 * MiB + 1)]
    d = torch.cuda.memory_allocated() - a0
    del xs
    return d


@step("reserved_covers_allocated")
def _():
    x = torch.empty(64 * MiB, dtype=torch.uint8, device=dev)
    ok = torch.cuda.memory_reserved() >= torch.cuda.memory_allocated() >= 64 * MiB
    del x
    return ok


@step("peaks")
def _():
    x = torch.empty(256 * MiB, dtype=torch.uint8, device=dev)
    del x
    before = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    after = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
    reserved_after = torch.cuda.max_memory_reserved() - torch.cuda.memory_reserved()
    return {"peak_above_current_before_reset": before >= 256 * MiB, "after_reset": after,
            "reserved_after_reset": reserved_after}


@step("empty_cache")
def _():
    x = torch.empty(512 * MiB, dtype=torch.uint8, device=dev)
    del x
    cached = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    released = cached - torch.cuda.memory_reserved()
    return {"released_at_least_512_MiB": released >= 512 * MiB,
            "reserved_covers_allocated": torch.cuda.memory_reserved() >= torch.cuda.memory_allocated()}


@step("stats_and_summary")
def _():
    s = torch.cuda.memory_stats()
    return {"keys": sorted(s), "allocation_count_positive": s["allocation.all.allocated"] > 0,
            "summary_has_title": "PyTorch CUDA memory summary" in torch.cuda.memory_summary()}


@step("mem_get_info")
def _():
    free, total = torch.cuda.mem_get_info()
    return 0 < free <= total


@step("record_stream")
def _():
    # The side stream reads x after the main stream frees it; the block must not be reused
    # before the side stream is done.
    s = torch.cuda.Stream()
    x = torch.full((16 * MiB // 4,), 3.0, device=dev)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy (about tens of ms)
        y = x * 2
    x.record_stream(s)
    del x
    z = torch.zeros(16 * MiB // 4, device=dev)  # may not take x's block while s still reads it
    z += 1
    torch.cuda.synchronize()
    return bool((y == 6.0).all()) and bool((z == 1.0).all())


@step("cudnn_benchmark")
def _():
    # cudnn.benchmark asks the allocator for its largest cached block (cacheInfo).
    torch.backends.cudnn.benchmark = True
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).to(dev)
    x = torch.randn(8, 16, 64, 64, device=dev, requires_grad=True)
    conv(x).square().sum().backward()
    torch.backends.cudnn.benchmark = False
    return bool(torch.isfinite(x.grad).all())


@step("mem_pool")
def _():
    if not hasattr(torch.cuda, "MemPool") or not hasattr(torch.cuda, "use_mem_pool"):
        return "absent"
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        t = torch.ones(8 * MiB // 4, device=dev)
    u = torch.ones(8 * MiB // 4, device=dev)  # outside the pool
    ok = bool((t + u == 2).all())
    del t, u
    del pool
    return ok


@step("mem_pool_no_split")
def _():
    # torch.cuda.MemPool(no_split=True): every tensor of the pool holds a segment of its own.
    import inspect

    if "no_split" not in inspect.signature(torch.cuda.MemPool.__init__).parameters:
        return "absent"
    pool = torch.cuda.MemPool(no_split=True)
    with torch.cuda.use_mem_pool(pool):
        xs = [torch.full((1000,), i, dtype=torch.uint8, device=dev) for i in range(3)]
    ptrs = {x.data_ptr() for x in xs}
    mine = [s for s in torch.cuda.memory_snapshot(pool.id) if s["address"] in ptrs]
    ok = all(int(x[0]) == i for i, x in enumerate(xs))
    del xs
    del pool
    return {"segments_starting_at_a_tensor": len(mine), "one_block_each": all(len(s["blocks"]) == 1 for s in mine),
            "values": ok}


@step("mem_pool_own_allocator")
def _():
    # torch.cuda.MemPool(allocator): segments come from the pool's own allocator (here functions
    # over cuMemAlloc, as a CUDAPluggableAllocator would give), and all go back to it.
    if not hasattr(torch._C, "_cuda_customAllocator"):
        return "absent"
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    calls = {"alloc": [], "free": 0}
    alloc_t = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p)
    free_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p)

    def alloc(size, device, stream):
        p = ctypes.c_uint64()
        if cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(size)) != 0:
            return None
        calls["alloc"].append(size)
        return p.value

    def free(ptr, size, device, stream):
        cuda.cuMemFree_v2(ctypes.c_uint64(ptr))
        calls["free"] += 1

    alloc_fn, free_fn = alloc_t(alloc), free_t(free)
    allocator = torch._C._cuda_customAllocator(ctypes.cast(alloc_fn, ctypes.c_void_p).value,
                                               ctypes.cast(free_fn, ctypes.c_void_p).value)
    pool = torch.cuda.MemPool(allocator)
    with torch.cuda.use_mem_pool(pool):
        t = torch.full((3 * MiB // 4,), 2.0, device=dev)
        v = torch.full((5 * MiB // 4,), 3.0, device=dev)
    u = torch.full((3 * MiB // 4,), 1.0, device=dev)  # outside the pool
    ok = bool((t * v[: t.numel()] + u == 7.0).all())
    sizes = list(calls["alloc"])
    del t, v, u
    del pool
    torch.cuda.empty_cache()
    return {"values": ok, "segment_sizes": sizes, "all_returned": calls["free"] == len(sizes)}


@step("history_pools_and_segments")
def _():
    # The memory history as _memory_viz and NCCL's allocator hook read it: segment_alloc /
    # segment_free entries that, applied to the segments there were when recording began, give
    # the segments of the snapshot at the end; and (where torch exposes it) the pool each entry
    # belongs to.
    if not hasattr(torch.cuda, "MemPool") or not hasattr(torch.cuda, "use_mem_pool"):
        return "absent"
    torch.cuda.empty_cache()
    before = {(s["address"], s["total_size"]) for s in torch.cuda.memory._snapshot()["segments"]}
    torch.cuda.memory._record_memory_history(max_entries=100000)
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        t = torch.ones(24 * MiB // 4, device=dev)
    u = torch.ones(40 * MiB // 4, device=dev)
    pool_ptr, pool_id = t.data_ptr(), tuple(pool.id)
    mid = torch.cuda.memory._snapshot()
    del t, u
    del pool
    torch.cuda.empty_cache()
    end = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, consistent = set(before), True
    actions = set()
    for e in end["device_traces"][torch.cuda.current_device()]:
        actions.add(e["action"])
        key = (e["addr"], e["size"])
        if e["action"] == "segment_alloc":
            consistent = consistent and key not in live
            live.add(key)
        elif e["action"] == "segment_free":
            consistent = consistent and key in live
            live.discard(key)
    allocs = [e for e in mid["device_traces"][torch.cuda.current_device()]
              if e["action"] == "alloc" and e["addr"] == pool_ptr]
    named = "absent" if not allocs or "pool_id" not in allocs[-1] else tuple(allocs[-1]["pool_id"]) == pool_id
    return {"segment_alloc": "segment_alloc" in actions, "segment_free": "segment_free" in actions,
            "replay_matches": consistent and live == {(s["address"], s["total_size"]) for s in end["segments"]},
            "pool_named": named}


@step("history_metadata")
def _():
    # What a script writes into the memory history besides stacks: _set_memory_metadata on the
    # entries of the calling thread, the compiled region an entry was made in
    # (compile_context=True; torch names regions "Torch-Compiled Region: i/j"), and, from torch
    # 2.14, _annotate_tensor's "annotate" entries.
    mm = torch.cuda.memory
    if not hasattr(mm, "_set_memory_metadata"):
        return "absent"
    supported = mm._memory_metadata_supported() if hasattr(mm, "_memory_metadata_supported") else "absent"
    mm._record_memory_history(max_entries=100000, compile_context=True)
    mm._set_memory_metadata('{"phase":"forward"}')  # a str: torch 2.11 takes no dict
    got = mm._get_memory_metadata()
    x = torch.empty(3 * MiB, dtype=torch.uint8, device=dev)
    mm._set_memory_metadata("")
    with torch.profiler.record_function("Torch-Compiled Region: 0/0"):
        y = torch.empty(5000, dtype=torch.uint8, device=dev)
    annotated = "absent"
    if hasattr(mm, "_annotate_tensor"):
        mm._annotate_tensor(x[1:], "packed")  # a view: keyed to its storage's base
        annotated = True
    trace = mm._snapshot()["device_traces"][torch.cuda.current_device()]
    mm._record_memory_history(enabled=None)
    x_ptr, y_ptr = x.data_ptr(), y.data_ptr()
    del x, y

    def of(action, addr):
        return [e for e in trace if e["action"] == action and e["addr"] == addr]

    if annotated is True:
        notes = of("annotate", x_ptr)
        annotated = [(e["size"], e.get("user_metadata")) for e in notes]
    return {"supported": supported, "get": got,
            "alloc_metadata": [e.get("user_metadata") for e in of("alloc", x_ptr)],
            "alloc_in_region": [e.get("compile_context") for e in of("alloc", y_ptr)],
            "annotated": annotated}


@step("uncached")
def _():
    # torch.cuda.memory.caching_allocator_enable(False): each allocation its own cudaMalloc, given
    # back to the device when freed, outside memory_allocated / memory_reserved.
    mm = torch.cuda.memory
    if not hasattr(mm, "caching_allocator_enable"):
        return "absent"
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    a0, r0 = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    free0 = torch.cuda.mem_get_info()[0]
    mm.caching_allocator_enable(False)
    try:
        x = torch.full((256 * MiB // 4,), 3.0, device=dev)
        free1 = torch.cuda.mem_get_info()[0]
        stats_untouched = torch.cuda.memory_allocated() == a0 and torch.cuda.memory_reserved() == r0
        value = x.sum().item()
        del x
        torch.cuda.synchronize()
        free2 = torch.cuda.mem_get_info()[0]
    finally:
        mm.caching_allocator_enable(True)
    return {"stats_untouched": stats_untouched, "value": value,
            "device_memory_taken": free0 - free1 >= 256 * MiB,
            "given_back_at_free": free2 >= free1 + 256 * MiB}


@step("oom")
def _():
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(0.25)
    raised, message = "none", ""
    try:
        torch.empty(int(total * 0.5), dtype=torch.uint8, device=dev)
    except torch.OutOfMemoryError as e:
        raised, message = "OutOfMemoryError", str(e)
    except Exception as e:
        raised, message = type(e).__name__, str(e)
    torch.cuda.set_per_process_memory_fraction(1.0)
    x = torch.empty(int(total * 0.5), dtype=torch.uint8, device=dev)  # usable again at the full fraction
    del x
    torch.cuda.empty_cache()
    return {"raised": raised, "mentions_stitchalloc": "stitchalloc" in message,
            "num_ooms": torch.cuda.memory_stats()["num_ooms"]}


out["stitchalloc_installed"] = args.way == "install" and __import__("stitchalloc").installed()
print(json.dumps(out))
