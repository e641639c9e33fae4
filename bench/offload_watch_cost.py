"""What the watch of the norms' outputs (stitchalloc._wiring) costs a layer's first calls, on the
host: how many torch functions pass through its mode in one first call of a transformers Llama
layer, what the mode adds to each, and the first iteration's median layer forward time (what
policy "auto" plans with) with the watch and with a watch that does nothing.

Only a layer's calls before one has split both blocks are watched (normally its first); every
later call runs without the mode. Under "auto" the first iteration is the measuring one, so the
watch's cost enters ``layer_forward_seconds``.

Usage: PYTHONPATH=python STITCHALLOC_LIBRARY_DIR=build/default/torch_plugin \
           .venv/bin/python bench/offload_watch_cost.py [--tokens 4096] [--repeat 5]
Raw output: bench/results/host-offload-watch-cost-<date>.txt.
"""

import argparse
import contextlib
import importlib
import os
import statistics
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))


class NullWatch:
    """A watch that watches nothing: no mode, no alias."""

    def __init__(self, i, layer):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def alias(self, t, norm):
        return t

    def returned(self, out):
        pass

    def which(self, value):
        return None


def model_of(transformers, args):
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=args.dim, intermediate_size=args.hidden,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.heads, max_position_embeddings=args.tokens + 1,
                                      attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).train()


def first_iteration(stitchalloc, RecordingBackend, model, ids, chunk):
    """A fresh offload's first step under "auto": the median layer forward time it measured."""
    with stitchalloc.offload(model, policy="auto", backend=RecordingBackend(), recompute_chunk=chunk) as off:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        model(input_ids=ids[:, :8], labels=ids[:, :8]).loss.backward()  # ends the first iteration: the plan
        return off.layer_forward_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1408)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=1024, help="recompute_chunk (tokens)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import transformers
    from test_offload import RecordingBackend

    import stitchalloc

    wiring = importlib.import_module("stitchalloc._wiring")
    offload_module = importlib.import_module("stitchalloc.offload")
    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = model_of(transformers, args)
    ids = torch.randint(0, 1024, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs; Llama "
          f"dim {args.dim}, MLP {args.hidden}, {args.heads} heads, {args.layers} layers, float32, "
          f"{args.tokens} tokens, recompute_chunk {args.chunk}")

    # 1. Torch functions through the mode in one layer's first call, and those it checked.
    names = offload_module._llama_names(model.model.layers[0])
    Watch = wiring._NormOutputWatch(torch, 0, model.model.layers[0], names).__class__
    seen = {"calls": 0, "checked": 0}
    dispatch = Watch.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        seen["calls"] += 1
        seen["checked"] += bool(self.watched)
        return dispatch(self, func, types, args, kwargs)

    Watch.__torch_function__ = counting
    try:
        first_iteration(stitchalloc, RecordingBackend, model, ids, args.chunk)
    finally:
        Watch.__torch_function__ = dispatch
    per_layer = {k: v / args.layers for k, v in seen.items()}
    print(f"torch functions through the mode, per layer first call: {per_layer['calls']:.0f} "
          f"({per_layer['checked']:.0f} with a norm's output watched, their arguments scanned)")

    # 2. What the mode adds to one torch function: a small add with a watched alias alive.
    a = torch.ones(8)
    n = 100_000

    def adds():
        start = time.perf_counter()
        for _ in range(n):
            a.add(1)
        return (time.perf_counter() - start) / n

    plain = min(adds() for _ in range(args.repeat))
    watch = Watch(0, model.model.layers[0], names)
    watch.alias(torch.zeros(4), names[:2])
    with watch:
        watched = min(adds() for _ in range(args.repeat))
    extra = watched - plain
    print(f"one torch function (Tensor.add of 8 floats): {plain * 1e6:.2f} us plain, {watched * 1e6:.2f} us under "
          f"the mode: +{extra * 1e6:.2f} us; x {per_layer['calls']:.0f} = {extra * per_layer['calls'] * 1e3:.3f} ms "
          "per layer first call")

    # 3. The first iteration's median layer forward time, with the watch and with a null one, interleaved.
    times = {"watch": [], "null": []}
    real = offload_module._NormOutputWatch
    for r in range(args.repeat):
        for kind in (("watch", "null") if r % 2 == 0 else ("null", "watch")):  # each first as often
            offload_module._NormOutputWatch = real if kind == "watch" else (lambda _, i, layer, n: NullWatch(i, layer))
            try:
                times[kind].append(first_iteration(stitchalloc, RecordingBackend, model, ids, args.chunk))
            finally:
                offload_module._NormOutputWatch = real
    for kind, values in times.items():
        print(f"layer_forward_seconds, first iteration, {kind:5s}: median {statistics.median(values) * 1e3:8.2f} ms, "
              f"min {min(values) * 1e3:8.2f} ms, of {len(values)}: " + " ".join(f"{v * 1e3:.2f}" for v in values))
    w, z = statistics.median(times["watch"]), statistics.median(times["null"])
    print(f"difference of the medians: {(w - z) * 1e3:+.2f} ms ({(w - z) / z * 100:+.1f}%); of the minima: "
          f"{(min(times['watch']) - min(times['null'])) * 1e3:+.2f} ms")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
