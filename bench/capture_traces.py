"""Allocation traces recorded on a GPU from process start, and the peak reserved memory that torch
reports for the same training runs under each allocator (issue 4, item 7; docs/trace-format.md).

A run (one process, so that the allocator is chosen before CUDA starts):
    python bench/capture_traces.py run --setting varlen|ckpt|frozen --allocator native|expandable|stitchalloc
                                       [--record FILE.pickle] [--steps N]
prints one JSON line: setting, allocator, losses, max_memory_reserved/allocated (torch's figures).
With --record, torch.cuda.memory._record_memory_history is on before the first CUDA allocation and
the snapshot is dumped at the end (from process start: the trace has every segment allocation).

Everything (3 settings x 3 allocators, the native runs recorded, converted with
stitchalloc.convert and replayed with --validate_segments):
    python bench/capture_traces.py all --out DIR [--replay build/default/bench/stitchalloc-replay]
writes DIR/<setting>.trace.gz (the project data), DIR/capture.json (torch's figures per run) and
DIR/replay.json + DIR/replay.txt (the replay of the captured traces).

Settings (a randomly initialised Llama-style decoder, tests/models/tiny_llama.py, bf16 weights,
AdamW, no downloads):
  varlen   a different sequence length every step (256..4096 tokens)
  ckpt     the same lengths with full activation checkpointing of every layer
  frozen   LoRA-like fine-tuning: base weights frozen, rank-16 adapters on q/v trained
--device cpu runs the same code with tiny shapes and no memory history (the CI smoke test).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETTINGS = ("varlen", "ckpt", "frozen")
ALLOCATORS = ("native", "expandable", "stitchalloc")


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["run", "all"])
    p.add_argument("--setting", default="varlen", choices=SETTINGS)
    p.add_argument("--allocator", default="native", choices=ALLOCATORS)
    p.add_argument("--record", help="run: dump the memory snapshot (from process start) here")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-min", type=int, default=256)
    p.add_argument("--seq-max", type=int, default=4096)
    p.add_argument("--out", help="all: output folder")
    p.add_argument("--replay", default=os.path.join(ROOT, "build", "default", "bench", "stitchalloc-replay"))
    return p


def seq_lengths(a):
    """Deterministic lengths covering [seq_min, seq_max] in an order that is neither rising nor falling."""
    span = a.seq_max - a.seq_min
    return [a.seq_min + (span * ((7 * i) % 11)) // 10 // 8 * 8 for i in range(a.steps)]


def run(a):
    if a.device == "cuda" and a.record:
        # Before torch touches CUDA: the snapshot then holds every segment from the first one.
        import torch

        torch.cuda.memory._record_memory_history(context=None, max_entries=1_000_000)
    if a.allocator == "stitchalloc":
        import stitchalloc

        stitchalloc.install(os.environ.get("STITCHALLOC_CAPTURE_CONF", ""))
    import torch
    import torch.nn as nn

    sys.path.insert(0, os.path.join(ROOT, "tests", "models"))
    import tiny_llama

    torch.manual_seed(0)
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = tiny_llama.TinyLlama(vocab=a.vocab, dim=a.dim, heads=a.heads, hidden=a.hidden, layers=a.layers,
                                 sdpa=True).to(dev, dtype)
    if a.setting == "ckpt":
        model.checkpoint_layers()
    if a.setting == "frozen":

        class LoRA(nn.Module):
            def __init__(self, base, rank=16):
                super().__init__()
                self.base = base
                self.down = nn.Linear(base.in_features, rank, bias=False)
                self.up = nn.Linear(rank, base.out_features, bias=False)
                nn.init.zeros_(self.up.weight)

            def forward(self, x):
                return self.base(x) + self.up(self.down(x))

        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.layers:
            for name in ("q_proj", "v_proj"):
                setattr(layer.self_attn, name, LoRA(getattr(layer.self_attn, name)).to(dev, dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    losses, step_seconds, start = [], [], time.perf_counter()
    for seq in seq_lengths(a):
        t0 = time.perf_counter()
        ids = torch.randint(0, a.vocab, (a.batch, seq + 1), generator=gen).to(dev)
        loss = model.loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # waits for the step's kernels
        step_seconds.append(time.perf_counter() - t0)
    out = {"setting": a.setting, "allocator": a.allocator, "steps": a.steps, "seq_lengths": seq_lengths(a),
           "losses": losses, "seconds": time.perf_counter() - start, "step_seconds": step_seconds}
    if a.device == "cuda":
        torch.cuda.synchronize()
        out["max_memory_reserved"] = torch.cuda.max_memory_reserved()
        out["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        out["device"] = torch.cuda.get_device_name()
        out["torch"] = torch.__version__
        if a.record:
            torch.cuda.memory._dump_snapshot(a.record)
            torch.cuda.memory._record_memory_history(enabled=None)
    print(json.dumps(out), flush=True)


def child(a, setting, allocator, record=None):
    cmd = [sys.executable, os.path.abspath(__file__), "run", "--setting", setting, "--allocator", allocator,
           "--steps", str(a.steps), "--device", a.device]
    for flag in ("dim", "layers", "heads", "hidden", "vocab", "batch", "seq_min", "seq_max"):
        cmd += ["--" + flag.replace("_", "-"), str(getattr(a, flag))]
    if record:
        cmd += ["--record", record]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "LD_PRELOAD")}
    if allocator == "expandable":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return {"setting": setting, "allocator": allocator, "error": r.stderr[-3000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def all_runs(a):
    if not a.out:
        sys.exit("all: --out DIR is required")
    os.makedirs(a.out, exist_ok=True)
    runs, traces = [], []
    allocators = ALLOCATORS if a.device == "cuda" else ("native",)
    for setting in SETTINGS:
        for allocator in allocators:
            record = None
            if allocator == "native" and a.device == "cuda":
                record = os.path.join(a.out, f"{setting}.pickle")
            r = child(a, setting, allocator, record)
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "seq_lengths")}), flush=True)
            if record and os.path.exists(record):
                trace = os.path.join(a.out, f"{setting}.trace.gz")
                subprocess.run([sys.executable, "-m", "stitchalloc.convert", record, "-o", trace], check=True,
                               env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python")))
                os.remove(record)  # the converted trace is the project data; the pickle is 10-100x larger
                traces.append(trace)
    # The same losses under every allocator: the allocator must not change the computation.
    for setting in SETTINGS:
        got = {r["allocator"]: r.get("losses") for r in runs if r["setting"] == setting}
        same = len({json.dumps(v) for v in got.values()}) == 1 and None not in got.values()
        print(f"{setting}: losses identical under {', '.join(got)}: {same}")
    with open(os.path.join(a.out, "capture.json"), "w") as f:
        json.dump({"runs": runs}, f, indent=1)
    if traces and os.path.exists(a.replay):
        r = subprocess.run([a.replay, "--compare", "--check", "--validate_segments", "--explain_peak", "--json",
                            os.path.join(a.out, "replay.json"), *traces], capture_output=True, text=True)
        with open(os.path.join(a.out, "replay.txt"), "w") as f:
            f.write(r.stdout + r.stderr)
        print(r.stdout + r.stderr)
        if r.returncode != 0:
            sys.exit(f"replay failed ({r.returncode})")
    failed = [r for r in runs if "error" in r]
    if failed:
        sys.exit(f"{len(failed)} run(s) failed: " + "; ".join(f"{r['setting']}/{r['allocator']}" for r in failed))


def main():
    a = parser().parse_args()
    if a.device == "cpu":
        a.dim, a.layers, a.heads, a.hidden, a.vocab = min(a.dim, 64), min(a.layers, 2), min(a.heads, 4), \
            min(a.hidden, 172), min(a.vocab, 256)
        a.seq_min, a.seq_max, a.batch = min(a.seq_min, 16), min(a.seq_max, 64), 1
        if a.allocator == "stitchalloc":
            sys.exit("--device cpu runs the native allocator only (stitchalloc is a CUDA allocator)")
    run(a) if a.command == "run" else all_runs(a)


if __name__ == "__main__":
    main()
