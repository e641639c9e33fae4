"""Peak memory of one pipeline stage's step with several micro-batches in flight, counted on the
host as bench/offload_memory.py counts it (storages created during the step and alive at once;
gradients left out), with offloaded tensors moved as stitchalloc's swap manager moves them
(offload_backends.Mover: a layer's tensors leave at its forward end, the last layer's stay, and
come back when the backward of the layer above begins in the same forward pass).

    python bench/offload_micro_batches.py [--dim 512 --heads 4 --hidden 1408] [--layers 6] [--seq 256]

Schedules over m micro-batches: GPipe (every forward, then every backward), 1F1B (two forwards
in flight: F0 F1 B0 F2 B1 ... ) and summed (every forward, one backward of the summed losses).
Printed: the peak in MiB and "late", the tensors used while still on the host (brought back by
no backward). A figure from the host's allocator-free count, not a GPU measurement.
"""

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from offload_backends import Mover  # noqa: E402
from offload_memory import LiveBytes, layer_stack, report  # noqa: E402


class LateCounting(Mover):
    """Mover that counts the tensors waited for while still on the host."""

    def __init__(self, layers):
        super().__init__(layers)
        self.late = 0

    def wait_storage(self, ticket):
        if ticket in self.host:
            self.late += 1
        return super().wait_storage(ticket)


def gpipe(run, m):
    for loss in [run(k) for k in range(m)]:
        loss.backward()


def one_f_one_b(run, m):
    pending = [run(0)]
    for k in range(1, m):
        pending.append(run(k))
        pending.pop(0).backward()
    for loss in pending:
        loss.backward()


def summed(run, m):
    sum(run(k) for k in range(m)).backward()


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "summed": summed}


def step_peak(a, schedule, m, mode):
    backend = LateCounting(a.layers)
    model, handle = layer_stack(a, a.layers, mode, backend)
    torch.manual_seed(1)
    xs = [torch.randn(1, a.seq, a.dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(m)]
    g = torch.randn(1, a.seq, a.dim, dtype=torch.bfloat16)

    def run(k):
        x = xs[k]
        for layer in model.layers:
            x = layer(x)
        return (x * g).sum()

    counter = LiveBytes(tuple(q.shape) for q in model.parameters())
    with counter:
        SCHEDULES[schedule](run, m)
    if handle is not None:
        handle.remove()
    return counter.peak, backend.late


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1408)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batches", default="1,2,4")
    p.add_argument("--recompute-chunk", type=int, default=128)
    p.add_argument("--json")
    a = p.parse_args()
    ms = [int(v) for v in a.micro_batches.split(",")]
    modes = ("native", "swap", "alpha 0.5")
    out = {"dim": a.dim, "heads": a.heads, "hidden": a.hidden, "layers": a.layers, "seq": a.seq, "rows": []}
    print(f"peak MiB of a {a.layers}-layer stage's step (bf16, dim {a.dim}, {a.heads} heads, MLP {a.hidden}, "
          f"{a.seq} tokens a micro-batch); late: tensors used while still on the host")
    print(f"  {'schedule':<8} {'m':>2}  " + "  ".join(f"{mode:>16}" for mode in modes))
    for schedule in SCHEDULES:
        for m in ms:
            if m == 1 and schedule != "gpipe":
                continue  # one micro-batch: every schedule is the same step
            cells = []
            for mode in modes:
                peak, late = step_peak(a, schedule, m, mode)
                out["rows"].append({"schedule": schedule, "micro_batches": m, "mode": mode, "peak_bytes": peak,
                                    "late": late})
                cells.append(f"{peak / 2**20:9.1f} late {late:2d}")
            print(f"  {schedule:<8} {m:>2}  " + "  ".join(f"{c:>16}" for c in cells), flush=True)
    report(out, a.json)


if __name__ == "__main__":
    main()
