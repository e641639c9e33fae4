"""Longest trainable sequence, tokens/s and MFU for a randomly initialised Llama-family model on one
GPU, under PyTorch's allocator without and with full activation checkpointing and under
stitchalloc offload (issue 6, item 7; docs/offload.md). Written before any GPU session ran it.

One probe (one process: an OOM leaves nothing behind):
    python bench/offload_seq.py probe --mode native|checkpoint|offload --seq N [--policy auto]
prints one JSON line: ok, oom, seconds per step, tokens/s, MFU, peak reserved / allocated.

The search (doubling, then bisection to --resolution tokens, one process per probe), then tokens/s
and MFU at each mode's longest length and, for offload, at checkpoint's longest length:
    python bench/offload_seq.py search [--modes native,checkpoint,offload] [--json FILE]

Model (default about 1.1B parameters): --dim 2048 --layers 16 --heads 16 --hidden 5632
--vocab 32000, bf16 weights, AdamW, batch 1, SDPA attention, the loss in chunks of --loss-chunk
tokens in every mode (8192; 0 computes it whole, as the 2026-11-22 H100 figures did). MFU = tokens/s * (6 * parameters +
12 * layers * dim * seq) / peak FLOP/s (--peak-tflops, default 989: H100 SXM dense bf16).
--device cpu runs the same code on the CPU with tiny shapes (the CI smoke test; no offload there).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def args_parser():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["probe", "search"])
    p.add_argument("--mode", default="native", choices=["native", "checkpoint", "offload"])
    p.add_argument("--modes", default="native,checkpoint,offload")
    p.add_argument("--policy", default="auto", help="offload policy: auto, swap, recompute or an alpha")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--hidden", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--conf", default="", help="stitchalloc.install() keys for --mode offload")
    p.add_argument("--loss-chunk", type=int, default=8192,
                   help="tokens per chunk of the final norm, LM head and loss (recomputed in backward); 0: the whole "
                        "sequence at once, as the 2026-11-22 H100 figures were measured")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--start", type=int, default=2048)
    p.add_argument("--limit", type=int, default=1 << 20)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--json")
    return p


def probe(a):
    if a.mode == "offload":
        import stitchalloc

        stitchalloc.install(a.conf)
    import torch

    sys.path.insert(0, os.path.join(HERE, "..", "tests", "models"))
    import tiny_llama

    dev = torch.device(a.device)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = tiny_llama.TinyLlama(vocab=a.vocab, dim=a.dim, heads=a.heads, hidden=a.hidden, layers=a.layers,
                                 sdpa=True).to(dev, dtype)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    handle = None
    if a.mode == "checkpoint":
        import torch.utils.checkpoint as cp

        for layer in model.layers:
            original = layer.forward
            layer.forward = (lambda f: lambda *x, **k: cp.checkpoint(f, *x, use_reentrant=False, **k))(original)
    elif a.mode == "offload":
        import stitchalloc

        policy = a.policy if a.policy in ("auto", "swap", "recompute") else float(a.policy)
        handle = stitchalloc.offload(model, policy=policy)
    ids = torch.randint(0, a.vocab, (1, a.seq + 1), device=dev)
    out = {"mode": a.mode, "seq": a.seq, "params": params, "ok": False, "oom": False, "device": a.device,
           "loss_chunk": a.loss_chunk}

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    try:
        times = []
        for step in range(a.steps + 1):
            sync()
            t0 = time.perf_counter()
            loss = model.loss(ids, chunk=a.loss_chunk)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if step > 0:
                times.append(time.perf_counter() - t0)
        seconds = sorted(times)[len(times) // 2]
        flops = 6 * params + 12 * a.layers * a.dim * a.seq
        out.update(ok=True, loss=float(loss), seconds_per_step=seconds, tokens_per_second=a.seq / seconds,
                   mfu=a.seq / seconds * flops / (a.peak_tflops * 1e12))
    except torch.OutOfMemoryError as e:
        out.update(oom=True, error=str(e).splitlines()[0][:300])
    if a.device == "cuda":
        out.update(peak_reserved=torch.cuda.max_memory_reserved(), peak_allocated=torch.cuda.max_memory_allocated(),
                   gpu=torch.cuda.get_device_name())
    if handle is not None:
        out["offload"] = handle.stats()
        out["plan"] = handle.plan_text
        import stitchalloc

        out["swap_stats"] = stitchalloc.swap.swap_stats()
    print(json.dumps(out), flush=True)


def run_probe(a, mode, seq):
    cmd = [sys.executable, os.path.abspath(__file__), "probe", "--mode", mode, "--seq", str(seq)]
    for k in ("steps", "dim", "layers", "heads", "hidden", "vocab", "device", "conf", "policy", "peak_tflops",
              "loss_chunk"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "LD_PRELOAD",
                                                            "STITCHALLOC_AUTO_INSTALL")}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "seq": seq, "ok": False, "oom": False, "error": "timeout"}
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"mode": mode, "seq": seq, "ok": False, "oom": False, "error": r.stderr[-600:]}
    return json.loads(lines[-1])


def longest(a, mode, log):
    ok, bad, seq = None, None, a.start
    while seq <= a.limit:
        r = run_probe(a, mode, seq)
        log.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
        if not r["ok"]:
            bad = seq
            break
        ok, seq = r, seq * 2
    if ok is None:
        return None
    lo, hi = ok["seq"], bad if bad is not None else None
    while hi is not None and hi - lo > a.resolution:
        mid = (lo + hi) // 2 // a.resolution * a.resolution or lo + a.resolution
        r = run_probe(a, mode, mid)
        log.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
        if r["ok"]:
            ok, lo = r, mid
        else:
            hi = mid
    return ok


def search(a):
    modes = [m for m in a.modes.split(",") if m]
    log, best = [], {}
    for mode in modes:
        best[mode] = longest(a, mode, log)
    extra = {}
    if "offload" in best and best.get("checkpoint"):
        extra["offload_at_checkpoint_longest"] = run_probe(a, "offload", best["checkpoint"]["seq"])
    result = {"longest": best, "extra": extra, "probes": log, "args": vars(a),
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    print("mode        longest seq   tokens/s      MFU")
    for mode, r in best.items():
        if r is None:
            print(f"{mode:<11} none (the first probe at {a.start} failed)")
        else:
            print(f"{mode:<11} {r['seq']:>11}   {r['tokens_per_second']:>9.1f}   {r['mfu']:.3f}")
    if extra:
        r = extra["offload_at_checkpoint_longest"]
        print(f"offload at checkpoint's longest ({r['seq']}): ok={r['ok']} tokens/s={r.get('tokens_per_second')}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    a = args_parser().parse_args()
    probe(a) if a.command == "probe" else search(a)
