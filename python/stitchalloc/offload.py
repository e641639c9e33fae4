"""``stitchalloc.offload(model)``: saved activations leave for pinned host memory at layer
boundaries, with a fraction of tokens recomputed instead of copied (docs/offload.md).

How it hooks in (nothing in the training loop changes):

- each layer's ``forward`` runs under ``torch.autograd.graph.saved_tensors_hooks``: a tensor
  autograd saves is handed to the swap manager (``stitchalloc.swap``) as a ticket, one ticket per
  storage, parameters excluded; the first layer's forward starts the iteration;
- when a layer's forward returns, its offloads are issued (the copy runs while the next layer
  computes) and its own references are dropped, so the device memory returns to the allocator
  once the copy has read it;
- a gradient hook on the layer's output marks the start of its backward: the layers below come
  back (lookahead from the swap_lookahead key); ``unpack`` waits for its tensor in stream order;
- a saved tensor that dies without being used (no backward) cancels its ticket.

Token-wise recompute for Llama-family decoder layers (transformers' LlamaDecoderLayer and Qwen2,
recognised by ``input_layernorm``, ``self_attn``, ``post_attention_layernorm`` and ``mlp``, and
no ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` as Gemma's layers have), under
every policy but "swap". A layer that calls ``mlp`` on anything but what its
``post_attention_layernorm`` returned is refused at that call (its split would compute another
function):

- the attention block (``self_attn(input_layernorm(x))``) saves only the layer input x and what
  the attention core itself produced: when the block calls F.scaled_dot_product_attention and
  PyTorch runs it as one fused kernel (flash, memory-efficient, cuDNN, the CPU flash kernel), its
  output and softmax statistics are swapped and its q, k, v are not kept: before the layer's
  backward, the block's token-local part (norm, projections, RoPE, output projection) is
  recomputed from x and the core's own backward runs on the recomputed q, k, v with the saved
  output (``_AttentionReplay``). A block whose core is not one fused kernel (attention spelled out,
  a padded head size) is recomputed whole from x, core included. Attention dropout is refused;
  a KV cache argument is dropped (with one warning), as transformers' gradient checkpointing does;
- the token-local block after it (``mlp(post_attention_layernorm(h))``, h being the attention
  output plus the residual) runs in two token ranges: the first ``alpha`` of the tokens with
  their saved tensors swapped, the rest recomputed, token by token, when the layer's backward
  needs them, from their slice of h. h itself is not kept when the graph shows it is exactly x
  plus the attention block's output: before the block's backward it is recomputed from x and
  the core's saved output (``_AttentionState.residual_input``); otherwise the slice is swapped.
  The recomputed range runs ``recompute_chunk`` tokens at a time, in the forward and in the
  recompute with its backward, so one chunk's MLP intermediates (4 x the MLP width a token,
  most of a layer's working set) are on the device at once, not the whole sequence's.

So at alpha 0 a layer swaps x and the core's output and statistics: MEMO's "layer input and
attention output". Layers of any other structure have their saved tensors swapped whole.

Policies: ``"swap"`` (everything swapped, no recompute), ``"recompute"`` (alpha 0 for Llama-family
layers; other layers run under torch.utils.checkpoint, which keeps their inputs on the device),
a number alpha in [0, 1] (Llama-family layers only, unless 1), or ``"auto"``: the first
iteration runs at alpha 0 (the least device and host memory, so it fits wherever any alpha
would) and measures the per-layer bytes (what every alpha swaps, and what the token-local block
saves, counted by its recompute), the layer forward time (the median layer's compute, timed
before its offloads are issued) and the copy bandwidth; alpha then comes from the MEMO formula
(``stitchalloc.offload_plan``), with the host memory capped by the pinned pool's limit.
"""

import contextlib
import os
import statistics
import time
import weakref

