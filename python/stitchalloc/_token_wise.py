"""The token-wise recompute of ``stitchalloc.offload`` (docs/offload.md): the autograd Functions
and the attention core's capture and replay that let a Llama-family layer keep only its input and
the attention core's output, and recompute the rest token-locally before its backward.

Data structures and their invariants:

- ``_AttentionState``: one attention block call of one iteration. ``x`` is the layer input as the
  layer's pack hook saved it (swapped); ``cores`` the attention core calls in call order, each a
  ``_Core``. A replay (``replay()``) must call the core exactly as often as the forward did, with
  q, k, v of the forward's layouts; otherwise it raises rather than compute something else. A
  core is kept fused only while ``fuse``: a fused core's gradient reaches q, k and v alone, so a
  replay that finds another of its tensor arguments needing one (a mask computed from
  parameters) runs that core again with autograd and calls ``unfuse`` (offload then stops
  fusing that layer's cores).
- ``_NotReplayable``: raised from a block's forward, before anything it computed is kept, for a
  block no replay can reproduce (attention dropout; tensors returned besides the output, as
  attention weights or an MoE block's router scores); the caller runs the block as it is instead.
- ``_Core``: a fused core keeps its own autograd node (``node``), whose saved q, k, v are
  ``_Recomputed`` markers filled (``slots``) by the replay just before the node's backward runs,
  and whose other saved tensors (output, softmax statistics) went through the layer's pack hook.
  A core that is not one fused node (``node`` None) is recomputed whole.
- ``_ForwardContext``: what a recompute repeats of its forward (autocast settings, random
  generator states); the generators continue afterwards as if only the forward had drawn.
- Under ``retain_graph=True`` (``_keep_graph``) a backward keeps the state it replays from, so
  that the next backward through the same graph can replay again; otherwise it lets it go.
- Nothing here forms a reference cycle with the autograd graph (a ``_Recomputed`` holds its core
  weakly, a state its block's node weakly): a graph that dies without backward frees its states
  and tickets by reference counting at once, not at the cycle collector's next full pass.

Nothing here imports torch at module level: torch is imported by the caller and passed in, and
the Functions are built on first use (``_functions``).
"""

import contextlib
import weakref


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _NotReplayable(RuntimeError):
    """A token-wise block cannot be replayed: ``reason`` (what it does) and ``why`` (what a
    replay would get wrong), for the caller's warning."""

    def __init__(self, reason, why, context=None):
        super().__init__(f"stitchalloc.offload: a token-wise block cannot be replayed ({reason}): {why}")
        self.reason = reason
        self.why = why
        self.context = context  # the _ForwardContext taken when the refused call began


# Why a token-local block returning anything but one tensor (transformers' GPT-OSS MoE block
# returns its router scores beside its output) runs as it is.
_MORE_THAN_A_TENSOR = ("it returns more than its output tensor (an MoE block's router scores?)",
                       "split by tokens, what it returns besides would cover one range of tokens and have no "
                       "autograd graph")


class _Deferred:
    """A tensor the attention core's node saved: held as is until the core is known to be one
    fused node, then handed to the layer's pack hook (swapped) or dropped with the node."""

    __slots__ = ("tensor", "packed")

    def __init__(self, tensor):
        self.tensor = tensor
        self.packed = None


class _Recomputed:
    """What the core's node keeps instead of q, k or v: the index of the tensor recomputed
    before the layer's backward. The core is held weakly: the core holds its node, and a cycle
    through the node's saved tensors (C++, which Python's collector cannot see) would keep the
    node, and the layer's swapped tensors with it, alive after the graph died without backward."""

    __slots__ = ("core", "index")

    def __init__(self, core, index):
        self.core = core  # weakref.ref(_Core)
        self.index = index


