"""Longest trainable sequence, tokens/s and MFU for a randomly initialised Llama-family model on one
GPU, under PyTorch's allocator without and with full activation checkpointing and under
stitchalloc offload (issue 6, item 7; docs/offload.md). Written before any GPU session ran it.

One probe (one process: an OOM leaves nothing behind):
    python bench/offload_seq.py probe --mode native|checkpoint|offload|offload-nocopy --seq N [--policy auto]
prints one JSON line: ok, oom, seconds per step, tokens/s, MFU, peak reserved / allocated, and for
offload the copy engine's busy seconds per step. offload-nocopy runs the same hooks and recompute
with every saved tensor left in place (bench/offload_backends.py; no stitchalloc needed).
native-stitchalloc and checkpoint-stitchalloc are native and checkpoint with stitchalloc.install()
(--conf) as the allocator and no offload: what stitching alone changes (on 2026-11-24 PyTorch's
allocator ran checkpoint's first step at 389,120 tokens and then ran out of memory with
15.21 GiB reserved but unallocated).

The search (doubling, then bisection to --resolution tokens, one process per probe), then tokens/s
and MFU at each mode's longest length and, for offload, at checkpoint's longest length, and the
fraction of copy time hidden behind compute: at native's longest length, 1 - (step time with
offload - step time of offload-nocopy at the same alpha) / copy engine busy time, clamped to [0, 1]
(alone, at --seq N: `python bench/offload_seq.py hiding --seq N`):
    python bench/offload_seq.py search [--modes native,checkpoint,offload] [--json FILE]

Model (default about 1.1B parameters): --dim 2048 --layers 16 --heads 16 --hidden 5632
--vocab 32000, bf16 weights, AdamW, batch 1, SDPA attention, the loss in chunks of --loss-chunk
tokens in every mode (8192; 0 computes it whole, as the 2026-11-22 H100 figures did).
MFU = tokens/s * (6 * parameters + 6 * layers * dim * seq) / peak FLOP/s (--peak-tflops, default
989: H100 SXM dense bf16): model FLOPs per token, attention counted causal (half of the
12 L d T of full attention, which the 2026-11-22 figures used, overstating MFU at long lengths).
--device cpu runs the same code on the CPU with tiny shapes (the CI smoke test; no offload there).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def args_parser():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["probe", "search", "hiding"])
    p.add_argument("--mode", default="native", choices=["native", "checkpoint", "offload", "offload-nocopy",
                                                        "native-stitchalloc", "checkpoint-stitchalloc"])
    p.add_argument("--modes", default="native,checkpoint,offload")
    p.add_argument("--policy", default="auto", help="offload policy: auto, swap, recompute or an alpha")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps after one warm-up step; 0: the warm-up step only (whether the length fits, "
                        "and that step's time, one-time costs included, as first_step_seconds)")
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
    p.add_argument("--recompute-chunk", type=int, default=8192,
                   help="offload: tokens per chunk of a layer's recomputed MLP block (stitchalloc.offload's "
                        "recompute_chunk; 0: all at once, as before 2026-11-22's fourth stop)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--start", type=int, default=2048)
    p.add_argument("--limit", type=int, default=1 << 20)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--json")
    return p


def probe(a):
    base = a.mode.removesuffix("-stitchalloc")  # native or checkpoint under stitchalloc's allocator
    if a.mode == "offload" or base != a.mode:
        if a.device != "cuda":
            sys.exit(f"offload_seq: --mode {a.mode} needs --device cuda (stitchalloc allocates CUDA memory)")
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
    if base == "checkpoint":
        model.checkpoint_layers()
    elif a.mode in ("offload", "offload-nocopy"):
        import stitchalloc

        policy = a.policy if a.policy in ("auto", "swap", "recompute") else float(a.policy)
        backend = None
        if a.mode == "offload-nocopy":  # the same recompute, every saved tensor left in place
            sys.path.insert(0, HERE)
            from offload_backends import InPlace

            backend = InPlace()
        handle = stitchalloc.offload(model, policy=policy, backend=backend, recompute_chunk=a.recompute_chunk)
    ids = torch.randint(0, a.vocab, (1, a.seq + 1), device=dev)
    out = {"mode": a.mode, "seq": a.seq, "params": params, "ok": False, "oom": False, "device": a.device,
           "loss_chunk": a.loss_chunk, "recompute_chunk": a.recompute_chunk}

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    def copy_seconds():
        if a.mode != "offload":
            return 0.0
        import stitchalloc

        st = stitchalloc.swap.swap_stats()
        return st["copy.d2h_seconds"] + st["copy.h2d_seconds"]

    class Terminated(Exception):
        pass

    def terminated(signum, frame):
        raise Terminated(signal.Signals(signum).name)

    times = []
    out["steps_done"] = 0
    # `timeout` (scripts/gpu.sh probes) sends SIGTERM: the steps done so far are still reported.
    signal.signal(signal.SIGTERM, terminated)
    try:
        copy_start = None
        for step in range(a.steps + 1):
            sync()
            if step == 1:
                copy_start = copy_seconds()
            t0 = time.perf_counter()
            loss = model.loss(ids, chunk=a.loss_chunk)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            seconds = time.perf_counter() - t0
            if step > 0:
                times.append(seconds)
            else:
                out["first_step_seconds"] = seconds
            out["steps_done"] = step + 1
            # One line a step on stderr, so that a run cut off later still shows what it did.
            progress = {"progress": f"{a.mode} at {a.seq}", "step": step, "seconds": round(seconds, 3),
                        "loss": float(loss.detach())}
            if a.device == "cuda":
                progress.update(reserved=torch.cuda.memory_reserved(), peak_reserved=torch.cuda.max_memory_reserved())
            print(json.dumps(progress), file=sys.stderr, flush=True)
        out.update(ok=True, loss=float(loss.detach()))
        if times:
            seconds = sorted(times)[len(times) // 2]
            flops = 6 * params + 6 * a.layers * a.dim * a.seq  # causal attention: half of 12 L d T
            out.update(seconds_per_step=seconds, tokens_per_second=a.seq / seconds,
                       mfu=a.seq / seconds * flops / (a.peak_tflops * 1e12))
            if a.mode == "offload":  # the copy engine's busy time per timed step, both directions summed
                out["copy_seconds_per_step"] = (copy_seconds() - copy_start) / a.steps
    except torch.OutOfMemoryError as e:
        out.update(oom=True, error=str(e).splitlines()[0][:300])
    except Terminated as e:
        out.update(error=f"terminated by {e} after {out['steps_done']} of {a.steps + 1} steps",
                   step_seconds=times)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if a.device == "cuda":
        out.update(peak_reserved=torch.cuda.max_memory_reserved(), peak_allocated=torch.cuda.max_memory_allocated(),
                   gpu=torch.cuda.get_device_name())
    if handle is not None:
        out["offload"] = handle.stats()
        out["plan"] = handle.plan_text
        if a.mode == "offload":
            import stitchalloc

            out["swap_stats"] = stitchalloc.swap.swap_stats()
    print(json.dumps(out), flush=True)


def run_probe(a, mode, seq, policy=None):
    cmd = [sys.executable, os.path.abspath(__file__), "probe", "--mode", mode, "--seq", str(seq)]
    for k in ("steps", "dim", "layers", "heads", "hidden", "vocab", "device", "conf", "policy", "peak_tflops",
              "loss_chunk", "recompute_chunk"):
        value = policy if k == "policy" and policy is not None else getattr(a, k)
        cmd += [f"--{k.replace('_', '-')}", str(value)]
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


def hidden_fraction(offload, nocopy):
    """The fraction of the copy engine's busy time that did not lengthen the step: the step with
    copies against the same step (same alpha, same recompute) with every tensor left in place."""
    copy = offload.get("copy_seconds_per_step", 0.0)
    if not (offload.get("ok") and nocopy.get("ok")) or copy <= 0:
        return None
    exposed = max(0.0, offload["seconds_per_step"] - nocopy["seconds_per_step"])
    return max(0.0, 1.0 - exposed / copy)


def copy_hiding(a, best=None):
    """At a length where keeping every tensor in place still fits (native's longest in a search,
    else --seq): offload, then the same alpha without copies."""
    seq = best["native"]["seq"] if best and best.get("native") else a.seq
    off = run_probe(a, "offload", seq)
    alpha = (off.get("offload") or {}).get("alpha")
    policy = "swap" if alpha is None or alpha >= 1.0 else repr(float(alpha))
    nocopy = run_probe(a, "offload-nocopy", seq, policy=policy)
    return {"seq": seq, "alpha": alpha, "offload": off, "nocopy": nocopy, "hidden_fraction": hidden_fraction(off, nocopy)}


def search(a):
    modes = [m for m in a.modes.split(",") if m]
    log, best = [], {}
    for mode in modes:
        best[mode] = longest(a, mode, log)
    extra = {}
    if "offload" in best and best.get("checkpoint"):
        extra["offload_at_checkpoint_longest"] = run_probe(a, "offload", best["checkpoint"]["seq"])
    if best.get("offload") and a.device == "cuda":
        extra["copy_hiding"] = copy_hiding(a, best)
    result = {"longest": best, "extra": extra, "probes": log, "args": vars(a),
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    print("mode        longest seq   tokens/s      MFU")
    for mode, r in best.items():
        if r is None:
            print(f"{mode:<11} none (the first probe at {a.start} failed)")
        else:
            speed = (f"{r['tokens_per_second']:>9.1f}   {r['mfu']:.3f}" if "tokens_per_second" in r
                     else "(--steps 0: not timed)")
            print(f"{mode:<11} {r['seq']:>11}   {speed}")
    if "offload_at_checkpoint_longest" in extra:
        r = extra["offload_at_checkpoint_longest"]
        print(f"offload at checkpoint's longest ({r['seq']}): ok={r['ok']} tokens/s={r.get('tokens_per_second')}")
    if "copy_hiding" in extra:
        h = extra["copy_hiding"]
        print(f"copy time hidden at {h['seq']} tokens (alpha {h['alpha']}): {h['hidden_fraction']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    a = args_parser().parse_args()
    if a.command == "probe":
        probe(a)
    elif a.command == "search":
        search(a)
    else:
        print(json.dumps(copy_hiding(a)))
