"""Whether a Llama-family layer is wired as ``stitchalloc.offload``'s token-wise blocks assume
(docs/offload.md, "Using it from PyTorch").

The token-wise split runs ``callee(norm(...))`` as one block where the layer calls ``norm``:
``self_attn(input_layernorm(x))`` and ``mlp(post_attention_layernorm(h))``. What the layer then
gets from ``norm`` is not the norm's output: it is x itself (the attention block, replayed, norms
x inside) or the MLP block's output. That is only right if the layer does nothing with what
``norm`` returned but call ``callee`` on it. Three checks, each raising ``_Miswired`` with the
reason:

- the layer calls ``callee`` on exactly what ``norm`` returned (``_callee_got``), and calls every
  norm whose block was applied on to its callee (the caller's ``finish``);
- at a layer's first calls (until one splits both blocks), what ``norm`` returns is a fresh alias
  (``_norm_returned``), watched by a torch-function mode (``_NormOutputWatch``) for the duration of
  the layer's forward: any torch function the layer calls on it other than a query of its
  metadata (shape, dtype, ...) is a use the split would miscompute (MiniMax's residual is the
  norm's output, scaled), and so are passing it to another of the four modules
  (``_passed_to``) and returning it. Uses inside a call of one of the four modules are not the
  layer's: their forwards are stitchalloc's, and their hooks were vetted (a hook that may see
  or keep a block's tensors makes the block run as it is, so nothing was replaced): torch's
  module tracker (FlopCounterMode) registers gradient hooks on every module's inputs and
  outputs, a norm's output among them. The callee gets the alias and maps it back
  (``_callee_got``); nothing of stitchalloc's operates on an alias, and its wrappers run without
  the mode (``_unwatched``), so the mode sees only the layer's own torch functions;
- the layer calls ``mlp`` without ``post_attention_layernorm`` before it (a parallel block: mlp
  may get input_layernorm's output, which is x itself while the attention block is replayed).

The four modules go by the layer's naming (offload's ``_LLAMA_NAMINGS``: transformers'
input_layernorm, self_attn, post_attention_layernorm, mlp (linear_attn in place of self_attn in
its linear-attention hybrids), or Meta's reference attention_norm, attention, ffn_norm,
feed_forward); this docstring uses transformers'.

Data structures: ``Offload._norm_outputs`` maps (layer, block) (ATTENTION, MLP) to ``_NormOutput``
(what the layer got, whether the block was applied, the tensor the callee continues with) from
the norm's call to its callee's; ``_NormOutputWatch.watched`` maps id(alias) to (alias, (norm,
callee)) while the layer's forward runs (the alias held, so that the id stays its own).

Nothing here imports torch at module level (the mode's class is built on first use).
"""

import collections
import contextlib
import sys


