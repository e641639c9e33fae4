"""FLOPs of one training step's layer stack, by mode, counted on the host (PyTorch's
FlopCounterMode over the aten operators a step runs; copies of an offload cost no FLOPs and are
left out: the InPlace stand-in keeps every tensor where it is).

    python bench/offload_flops.py [--dim 2048 --heads 16 --hidden 5632] [--seqs 256,512] [--at 389120]

Counted at the benchmark model's width (the projections' FLOPs grow with the width squared, the
attention core's with the width, so a narrower model would weigh them differently), for one
layer at two lengths, and split into the attention core (the fused SDPA kernel and its backward)
and everything else. Everything else is linear in the length and the core quadratic, so the two
counts give both per layer exactly; the table prints them at --at tokens, halving the core's
FLOPs for causal attention (the counter charges the full square; the flash kernels skip the
masked blocks). The loss, the same in every mode, is left out. The modes and their setup are
bench/offload_memory.py's.

What this says about speed is a count, not a timing: checkpointing recomputes the attention core
in its backward, token-wise recompute does not, and at long lengths the core is most of the work.
"""

import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from offload_backends import InPlace  # noqa: E402
from offload_memory import MODES, layer_stack, model_arguments, report  # noqa: E402


def is_core(op):
    return "scaled_dot_product" in str(op)


def step_flops(a, seq, mode):
    """(attention core FLOPs, other FLOPs) of one layer's forward and backward."""
    model, handle = layer_stack(a, 1, mode, InPlace())
    x = torch.randn(1, seq, a.dim, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, seq, a.dim, dtype=torch.bfloat16)
    with FlopCounterMode(display=False) as counter:
        (model.layers[0](x) * g).sum().backward()
    if handle is not None:
        handle.remove()
    counts = counter.get_flop_counts()["Global"]
    core = sum(v for op, v in counts.items() if is_core(op))
    if core == 0:
        raise SystemExit(f"offload_flops: torch {torch.__version__}'s FlopCounterMode counted no attention core "
                         f"FLOPs (it has no formula for the SDPA kernel this device runs); counted: "
                         f"{sorted(str(op) for op in counts)}")
    return core, sum(counts.values()) - core


def main():
    p = argparse.ArgumentParser()
    model_arguments(p)
    p.add_argument("--at", type=int, default=389120, help="the length to print the FLOPs at")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--recompute-chunk", type=int, default=128)
    p.add_argument("--json")
    a = p.parse_args()
    t1, t2 = [int(v) for v in a.seqs.split(",")]
    out = {"dim": a.dim, "heads": a.heads, "hidden": a.hidden, "seqs": [t1, t2], "at": a.at, "layers": a.layers,
           "modes": {}}
    print(f"FLOPs of one step of {a.layers} layers (dim {a.dim}, {a.heads} heads, MLP {a.hidden}) at {a.at} tokens, "
          f"causal attention, the loss left out; fitted from one layer at {t1} and {t2} tokens:")
    print(f"  {'mode':<11} {'core PFLOP':>10} {'other PFLOP':>11} {'total':>8}  {'vs checkpoint':>13}")
    rows = {}
    for mode in MODES:
        (c1, o1), (c2, o2) = step_flops(a, t1, mode), step_flops(a, t2, mode)
        core_per_t2, other_per_t = c2 / t2 ** 2, o2 / t2
        # The counts must follow the model (core quadratic, the rest linear): a check, not an assumption.
        if abs(c1 - core_per_t2 * t1 ** 2) > 1e-9 * c1 + 1 or abs(o1 - other_per_t * t1) > 1e-6 * o1 + 1:
            raise SystemExit(f"offload_flops: {mode}: counts are not core ~ T^2, rest ~ T ({c1}, {c2}, {o1}, {o2})")
        core = a.layers * 0.5 * core_per_t2 * a.at ** 2
        other = a.layers * other_per_t * a.at
        rows[mode] = (core, other)
        out["modes"][mode] = {"core_flops_per_token_squared": core_per_t2, "other_flops_per_token": other_per_t,
                              "core_flops": core, "other_flops": other}
    base = sum(rows["checkpoint"])
    for mode, (core, other) in rows.items():
        print(f"  {mode:<11} {core / 1e15:10.1f} {other / 1e15:11.2f} {(core + other) / 1e15:8.1f}  "
              f"{(core + other) / base:13.3f}")
    report(out, a.json)


if __name__ == "__main__":
    main()