class _Core:
    """One attention core call of one replayed attention block."""

    __slots__ = ("node", "entry", "meta", "slots", "out", "keep", "__weakref__")

    def __init__(self):
        self.node = None  # the core's autograd node; None: not one fused node, recomputed
        self.entry = None  # the node of the stand-ins for q, k, v (the core's only inputs)
        self.meta = None  # _layout of q, k, v as the node saw them
        self.slots = None  # q, k, v recomputed, during the layer's backward
        self.out = None  # the core's output as the layer's pack hook saved it
        self.keep = False  # its backward keeps the node's saved tensors (retain_graph=True)


class _AttentionState:
    """One attention block call of one iteration: its cores, in call order."""

    __slots__ = ("owner", "pack", "cores", "next", "extras", "run", "x", "input_edge", "output_node",
                 "forward_context", "fuse", "unfuse")

    def __init__(self, owner, pack, run, fuse=True, unfuse=None):
        self.owner = owner
        self.pack = pack
        self.fuse = fuse  # whether a core run as one fused node keeps that node (else recomputed)
        self.unfuse = unfuse  # called with the names of a fused core's other arguments needing grad
        self.cores = []
        self.next = 0
        self.extras = None  # what the block returns besides its output (transformers: (None,))
        self.run = run  # the block, from the raw layer input
        self.x = None  # the layer input as the layer's pack hook saved it (swapped)
        self.input_edge = None  # where x came from in the graph, and where the block's output goes:
        # to recognise h = x + output (residual_input); held weakly, as the block's own node
        # holds this state: a cycle would outlive the graph until the collector's next full pass
        self.output_node = None
        self.forward_context = None  # autocast and random generators of the forward (_ForwardContext)

    def replay(self, torch, x, grad):
        """The block's output again, from x: the fused cores return their saved outputs (with
        their own nodes as backward when `grad`), the unfused ones run again."""
        self.next = 0
        context = self.forward_context
        mode = _functions(torch)["CoreMode"](_replay(torch, self, grad))
        with context.generators(torch), context.autocast(torch), mode:
            result = self.run(x)
        if self.next != len(self.cores):
            raise RuntimeError("stitchalloc.offload: the attention block, recomputed, called the attention core "
                               f"{self.next} times instead of {len(self.cores)}")
        return result[0] if isinstance(result, (tuple, list)) else result

    def residual_input(self, torch):
        """h = x + self_attn(input_layernorm(x)) again, without autograd, x back from its ticket."""
        x = _unpack_packed(self.x)
        with torch.no_grad():
            return x + self.replay(torch, x, grad=False)

    def is_residual_of(self, h):
        """Whether h is exactly x + the block's output in the graph (the residual connection of
        transformers' decoder layers), so that residual_input() recomputes it."""
        node = h.grad_fn
        output_node = self.output_node() if self.output_node is not None else None
        if node is None or output_node is None or self.input_edge is None or node.name() != "AddBackward0":
            return False
        if getattr(node, "_saved_alpha", 1) != 1:
            return False
        edges = {(id(f), n) for f, n in node.next_functions}
        return edges == {(id(output_node), 0), (id(self.input_edge.node), self.input_edge.output_nr)}


def _layout(t):
    """dtype, shape and strides, the strides of dimensions of size 1 left out: they address
    nothing, and whether a computation ran with autograd can change them (batch 1)."""
    return t.dtype, tuple(t.size()), tuple(st if n != 1 else 0 for n, st in zip(t.size(), t.stride()))


def _sdpa_arguments(args, kwargs):
    bound = dict(zip(_SDPA_ARGS, args))
    bound.update(kwargs)
    return bound


def _unpack_core(saved):
    if isinstance(saved, _Recomputed):
        core = saved.core()
        slots = core.slots if core is not None else None
        if slots is None:
            raise RuntimeError("stitchalloc.offload: the attention core's backward ran before its inputs were "
                               "recomputed (was the layer's graph used twice?)")
        return slots[saved.index]
    if isinstance(saved, _Deferred):
        return saved.tensor if saved.packed is None else _unpack_packed(saved.packed)
    return saved