_LLAMA_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
# Layers with these norm the attention's output before the residual and the MLP's input with a
# norm of its own (Gemma 2 and 3): their post_attention_layernorm is not the MLP's norm, so the
# token-local block mlp(post_attention_layernorm(h)) does not exist there.
_OTHER_MLP_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def offload_plan(layers, input_bytes, attention_bytes, other_bytes, copy_bytes_per_second, layer_forward_seconds,
                 host_bytes):
    """The token-wise plan (alpha and its table) for a model shape and hardware figures.

    Returns ``(alpha, text)``; ``print(text)`` shows alpha, the binding limit, bytes swapped and
    recomputed per layer, predicted copy time against the layer time, and warnings."""
    import ctypes

    from . import _c_api

    lib = _c_api()
    lib.stitchalloc_plan_offload.argtypes = [ctypes.c_int] + [ctypes.c_double] * 6 + [
        ctypes.POINTER(ctypes.c_double), ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
    alpha = ctypes.c_double()
    needed = ctypes.c_size_t()
    buf = ctypes.create_string_buffer(8192)
    if lib.stitchalloc_plan_offload(int(layers), float(input_bytes), float(attention_bytes), float(other_bytes),
                                    float(copy_bytes_per_second), float(layer_forward_seconds), float(host_bytes),
                                    ctypes.byref(alpha), buf, len(buf), ctypes.byref(needed)) != 0:
        raise ValueError(lib.stitchalloc_last_error().decode())
    return alpha.value, buf.value.decode()


class _StitchallocBackend:
    """The swap manager of the installed allocator (stitchalloc.swap)."""

    def __init__(self):
        from . import installed, swap

        if not installed():
            raise RuntimeError("stitchalloc.offload needs stitchalloc as PyTorch's CUDA allocator "
                               "(stitchalloc.install(), PYTORCH_CUDA_ALLOC_CONF=backend:stitchalloc or LD_PRELOAD)")
        self._swap = swap

    def accepts(self, t):
        return t.is_cuda

    @staticmethod
    def device_of(t):
        """The device whose swap manager takes ``t`` (stitchalloc.swap.offload picks it so)."""
        return t.device.index

    def begin(self, num_layers, device):
        self._swap.begin_iteration(num_layers, device)

    def offload(self, t, layer):
        return self._swap.offload(t, layer)

    def forward_end(self, layer, device):
        self._swap.forward_end(layer, device)

    def backward_begin(self, layer, device):
        self._swap.backward_begin(layer, device)

    def wait_storage(self, ticket):
        return self._swap.wait_storage(ticket)

    def cancel(self, ticket):
        self._swap.cancel(ticket)

    def copy_bytes_per_second(self, device):
        return float(self._swap.swap_stats(device).get("copy.d2h_bytes_per_second", 0.0))

    def host_bytes(self, device):
        """Host memory this GPU's swapped tensors may use: its share of physical memory, and
        never more than the pinned pool's cap (swap_host_limit_mb)."""
        import torch

        count = max(1, torch.cuda.device_count())
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cap = float(self._swap.swap_stats(device).get("pinned.capacity_bytes", 0.0))
        return min(physical / count, cap) if cap > 0 else physical / count


class _Storage:
    """One offloaded storage of one iteration, shared by every saved view of it."""

    __slots__ = ("owner", "ticket", "layer", "tensor", "version", "restored", "__weakref__")

    def __init__(self, owner, ticket, layer, tensor):
        self.owner = owner
        self.ticket = ticket
        self.layer = layer
        self.tensor = tensor  # until the layer's forward ends (in-place check)
        self.version = tensor._version
        self.restored = None  # the storage back on the device, as flat bytes

    def bytes(self):
        if self.restored is None:
            self.restored = self.owner._backend.wait_storage(self.ticket)
            self.owner._waited += 1
        return self.restored

    def __del__(self):
        # Died before any unpack (no backward, or the graph was freed): drop the pending copy.
        if getattr(self, "restored", None) is None and getattr(self, "ticket", None) is not None:
            try:
                self.owner._backend.cancel(self.ticket)
                self.owner._cancelled += 1
            except Exception:  # interpreter shutdown, allocator gone: nothing left to return
                pass


class _Saved:
    """What autograd keeps instead of a swapped tensor: its storage and its view."""

    __slots__ = ("storage", "dtype", "size", "stride", "offset")

    def __init__(self, storage, t):
        self.storage = storage
        self.dtype = t.dtype
        self.size = tuple(t.size())
        self.stride = tuple(t.stride())
        self.offset = t.storage_offset()


class Offload:
    """The hooks ``offload()`` installed; ``remove()`` (or leaving a ``with`` block) undoes them."""

    def __init__(self, model, layers, policy, backend, recompute_chunk=8192):
        import torch

        self._torch = torch
        self._layers = list(layers)
        if not self._layers:
            raise ValueError("stitchalloc.offload: no layers to offload")
        self._backend = backend
        self._policy = policy
        self._recompute_chunk = recompute_chunk
        self._alpha = None if policy == "auto" else (1.0 if policy == "swap" else 0.0 if policy == "recompute"
                                                     else float(policy))
        self._llama = [all(hasattr(layer, p) for p in _LLAMA_PARTS)
                       and not any(hasattr(layer, p) for p in _OTHER_MLP_NORMS) for layer in self._layers]
        self._token_local_outputs = {}  # layer -> what its token-local block returned, until mlp is called
        self._attention_inputs = {}  # layer -> what its input_layernorm got, until self_attn is called
        # Every policy but "swap" (alpha 1 given as a number is "swap") recomputes the attention
        # block's token-local part; "auto" does too, whatever alpha its plan gives.
        self._token_wise = policy == "auto" or self._alpha < 1.0
        self._in_layer = None  # the layer whose forward runs under our hooks
        self._attention_states = {}  # layer -> its attention block's state, until its token-local block
        self._warned_cache = False
        self._warned_capture = False
        if self._alpha is not None and self._alpha < 1.0 and policy != "recompute" and not all(self._llama):
            raise ValueError(f"stitchalloc.offload: alpha {self._alpha} splits tokens, which needs Llama-family "
                             "decoder layers (input_layernorm, self_attn, post_attention_layernorm, mlp); use "
                             "policy='swap' or 'recompute' for other layers")
        self._param_storages = set()
        # The running layer's parameters as its forward sees them: FSDP2 gathers them into new
        # storage for each forward (views of which, such as a weight's transpose, are saved).
        self._layer_param_storages = frozenset()
        for p in model.parameters():
            address = _storage_address(p)
            if address is not None:
                self._param_storages.add(address)
        # The devices this iteration's saved tensors are on, in order of first use: a model split
        # over several GPUs (transformers' device_map) has a swap manager on each.
        self._devices = []
        self._by_ptr = {}  # storage data_ptr -> _Storage, within the current layer
        self._pending = {}  # layer -> [_Storage] whose forward has not ended
        self._undo = []
        self._unpack_hook = _eager(torch, self._unpack)
        self._measure = None if self._alpha is not None else {"bytes": 0.0, "input": 0.0, "local": 0.0,
                                                               "local_layers": 0, "times": [], "layers": 0}
        self.layer_forward_seconds = None  # measured by policy "auto": the median layer's forward
        self.measured = None  # policy "auto": the plan's per-layer bytes (input, attention, other)
        self.plan_text = None
        # Counters (also what the tests look at).
        self.offloaded = 0
        self._waited = 0
        self._cancelled = 0
        self.iterations = 0
        for i, layer in enumerate(self._layers):
            self._wrap(i, layer)

    # ---- public ---------------------------------------------------------------------------
    @property
    def alpha(self):
        """The fraction of token-local saved tensors swapped (None until "auto" has measured)."""
        return self._alpha

    def stats(self):
        return {"iterations": self.iterations, "offloaded": self.offloaded, "waited": self._waited,
                "cancelled": self._cancelled, "alpha": self._alpha}

    def remove(self):
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    # ---- hooks ----------------------------------------------------------------------------
    def _pack(self, layer):
        torch = self._torch

        def pack(t):
            if (not self._backend.accepts(t) or isinstance(t, torch.nn.Parameter)
                    or t.untyped_storage().data_ptr() in self._param_storages
                    or t.untyped_storage().data_ptr() in self._layer_param_storages
                    or t.untyped_storage().nbytes() == 0):
                return t
            if self._capturing():
                return t
            device = self._device_of(t)
            if device not in self._devices:
                self._backend.begin(len(self._layers), device)
                self._devices.append(device)
            ptr = t.untyped_storage().data_ptr()
            s = self._by_ptr.get(ptr)
            if s is None:
                s = _Storage(self, self._backend.offload(t, layer), layer, t)
                self._by_ptr[ptr] = s
                self._pending.setdefault(layer, []).append(s)
                self.offloaded += 1
                if self._measure is not None:
                    self._measure["bytes"] += t.untyped_storage().nbytes()
            return _Saved(s, t)

        return _eager(torch, pack)

    def _capturing(self):
        """Whether a CUDA graph is being captured on the current stream (torch.cuda.graph,
        torch.compile's CUDA graphs): the swap manager's schedule (host-side tickets, events,
        copies issued at layer ends) cannot be replayed by a graph, so saved tensors then stay
        on the device, as without offload. Warns once."""
        torch = self._torch
        if not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()):
            return False
        if not self._warned_capture:
            import warnings

            warnings.warn("stitchalloc.offload: a CUDA graph is being captured; the tensors it saves for backward "
                          "stay on the device (offload's copies and schedule cannot be replayed by a graph)",
                          stacklevel=3)
            self._warned_capture = True
        return True

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        from .swap import restore

        return restore(saved.storage.bytes(), saved.dtype, saved.size, saved.stride, saved.offset)

    def _forward_end(self, layer):
        self._attention_states.pop(layer, None)  # not consumed: nothing may outlive the forward
        pending = self._pending.pop(layer, [])
        for s in pending:
            if s.tensor._version != s.version:
                raise RuntimeError(
                    f"stitchalloc.offload: a tensor saved for backward in layer {layer} was modified in place "
                    "before the layer's forward ended; its copy would not match what autograd saved")
            s.tensor = None
        self._by_ptr.clear()
        for device in self._devices:
            self._backend.forward_end(layer, device)

    def _backward_begin(self, layer):
        for device in self._devices:
            self._backend.backward_begin(layer, device)
        if layer == 0:
            self._iteration_done()

    def _iteration_done(self):
        self.iterations += 1
        device = self._devices[0] if self._devices else 0
        self._devices = []
        m = self._measure
        if m is None or m["layers"] == 0:
            return
        self._measure = None
        n = len(self._layers)
        # The measuring iteration swapped what every alpha swaps: the layer input, the attention
        # block's tensors and the attention output the token-local block starts from. The plan's
        # "other" is what that block saves when it is not recomputed (counted by its recompute,
        # in the backward of every layer but the first, which comes after this point).
        per_layer = m["bytes"] / m["layers"]
        s_in = m["input"] / m["layers"]
        s_attn = max(per_layer - s_in, 0.0)
        other = max(m["local"] / m["local_layers"], 1.0) if m["local_layers"] else 1.0
        self.measured = {"input": s_in, "attention": s_attn, "other": other}
        bandwidth = self._backend.copy_bytes_per_second(device)
        # The median layer: the first layers of the first iteration also pay one-time costs
        # (library handles, kernel selection, the first mappings).
        seconds = statistics.median(m["times"])
        self.layer_forward_seconds = seconds
        if bandwidth <= 0 or seconds <= 0 or n < 3 or not all(self._llama):
            self._alpha = 1.0
            self.plan_text = (f"alpha 1 (swap everything): measured bandwidth {bandwidth:.3g} B/s, layer time "
                              f"{seconds:.3g} s, {n} layers, Llama-family: {all(self._llama)}")
            return
        self._alpha, self.plan_text = offload_plan(n, s_in, s_attn, other, bandwidth, seconds,
                                                   self._backend.host_bytes(device))

    def _device_of(self, t):
        device_of = getattr(self._backend, "device_of", None)
        return device_of(t) if device_of is not None else (t.device.index or 0)

    def _count_local(self, nbytes):
        if self._measure is not None:
            self._measure["local"] += nbytes
            self._measure["local_layers"] += 1

    # ---- wrapping -------------------------------------------------------------------------
    def _wrap(self, i, layer):
        torch = self._torch
        original = layer.forward
        pack = self._pack(i)
        owner = weakref.ref(self)
        llama = self._llama[i]
        checkpoint_whole = self._alpha == 0.0 and not llama

        if llama and self._token_wise:  # under "swap" the layer runs as it is
            self._wrap_token_local(i, layer, pack)
            self._wrap_attention(i, layer, pack)

        def on_grad(grad):
            me = owner()
            if me is not None:
                me._backward_begin(i)
            return grad

        def begin(args):
            """Whether this call is offloaded (then the Offload and the measure's start time)."""
            me = owner()
            if me is None or not torch.is_grad_enabled() or _in_backward(torch):
                # In a backward: the layer's forward recomputed by a torch.utils.checkpoint the
                # model runs it under (reentrant). What it saves is used by this backward at once.
                return None
            start = time.perf_counter() if me._measure is not None else None
            if start is not None and args and torch.is_tensor(args[0]):
                me._measure["input"] += args[0].untyped_storage().nbytes()
            me._in_layer = i
            me._layer_param_storages = frozenset(_storage_address(p) for p in layer.parameters())
            return me, start

        def failed(me):
            me._in_layer = None
            me._layer_param_storages = frozenset()

        def end(me, start, out):
            me._in_layer = None
            me._layer_param_storages = frozenset()
            if start is not None:
                # The layer's own compute: timed before its offloads are issued (their copies, and
                # the pinned pool growing for them, are what the compute must hide, not part of it).
                if torch.cuda.is_available():
                    for device in me._devices:
                        torch.cuda.synchronize(device)
                me._measure["times"].append(time.perf_counter() - start)
                me._measure["layers"] += 1
            me._forward_end(i)
            first = out[0] if isinstance(out, (tuple, list)) else out
            if torch.is_tensor(first) and first.requires_grad:
                first.register_hook(on_grad)
            return out

        on_grad, begin, end, failed = (_eager(torch, f) for f in (on_grad, begin, end, failed))

        def forward(*args, **kwargs):
            # Under torch.compile only the layer's own computation (`original`) is compiled:
            # begin, end and the hooks run eagerly.
            began = begin(args)
            if began is None:
                return original(*args, **kwargs)
            me, start = began
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, me._unpack_hook):
                    if checkpoint_whole:
                        import torch.utils.checkpoint as cp

                        out = cp.checkpoint(original, *args, use_reentrant=False, **kwargs)
                    else:
                        out = original(*args, **kwargs)
            except BaseException:
                failed(me)
                raise
            return end(me, start, out)

        layer.forward = _eager(torch, forward, recursive=False)
        self._undo.append(lambda: layer.__dict__.pop("forward", None))

    def _wrap_token_local(self, i, layer, pack):
        """mlp(post_attention_layernorm(h)) split by tokens (see the module docstring)."""
        torch = self._torch
        norm, mlp = layer.post_attention_layernorm, layer.mlp
        norm_forward, mlp_forward = norm.forward, mlp.forward
        owner = weakref.ref(self)

        def params():
            # Read at each call: FSDP2 puts its unsharded parameters on the modules for the
            # forward (and its sharded ones back after it).
            return (*norm.parameters(), *mlp.parameters())

        def block(h):
            return mlp_forward(norm_forward(h))

        def fused(h):
            out = token_local(h)
            me = owner()
            if me is not None:
                me._token_local_outputs[i] = out
            return out

        def mlp_applied(x):
            """The layer's call of mlp, already applied: it must be on what the token-local block
            returned, or the layer is not built as the block assumes."""
            me = owner()
            expected = me._token_local_outputs.pop(i, None) if me is not None else x
            if x is not expected:
                raise RuntimeError(
                    f"stitchalloc.offload: layer {i} ({type(layer).__name__}) calls mlp on something other than "
                    "post_attention_layernorm's output, so its token-wise recompute (which runs "
                    "mlp(post_attention_layernorm(h)) as one block) would compute another function; use "
                    "policy='swap'")
            return x

        def token_local(h):
            me = owner()
            if (me is None or me._in_layer != i or not torch.is_grad_enabled() or h.dim() < 2
                    or not _innermost(torch, pack)):
                return block(h)
            # The measuring iteration of policy "auto" recomputes the whole block (the least
            # memory: at a length that needs alpha < 1, swapping everything would not fit), and
            # the block's recompute counts what it saves (the plan's "other").
            measuring = me._measure is not None
            alpha = 0.0 if measuring else me._alpha
            tokens = h.shape[-2]
            k = min(tokens, max(0, round(alpha * tokens)))
            # h = x + the attention block's output: recomputed from what that block keeps
            # rather than swapped, when the graph shows it is exactly that sum.
            source = me._attention_states.pop(i, None)
            if source is not None and not source.is_residual_of(h):
                source = None
            if k == tokens:
                return block(h)
            parts = []
            if k > 0:
                # With h recomputed, a view of it saved by the block would swap all of h: the
                # first tokens get storage of their own.
                head = h.narrow(-2, 0, k)
                parts.append(block(head.clone() if source is not None else head.contiguous()))
            rest = h.narrow(-2, k, tokens - k).contiguous()
            parts.append(_TokenLocal.apply(block, me._count_local if measuring else None, source, k,
                                           me._recompute_chunk, rest, *params()))
            return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

        norm.forward = _eager(torch, fused)
        mlp.forward = _eager(torch, mlp_applied)
        self._undo.append(lambda: norm.__dict__.pop("forward", None))
        self._undo.append(lambda: mlp.__dict__.pop("forward", None))

    _CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past")  # transformers' names, by version

    def _without_cache(self, kwargs):
        """The attention block's keyword arguments without a KV cache: the block runs again in the
        backward, and a cache would be extended twice (transformers' own gradient checkpointing
        turns the cache off the same way). Warns once."""
        names = [n for n in self._CACHE_ARGUMENTS if kwargs.get(n) is not None]
        if not names:
            return kwargs
        if not self._warned_cache:
            import warnings

            warnings.warn("stitchalloc.offload: the attention blocks are recomputed in the backward, so they run "
                          "without the KV cache (as under gradient checkpointing); the cache the model returns lacks "
                          "these layers. Pass use_cache=False to the model to silence this.", stacklevel=4)
            self._warned_cache = True
        return {k: (None if k in names else v) for k, v in kwargs.items()}

    def _wrap_attention(self, i, layer, pack):
        """self_attn(input_layernorm(x)) as one _AttentionReplay (see the module docstring)."""
        torch = self._torch
        norm, attn = layer.input_layernorm, layer.self_attn
        norm_forward, attn_forward = norm.forward, attn.forward
        owner = weakref.ref(self)

        def params():
            return (*norm.parameters(), *attn.parameters())  # read at each call, as above

        def forward(*args, **kwargs):
            # The layer calls self_attn with the hidden states positionally (tiny_llama) or as
            # hidden_states= (transformers); input_layernorm, now the identity, left them raw.
            # The closures below live until the layer's backward: they must not hold x (it is
            # swapped), only the other arguments.
            me = owner()
            replay = me is not None and me._in_layer == i and torch.is_grad_enabled() and _innermost(torch, pack)
            if replay:
                kwargs = me._without_cache(kwargs)
            if args:
                x, rest, others = args[0], args[1:], kwargs
                rebuild = (lambda h: ((h,) + rest, others))
            else:
                x = kwargs["hidden_states"]
                others = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                rebuild = (lambda h: ((), {**others, "hidden_states": h}))
            del args, kwargs
            if me is not None and x is not me._attention_inputs.pop(i, None):
                raise RuntimeError(
                    f"stitchalloc.offload: layer {i} ({type(layer).__name__}) calls self_attn on something other than "
                    "input_layernorm's output, so its token-wise recompute (which runs "
                    "self_attn(input_layernorm(x)) as one block) would compute another function; use policy='swap'")

            def run(h):
                a, kw = rebuild(norm_forward(h))
                return attn_forward(*a, **kw)

            if not replay or not torch.is_tensor(x) or x.dim() < 2:
                return run(x)
            state = _AttentionState(me, pack, run)
            y = _AttentionReplay.apply(state, x, *params())
            # For the token-local block that follows: h = x + y can be recomputed instead of
            # swapped (its wrapper checks that h is that sum).
            if x.requires_grad:
                from torch.autograd.graph import get_gradient_edge

                state.input_edge = get_gradient_edge(x)
                state.output_node = y.grad_fn
            me._attention_states[i] = state
            return (y,) + state.extras if state.extras is not None else y

        def normed(h):
            """input_layernorm, applied inside the attention block: what self_attn must get."""
            me = owner()
            if me is not None:
                me._attention_inputs[i] = h
            return h

        norm.forward = _eager(torch, normed)
        attn.forward = _eager(torch, forward)
        self._undo.append(lambda: norm.__dict__.pop("forward", None))
        self._undo.append(lambda: attn.__dict__.pop("forward", None))


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _Deferred:
    """A tensor the attention core's node saved: held as is until the core is known to be one
    fused node, then handed to the layer's pack hook (swapped) or dropped with the node."""

    __slots__ = ("tensor", "packed")

    def __init__(self, tensor):
        self.tensor = tensor
        self.packed = None


