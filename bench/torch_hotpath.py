"""The allocator hot path as a PyTorch user sees it: nanoseconds per torch.empty + release on a GPU,
under PyTorch's native allocator and under stitchalloc, each in its own process (the allocator is
chosen before CUDA starts). Both figures include the same torch dispatch and Python overhead; the
difference between them is the allocators'.

    python bench/torch_hotpath.py [--json FILE]             # both allocators, a table
    python bench/torch_hotpath.py run --allocator native|stitchalloc   # one process, one JSON line

Patterns: one cached size (512 B, 64 KiB, 1 MiB, 8 MiB, 64 MiB: allocate, release, repeat), and
mixed (64 live tensors of seeded random sizes 512 B..16 MiB, each released and re-allocated at a
new size in turn). Each figure is the median of 5 timed rounds after a warm-up round.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

SIZES = [512, 64 << 10, 1 << 20, 8 << 20, 64 << 20]


def measure(alloc):
    import torch

    def cached(n, iters):
        for _ in range(iters):
            x = torch.empty(n, dtype=torch.uint8, device="cuda")
            del x

    def mixed(iters):
        rng = random.Random(7)
        live = [torch.empty(rng.randint(1, 32768) * 512, dtype=torch.uint8, device="cuda") for _ in range(64)]
        for i in range(iters):
            live[i % 64] = None
            live[i % 64] = torch.empty(rng.randint(1, 32768) * 512, dtype=torch.uint8, device="cuda")
        del live

    def timed(fn, iters):
        fn(iters)  # warm-up: fills the cache
        rounds = []
        for _ in range(5):
            t = time.perf_counter_ns()
            fn(iters)
            rounds.append((time.perf_counter_ns() - t) / iters)
        return statistics.median(rounds)

    torch.cuda.init()
    out = {"allocator": alloc, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "ns": {}}
    for n in SIZES:
        out["ns"][f"cached_{n}"] = timed(lambda k: cached(n, k), 20000)
    out["ns"]["mixed"] = timed(mixed, 20000)
    torch.cuda.synchronize()
    out["max_memory_reserved"] = torch.cuda.max_memory_reserved()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", nargs="?", default="compare", choices=["compare", "run"])
    p.add_argument("--allocator", default="native", choices=["native", "stitchalloc"])
    p.add_argument("--json")
    a = p.parse_args()
    if a.command == "run":
        if a.allocator == "stitchalloc":
            import stitchalloc

            stitchalloc.install()
        print(json.dumps(measure(a.allocator)), flush=True)
        return
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "LD_PRELOAD")}
    results = []
    for alloc in ("native", "stitchalloc"):
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "run", "--allocator", alloc], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{alloc}: {r.stderr[-3000:]}")
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"{'pattern':<16}" + "".join(f"{x['allocator'] + ' ns':>18}" for x in results))
    for key in results[0]["ns"]:
        print(f"{key:<16}" + "".join(f"{x['ns'][key]:>18.0f}" for x in results))
    print(f"device: {results[0]['device']}, torch {results[0]['torch']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