def _unpack_packed(packed):
    """What a layer's pack hook returned, as a tensor again."""
    from .offload import _Saved, _SavedWrapper

    if isinstance(packed, _Saved):
        return packed.storage.owner._unpack(packed)
    return packed.owner._unpack(packed) if isinstance(packed, _SavedWrapper) else packed


def _capture(torch, state):
    """The attention core in the block's forward (no grad): run with a graph of its own whose
    inputs are stand-ins for q, k, v, so that its node saves them as _Recomputed markers."""
    Entry = _functions(torch)["Entry"]

    def handler(func, args, kwargs):
        bound = _sdpa_arguments(args, kwargs)
        if float(bound.get("dropout_p", 0.0) or 0.0) != 0.0:
            raise _NotReplayable("it calls the attention core with dropout (dropout_p > 0)",
                                 "a replay before the layer's backward could not draw the same mask",
                                 state.forward_context)
        q, k, v = bound["query"], bound["key"], bound["value"]
        core = _Core()
        core_ref = weakref.ref(core)  # the hooks below live as long as the core's node (_Recomputed)
        anchor = torch.empty(0, device=q.device, requires_grad=True)
        # Autograd keeps the pack hook as long as what it packed: the hook must hold no tensor
        # (q, k and v would stay on the device until the backward), only their addresses and
        # layouts, and the deferred tensors only until they are handed on below.
        stand_in_keys = []
        held = []

        def pack(t):
            key = (t.data_ptr(), t.dtype, tuple(t.size()), tuple(t.stride()))
            if key in stand_in_keys:
                return _Recomputed(core_ref, stand_in_keys.index(key))
            d = _Deferred(t)
            held.append(d)
            return d

        with torch.enable_grad():
            stand_ins = Entry.apply(anchor, q.detach(), k.detach(), v.detach())
            stand_in_keys.extend((s.data_ptr(), s.dtype, tuple(s.size()), tuple(s.stride())) for s in stand_ins)
            rest = {n: a for n, a in bound.items() if n not in ("query", "key", "value")}
            with torch.autograd.graph.saved_tensors_hooks(pack, _unpack_core):
                out = func(*stand_ins, **rest)
        node = out.grad_fn if torch.is_tensor(out) else None
        entry = stand_ins[0].grad_fn
        edges = list(node.next_functions) if node is not None else []
        if state.fuse and len(edges) == 3 and all(f is entry and n == index for index, (f, n) in enumerate(edges)):
            core.node = node
            core.entry = entry
            core.meta = [_layout(s) for s in stand_ins]
            for d in held:  # out, the softmax statistics, ...: swapped like the rest of the layer
                d.packed = state.pack(d.tensor)
                d.tensor = None
            core.out = state.pack(out)
        else:
            for d in held:  # the unfused core's graph is dropped: nothing of it may stay
                d.tensor = None
        held.clear()
        state.cores.append(core)
        return out.detach()

    return handler


def _replay(torch, state, grad=True):
    """The attention core in the layer's backward: fused cores return their saved output, with
    the core's own node as backward (without `grad`, just the output); the others run again."""
    CoreGrad = _functions(torch)["CoreGrad"]

    def handler(func, args, kwargs):
        if state.next >= len(state.cores):
            raise RuntimeError("stitchalloc.offload: the attention block called the attention core more often "
                               "when recomputed than in its forward")
        core = state.cores[state.next]
        state.next += 1
        if core.node is None:
            return func(*args, **kwargs)
        if not grad:
            return _unpack_packed(core.out)
        bound = _sdpa_arguments(args, kwargs)
        # The core's node was captured without autograd and takes gradients for q, k and v only;
        # a mask that needs one (computed from parameters, as Doge's dynamic mask is) would get
        # none, and neither would what it was computed from. Such a core is run again instead.
        needs = [n for n, a in bound.items()
                 if n not in ("query", "key", "value") and torch.is_tensor(a) and a.requires_grad]
        if needs:
            if state.unfuse is not None:
                state.unfuse(needs)
            return func(*args, **kwargs)
        qkv = (bound["query"], bound["key"], bound["value"])
        got = [_layout(t) for t in qkv]
        if got != core.meta:
            raise RuntimeError(f"stitchalloc.offload: the attention core's inputs, recomputed, have another layout "
                               f"({got}) than in the forward ({core.meta})")
        return CoreGrad.apply(core, *qkv)

    return handler


