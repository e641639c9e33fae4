"""What offload's per-iteration look at the model's parameters costs, on the host.

At each iteration's first offloaded forward, ``stitchalloc.offload`` takes the model's parameter
storage addresses again (``Offload._refresh_param_storages``), so that a model converted or moved
after ``offload()`` does not have activations at its parameters' old addresses kept on the
device as parameters. This times that refresh for transformers Llama models of a given number of
layers at tiny widths: the cost is per parameter (a storage lookup and a weak reference each),
not per byte, so 16 layers stand for the 953M-parameter model of the GPU runs (147 parameters)
and 80 for a Llama 70B (723).

Usage: PYTHONPATH=python STITCHALLOC_LIBRARY_DIR=build/default/torch_plugin \
           .venv/bin/python bench/offload_param_refresh.py [--layers 16 32 80] [--repeat 5]
Raw output: bench/results/host-offload-param-refresh-<date>.txt.
"""

import argparse
import os
import sys
import timeit

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import stitchalloc  # noqa: E402
from offload_backends import InPlace  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 32, 80])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--number", type=int, default=200)
    args = parser.parse_args()
    import transformers

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs; "
          f"best of {args.repeat} x {args.number} refreshes")
    print(f"{'layers':>6} {'parameters':>10} {'us per refresh':>15} {'ns per parameter':>17}")
    for layers in args.layers:
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(config)
        count = sum(1 for _ in model.parameters())
        with stitchalloc.offload(model, policy="swap", backend=InPlace()) as off:
            best = min(timeit.repeat(off._refresh_param_storages, number=args.number, repeat=args.repeat))
        seconds = best / args.number
        print(f"{layers:>6} {count:>10} {seconds * 1e6:>15.1f} {seconds / count * 1e9:>17.0f}")


if __name__ == "__main__":
    main()
