"""``python -m stitchalloc --preload-path``: prints the LD_PRELOAD library's path;
``--library-dir``: the folder of the native libraries; ``--version``."""

import argparse
import sys

import stitchalloc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stitchalloc", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--preload-path", action="store_true", help="path of libstitchalloc_preload.so")
    group.add_argument("--library-dir", action="store_true", help="folder of the native libraries")
    group.add_argument("--version", action="store_true")
    args = parser.parse_args(argv)
    if args.preload_path:
        print(stitchalloc.library_path("stitchalloc_preload"))
    elif args.library_dir:
        import os

        print(os.path.dirname(stitchalloc.library_path("stitchalloc")))
    else:
        print(stitchalloc.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
