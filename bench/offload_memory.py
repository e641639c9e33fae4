"""Peak memory of one training step's layer stack, by mode, counted on the host: the bytes of
every tensor storage created during the step that is alive at the same time (a dispatch mode
watches each operator's outputs; parameters and inputs, created before, do not count, nor do
tensors of a parameter's shape: gradients). "Offloaded" tensors leave for a separate store when their layer's forward ends and come back
one layer ahead of their backward, as stitchalloc's swap manager moves them (its last layer
stays; every tensor is moved whatever its size), so what is counted is what would be on the GPU.

    python bench/offload_memory.py [--dim 2048 --heads 16 --hidden 5632] [--layers 2,4] [--seqs 256,512]

From two layer counts and two lengths it fits peak = fixed + tokens x (per_token_base + layers x
per_token_layer) and prints the bytes per token each mode needs on the device. The loss is left out
(a sum against a fixed tensor, nothing saved); bench/offload_seq.py's chunked loss adds its
chunk's logits, a constant. These are estimates of device memory from the host: the CPU's
attention kernel and allocator are not the GPU's, and nothing here is a GPU measurement.
"""

import argparse
import json
import os
import sys

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "models"))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import stitchalloc  # noqa: E402
import tiny_llama  # noqa: E402
from offload_backends import Mover  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Peak of the summed sizes of the storages created under it and still alive, leaving out
    tensors of a parameter's shape (gradients, new or accumulated: a constant of the model)."""

    def __init__(self, parameter_shapes=()):
        super().__init__()
        self.live = {}  # StorageImpl address -> (weak reference, bytes)
        self.current = 0
        self.peak = 0
        self.skip = set(parameter_shapes)

    def prune(self):
        """Forgets the storages that died since the last operator."""
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.prune()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and tuple(t.shape) not in self.skip:
                st = t.untyped_storage()
                ref = StorageWeakRef(st)
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


MODES = ("native", "checkpoint", "swap", "alpha 0.5", "alpha 0")


def layer_stack(a, layers, mode, backend):
    """TinyLlama at a's width (bf16, SDPA attention, seeded) set up for `mode`, one of MODES:
    the model, and the offload handle (None but for the offload modes, which use `backend` as
    the swap manager and a.recompute_chunk)."""
    torch.manual_seed(0)
    model = tiny_llama.TinyLlama(vocab=256, dim=a.dim, heads=a.heads, hidden=a.hidden, layers=layers,
                                 sdpa=True).to(torch.bfloat16)
    handle = None
    if mode == "checkpoint":
        model.checkpoint_layers()
    elif mode != "native":
        policy = {"swap": "swap", "alpha 0.5": 0.5, "alpha 0": "recompute"}[mode]
        handle = stitchalloc.offload(model, layers=list(model.layers), policy=policy, backend=backend,
                                     recompute_chunk=a.recompute_chunk)
    return model, handle


def report(out, path):
    """The figures as one JSON line, and into `path` when given."""
    print(json.dumps(out))
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)


def step_peak(a, layers, seq, mode):
    model, handle = layer_stack(a, layers, mode, Mover(layers))
    x0 = torch.randn(1, seq, a.dim, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(1, seq, a.dim, dtype=torch.bfloat16)

    def run():
        x = x0
        for layer in model.layers:
            x = layer(x)
        (x * g).sum().backward()

    # Gradients are a constant of the model (with the weights and the optimizer's state), not
    # of the length; counted, they would move the step's peak from one layer to another as the
    # length changes, and the fit below would mix them into the per-token figures.
    counter = LiveBytes(tuple(q.shape) for q in model.parameters())
    with counter:
        run()
    if handle is not None:
        handle.remove()
    return counter.peak


def model_arguments(p):
    """The benchmark model's shape (the 1B model's by default) and the two lengths fitted."""
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--hidden", type=int, default=5632)
    p.add_argument("--seqs", default="256,512")


def main():
    p = argparse.ArgumentParser()
    model_arguments(p)
    p.add_argument("--layers", default="2,4")
    p.add_argument("--recompute-chunk", type=int, default=512,
                   help="stitchalloc.offload's recompute_chunk: much shorter than the lengths, as 8192 (the default) "
                        "is against the lengths that need offload; its chunk's memory is a constant, not per token")
    p.add_argument("--json")
    a = p.parse_args()
    (l1, l2), (t1, t2) = [int(v) for v in a.layers.split(",")], [int(v) for v in a.seqs.split(",")]
    out = {"dim": a.dim, "heads": a.heads, "hidden": a.hidden, "layers": [l1, l2], "seqs": [t1, t2],
           "recompute_chunk": a.recompute_chunk, "modes": {}}
    print(f"device bytes per token of the layer stack (bf16, dim {a.dim}, {a.heads} heads, MLP {a.hidden}, offload's "
          f"recompute_chunk {a.recompute_chunk}), from peaks at {l1}/{l2} layers x {t1}/{t2} tokens:")
    print(f"  {'mode':<11} {'per layer':>10} {'base':>10}   {'16 layers':>10}")
    if len({t1, t2, l1, l2} & {a.dim, a.hidden, 256}) or t1 == t2 or l1 == l2:
        raise SystemExit("offload_memory: lengths must differ from each other and from the model's dimensions "
                         "(tensors of a parameter's shape are left out), and so must the layer counts")
    for mode in MODES:
        peaks = {(n, t): step_peak(a, n, t, mode) for n in (l1, l2) for t in (t1, t2)}
        slope = {n: (peaks[(n, t2)] - peaks[(n, t1)]) / (t2 - t1) for n in (l1, l2)}
        per_layer = (slope[l2] - slope[l1]) / (l2 - l1)
        base = slope[l1] - l1 * per_layer
        out["modes"][mode] = {"peaks": {f"{n}x{t}": v for (n, t), v in peaks.items()},
                              "per_token_per_layer": per_layer, "per_token_base": base}
        print(f"  {mode:<11} {per_layer / 1024:8.2f} KiB {base / 1024:8.2f} KiB   "
              f"{(base + 16 * per_layer) / 1024:8.1f} KiB", flush=True)
    report(out, a.json)


if __name__ == "__main__":
    main()