def _chunks(tokens, chunk):
    """(start, length) of consecutive token ranges of at most `chunk` tokens (0: one range)."""
    if tokens == 0 or chunk <= 0 or chunk >= tokens:
        return [(0, tokens)]
    return [(start, min(chunk, tokens - start)) for start in range(0, tokens, chunk)]


class _ForwardContext:
    """What a recompute in the backward must run under to repeat the forward exactly, as
    torch.utils.checkpoint restores it: the forward's random number generators (the CPU's and
    the tensor's device's) and its autocast settings (the tensor's device type and the CPU's), so
    that a dropout draws the same mask again and a model trained under ``torch.autocast``
    recomputes in the same precision. ``generators()`` sets the generators to the forward's for
    its duration (afterwards they continue where they were, as if the recompute had drawn
    nothing); ``autocast()`` is entered around the recomputed forward only, not around the
    gradients computed from it (autocast applies to forward operations)."""

    __slots__ = ("device_type", "autocast_settings", "cache", "cpu_rng", "devices", "device_rngs")

    def __init__(self, torch, t):
        from torch.utils.checkpoint import get_device_states

        self.device_type = t.device.type
        types = ["cpu"] if self.device_type == "cpu" else [self.device_type, "cpu"]
        self.autocast_settings = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in types
                                  if torch.amp.is_autocast_available(d)]
        self.cache = torch.is_autocast_cache_enabled()
        self.cpu_rng = torch.get_rng_state()
        self.devices, self.device_rngs = get_device_states(t) if self.device_type != "cpu" else ([], [])

    @contextlib.contextmanager
    def generators(self, torch):
        fork_type = self.device_type if self.device_type != "cpu" else "cuda"
        with torch.random.fork_rng(devices=self.devices, device_type=fork_type):
            self.rewind(torch)
            yield

    def rewind(self, torch):
        """Sets the generators back to where they were when the forward began, and leaves them
        there: a block run again as it is then draws what it would have drawn without offload."""
        from torch.utils.checkpoint import set_device_states

        torch.set_rng_state(self.cpu_rng)
        if self.devices:
            set_device_states(self.devices, self.device_rngs, device_type=self.device_type)

    @contextlib.contextmanager
    def autocast(self, torch):
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in self.autocast_settings:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=self.cache))
            yield