class _Recomputed:
    """What the core's node keeps instead of q, k or v: the index of the tensor recomputed
    before the layer's backward."""

    __slots__ = ("core", "index")

    def __init__(self, core, index):
        self.core = core
        self.index = index


class _Core:
    """One attention core call of one replayed attention block."""

    __slots__ = ("node", "entry", "meta", "slots", "out", "keep")

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
                 "forward_context")

    def __init__(self, owner, pack, run):
        self.owner = owner
        self.pack = pack
        self.cores = []
        self.next = 0
        self.extras = None  # what the block returns besides its output (transformers: (None,))
        self.run = run  # the block, from the raw layer input
        self.x = None  # the layer input as the layer's pack hook saved it (swapped)
        self.input_edge = None  # where x came from in the graph, and where the block's output goes:
        self.output_node = None  # to recognise h = x + output (residual_input)
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
        if node is None or self.output_node is None or self.input_edge is None or node.name() != "AddBackward0":
            return False
        if getattr(node, "_saved_alpha", 1) != 1:
            return False
        edges = {(id(f), n) for f, n in node.next_functions}
        return edges == {(id(self.output_node), 0), (id(self.input_edge.node), self.input_edge.output_nr)}


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
        slots = saved.core.slots
        if slots is None:
            raise RuntimeError("stitchalloc.offload: the attention core's backward ran before its inputs were "
                               "recomputed (was the layer's graph used twice?)")
        return slots[saved.index]
    if isinstance(saved, _Deferred):
        return saved.tensor if saved.packed is None else _unpack_packed(saved.packed)
    return saved


