"""Bytes per token that one layer of the benchmark model keeps for its backward, by policy:
what PyTorch keeps on the device without offload, and what stitchalloc.offload swaps per layer
under "swap", alpha 0.5 and "recompute" (alpha 0). Counted by running the model (CPU is enough:
the counts depend on shapes and dtypes only; the CPU's fused attention kernel saves the same
output and float32 log-sum-exp as CUDA's flash kernel).

    python bench/offload_bytes.py [--dim 2048 --heads 16 --hidden 5632 --seq 256 --layers 2]

The swap manager is replaced by a counter that keeps every tensor where it is (no copies;
bench/offload_backends.py).
"""

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "models"))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import stitchalloc  # noqa: E402
import tiny_llama  # noqa: E402
from offload_backends import Counter  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--hidden", type=int, default=5632)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    torch.manual_seed(0)
    model = tiny_llama.TinyLlama(vocab=256, dim=a.dim, heads=a.heads, hidden=a.hidden, layers=a.layers,
                                 sdpa=True).to(getattr(torch, a.dtype))
    ids = torch.randint(0, 256, (1, a.seq + 1))
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    out = {"dim": a.dim, "heads": a.heads, "hidden": a.hidden, "seq": a.seq, "dtype": a.dtype}

    # Without offload: every storage a layer saves, counted once (the layer's own input included).
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x = model.embed_tokens(ids[:, :-1]).detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x).sum().backward()  # sum saves nothing
    out["native"] = sum(seen.values()) / a.seq
    for policy in ("swap", 0.5, "recompute"):
        counter = Counter()
        with stitchalloc.offload(model, policy=policy, backend=counter):
            model.loss(ids).backward()
        model.zero_grad(set_to_none=True)
        out[str(policy)] = counter.by_layer[0] / a.seq
    print(json.dumps(out))
    print(f"bytes per token one layer keeps ({a.dtype}, dim {a.dim}, {a.heads} heads, MLP {a.hidden}):")
    for k in ("native", "swap", "0.5", "recompute"):
        print(f"  {k:<10} {out[k] / 1024:8.2f} KiB")


if __name__ == "__main__":
    main()
