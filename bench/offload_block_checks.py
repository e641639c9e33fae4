"""What stitchalloc.offload's checks cost per token-wise block call, on the host.

Each token-wise block call (transformers' decoder layers: the attention block and the MLP block)
first checks for hooks that would see or keep the block's tensors (_why_whole), then, around
the call, whether a module in it kept a tensor in an attribute (or, from 2026-11-24, put one
into a list or dict it holds; after 55f307f also into a set, a subclass of those, or a
container nested in another) or changed a buffer (_state_snapshot before, _changed_state after;
absent before 2026-11-24, then printed as "(none)"). This times both, outside any model run, for
transformers' Llama (also with a list held by two projections, "llama+list", and with a list
inside a dict, "llama+nest"), Mixtral and Qwen2-MoE layers (small shapes: the checks walk
modules, not tensors, so their cost does not depend on the sizes). timeit, best of --repeat x
--number calls.

    .venv/bin/python bench/offload_block_checks.py   (PYTHONPATH=python, or stitchalloc installed)
"""

import argparse
import importlib
import inspect
import platform
import sys
import timeit


def layers(torch, transformers):
    small = dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)
    yield "llama", transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    # The same with a list held by a projection in each block (an auxiliary loss collected):
    # the state check then also copies and compares that list (from 2026-11-24).
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    model.model.layers[0].mlp.up_proj.collected = []
    model.model.layers[0].self_attn.v_proj.collected = []
    yield "llama+list", model
    # The same with the list inside a dict (looked into after 55f307f).
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    model.model.layers[0].mlp.up_proj.collected = {"aux": []}
    model.model.layers[0].self_attn.v_proj.collected = {"aux": []}
    yield "llama+nest", model
    # The same with a tensor in a plain attribute of two projections (a running count kept
    # outside the buffers): watched by version counter, and copied, from 2026-11-24 (stop 34).
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    model.model.layers[0].mlp.up_proj.seen = torch.zeros(())
    model.model.layers[0].self_attn.v_proj.seen = torch.zeros(())
    yield "llama+tensor", model
    yield "mixtral", transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **small, num_local_experts=8, num_experts_per_tok=2))
    yield "qwen2_moe", transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        **small, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=60,
        num_experts_per_tok=4))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import torch
    import transformers

    try:  # the checks left offload.py for _block_checks.py on 2026-11-24
        checks = importlib.import_module("stitchalloc._block_checks")
    except ImportError:
        checks = importlib.import_module("stitchalloc.offload")
    state_check = None
    if hasattr(checks, "_state_snapshot"):
        # From 2026-11-24 offload keeps a dict between calls for the container look (quiet).
        takes_quiet = "quiet" in inspect.signature(checks._state_snapshot).parameters
        quiet = {}
        state_check = (lambda top: checks._changed_state(checks._state_snapshot(torch, top, quiet))) if takes_quiet \
            else (lambda top: checks._changed_state(checks._state_snapshot(torch, top)))
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.machine()}; best of {args.repeat} x {args.number} calls; us per call")
    print(f"{'layers':12s} {'block':9s} {'modules':>7s} {'hook check':>11s} {'state check':>16s}")

    def best(fn):
        return min(timeit.repeat(fn, number=args.number, repeat=args.repeat)) / args.number * 1e6

    for name, model in layers(torch, transformers):
        layer = model.model.layers[0]
        for block, top in (("self_attn", (layer.input_layernorm, layer.self_attn)),
                           ("mlp", (layer.post_attention_layernorm, layer.mlp))):
            modules = sum(1 for t in top for _ in t.modules())
            hook = best(lambda: checks._why_whole(torch, top, set()))
            attr = f"{best(lambda: state_check(top)):16.2f}" if state_check else f"{'(none)':>16s}"
            print(f"{name:12s} {block:9s} {modules:7d} {hook:11.2f} {attr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