def _unpack_packed(packed):
    """What a layer's pack hook returned, as a tensor again."""
    return packed.storage.owner._unpack(packed) if isinstance(packed, _Saved) else packed


def _capture(torch, state):
    """The attention core in the block's forward (no grad): run with a graph of its own whose
    inputs are stand-ins for q, k, v, so that its node saves them as _Recomputed markers."""
    Entry = _functions(torch)["Entry"]

    def handler(func, args, kwargs):
        bound = _sdpa_arguments(args, kwargs)
        if float(bound.get("dropout_p", 0.0) or 0.0) != 0.0:
            raise RuntimeError("stitchalloc.offload: token-wise recompute cannot replay attention dropout "
                               "(dropout_p > 0); use policy='swap' or train without attention dropout")
        q, k, v = bound["query"], bound["key"], bound["value"]
        core = _Core()
        anchor = torch.empty(0, device=q.device, requires_grad=True)
        # Autograd keeps the pack hook as long as what it packed: the hook must hold no tensor
        # (q, k and v would stay on the device until the backward), only their addresses and
        # layouts, and the deferred tensors only until they are handed on below.
        stand_in_keys = []
        held = []

        def pack(t):
            key = (t.data_ptr(), t.dtype, tuple(t.size()), tuple(t.stride()))
            if key in stand_in_keys:
                return _Recomputed(core, stand_in_keys.index(key))
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
        if len(edges) == 3 and all(f is entry and n == index for index, (f, n) in enumerate(edges)):
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
        from torch.utils.checkpoint import set_device_states

        fork_type = self.device_type if self.device_type != "cpu" else "cuda"
        with torch.random.fork_rng(devices=self.devices, device_type=fork_type):
            torch.set_rng_state(self.cpu_rng)
            if self.devices:
                set_device_states(self.devices, self.device_rngs, device_type=self.device_type)
            yield

    @contextlib.contextmanager
    def autocast(self, torch):
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in self.autocast_settings:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=self.cache))
            yield


