"""What offload's state check costs per container a module inside a token-wise block holds, by
its length, on the host.

A module that holds a container (an auxiliary-loss list, a log) has it copied before each
token-wise block call and compared after (stitchalloc._block_checks' _containers and
_same_contents), and a container or attribute is asked whether it holds a tensor
(_holds_tensor). This times the three for a list of N floats held by a module. A module with
buffers has them copied too, where the call may be undone (the forward's token-wise call; after
39e0ac2 not in the recompute's nor the watch's checks), and from 2026-11-24 so has a tensor
held in a plain attribute: the second table times the snapshot of a module holding one tensor of
N bytes as a buffer or a plain attribute, with and without the copy. timeit, best of --repeat;
us per call.

    .venv/bin/python bench/offload_container_scan.py   (PYTHONPATH=python, or stitchalloc installed)
"""

import argparse
import importlib
import platform
import timeit


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sizes", default="10,1000,100000")
    parser.add_argument("--buffer-sizes", default="65536,8388608")
    args = parser.parse_args()
    import torch

    try:  # the checks left offload.py for _block_checks.py on 2026-11-24
        checks = importlib.import_module("stitchalloc._block_checks")
    except ImportError:
        checks = importlib.import_module("stitchalloc.offload")
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}; "
          f"best of {args.repeat}; us per call")
    print(f"{'items':>8s} {'copy (_containers)':>19s} {'compare':>9s} {'holds tensor':>13s}")
    for n in map(int, args.sizes.split(",")):
        module = torch.nn.Module()
        module.log = [float(i) for i in range(n)]
        tables = module.__dict__
        entry = checks._containers(module, tables)[0]
        # 55f307f: (name, container, copy); after it: (name, [(container, copy), ...]), and from
        # 2026-11-24 (stop 34) (name, [(container, copy), ...], [tensor, ...]).
        container, copied = entry[1:3] if entry[1] is module.log else entry[1][0]
        number = max(1, 200000 // n)

        def best(fn):
            return min(timeit.repeat(fn, number=number, repeat=args.repeat)) / number * 1e6

        print(f"{n:8d} {best(lambda: checks._containers(module, tables)):19.2f} "
              f"{best(lambda: checks._same_contents(container, copied)):9.2f} "
              f"{best(lambda: checks._holds_tensor(module.log)):13.2f}")

    import inspect

    copies = "copies" in inspect.signature(checks._state_snapshot).parameters
    print()
    print(f"{'held as':>9s} {'bytes':>9s} {'snapshot, copy':>15s} {'snapshot, versions only':>24s}")
    for held in ("buffer", "attribute"):
        for n in map(int, args.buffer_sizes.split(",")):
            module = torch.nn.Module()
            if held == "buffer":
                module.register_buffer("packed", torch.zeros(n, dtype=torch.uint8))
            else:
                module.packed = torch.zeros(n, dtype=torch.uint8)  # watched from 2026-11-24 (stop 34)
            number = max(1, (1 << 24) // n)

            def best(fn):
                return min(timeit.repeat(fn, number=number, repeat=args.repeat)) / number * 1e6

            with_copy = best(lambda: checks._state_snapshot(torch, (module,)))
            without = (f"{best(lambda: checks._state_snapshot(torch, (module,), copies=False)):24.2f}" if copies
                       else f"{'(always copied)':>24s}")
            print(f"{held:>9s} {n:9d} {with_copy:15.2f} {without}")

if __name__ == "__main__":
    main()
