"""python -m stitchalloc.convert IN [-o OUT] [--device N]

Converts a PyTorch memory snapshot (.pickle, as written by torch.cuda.memory._dump_snapshot,
optionally gzip-compressed) or an event CSV (seq,action,addr,size,stream,time_us) into a
stitchalloc trace. OUT defaults to IN's name with .trace.gz. Needs no torch.
"""

from __future__ import annotations

import argparse
import os
import sys

from stitchalloc.snapshot import SnapshotError, convert_events_csv, convert_snapshot, load_snapshot


def _name(path: str) -> str:
    base = os.path.basename(path)
    for ext in (".gz", ".pickle", ".pkl", ".csv", ".events"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stitchalloc.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input")
    parser.add_argument("-o", "--output")
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--name", help="trace name (default: from the input file name)")
    args = parser.parse_args(argv)
    name = args.name or _name(args.input)
    out = args.output or os.path.join(os.path.dirname(args.input) or ".", name + ".trace.gz")
    try:
        if ".csv" in os.path.basename(args.input):
            trace = convert_events_csv(args.input, name)
        else:
            trace = convert_snapshot(load_snapshot(args.input), name, args.device, os.path.basename(args.input))
        trace.write(out)
    except SnapshotError as e:
        print(f"stitchalloc.convert: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"stitchalloc.convert: error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {trace.allocs()} allocations, {len(trace.rows)} events")
    return 0


if __name__ == "__main__":
    sys.exit(main())
