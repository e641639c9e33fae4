"""Every causal LM of the installed transformers under stitchalloc.offload, on the CPU: which
decoder layers offload takes for Llama's (split token-wise) and whether the loss and gradients
under each policy are those of the model without offload.

For each model type of transformers' causal-LM mapping the script builds a tiny randomly
initialised model (float64, 2 layers, hidden size 64; a few families need overrides, below),
runs one step without offload and one under each policy (``"recompute"``, 0.5, ``"auto"``) from
the same random generator state, with a backend that copies tensors within host memory, and
prints a row:

    model_type  layer class  verdict  per policy: largest relative gradient difference,
                                      blocks run as they are, stitchalloc warnings

Verdicts: ``split`` (taken for Llama's: blocks split token-wise, gradients equal to 1e-6 of the
largest entry of each), ``as-is`` (taken for Llama's, but its first calls showed every layer
wired otherwise, so they ran as they are; gradients equal as for ``split``), ``whole`` (no layer
of Llama's structure: its saved tensors swapped whole, not run here: nothing of it is recomputed
token-wise; a stack mixing the two is run, its other layers swapped whole), ``BAD`` (a gradient differs, or one is missing on
one side only), ``FAILED`` (offload raised where the plain model ran), and ``skipped`` (the tiny
model could not be built or run without offload: a configuration this script does not know how
to shrink; the reason follows). A family whose token-local block draws random numbers (residual
dropout in the MLP) draws them per range of tokens under offload, so its gradients differ from the
plain model's by design; the script turns dropout (and PhiMoE's router jitter noise) off except in
the attention core (which, if on, makes the attention block run as it is).

With ``--by-calls`` the names offload knows for layers wired otherwise (``_OTHER_WIRING``:
Gemma's feed-forward norms, AFMoE's, MiniMax's residual factors) are forgotten, so that every
layer with Llama's four module names is taken for Llama's and only the checks of its calls
(``stitchalloc._wiring``) stand between it and a split that computes another function: a
family they miss shows as BAD.

Usage: PYTHONPATH=python STITCHALLOC_LIBRARY_DIR=build/default/torch_plugin \
           .venv/bin/python bench/offload_families.py [--by-calls] [model_type ...]
Exits 1 when a row is BAD or FAILED. About 8 minutes on 2 cores for transformers 5.23's ~190 types.
Raw output: bench/results/host-offload-families-<date>.txt.
"""

import argparse
import contextlib
import importlib
import io
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, moe_intermediate_size=32,
             num_experts=4, num_local_experts=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
             rotary_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
# Multi-head latent attention (DeepSeek-V2/V3 and their kin) sizes its heads otherwise; head_dim
# is the rotary part's where a family keeps one. Its keys and values are expanded from the latent
# for every head, so there are as many key-value heads as heads (with fewer, transformers'
# attention repeats them again and the shapes disagree). DeepSeek-V3.2's sparse attention
# (DeepSeek-V3.2, GLM's DSA, AXK2, HY-V4) adds an indexer, here of 4 heads of 16 that keeps 8
# keys per query (fewer than the 33 tokens, so the attention is sparse); those families refuse
# a q_lora_rank of None, and get Q_LORA_RANK.
MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=16,
           first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4, index_n_heads=4,
           index_head_dim=16, index_topk=8)
Q_LORA_RANK = 16
DROPOUTS = ("hidden_dropout", "residual_dropout", "resid_pdrop", "embd_pdrop", "hidden_dropout_prob", "dropout",
            "mlp_dropout", "ffn_dropout", "embedding_dropout", "router_jitter_noise", "input_jitter_noise")
POLICIES = ("recompute", 0.5, "auto")


def tiny_config(transformers, model_type):
    """The family's configuration at the tiny sizes: given to its constructor where it takes them
    (derived sizes follow), else set on the default configuration."""
    default = transformers.AutoConfig.for_model(model_type)
    sizes = {k: v for k, v in SMALL.items() if hasattr(default, k) or k == "head_dim"}
    if hasattr(default, "kv_lora_rank"):
        sizes.update({k: v for k, v in MLA.items() if hasattr(default, k) or k in ("kv_lora_rank", "q_lora_rank")})
        if hasattr(default, "head_dim"):
            sizes["head_dim"] = MLA["qk_rope_head_dim"]
        else:
            sizes.pop("head_dim")
    config = None
    for extra in ({"experts_implementation": "eager"}, {}):
        with contextlib.suppress(Exception):
            config = transformers.AutoConfig.for_model(model_type, **sizes, **extra)
            break
    config = config or default
    for key, value in sizes.items():
        if hasattr(config, key) or key == "head_dim":
            with contextlib.suppress(Exception):
                setattr(config, key, value)
    # A hybrid of linear and full attention (Qwen3-Next, Qwen3.5) puts a full-attention layer only
    # every few layers: the two tiny layers get one of each. (Qwen4-exp's other kind, indexed
    # attention, has no default sizes for its indexer: its two layers stay linear.)
    kinds = getattr(default, "layer_types", None)
    if isinstance(kinds, list) and "linear_attention" in kinds and "full_attention" in kinds:
        with contextlib.suppress(Exception):
            config.layer_types = ["linear_attention", "full_attention"]
    if "q_lora_rank" in sizes and getattr(config, "q_lora_rank", None) is not None:
        with contextlib.suppress(Exception):
            setattr(config, "q_lora_rank", Q_LORA_RANK)
    for key in DROPOUTS:
        if isinstance(getattr(config, key, None), float):
            with contextlib.suppress(Exception):
                setattr(config, key, 0.0)
    for key in ("experts_implementation", "_experts_implementation"):
        with contextlib.suppress(Exception):
            setattr(config, key, "eager")
    return config