def _storage_address(t):
    """Where ``t``'s storage is; for a distributed tensor (FSDP2's parameters are DTensors, which
    have no storage of their own) its local shard's; None where there is none to read."""
    to_local = getattr(t, "to_local", None)
    if to_local is not None:
        t = to_local()
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return None


def _eager(torch, fn, recursive=True):
    """``fn``, never traced by torch.compile: offload's hooks and wrappers act on Python state
    (tickets, the layer schedule, storage addresses) at run time, which a compiled graph would
    freeze or guard on (dynamo used to trace the pack hook anew for each storage address until
    its recompile limit). ``recursive=False`` leaves what ``fn`` calls compilable."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn, recursive=recursive) if disable is not None else fn


def _innermost(torch, pack):
    """Whether ``pack`` (a layer's) is the innermost saved-tensor hook, so that what autograd
    saves now goes to it. Not so inside a torch.utils.checkpoint the layer runs itself: the
    checkpoint's hooks get the tensors, and its recompute in the backward runs without ours;
    the layer's blocks then run as they are, in the forward as in that recompute."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True
    hooks = top(False)
    return hooks is not None and hooks[0] is pack


def _in_backward(torch):
    """Whether a backward pass is running on this thread."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _keep_graph(torch):
    """Whether the running backward keeps the graph (``retain_graph=True``): then a recompute
    keeps what it needs for the next backward through the same graph instead of letting it go."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return bool(keep()) if keep is not None else False


def _counted(torch, ctx, x):
    """ctx.block(x) and the bytes its graph saves (x and the block's parameters excluded):
    policy "auto"'s measure of what the block keeps when not recomputed."""
    skip = {p.untyped_storage().data_ptr() for p in ctx.params} | {x.untyped_storage().data_ptr()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
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
                    raise RuntimeError("stitchalloc.offload: the attention block returns tensors besides its output "
                                       "(attention weights?); token-wise recompute needs an attention "
                                       "implementation that does not (sdpa), or policy='swap'")
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


def _find_layers(model):
    import torch

    best = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2:
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ValueError("stitchalloc.offload: found no nn.ModuleList of layers in the model; pass layers=[...]")
    return list(best)


def offload(model, layers=None, policy="auto", *, recompute_chunk=8192, backend=None):
    """Offloads ``model``'s saved activations layer by layer (see the module docstring).

    ``layers``: the modules whose boundaries drive the schedule (default: the model's longest
    nn.ModuleList). ``policy``: "auto", "swap", "recompute" or an alpha in [0, 1].
    ``recompute_chunk``: the recomputed tokens of a Llama-family layer's MLP block run (forward,
    and recompute with backward) this many at a time, so that one chunk's intermediate tensors
    are on the device at once (0: all tokens at once). Needs stitchalloc installed as PyTorch's
    CUDA allocator (``backend`` replaces the swap manager, for tests). Returns an ``Offload``
    whose ``remove()`` restores the model."""
    if isinstance(policy, str):
        if policy not in ("auto", "swap", "recompute"):
            raise ValueError(f"stitchalloc.offload: policy must be 'auto', 'swap', 'recompute' or a number in [0, 1], "
                             f"not {policy!r}")
    elif isinstance(policy, bool) or not isinstance(policy, (int, float)) or not 0.0 <= float(policy) <= 1.0:
        raise ValueError(f"stitchalloc.offload: alpha must be a number in [0, 1], not {policy!r}")
    if isinstance(recompute_chunk, bool) or not isinstance(recompute_chunk, int) or recompute_chunk < 0:
        raise ValueError(f"stitchalloc.offload: recompute_chunk must be a whole number of tokens >= 0 "
                         f"(0: no chunks), not {recompute_chunk!r}")
    if layers is None:
        layers = _find_layers(model)
    return Offload(model, layers, policy, backend if backend is not None else _StitchallocBackend(),
                   recompute_chunk)