class _Miswired(RuntimeError):
    """Layer i is not wired as the token-wise blocks assume, or its block, run alone, failed.
    Raised out of the layer's forward: at the layer's first token-wise calls the layer runs again
    as it is (offload's ``_wrap``, whose warning gives ``reason``); after it has split, the step
    fails with this message, which adds what the user can do."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


# A layer's two token-wise blocks, by role: the attention block is its modules 0 and 1 (norm,
# callee), the MLP block its modules 2 and 3, in the layer's naming (offload's _LLAMA_NAMINGS:
# input_layernorm, self_attn, post_attention_layernorm, mlp in transformers).
ATTENTION, MLP = 0, 1


def _norm_and_callee(names, block):
    return names[2 * block], names[2 * block + 1]


# (what the layer got from the norm, whether its block was applied, what the callee continues with)
_NormOutput = collections.namedtuple("_NormOutput", "returned applied source")

# Torch functions on a tensor that read only its metadata, never its values: a layer may call them
# on a norm's output (a shape read for a reshape elsewhere) without the split computing otherwise.
_METADATA = frozenset((
    "shape", "size", "dim", "ndim", "ndimension", "dtype", "device", "layout", "requires_grad", "is_leaf",
    "grad_fn", "is_contiguous", "stride", "storage_offset", "numel", "nelement", "element_size", "__len__",
    "data_ptr", "get_device", "is_cuda", "is_cpu", "is_meta", "is_sparse", "is_quantized",
    "is_floating_point", "is_complex", "is_inference", "names", "_version", "output_nr",
    "__repr__", "__str__", "__format__"))


def _norm_returned(me, i, layer, names, block, t, applied):
    """Layer i's norm of ``block`` (ATTENTION, MLP; ``names``: the layer's four module names)
    returns: ``t`` (the norm's output, or with its block ``applied``, what the layer gets
    instead). Returns what the layer gets: ``t``, or at a watched call (the layer's first ones) a
    fresh alias of it that the watch flags any other use of."""
    if me is None or me._in_layer != i:
        return t
    returned = t
    watch = me._watch
    if applied and watch is not None:
        returned = watch.alias(t, _norm_and_callee(names, block))
    me._norm_outputs[i, block] = _NormOutput(returned, applied, t)
    return returned


def _callee_got(me, i, layer, names, block, t):
    """Layer i calls the callee of ``block`` (mlp, self_attn) on ``t``. Returns the tensor the
    block goes on with (the norm's real output: x for self_attn, the block's output for mlp) if
    the norm's block was applied, else None (the callee runs as it is on ``t``). Raises _Miswired
    if the block was applied and ``t`` is not what the norm returned (the split would compute
    another function), or if the layer, running token-wise, calls mlp without its norm before it."""
    if me is None:
        return None
    norm, callee = _norm_and_callee(names, block)
    entry = me._norm_outputs.pop((i, block), None)
    if entry is None:
        if block == MLP and me._in_layer == i and i not in me._plain:
            raise _Miswired(
                f"stitchalloc.offload: layer {i} ({type(layer).__name__}) calls {callee} without {norm} before it, "
                f"so it may get {names[0]}'s output, which is the layer input itself while the attention block "
                "is recomputed token-wise")
        return None
    if not entry.applied:
        return None
    if t is not entry.returned:
        raise _Miswired(
            f"stitchalloc.offload: layer {i} ({type(layer).__name__}) calls {callee} on something other than "
            f"{norm}'s output, so its token-wise recompute (which runs {callee}({norm}(...)) as one block) would "
            "compute another function")
    return entry.source


def _passed_to(me, module, value):
    """Layer i passes ``value`` to ``module`` (a norm, or a callee its norm's block was not applied
    for): at a watched call, a norm's output in it is a use other than its callee's."""
    watch = me._watch if me is not None else None
    if watch is not None:
        found = watch.which(value)
        if found is not None:
            raise watch.miswired(found, f"it passes it to {module}")


_NOT_WATCHED = contextlib.nullcontext()


class _Unwatched:
    """The watch's mode taken off the mode stack for a ``with`` block, and put back after it."""

    __slots__ = ("watch",)

    def __init__(self, watch):
        self.watch = watch

    def __enter__(self):
        self.watch.__exit__(None, None, None)

    def __exit__(self, *exc):
        self.watch.__enter__()
        return False


def _unwatched(torch, me):
    """A context for stitchalloc's own code inside a watched layer forward (the four modules'
    forwards, ours): it runs without the watch's mode. It never gets an alias (``_callee_got``
    maps them back, ``_passed_to`` refuses them), and its torch functions, most of the layer's,
    would each pay the mode's Python call (bench/offload_watch_cost.py). Where another mode was
    entered above the watch, the watch stays. Outside a watched call (a layer's every call after
    its first ones) a shared null context: the blocks' hot path pays one attribute check."""
    watch = me._watch if me is not None else None
    if watch is None:
        return _NOT_WATCHED
    current = getattr(torch.overrides, "_get_current_function_mode", None)
    if current is None or current() is not watch:
        return _NOT_WATCHED
    return _Unwatched(watch)


def _unused_norms(me, i):
    """Ends layer i's norm entries (its forward is over); returns the blocks whose norm applied
    the block but whose callee never got what the norm returned."""
    keys = [key for key in me._norm_outputs if key[0] == i]
    unused = [key[1] for key in keys if me._norm_outputs[key].applied]
    for key in keys:
        del me._norm_outputs[key]
    return unused


def _raise_unused(i, layer, names, unused):
    """Raises _Miswired for the first of the ``unused`` blocks (_unused_norms), if any."""
    if unused:
        norm, callee = _norm_and_callee(names, unused[0])
        raise _Miswired(
            f"stitchalloc.offload: layer {i} ({type(layer).__name__}) calls {norm} but not {callee} on "
            f"its output, so its token-wise recompute (which runs {callee}({norm}(...)) as one block) "
            "computed another function")


_WATCH = {}


def _NormOutputWatch(torch, i, layer, names):
    """A torch-function mode for layer i's forward at a first call: flags (raises _Miswired) the
    layer's uses of a norm output other than its callee's call (see the module docstring);
    ``names``: the layer's four module names."""
    if not _WATCH:
        _WATCH["class"] = _watch_class(torch)
    return _WATCH["class"](i, layer, names)


def _in_call_of(torch, modules):
    """Whether the running code is inside a call (``Module.__call__``: its hooks and forward) of
    one of ``modules``, from the frames on the stack."""
    call_impl = getattr(getattr(torch.nn.Module, "_call_impl", None), "__code__", None)
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is call_impl and any(frame.f_locals.get("self") is m for m in modules):
            return True
        frame = frame.f_back
    return False


def _watch_class(torch):
    from torch.overrides import TorchFunctionMode, resolve_name

    def tensors(value, depth=0):
        if torch.is_tensor(value):
            yield value
        elif depth < 3 and isinstance(value, (list, tuple)):
            for v in value:
                yield from tensors(v, depth + 1)
        elif depth < 3 and isinstance(value, dict):
            for v in value.values():
                yield from tensors(v, depth + 1)

    class Watch(TorchFunctionMode):
        __doc__ = _NormOutputWatch.__doc__

        def __init__(self, i, layer, names):
            super().__init__()
            self.i = i
            self.layer = layer
            self.watched = {}  # id(alias) -> (alias, (norm, callee))
            self.modules = tuple(getattr(layer, name) for name in names)

        def alias(self, t, norm_and_callee):
            """A fresh alias of ``t`` standing for a norm's output, watched from now on."""
            a = t.view_as(t)
            self.watched[id(a)] = (a, norm_and_callee)
            return a

        def which(self, value):
            """(norm, callee) of the norm whose watched output ``value`` is or holds, else None."""
            for t in tensors(value):
                entry = self.watched.get(id(t))
                if entry is not None and entry[0] is t:
                    return entry[1]
            return None

        def miswired(self, norm_and_callee, use):
            norm, callee = norm_and_callee
            return _Miswired(
                f"stitchalloc.offload: layer {self.i} ({type(self.layer).__name__}) uses {norm}'s output otherwise "
                f"than by calling {callee} on it ({use}), so its token-wise recompute (which runs "
                f"{callee}({norm}(...)) as one block, that output never made) would compute another function")

        def returned(self, out):
            """The layer's forward returned ``out``: a norm's output in it is a use too."""
            found = self.which(out)
            if found is not None:
                raise self.miswired(found, "it returns it")

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if self.watched:
                found = self.which((args, kwargs))
                if found is not None:
                    name = resolve_name(func) or getattr(func, "__name__", repr(func))
                    if (name.removesuffix(".__get__").rsplit(".", 1)[-1] not in _METADATA
                            and not _in_call_of(torch, self.modules)):
                        raise self.miswired(found, name)
            return func(*args, **kwargs)

    return Watch