def build(transformers, config):
    """The model, sdpa attention where the family has it (eager otherwise)."""
    for attention in ("sdpa", "eager"):
        config._attn_implementation = attention
        try:
            with torch.device("meta"):
                meta = transformers.AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            if attention == "sdpa" and "scaled_dot_product_attention" in str(e):
                continue
            raise
        size = sum(p.numel() for p in meta.parameters())
        if size > 20e6:
            raise RuntimeError(f"{size / 1e6:.0f}M parameters at the tiny sizes")
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(config).double().train(), attention
    raise AssertionError("unreachable")


def step(model, ids):
    from test_offload import hf_grads

    torch.manual_seed(7)
    loss, grads = hf_grads(model, ids, use_cache=False)
    return loss.item(), grads


def difference(expected, got):
    """The largest |a - b| / max|a| over the parameters; inf where one side has no gradient."""
    worst = 0.0
    for a, b in zip(expected, got):
        if (a is None) != (b is None):
            return float("inf")
        if a is not None:
            worst = max(worst, ((a - b).abs().max() / a.abs().max().clamp_min(1e-300)).item())
    return worst


def survey(transformers, offload_module, stitchalloc, model_type):
    from test_offload import RecordingBackend

    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = tiny_config(transformers, model_type)
            model, attention = build(transformers, config)
            layers = offload_module._find_layers(model)
            ids = torch.randint(3, 256, (2, 33), generator=torch.Generator().manual_seed(1))
            expected = step(model, ids)
        except Exception as e:
            return "-", "skipped", f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    name = type(layers[0]).__name__
    if not any(offload_module._is_llama(layer) for layer in layers):
        return name, "whole", attention
    cells, verdict, plain = [], "split", True
    for policy in POLICIES:
        backend = RecordingBackend()
        with warnings.catch_warnings(record=True) as record, contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("always")
            try:
                with stitchalloc.offload(model, policy=policy, backend=backend) as off:
                    got = step(model, ids)
            except Exception as e:
                cells.append(f"{policy}: raised {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                verdict = "FAILED"
                continue
        ours = sum("stitchalloc" in str(w.message) for w in record)
        worst = max(difference(expected[1], got[1]),
                    abs(got[0] - expected[0]) / max(abs(expected[0]), 1e-300))
        if worst > 1e-6:
            verdict = "BAD"
        plain = plain and len(off._plain) == len(off._layers)
        cells.append(f"{policy}: {worst:.1e} whole={off.stats()['blocks_run_whole']} warned={ours}")
    if verdict == "split" and plain:
        verdict = "as-is"
    return name, verdict, f"{attention} | " + " | ".join(cells)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types (default: every causal LM)")
    parser.add_argument("--by-calls", action="store_true",
                        help="forget the names of layers wired otherwise: only the checks of the calls remain")
    args = parser.parse_args()
    import transformers

    import stitchalloc

    offload_module = importlib.import_module("stitchalloc.offload")
    if args.by_calls:
        offload_module._OTHER_WIRING = ()
    transformers.logging.set_verbosity_error()
    names = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    types = args.types or sorted(names)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; policies {POLICIES}"
          + ("; layers wired otherwise found by their calls only (--by-calls)" if args.by_calls else ""))
    print(f"{'model_type':28s} {'layer':34s} {'verdict':8s} detail")
    counts = {}
    for model_type in types:
        layer, verdict, detail = survey(transformers, offload_module, stitchalloc, model_type)
        counts[verdict] = counts.get(verdict, 0) + 1
        print(f"{model_type:28s} {layer:34s} {verdict:8s} {detail}", flush=True)
    print("totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 1 if counts.get("BAD") or counts.get("FAILED") else 0


if __name__ == "__main__":
    sys.exit(main())
