"""A randomly initialised Llama-style decoder (no downloads) trained for a few steps; prints one
JSON line with what tests/gpu/test_torch_gpu.py compares across allocators.

    python tests/gpu/llama_job.py --way native|install|env|preload [--steps N] [--vary-seq]
                                  [--graph] [--compile] [--snapshot FILE]

`--way` only tells the job how it was started (the env and preload ways are set up by the
caller); `install` calls stitchalloc.install() before any CUDA use. Deterministic: fixed seeds,
deterministic algorithms, TF32 off.
"""

import argparse
import json
import os
import sys

p = argparse.ArgumentParser()
p.add_argument("--way", required=True, choices=["native", "install", "env", "preload"])
p.add_argument("--steps", type=int, default=20)
p.add_argument("--vary-seq", action="store_true", help="a different sequence length every step")
p.add_argument("--graph", action="store_true",
               help="also capture a CUDA graph, empty the cache, and replay it")
p.add_argument("--compile", action="store_true",
               help="train the model under torch.compile(mode='reduce-overhead') (CUDA graph trees)")
p.add_argument("--snapshot", help="record memory history and dump a snapshot here")
args = p.parse_args()

if args.way == "install":
    import stitchalloc

    stitchalloc.install(os.environ.get("STITCHALLOC_TEST_CONF", ""))

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.manual_seed(0)
torch.use_deterministic_algorithms(True)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
dev = torch.device("cuda")

DIM, HEADS, LAYERS, FFN, VOCAB = 512, 8, 6, 1408, 8192


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
import tiny_llama  # noqa: E402  (Llama-family layers, transformers' module names)


def Llama():
    return tiny_llama.TinyLlama(vocab=VOCAB, dim=DIM, heads=HEADS, hidden=FFN, layers=LAYERS)


if args.snapshot:
    torch.cuda.memory._record_memory_history(max_entries=100000)
model = Llama().to(dev)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
forward = torch.compile(model, mode="reduce-overhead") if args.compile else model
gen = torch.Generator().manual_seed(1)
losses, consistent = [], True
for step in range(args.steps):
    seq = 128 + 64 * ((step * 7) % 13) if args.vary_seq else 512
    ids = torch.randint(0, VOCAB, (4, seq + 1), generator=gen).to(dev)
    if args.compile:
        torch.compiler.cudagraph_mark_step_begin()
    logits = forward(ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
    # Allocated bytes cover at least the parameters and optimizer state alive now.
    live = sum(p.numel() * p.element_size() for p in model.parameters())
    live += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    consistent = consistent and torch.cuda.memory_allocated() >= live
    consistent = consistent and torch.cuda.memory_reserved() >= torch.cuda.memory_allocated()

import stitchalloc  # noqa: E402  (never installs by itself)

result = {
    "way": args.way,
    "stitchalloc": stitchalloc.installed(),
    "losses": losses,
    "stats_consistent": consistent,
    "max_memory_reserved": torch.cuda.max_memory_reserved(),
    "max_memory_allocated": torch.cuda.max_memory_allocated(),
    "stats_keys": sorted(torch.cuda.memory_stats().keys()),
}

if args.graph:
    static_in = torch.randn(64, DIM, device=dev)
    lin = nn.Linear(DIM, DIM).to(dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            lin(static_in)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = lin(static_in).relu()  # lin's output: freed during the capture, used by every replay
    # A graph's pool keeps its memory mapped: emptying the cache before replaying must not take it.
    torch.cuda.empty_cache()
    ok = True
    for i in range(5):
        static_in.copy_(torch.randn(64, DIM, device=dev))
        g.replay()
        ok = ok and torch.equal(static_out, lin(static_in).relu())
    pool = g.pool()
    del g, static_out
    torch.cuda.synchronize()
    result["graph_replay_equal"] = ok
    result["graph_pool"] = list(pool)

if args.snapshot:
    torch.cuda.memory._dump_snapshot(args.snapshot)
    torch.cuda.memory._record_memory_history(enabled=None)

print(json.dumps(result))
