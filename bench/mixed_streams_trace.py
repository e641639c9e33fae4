"""A steady multi-stream workload as a stitchalloc trace (docs/trace-format.md): the pattern of the
BM_Mixed microbenchmark (bench/allocator_bench.cc) over many more operations, for replays that
look at the long run rather than one step.

64 blocks stay live; each operation frees the oldest and allocates the next size of a fixed
cycle of 4096 sizes, log-uniform from 512 B to 64 MiB (seeded), round-robin over the streams.
After the first cycle the live set is stationary, so a good allocator's reserved memory levels
off; one that creeps keeps rising with the number of operations.

    python3 bench/mixed_streams_trace.py --streams 4 --ops 300000 -o /tmp/mixed4.trace.gz
    ./build/default/bench/stitchalloc-replay --compare /tmp/mixed4.trace.gz

Only the standard library; the trace is written gzip-compressed when the name ends in .gz.
"""
import argparse
import gzip
import random

LIVE = 64
CYCLE = 4096


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=4, help="streams, 1-64 (default 4)")
    ap.add_argument("--ops", type=int, default=300000, help="free+alloc operations after the first 64 allocs")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    if not 1 <= a.streams <= LIVE:
        ap.error("--streams must be 1 to 64")
    if a.ops < 0:
        ap.error("--ops must be >= 0")
    rng = random.Random(a.seed)
    sizes = [int(512 * 2 ** rng.uniform(0, 17)) for _ in range(CYCLE)]
    lines = ["# stitchalloc-trace v1",
             f"# name: mixed-{a.streams}streams-{a.ops}",
             f"# source: bench/mixed_streams_trace.py --streams {a.streams} --ops {a.ops} --seed {a.seed}",
             "action,id,size,stream,time_us,label"]
    live = [None] * LIVE
    state = {"id": 0, "next": 0, "t": 0}

    def alloc(slot):
        size = sizes[state["next"] % CYCLE]
        state["next"] += 1
        state["id"] += 1
        state["t"] += 1
        lines.append(f"alloc,{state['id']},{size},{slot % a.streams},{state['t']},")
        live[slot] = (state["id"], size)

    for slot in range(LIVE):
        alloc(slot)
    slot = 0
    for _ in range(a.ops):
        block, size = live[slot]
        state["t"] += 1
        lines.append(f"free,{block},{size},{slot % a.streams},{state['t']},")
        alloc(slot)
        slot = (slot + 1) % LIVE
    text = "\n".join(lines) + "\n"
    opener = gzip.open if a.output.endswith(".gz") else open
    with opener(a.output, "wt") as f:
        f.write(text)


if __name__ == "__main__":
    main()