def _keep_graph(torch):
    """Whether the running backward keeps the graph (``retain_graph=True``): then a recompute
    keeps what it needs for the next backward through the same graph instead of letting it go."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return bool(keep()) if keep is not None else False


def _counted(torch, ctx, x):
    """ctx.block(x) and the bytes its graph saves (x and the block's parameters excluded):
    policy "auto"'s measure of what the block keeps when not recomputed."""
    from .offload import _storages

    skip = {ptr for t in (*ctx.params, x) for ptr, _ in _storages(torch, t)}
    seen = {}

    def pack(t):
        for ptr, nbytes in _storages(torch, t):
            if ptr not in skip:
                seen[ptr] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ctx.block(x)
    return y, sum(seen.values())


_FUNCTIONS = {}


def _functions(torch):
    """The autograd Functions and the torch-function mode, built on first use (torch is imported
    lazily)."""
    if _FUNCTIONS:
        return _FUNCTIONS
    from torch.overrides import TorchFunctionMode

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def output_edge(y):
        """Where a recomputed block's output enters the graph: what its backward needs of it.
        Holding this instead of y lets y's memory go before that backward runs."""
        from torch.autograd.graph import get_gradient_edge

        return get_gradient_edge(y) if y.requires_grad else y

    def input_and_parameter_grads(y, x, params, grad):
        """The gradients of a recomputed block's input and parameters (None where a parameter
        takes none), from the gradient of its output (y: the output or its output_edge)."""
        trainable = [p for p in params if p.requires_grad]
        grads = iter(torch.autograd.grad([y], [x] + trainable, [grad], allow_unused=True))
        gx = next(grads)
        return gx, [next(grads) if p.requires_grad else None for p in params]

    class CoreMode(TorchFunctionMode):
        """Routes F.scaled_dot_product_attention to a handler; everything else runs as is."""

        def __init__(self, handler):
            super().__init__()
            self.handler = handler

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is sdpa:
                return self.handler(func, args, kwargs)
            return func(*args, **kwargs)

    class Entry(torch.autograd.Function):
        """q, k, v as the core's inputs, with no graph behind them: the core's node then holds
        no reference that keeps them alive (an anchor leaf makes the outputs require grad)."""

        @staticmethod
        def forward(ctx, anchor, q, k, v):
            return q.view_as(q), k.view_as(k), v.view_as(v)

        @staticmethod
        def backward(ctx, gq, gk, gv):
            return None, None, None, None

    class CoreGrad(torch.autograd.Function):
        """The core in the recomputed block: its output is the saved one; its backward is the
        forward's own core node, run on the recomputed q, k, v."""

        @staticmethod
        def forward(ctx, core, q, k, v):
            ctx.core = core
            core.slots = (q, k, v)
            out = _unpack_packed(core.out)
            return out.view_as(out)

        @staticmethod
        def backward(ctx, grad):
            # A graph task of its own from the core's node to its stand-in inputs (calling the
            # node directly, inside this backward's task, would compute nothing: that task does
            # not know the node). It releases the node's saved tensors.
            from torch.autograd.graph import GradientEdge

            core = ctx.core
            grads = torch.autograd.grad([GradientEdge(core.node, 0)],
                                        [GradientEdge(core.entry, index) for index in range(3)], [grad],
                                        retain_graph=core.keep)
            core.slots = None  # the recomputed q, k, v (a later replay recomputes them again)
            if not core.keep:
                core.node = None
                core.entry = None
            return (None, *grads)

    class TokenLocal(torch.autograd.Function):
        """Saves only x (through the swap hooks, so it is swapped; or nothing, with a `source`
        that recomputes it); block re-runs on x in backward. Forward, recompute and backward go
        `chunk` tokens at a time (the block is token-local). The block's parameters are inputs,
        so their gradients flow through this node. With `count`, the recompute reports the bytes
        it saves (x and parameters excluded), once per call."""

        @staticmethod
        def forward(ctx, block, count, source, k, chunk, x, *params):
            ctx.block = block
            ctx.count = count
            ctx.params = params  # alive anyway; not saved tensors
            ctx.source = source  # with a source, x is h[..., k:, :], recomputed from it
            ctx.k = k
            ctx.chunk = chunk
            ctx.forward_context = _ForwardContext(torch, x)
            if source is None:
                ctx.save_for_backward(x)
            with torch.no_grad():
                y = None
                for start, n in _chunks(x.shape[-2], chunk):
                    part = block(x.narrow(-2, start, n))
                    if not torch.is_tensor(part):
                        raise _NotReplayable(*_MORE_THAN_A_TENSOR, ctx.forward_context)
                    if n == x.shape[-2]:
                        return part
                    if y is None:
                        y = part.new_empty(part.shape[:-2] + (x.shape[-2],) + part.shape[-1:])
                    y.narrow(-2, start, n).copy_(part)
                return y

        @staticmethod
        def backward(ctx, grad):
            keep = _keep_graph(torch)
            if ctx.source is None:
                (x,) = ctx.saved_tensors
            else:
                h = ctx.source.residual_input(torch)
                x = h.narrow(-2, ctx.k, h.shape[-2] - ctx.k).contiguous()
                del h
                if not keep:
                    ctx.source = None
            x = x.detach()
            tokens = x.shape[-2]
            gx, sums, saved = None, None, 0
            # The chunks draw random numbers in the forward's order, from the forward's state.
            with ctx.forward_context.generators(torch):
                for start, n in _chunks(tokens, ctx.chunk):
                    # One chunk's recompute and backward at a time: the block is token-local, so only
                    # one chunk's intermediate tensors are on the device at once.
                    part = x.narrow(-2, start, n).detach().requires_grad_(True)
                    with torch.enable_grad(), ctx.forward_context.autocast(torch):
                        if ctx.count is None:
                            y = ctx.block(part)
                        else:
                            y, nbytes = _counted(torch, ctx, part)
                            saved += nbytes
                    y = output_edge(y)
                    gpart, gparams = input_and_parameter_grads(y, part, ctx.params, grad.narrow(-2, start, n))
                    del y
                    if start + n == tokens and ctx.count is not None:
                        ctx.count(saved)
                    if n == tokens:
                        return (None, None, None, None, None, gpart, *gparams)
                    if gx is None:
                        gx = gpart.new_empty(x.shape)
                        # Parameter gradients summed over chunks in float32 at least (float64 stays),
                        # rounded to the parameter's dtype once at the end.
                        sums = [None if gp is None else gp.to(torch.promote_types(gp.dtype, torch.float32), copy=True)
                                for gp in gparams]
                    else:
                        for total, gp in zip(sums, gparams):
                            if gp is not None:
                                total.add_(gp)
                    gx.narrow(-2, start, n).copy_(gpart)
                gparams = [None if total is None else total.to(p.dtype) for total, p in zip(sums, ctx.params)]
                return (None, None, None, None, None, gx, *gparams)

    class AttentionReplay(torch.autograd.Function):
        """y = self_attn(input_layernorm(x)), saving only x (and, through the core's node, the
        core's output and statistics); the block runs again from x in backward."""

        @staticmethod
        def forward(ctx, state, x, *params):
            ctx.state = state
            ctx.params = params
            state.forward_context = _ForwardContext(torch, x)
            # Saved through the layer's pack hook (swapped) where residual_input finds it too.
            state.x = state.pack(x)
            with CoreMode(_capture(torch, state)):
                result = state.run(x)
            if isinstance(result, (tuple, list)):
                extras = tuple(result[1:])
                if any(torch.is_tensor(e) for e in extras):
                    raise _NotReplayable("it returns tensors besides its output (attention weights: an attention "
                                         "implementation such as eager's)",
                                         "replayed, they would have no autograd graph (sdpa returns none)",
                                         state.forward_context)
                state.extras = extras
                result = result[0]
            return result

        @staticmethod
        def backward(ctx, grad):
            state = ctx.state
            # Under retain_graph=True the next backward through this graph replays the block
            # again: the state stays, and the cores' nodes keep what they saved.
            keep = _keep_graph(torch)
            for core in state.cores:
                core.keep = keep
            x = _unpack_packed(state.x).detach().requires_grad_(True)
            with torch.enable_grad():
                y = output_edge(state.replay(torch, x, grad=True))
            gx, gparams = input_and_parameter_grads(y, x, ctx.params, grad)
            if not keep:
                state.cores = []
                state.x = state.run = state.input_edge = state.output_node = None
            return (None, gx, *gparams)

    _FUNCTIONS.update(CoreMode=CoreMode, Entry=Entry, CoreGrad=CoreGrad, TokenLocal=TokenLocal,
                      AttentionReplay=AttentionReplay)
    return _FUNCTIONS


class _Lazy:
    """One of _functions' autograd Functions, looked up at its first use."""

    def __init__(self, name):
        self.name = name

    def apply(self, *args):
        import torch

        return _functions(torch)[self.name].apply(*args)


_TokenLocal = _Lazy("TokenLocal")
_AttentionReplay = _Lazy("AttentionReplay")
