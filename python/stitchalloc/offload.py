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
recognised by ``input_layernorm``, ``self_attn``, ``post_attention_layernorm`` and ``mlp``, or
Meta's reference naming, ``attention_norm``, ``attention``, ``ffn_norm`` and ``feed_forward``
(torchtitan), and none of the markers of other wirings, ``_OTHER_WIRING``), under every policy but "swap". A layer
whose calls show it is wired otherwise (``_wiring``: a callee called on something other than its
norm's output, a norm's output used otherwise, an MLP taking more than it) runs as it is from its
first call on, and a step in which a layer that has split is found so fails (its split would
compute another function). A block runs as it is (its saved tensors swapped) in a call where a
hook could see or keep its tensors (``_why_whole``: transformers' router-logit recorder of a mixture of experts),
and in a call where a module in it keeps a tensor in an attribute (or in a container it
holds) or changes a buffer or another tensor it holds in place (``_changed_state``: a
token-wise call that did is undone and runs
again as it is, and the block's next calls run as they are until one changes neither; one that
does so only while autograd records is seen in the recompute, ``_changed_in_recompute``, and
runs as it is from its next call):

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
attention output". Layers of any other structure have their saved tensors swapped whole. This
module holds the hooks, the wrappers and the schedule; the recompute's autograd Functions and the
attention core's capture and replay are in ``_token_wise``; the checks of whether a block may run
token-wise in a call (hooks, module state) are in ``_block_checks``.

Policies: ``"swap"`` (everything swapped, no recompute), ``"recompute"`` (alpha 0 for Llama-family
layers; other layers run under torch.utils.checkpoint, which keeps their inputs on the device),
a number alpha in [0, 1] (applied to the Llama-family layers, other layers swapped whole; refused
when no layer is Llama-family, unless 0 or 1), or ``"auto"``: the first
iteration runs at alpha 0 (the least device and host memory, so it fits wherever any alpha
would) and measures the per-layer bytes (what every alpha swaps, and what the token-local block
saves, counted by its recompute), the layer forward time (the median layer's compute, timed
before its offloads are issued) and the copy bandwidth; alpha then comes from the MEMO formula
(``stitchalloc.offload_plan``), with the host memory capped by the pinned pool's limit.
"""

import functools
import itertools
import os
import statistics
import time
import weakref

from ._block_checks import _CHANGE_WORDS, _MISSING, _changed_state, _restore_state, _state_snapshot, _why_whole
from ._replaced import _Forward
from ._token_wise import (_MORE_THAN_A_TENSOR, _AttentionReplay, _AttentionState, _ForwardContext, _NotReplayable,
                          _TokenLocal)
from ._wiring import (ATTENTION, MLP, _callee_got, _Miswired, _norm_and_callee, _norm_returned, _NormOutputWatch,
                      _passed_to, _raise_unused, _unused_norms, _unwatched)

# A Llama-family decoder layer's four modules (attention norm, attention, MLP norm, MLP) in the
# namings of the code that builds such layers: transformers' (LlamaDecoderLayer, Qwen2, ...),
# Meta's reference Llama's (torchtitan's TransformerBlock and the many models written after it),
# and transformers' hybrid layers whose token mixer is a linear attention (Qwen3-Next, Qwen3.5:
# Gated DeltaNet), wired as Llama's around it. A mixer other than F.scaled_dot_product_attention
# is no core offload captures: its block is recomputed whole from x, and the MLP block splits.
_LLAMA_NAMINGS = (("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"),
                  ("attention_norm", "attention", "ffn_norm", "feed_forward"),
                  ("input_layernorm", "linear_attn", "post_attention_layernorm", "mlp"))
# Layers with the first three norm the attention's output before the residual and the MLP's input
# with a norm of its own (Gemma 2 and 3, AFMoE): their post_attention_layernorm is not the MLP's
# norm, so the token-local block mlp(post_attention_layernorm(h)) does not exist there.
# So do layers with these: MiniMax's residuals are the norms' outputs (scaled by
# attn_alpha_factor and mlp_alpha_factor), which a token-wise block replaces. _wiring's checks
# find each of these at a layer's first call too (it then runs as it is); named here, they are
# layers of another family from the start, which "recompute" checkpoints whole.
_OTHER_WIRING = ("pre_feedforward_layernorm", "post_feedforward_layernorm", "pre_mlp_layernorm", "attn_alpha_factor")


def _llama_names(layer):
    """The names of ``layer``'s four modules (one of _LLAMA_NAMINGS) if it is taken for a
    Llama-family decoder layer, whose blocks split token-wise; else None. Each must be a module
    the layer can call: a ModuleList or ModuleDict under such a name (LongCat-Flash keeps two
    norms and two attentions per layer so) is not one."""
    import torch

    def callable_module(name):
        m = getattr(layer, name, None)
        return isinstance(m, torch.nn.Module) and not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict))

    if any(hasattr(layer, p) for p in _OTHER_WIRING):
        return None
    return next((names for names in _LLAMA_NAMINGS if all(callable_module(p) for p in names)), None)


def _is_llama(layer):
    """Whether ``layer`` is taken for a Llama-family decoder layer, whose blocks split token-wise."""
    return _llama_names(layer) is not None


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

    def begin(self, num_layers, device, pass_id):
        self._swap.begin_iteration(num_layers, device, pass_id=pass_id)

    def offload(self, t, layer, pass_id):
        return self._swap.offload(t, layer, pass_id=pass_id)

    def forward_end(self, layer, device, pass_id):
        self._swap.forward_end(layer, device, pass_id=pass_id)

    def backward_begin(self, layer, device, pass_id):
        self._swap.backward_begin(layer, device, pass_id=pass_id)

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


# Forward pass ids (Offload._passes), unique in the process; 0 is the swap manager's default pass.
_PASS_IDS = itertools.count(1)


class _Storage:
    """One offloaded storage of one iteration, shared by every saved view of it."""

    __slots__ = ("owner", "ticket", "layer", "pass_id", "tensor", "version", "restored", "__weakref__")

    def __init__(self, owner, ticket, layer, pass_id, tensor):
        self.owner = owner
        self.ticket = ticket
        self.layer = layer
        self.pass_id = pass_id
        self.tensor = tensor  # until the layer's forward ends (in-place check)
        self.version = tensor._version
        self.restored = None  # the storage back on the device, as flat bytes

    def bytes(self):
        if self.restored is None:
            self.restored = self.owner._backend.wait_storage(self.ticket)
            self.owner._waited += 1
            self.owner._live.discard((self.pass_id, self.ticket))
        return self.restored

    def __del__(self):
        # Died before any unpack (no backward, or the graph was freed): drop the pending copy.
        if getattr(self, "restored", None) is None and getattr(self, "ticket", None) is not None:
            try:
                self.owner._live.discard((self.pass_id, self.ticket))
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


class _SavedWrapper:
    """What autograd keeps instead of a tensor subclass wrapping others (_is_wrapper): its type,
    its flattening context and its inner tensors as the pack hook returned them."""

    __slots__ = ("owner", "cls", "context", "inner", "size", "stride")

    def __init__(self, owner, cls, context, inner, size, stride):
        self.owner = owner
        self.cls = cls
        self.context = context
        self.inner = inner
        self.size = size
        self.stride = stride

    def rebuild(self, unpack):
        t = self.cls.__tensor_unflatten__({name: unpack(v) for name, v in self.inner.items()}, self.context,
                                          self.size, self.stride)
        return t.detach() if t.requires_grad else t  # as a swapped tensor comes back: no graph


class Offload:
    """The hooks ``offload()`` installed; ``remove()`` (or leaving a ``with`` block) undoes them."""

    def __init__(self, model, layers, policy, backend, recompute_chunk=8192):
        import torch

        self._torch = torch
        self._layers = _layer_list(layers)
        self._backend = backend
        self._policy = policy
        self._recompute_chunk = recompute_chunk
        self._alpha = None if policy == "auto" else (1.0 if policy == "swap" else 0.0 if policy == "recompute"
                                                     else float(policy))
        self._names = [_llama_names(layer) for layer in self._layers]
        self._llama = [names is not None for names in self._names]
        # (layer, norm) -> _NormOutput (what the layer got, whether the norm applied its token-wise
        # block, what the block goes on with), in a layer's forward under our hooks, until the
        # block's callee (mlp, self_attn) gets it (_wiring)
        self._norm_outputs = {}
        self._watch = None  # the running layer's _NormOutputWatch, at its first calls
        self._ours = set()  # the forwards offload put on modules (_why_whole)
        self._run_whole = 0  # token-wise block calls run as they are (_runs_whole)
        self._warned_whole = set()
        # (layer, block) -> (reason, why) it runs as it is: a module in it kept a tensor in an
        # attribute (or a container it holds) or changed a buffer or held tensor at its last call
        # (_changed_and_undone, _keeping_before);
        # layer -> the state snapshot of its attention block run as it is for that reason, from
        # its norm to its self_attn call
        self._keeping = {}
        # (layer, block) -> (reason, why) it runs as it is for good: no replay can reproduce it
        # (attention dropout, attention weights returned; _NotReplayable)
        self._not_replayable = {}
        # layers whose attention core got arguments needing a gradient besides q, k, v: their cores
        # are no longer kept fused, but recomputed with the block (_AttentionState.unfuse)
        self._unfused = set()
        # Layers whose token-wise forward completed with both blocks split (wired as they assume), and the
        # layers found wired otherwise at a first call, which run as they are for good (_Miswired)
        self._proven = set()
        self._plain = {}
        self._quiet = {}  # module -> its attributes, while it holds no container or tensor (_containers)
        self._watching = {}
        # Every policy but "swap" (alpha 1 given as a number is "swap") recomputes the attention
        # block's token-local part; "auto" does too, whatever alpha its plan gives.
        self._token_wise = policy == "auto" or self._alpha < 1.0
        self._in_layer = None  # the layer whose forward runs under our hooks
        self._backward_seen = False  # a layer's backward began since the iteration's last one ended
        # Whether a layer's forward ran offloaded in this iteration; the first layer's offloaded
        # calls, and its backwards begun: the iteration ends when the last of those backwards
        # begins (a layer called twice per forward, two forwards before one backward: one).
        self._forward_seen = False
        self._forwards0 = 0
        self._backwards0 = 0
        self._attention_states = {}  # layer -> its attention block's state, until its token-local block
        self._warned_cache = False
        self._warned_capture = False
        other = [i for i, llama in enumerate(self._llama) if not llama]
        if self._alpha is not None and 0.0 < self._alpha < 1.0 and other:
            if len(other) == len(self._layers):
                raise ValueError(f"stitchalloc.offload: alpha {self._alpha} splits tokens, which needs Llama-family "
                                 "decoder layers (" + "; or ".join(", ".join(n) for n in _LLAMA_NAMINGS) + "), "
                                 f"and none of the {len(self._layers)} layers ({type(self._layers[0]).__name__}, "
                                 "...) is one; use policy='swap' or 'recompute'")
            _warn(torch, f"stitchalloc.offload: alpha {self._alpha} splits the tokens of the "
                  f"{len(self._layers) - len(other)} Llama-family layers; the other {len(other)} (layer {other[0]}, "
                  f"{type(self._layers[other[0]]).__name__}, ...) have their saved tensors swapped whole")
        # The model's parameters by storage address (address -> the parameter, weakly), taken
        # again at each iteration's first offloaded forward: a model converted or moved after
        # offload() (.half(), .float(), accelerate's prepare) has its parameters in new storage,
        # and the old addresses go to activations. Parameters gathered for a call (FSDP2's
        # unsharded ones, found there when the first layer's hooks have gathered its own) let
        # their storage go after it: an address counts only while its parameter is still there.
        self._model = weakref.ref(model)
        self._param_storages = {}
        self._refresh_param_storages()
        # The running layer's parameters as its forward sees them: FSDP2 gathers them into new
        # storage for each forward (views of which, such as a weight's transpose, are saved).
        self._layer_param_storages = frozenset()
        # The devices this iteration's saved tensors are on, in order of first use: a model split
        # over several GPUs (transformers' device_map) has a swap manager on each.
        self._devices = []
        # Forward passes (one micro-batch through the layers): the k-th offloaded call of each
        # layer in an iteration is in the iteration's k-th pass, whose id (_PASS_IDS: unique in
        # the process, so that two offloaded models never share one) is _passes[k]. The swap
        # managers schedule each pass on its own: a backward brings back its own pass's layers
        # only, not those of micro-batches whose backward comes later (a pipeline schedule, two
        # forwards before one backward), nor another model's. _pass_of[i]: the pass of layer i's
        # running (or last) forward. _begun: pass id -> the devices whose manager began it, in
        # order (they hear of its layer boundaries), for the passes that may still have tickets:
        # a pipeline's micro-batches outlive the iteration count's backward bursts.
        self._calls = [0] * len(self._layers)
        self._passes = []
        self._pass_of = [0] * len(self._layers)
        self._begun = {}
        self._by_ptr = {}  # storage data_ptr -> _Storage, within the current layer
        # Tickets of _Storages neither restored nor dead: while an iteration's forward ran and
        # no backward began, none left means every graph of its forwards died without a
        # backward (a forward that raised: an out-of-memory error caught and the step retried).
        # A set of (pass id, ticket), whose add and discard are one call each, as __del__ may run
        # on any thread.
        self._live = set()
        self._pending = {}  # layer -> [_Storage] whose forward has not ended
        self._undo = []
        self._removed = False  # remove() ran: the forwards wrapped pass every call through
        self._unpack_hook = _eager(torch, self._unpack)
        self._measure = None if self._alpha is not None else _new_measure()
        self.layer_forward_seconds = None  # measured by policy "auto": the median layer's forward
        self.measured = None  # policy "auto": the plan's per-layer bytes (input, attention, other)
        self.plan_text = None
        # Counters (also what the tests look at).
        self.offloaded = 0
        self._waited = 0
        self._cancelled = 0
        self.iterations = 0
        try:
            for i, layer in enumerate(self._layers):
                self._wrap(i, layer)
        except BaseException:
            self.remove()  # the layers wrapped so far get their forwards back
            raise
        for key in [key for key, (module, owner) in _OFFLOADED.items() if module() is None or owner() is None]:
            del _OFFLOADED[key]
        me = weakref.ref(self)
        for layer in self._layers:
            for inner in layer.modules():
                _OFFLOADED[id(inner)] = (weakref.ref(inner), me)

    # ---- public ---------------------------------------------------------------------------
    @property
    def alpha(self):
        """The fraction of token-local saved tensors swapped (None until "auto" has measured)."""
        return self._alpha

    def stats(self):
        return {"iterations": self.iterations, "offloaded": self.offloaded, "waited": self._waited,
                "cancelled": self._cancelled, "alpha": self._alpha, "blocks_run_whole": self._run_whole}

    def remove(self):
        """Undoes the wrapping: each forward this Offload replaced gets back what was there before
        (an instance attribute of its own, such as accelerate's hook, included). Where someone
        wrapped a forward after offload did, their wrapper stays (popping it would undo their
        change); the wrapper of offload's under it passes every call through from now on. A
        graph already recorded still swaps back and recomputes in its backward."""
        self._removed = True
        for layer in self._layers:
            for inner in layer.modules():
                entry = _OFFLOADED.get(id(inner))
                if entry is not None and entry[1]() is self:
                    del _OFFLOADED[id(inner)]
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def _replace_forward(self, module, call, own=True):
        """module.forward = a _Forward of ``call`` (what a copy of the module gets: _replaced),
        with its undo (see remove). ``own``: one of the forwards _why_whole lets be inside a
        token-wise block."""
        before = module.__dict__.get("forward", _MISSING)
        forward = _Forward(call, module, before)
        if own:
            self._ours.add(forward)
        module.forward = forward

        def undo():
            if module.__dict__.get("forward") is not forward:
                return  # wrapped again since: see remove()
            if before is _MISSING:
                del module.__dict__["forward"]
            else:
                module.forward = before

        self._undo.append(undo)

    def _replace_compiled_call(self, layer, compiled, call):
        """layer._compiled_call_impl = call (offload's, which calls ``compiled``, the layer's; or
        None: the layer's call runs eagerly), with its undo. Module.__getstate__ leaves this slot
        out, so a copy of the layer never has it."""
        layer._compiled_call_impl = call

        def undo():
            if layer.__dict__.get("_compiled_call_impl") is call:
                layer._compiled_call_impl = compiled

        self._undo.append(undo)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    # ---- hooks ----------------------------------------------------------------------------
    def _pack(self, layer):
        torch = self._torch

        def pack(t):
            # A parameter, or a view of one (a weight's transpose, which a linear layer saves):
            # FSDP2's gathered parameters among them, also those a module sharded on its own
            # gathers after the layer's forward began (whose storage FSDP2 frees after that
            # module's forward, so a copy of it would read nothing).
            if (not self._backend.accepts(t) or isinstance(t, torch.nn.Parameter)
                    or isinstance(t._base, torch.nn.Parameter)):
                return t
            if _is_wrapper(torch, t):
                # A tensor subclass wrapping others (a DTensor under tensor parallelism): it has
                # no storage; its inner tensors are swapped, and it is rebuilt around them.
                names, context = t.__tensor_flatten__()
                inner = {name: getattr(t, name) for name in names}  # tensors, or a DTensor's mesh
                return _SavedWrapper(self, type(t), context,
                                     {name: pack(v) if torch.is_tensor(v) else v for name, v in inner.items()},
                                     tuple(t.size()), tuple(t.stride()))
            try:
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
            except RuntimeError:  # no storage of its own to read (another kind of subclass): kept
                return t
            if ptr in self._layer_param_storages or storage.nbytes() == 0 or self._holds_parameter(ptr):
                return t
            if self._capturing():
                return t
            device = self._device_of(t)
            pass_id = self._pass_of[layer]
            devices = self._begun.setdefault(pass_id, [])
            if device not in devices:
                self._backend.begin(len(self._layers), device, pass_id)
                devices.append(device)
                if device not in self._devices:
                    self._devices.append(device)
            s = self._by_ptr.get(ptr)
            if s is None:
                s = _Storage(self, self._backend.offload(t, layer, pass_id), layer, pass_id, t)
                self._live.add((pass_id, s.ticket))
                self._by_ptr[ptr] = s
                self._pending.setdefault(layer, []).append(s)
                self.offloaded += 1
                if self._measure is not None:
                    self._measure["bytes"] += storage.nbytes()
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
            _warn(torch, "stitchalloc.offload: a CUDA graph is being captured; the tensors it saves for backward "
                  "stay on the device (offload's copies and schedule cannot be replayed by a graph)")
            self._warned_capture = True
        return True

    def _unpack(self, saved):
        if isinstance(saved, _SavedWrapper):
            return saved.rebuild(self._unpack)
        if not isinstance(saved, _Saved):
            return saved
        from .swap import restore

        return restore(saved.storage.bytes(), saved.dtype, saved.size, saved.stride, saved.offset)

    def _forward_end(self, layer):
        for s in self._leave_forward(layer):
            if s.tensor._version != s.version:
                raise RuntimeError(
                    f"stitchalloc.offload: a tensor saved for backward in layer {layer} was modified in place "
                    "before the layer's forward ended; its copy would not match what autograd saved")
            s.tensor = None
        pass_id = self._pass_of[layer]
        for device in self._begun.get(pass_id, ()):
            self._backend.forward_end(layer, device, pass_id)

    def _leave_forward(self, layer):
        """Layer ``layer``'s forward is over: its per-forward state goes (nothing of it may
        outlive the forward), and no later tensor at one of its storages' addresses is taken for
        them (another tensor may be made there). Returns its storages, still holding their tensors."""
        self._attention_states.pop(layer, None)
        self._watching.pop(layer, None)
        self._by_ptr.clear()
        return self._pending.pop(layer, [])

    def _backward_begin(self, layer, pass_id):
        for device in self._begun.get(pass_id, ()):
            self._backend.backward_begin(layer, device, pass_id)
        self._backward_seen = True
        if layer == 0:
            self._backwards0 += 1
            if 0 < self._forwards0 <= self._backwards0:
                self._iteration_done()

    def _restart_iteration(self):
        """Every forward of the iteration so far died without a backward (see _live): the
        iteration starts again with this forward, as if they had not run (their layer calls
        are not waited for, and "auto" measures again)."""
        self._forwards0 = 0
        self._devices = []
        self._new_passes()
        if self._measure is not None:
            self._measure = _new_measure()

    def _discard_forward(self, layer):
        """Layer `layer`'s forward raised: no backward will use what it saved so far. Its
        storages let their tensors go (their tickets are cancelled when the failed call's graph
        dies); no copy is issued."""
        for s in self._leave_forward(layer):
            s.tensor = None

    def _iteration_done(self):
        """The iteration's backward reached the first layer as often as its forward called it, or
        a backward ran and a forward starts again (a backward that stops above the first layer:
        the layers below frozen, with frozen embeddings; torch.autograd.grad for some
        parameters)."""
        self._backward_seen = False
        self._forward_seen = False
        self._forwards0 = self._backwards0 = 0
        self.iterations += 1
        device = self._devices[0] if self._devices else 0
        self._devices = []
        self._new_passes()
        m = self._measure
        if m is None or m["layers"] == 0:
            return
        self._measure = None
        n = len(self._layers)
        # The measuring iteration swapped what every alpha swaps: the layer input, the attention
        # block's tensors and the attention output the token-local block starts from. The plan's
        # "other" is what that block saves when it is not recomputed (counted by its recompute in
        # the backward of the layers before this point: all but the first when it is reached).
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
        if self._run_whole:
            # Their tensors were swapped and counted as the attention block's: the plan's figures
            # hold for the calls that split.
            self.plan_text += (f"\n(measured with {self._run_whole} token-wise block calls run as they are, "
                               "because of hooks: see the warning)")

    def _new_passes(self):
        """The next forward calls start new passes. The passes begun so far keep their entries
        while they have tickets (a micro-batch whose backward is still to come); the others are
        forgotten once more than a few are remembered."""
        self._calls = [0] * len(self._layers)
        self._passes = []
        if len(self._begun) > 16:
            held = {pass_id for pass_id, _ in list(self._live)}  # one C call: atomic under the GIL
            for pass_id in [p for p in self._begun if p not in held]:
                del self._begun[pass_id]

    def _enter_pass(self, layer):
        """Layer ``layer``'s forward starts: its pass (see _passes), now _pass_of[layer]."""
        k = self._calls[layer]
        self._calls[layer] = k + 1
        while len(self._passes) <= k:
            self._passes.append(next(_PASS_IDS))
        self._pass_of[layer] = self._passes[k]

    def _refresh_param_storages(self):
        model, torch = self._model(), self._torch
        if model is not None:
            self._param_storages = {address: weakref.ref(p) for p in model.parameters()
                                    if (address := _storage_address(torch, p))}

    def _holds_parameter(self, ptr):
        """Whether the storage at ``ptr`` is a model parameter's (_param_storages), still."""
        ref = self._param_storages.get(ptr)
        p = ref() if ref is not None else None
        return p is not None and _storage_address(self._torch, p) == ptr

    def _device_of(self, t):
        device_of = getattr(self._backend, "device_of", None)
        return device_of(t) if device_of is not None else (t.device.index or 0)

    def _raise_if_unproven(self, i, layer, what, failure):
        """For ``failure`` of layer i's ``what`` inside its token-wise split, at the layer's first
        calls (not yet _proven): raises a _Miswired from it, so that the layer runs again as it is
        (an mlp that needs more than the norm's output, DeepSeek-V4's input_ids). Returns (the
        caller re-raises the failure itself) once the layer has split, or when it is out of
        memory (the call as it is needs more)."""
        if i in self._proven or isinstance(failure, (_Miswired, getattr(self._torch, "OutOfMemoryError", ()))):
            return
        raise _Miswired(f"stitchalloc.offload: layer {i}'s ({type(layer).__name__}) {what} failed "
                        f"({type(failure).__name__}: {failure})") from failure

    def _refused(self, i, block, snapshot, context, refused):
        """Layer i's ``block`` cannot be replayed (_NotReplayable): what its call changed is given
        back (``snapshot``) and the random generators rewound (``context``, where the call began),
        so that the caller's run as it is changes and draws what it would without offload; the
        block runs as it is from now on."""
        _restore_state(self._torch, _changed_state(snapshot))
        if context is not None:
            context.rewind(self._torch)
        self._not_replayable[i, block] = (refused.reason, refused.why)
        self._whole(i, block, refused.reason, refused.why)

    def _plain_call(self, i):
        """Whether layer i runs as it is for good (_Miswired at its first call): then a block of it
        is counted as run as it is."""
        if i not in self._plain:
            return False
        self._run_whole += 1
        return True

    def _runs_whole(self, i, block, top):
        """Whether layer i's token-wise ``block`` (called through the modules ``top``) must run as
        it is in this call, its saved tensors swapped, for a hook (_why_whole); warns once per
        reason."""
        fixed = self._not_replayable.get((i, block))
        if fixed is not None:
            self._whole(i, block, *fixed)
            return True
        reason = _why_whole(self._torch, top, self._ours)
        if reason is None:
            return False
        self._whole(i, block, reason)
        return True

    def _keeping_before(self, i, block, top):
        """For a block whose last call kept a tensor in an attribute (or a container it holds) or
        changed a buffer or held tensor (_changed_and_undone): this call runs as it is too, and the snapshot
        returned watches it (_keeping_after). None for others."""
        reason = self._keeping.get((i, block))
        if reason is None:
            return None
        self._whole(i, block, *reason)
        return _state_snapshot(self._torch, top, self._quiet, copies=False)  # watched, never undone

    def _keeping_after(self, i, block, snapshot):
        """After a call that _keeping_before watched: a call that changed nothing ends the running
        as it is (a lazily made constant is kept once; an auxiliary loss, a counter at every call)."""
        if not _changed_state(snapshot):
            self._keeping.pop((i, block), None)

    def _changed_and_undone(self, i, block, snapshot):
        """After a token-wise call of layer i's ``block``: whether a module in it kept a tensor in
        an attribute (or put one in a container it holds) or changed a buffer or another tensor it
        holds in place during the call (_changed_state). What it kept has no autograd graph (and,
        from the MLP's ranges, only the last range's tokens, or one per range), so a loss using it
        would be wrong; a buffer or tensor changed once per range, and would change again in the
        recompute. Then attributes, containers, buffers and tensors get back what they held before
        the call, the caller runs the call again as it is
        (which changes them as without offload), and the block's next calls run as they are until
        one changes neither (_keeping_before)."""
        changed = _changed_state(snapshot)
        if not changed:
            return False
        _restore_state(self._torch, changed)
        who, kind, name = self._who(i, changed[0])
        does, _, why = _CHANGE_WORDS[kind]
        reason = (f"{who} {does.format(name)}", why)
        self._keeping[i, block] = reason
        self._whole(i, block, *reason)
        return True

    def _changed_in_recompute(self, i, block, top, run):
        """``run()``, a recompute of layer i's token-wise ``block`` before its backward, watched:
        a module state change there that the forward's call did not make (or it would have been
        caught then, _changed_and_undone) means that the block's forward depends on whether
        autograd records (``torch.is_grad_enabled()``, ``requires_grad``), and that this step's
        forward, token-wise, ran without that change. What the recompute changed stays (a count
        made only when autograd records comes out as without offload); the block runs as it is
        from its next call (_keeping_before), with a warning."""
        if (i, block) in self._keeping:
            return run()
        snapshot = _state_snapshot(self._torch, top, self._quiet, copies=False)  # what it changes stays
        out = run()
        changed = _changed_state(snapshot)
        if changed:
            who, kind, name = self._who(i, changed[0])
            what = _CHANGE_WORDS[kind][1].format(name)
            reason = f"{who} changes {what} only when autograd records"
            self._keeping[i, block] = (reason, "token-wise, the block runs without autograd in the forward")
            self._warn_once(reason, f"stitchalloc.offload: layer {i}'s {block} block: {who} changed {what} in the "
                            "recompute before the block's backward, and not in its forward, which runs without "
                            "autograd token-wise: this step's forward ran without that change. The block runs as it "
                            "is from its next call.")
        return out

    def _unfuse(self, i, names):
        """Layer i's attention core got arguments besides q, k, v that need a gradient (a mask
        computed from parameters): from its next call the core is recomputed with the block
        before the layer's backward instead of keeping its output (this call's replay has run it
        again already, _replay)."""
        if i in self._unfused:
            return
        self._unfused.add(i)
        self._warn_once(("unfused", tuple(names)),
                        f"stitchalloc.offload: layer {i}'s attention core gets {', '.join(names)} needing a gradient "
                        "(computed from parameters or the layer input): the core is recomputed before the layer's "
                        "backward instead of keeping its output, so that the gradient reaches them")

    def _who(self, i, change):
        """'path (type)' of the module a _changed_state entry of layer i names, the kind, the name."""
        module, kind, name = change[:3]
        path = next((n for n, m in self._layers[i].named_modules() if m is module), "?")
        return f"{path} ({type(module).__name__})", kind, name

    def _warn_once(self, reason, message):
        if reason not in self._warned_whole:
            self._warned_whole.add(reason)
            _warn(self._torch, message)

    def _whole(self, i, block, reason, why=None):
        self._run_whole += 1
        if reason in self._warned_whole:
            return  # told already: no message built at every call run as it is
        why = why or ("token-wise, it would run without autograd in the forward, so a tensor kept from inside it "
                      "would have no gradient, or a hook would see another module's tensors")
        self._warn_once(reason, f"stitchalloc.offload: layer {i}'s {block} block runs as it is (its saved tensors "
                        f"swapped, none recomputed) while {reason}: {why}")

    def _count_local(self, nbytes):
        if self._measure is not None:
            self._measure["local"] += nbytes
            self._measure["local_layers"] += 1

    # ---- wrapping -------------------------------------------------------------------------
    def _wrap(self, i, layer):
        torch = self._torch
        original = layer.forward
        pack = self._pack(i)
        owner = weakref.ref(self)  # in the backward (a graph recorded before remove() included)
        live = _live_ref(self)  # in the forward: None once removed
        llama = self._llama[i]
        names = self._names[i]
        checkpoint_whole = self._alpha == 0.0 and not llama
        # A layer compiled with Module.compile() (torchtitan's per-block compile, fullgraph=True):
        # Module.__call__ calls its compiled _call_impl, which would trace offload's forward (a
        # graph break, an error under fullgraph). Swapped whole, it keeps its compiled call, run
        # under offload's hooks from the call's slot; split token-wise, whose blocks run eagerly
        # (their recompute and replay are Python), its compiled call is set aside. So is the
        # compiled forward of a layer that torch.compile(layer) made (an OptimizedModule) split
        # token-wise: its module is called eagerly.
        compiled = layer.__dict__.get("_compiled_call_impl")
        inner = _compiled_module(torch, layer)
        if llama and self._token_wise and (compiled is not None or inner is not None):
            if compiled is not None:
                self._replace_compiled_call(layer, compiled, None)
                compiled = None
            else:
                original = inner.__call__
            self._warn_once(("compiled", "token-wise"),
                            f"stitchalloc.offload: layer {i} ({type(layer).__name__}) is compiled; split token-wise, "
                            "its blocks run eagerly (their recompute and replay are Python), so it runs eagerly "
                            "while offloaded (remove() gives its compiled call back); policy='swap' keeps it "
                            "compiled")
        if compiled is not None:
            original = compiled

        if llama and self._token_wise:  # under "swap" the layer runs as it is
            self._wrap_token_local(i, layer, pack)
            self._wrap_attention(i, layer, pack)

        def on_grad(pass_id, grad):
            me = owner()
            if me is not None:
                me._backward_begin(i, pass_id)
            return grad

        def begin(args, kwargs):
            """Whether this call is offloaded (then the Offload and the measure's start time)."""
            me = live()
            if me is None or not torch.is_grad_enabled() or _in_backward(torch):
                # In a backward: the layer's forward recomputed by a torch.utils.checkpoint the
                # model runs it under (reentrant). What it saves is used by this backward at once.
                return None
            if me._backward_seen:
                if me._forward_seen:
                    me._iteration_done()
                else:  # the backward was another one through a graph whose iteration ended (retain_graph)
                    me._backward_seen = False
            if i == 0 and me._forward_seen and not me._backward_seen and not me._live:
                me._restart_iteration()
            if not me._forward_seen:
                me._refresh_param_storages()
            me._forward_seen = True
            if i == 0:
                me._forwards0 += 1
            me._enter_pass(i)
            start = time.perf_counter() if me._measure is not None else None
            x = args[0] if args else kwargs.get("hidden_states")  # transformers' keyword
            if start is not None and torch.is_tensor(x):
                me._measure["input"] += sum(n for _, n in _storages(torch, x))
            enter(me)
            return me, start

        def enter(me):
            """The layer's forward runs under our hooks (until leave)."""
            me._in_layer = i
            me._layer_param_storages = frozenset(_storage_address(torch, p) for p in layer.parameters())

        def leave(me):
            """The layer's forward is over (returned or raised). Returns the norms whose token-wise
            block was applied but whose output never reached the block's callee."""
            me._in_layer = None
            me._watch = None
            me._layer_param_storages = frozenset()
            return _unused_norms(me, i)

        def failed(me):
            """The layer's forward raised: over, and what it saved discarded."""
            leave(me)
            me._discard_forward(i)

        def finish(me):
            """The layer's forward returned: every norm whose block was applied reached its callee."""
            _raise_unused(i, layer, names, leave(me))

        def end(me, start, out, args, kwargs):
            if start is not None:
                # The layer's own compute: timed before its offloads are issued (their copies, and
                # the pinned pool growing for them, are what the compute must hide, not part of it).
                if torch.cuda.is_available():
                    for device in me._devices:
                        torch.cuda.synchronize(device)
                me._measure["times"].append(time.perf_counter() - start)
                me._measure["layers"] += 1
            me._forward_end(i)
            output = _main_output(torch, out, args[0] if args else kwargs.get("hidden_states"))
            if output is not None:
                output.register_hook(functools.partial(on_grad, me._pass_of[i]))
            return out

        def probe(me, args, kwargs):
            """At a token-wise layer's first calls (until one splits both blocks): what the call may
            have to undo to run again as it is (_Miswired)."""
            if not (llama and me._token_wise) or i in me._proven or i in me._plain:
                return None
            x = args[0] if args else kwargs.get("hidden_states")
            if not torch.is_tensor(x):
                return None
            return _state_snapshot(torch, (layer,), me._quiet), _ForwardContext(torch, x), me._run_whole

        def as_it_is(me, probed, miswired, args, kwargs):
            """Layer i is not wired as its token-wise blocks assume (or a block of it, run alone,
            failed): what its call changed is given back, the random generators rewound, and it
            runs again as it is, as do its next calls (with one warning), if that succeeds."""
            snapshot, context, _ = probed
            _restore_state(torch, _changed_state(snapshot))
            context.rewind(torch)
            me._plain[i] = miswired.reason
            enter(me)
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, me._unpack_hook):
                    out = original(*args, **kwargs)
            except BaseException:
                del me._plain[i]  # failed as it is too: the error is the layer's own
                me._discard_forward(i)
                raise
            finally:
                leave(me)
            me._warn_once(("plain", type(layer)), f"{miswired.reason}. Layer {i} runs as it is from this call on (its saved "
                          "tensors swapped, none recomputed), as will every layer of its type that fails so.")
            return out

        on_grad, begin, end, failed, finish, probe, as_it_is, original_eagerly = (
            _eager(torch, f) for f in (on_grad, begin, end, failed, finish, probe, as_it_is, original))

        def forward(*args, **kwargs):
            # Under torch.compile only the layer's own computation (`original`) is compiled:
            # begin, end and the hooks run eagerly.
            began = begin(args, kwargs)
            if began is None:
                return original(*args, **kwargs)
            me, start = began
            probed = probe(me, args, kwargs)
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, me._unpack_hook):
                    if checkpoint_whole:
                        import torch.utils.checkpoint as cp

                        out = cp.checkpoint(original, *args, use_reentrant=False, **kwargs)
                    elif probed is not None:
                        # A first call: the norms' outputs are watched (_wiring), the layer run
                        # eagerly (a compiled layer would guard on the watch's mode).
                        me._watch = _NormOutputWatch(torch, i, layer, names)
                        with me._watch:
                            out = original_eagerly(*args, **kwargs)
                            me._watch.returned(out)
                    else:
                        out = original(*args, **kwargs)
                finish(me)
            except _Miswired as miswired:
                failed(me)
                if probed is None:
                    raise
                _drop_frames(miswired)  # the failed call's tensors and tickets go before the call again
                out = as_it_is(me, probed, miswired, args, kwargs)
            except BaseException:
                failed(me)
                raise
            if probed is not None and i not in me._plain and me._run_whole == probed[2]:
                me._proven.add(i)  # both blocks split: wired as they assume
            return end(me, start, out, args, kwargs)

        if compiled is not None:
            self._replace_compiled_call(layer, compiled, _eager(torch, forward, recursive=False))
        else:
            self._replace_forward(layer, _eager(torch, forward, recursive=False), own=False)

    def _wrap_token_local(self, i, layer, pack):
        """mlp(post_attention_layernorm(h)) split by tokens (see the module docstring)."""
        torch = self._torch
        names = self._names[i]
        norm_name, mlp_name = _norm_and_callee(names, MLP)
        norm, mlp = getattr(layer, norm_name), getattr(layer, mlp_name)
        norm_forward, mlp_forward = norm.forward, mlp.forward
        owner = _live_ref(self)

        def params():
            # Read at each call: FSDP2 puts its unsharded parameters on the modules for the
            # forward (and its sharded ones back after it).
            return (*norm.parameters(), *mlp.parameters())

        def block(h):
            me = owner()
            if me is not None and _in_backward(torch):  # the recompute, before the layer's backward
                return me._changed_in_recompute(i, "mlp", (norm, mlp), lambda: mlp_forward(norm_forward(h)))
            return mlp_forward(norm_forward(h))

        def fused(h):
            """post_attention_layernorm: the whole token-local block when it splits, else the norm."""
            me = owner()
            _passed_to(me, norm_name, h)
            with _unwatched(torch, me):
                out = token_local(me, h)
                applied = out is not None
                if not applied:
                    out = norm_forward(h)
            return _norm_returned(me, i, layer, names, MLP, out, applied)

        def mlp_applied(x, *args, **kwargs):
            """The layer's call of mlp: already applied inside the token-local block, if it split."""
            out = _callee_got(owner(), i, layer, names, MLP, x)
            if out is not None:
                if args or kwargs:
                    more = [f"argument {n + 2}" for n in range(len(args))] + list(kwargs)
                    raise _Miswired(
                        f"stitchalloc.offload: layer {i} ({type(layer).__name__}) calls {mlp_name} with "
                        f"{', '.join(more)} besides {norm_name}'s output, which its token-wise block (run where "
                        f"{norm_name} is called) did not have")
                return out
            me = owner()
            _passed_to(me, mlp_name, (x, args, kwargs))
            with _unwatched(torch, me):
                return mlp_forward(x, *args, **kwargs)

        def token_local(me, h):
            """The block's output, split by tokens; None where it runs as it is."""
            if (me is None or me._in_layer != i or not torch.is_grad_enabled() or not torch.is_tensor(h)
                    or h.dim() < 2 or not _innermost(torch, pack) or me._plain_call(i)):
                return None
            # The measuring iteration of policy "auto" recomputes the whole block (the least
            # memory: at a length that needs alpha < 1, swapping everything would not fit), and
            # the block's recompute counts what it saves (the plan's "other").
            measuring = me._measure is not None
            alpha = 0.0 if measuring else me._alpha
            tokens = h.shape[-2]
            k = min(tokens, max(0, round(alpha * tokens)))
            if k == tokens or me._runs_whole(i, "mlp", (norm, mlp)):
                me._attention_states.pop(i, None)
                return None
            watch = me._keeping_before(i, "mlp", (norm, mlp))
            if watch is not None:
                me._attention_states.pop(i, None)
                out = block(h)  # as it is: no hook on norm or mlp (_runs_whole), their forwards ours
                me._keeping_after(i, "mlp", watch)
                return out
            # h = x + the attention block's output: recomputed from what that block keeps
            # rather than swapped, when the graph shows it is exactly that sum.
            source = me._attention_states.pop(i, None)
            if source is not None and not source.is_residual_of(h):
                source = None
            snapshot = _state_snapshot(torch, (norm, mlp), me._quiet)
            parts = []
            # The random generators before the swapped first tokens run (_TokenLocal takes its own),
            # for a call that may find the block returns more than a tensor: a layer's first ones.
            context = _ForwardContext(torch, h) if k > 0 and i not in me._proven else None
            try:
                if k > 0:
                    # With h recomputed, a view of it saved by the block would swap all of h: the
                    # first tokens get storage of their own.
                    head = h.narrow(-2, 0, k)
                    parts.append(block(head.clone() if source is not None else head.contiguous()))
                    if not torch.is_tensor(parts[0]):
                        raise _NotReplayable(*_MORE_THAN_A_TENSOR, context)
                rest = h.narrow(-2, k, tokens - k).contiguous()
                parts.append(_TokenLocal.apply(block, me._count_local if measuring else None, source, k,
                                               me._recompute_chunk, rest, *params()))
            except _NotReplayable as refused:  # (before the next clause: it is an Exception too)
                parts.clear()
                me._refused(i, "mlp", snapshot, context if k > 0 else refused.context, refused)
                return None  # the caller runs it as it is
            except Exception as failure:
                me._raise_if_unproven(i, layer, f"{mlp_name} block, run on {norm_name}'s output alone,", failure)
                raise
            if me._changed_and_undone(i, "mlp", snapshot):
                return None  # the caller runs it again as it is
            return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

        self._replace_forward(norm, _eager(torch, fused))
        self._replace_forward(mlp, _eager(torch, mlp_applied))

    _CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past")  # transformers' names, by version

    def _without_cache(self, kwargs):
        """The attention block's keyword arguments without a KV cache: the block runs again in the
        backward, and a cache would be extended twice (transformers' own gradient checkpointing
        turns the cache off the same way). Warns once."""
        names = [n for n in self._CACHE_ARGUMENTS if kwargs.get(n) is not None]
        if not names:
            return kwargs
        if not self._warned_cache:
            _warn(self._torch, "stitchalloc.offload: the attention blocks are recomputed in the backward, so they run "
                  "without the KV cache (as under gradient checkpointing); the cache the model returns lacks these "
                  "layers. Pass use_cache=False to the model to silence this.")
            self._warned_cache = True
        return {k: (None if k in names else v) for k, v in kwargs.items()}

    def _wrap_attention(self, i, layer, pack):
        """self_attn(input_layernorm(x)) as one _AttentionReplay (see the module docstring)."""
        torch = self._torch
        names = self._names[i]
        norm_name, attn_name = _norm_and_callee(names, ATTENTION)
        norm, attn = getattr(layer, norm_name), getattr(layer, attn_name)
        norm_forward, attn_forward = norm.forward, attn.forward
        owner = _live_ref(self)

        def params():
            return (*norm.parameters(), *attn.parameters())  # read at each call, as above

        def normed(h):
            """input_layernorm: the identity when the attention block is replayed (the block norms
            x itself, so that it saves only x), else the norm."""
            me = owner()
            _passed_to(me, norm_name, h)
            with _unwatched(torch, me):
                replay = (me is not None and me._in_layer == i and torch.is_grad_enabled() and torch.is_tensor(h)
                          and h.dim() >= 2 and _innermost(torch, pack) and not me._plain_call(i)
                          and not me._runs_whole(i, "self_attn", (norm, attn)))
                if replay:
                    watch = me._keeping_before(i, "self_attn", (norm, attn))
                    if watch is not None:
                        me._watching[i] = watch  # until the layer calls self_attn (forward below)
                        replay = False
                out = h if replay else norm_forward(h)
            return _norm_returned(me, i, layer, names, ATTENTION, out, replay)

        def forward(*args, **kwargs):
            # The layer calls self_attn with the hidden states positionally (tiny_llama, Meta's
            # naming) or as hidden_states= (transformers); input_layernorm, now the identity, left
            # them raw.
            me = owner()
            x = _callee_got(me, i, layer, names, ATTENTION, args[0] if args else kwargs.get("hidden_states"))
            if x is None:
                _passed_to(me, attn_name, (args, kwargs))
            with _unwatched(torch, me):
                return called(me, x, args, kwargs)

        def called(me, x, args, kwargs):
            """self_attn's call: replayed from x (the raw layer input), or as it is where x is None.
            The closures below live until the layer's backward: they must not hold x (it is
            swapped), only the other arguments."""
            if x is None:
                watch = me._watching.pop(i, None) if me is not None else None
                out = attn_forward(*args, **kwargs)
                if watch is not None:
                    me._keeping_after(i, "self_attn", watch)
                return out
            stripped = me._without_cache(kwargs)
            if args:
                rest, others = args[1:], stripped
                rebuild = (lambda h: ((h,) + rest, others))
            else:
                others = {k: v for k, v in stripped.items() if k != "hidden_states"}
                rebuild = (lambda h: ((), {**others, "hidden_states": h}))
            del stripped

            def run(h):
                def call():
                    a, kw = rebuild(norm_forward(h))
                    return attn_forward(*a, **kw)

                me = owner()
                if me is not None and _in_backward(torch):  # the replay before the layer's backward
                    return me._changed_in_recompute(i, "self_attn", (norm, attn), call)
                return call()

            state = _AttentionState(me, pack, run, fuse=i not in me._unfused,
                                    unfuse=functools.partial(me._unfuse, i))
            snapshot = _state_snapshot(torch, (norm, attn), me._quiet)
            try:
                y = _AttentionReplay.apply(state, x, *params())
            except _NotReplayable as refused:  # (before the next clause: it is an Exception too)
                y = None
                me._refused(i, "self_attn", snapshot, refused.context, refused)
            except Exception as failure:
                me._raise_if_unproven(i, layer, f"{attn_name} block, run token-wise,", failure)
                raise
            if y is None or me._changed_and_undone(i, "self_attn", snapshot):
                # Again as it is, with the arguments as given (a KV cache included).
                del y, state
                if args:
                    return attn_forward(norm_forward(x), *args[1:], **kwargs)
                return attn_forward(**{**kwargs, "hidden_states": norm_forward(x)})
            del args, kwargs
            # For the token-local block that follows: h = x + y can be recomputed instead of
            # swapped (its wrapper checks that h is that sum).
            if x.requires_grad:
                from torch.autograd.graph import get_gradient_edge

                state.input_edge = get_gradient_edge(x)
                state.output_node = weakref.ref(y.grad_fn)
            me._attention_states[i] = state
            return (y,) + state.extras if state.extras is not None else y

        self._replace_forward(norm, _eager(torch, normed))
        self._replace_forward(attn, _eager(torch, forward))


def _drop_frames(error):
    """Clears the locals of the finished frames ``error`` and the errors it chains passed through:
    they hold what the failed call computed (tensors, tickets), which a frame holding the error
    itself would otherwise keep until the cycle collector's next pass."""
    import traceback

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def _is_wrapper(torch, t):
    """Whether ``t`` is a tensor subclass wrapping inner tensors (torch's traceable wrapper
    subclasses: DTensor, float8 and quantized tensors), which has no storage of its own."""
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return False
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return is_traceable_wrapper_subclass(t)


def _storages(torch, t):
    """(address, bytes) of each storage ``t`` holds: its own, or for a tensor subclass wrapping
    others (_is_wrapper: a DTensor) its inner tensors'; none where there is none to read."""
    if _is_wrapper(torch, t):
        names, _ = t.__tensor_flatten__()
        inner = (getattr(t, name) for name in names)
        return [s for v in inner if torch.is_tensor(v) for s in _storages(torch, v)]
    try:
        storage = t.untyped_storage()
        return [(storage.data_ptr(), storage.nbytes())]
    except RuntimeError:
        return []


def _main_output(torch, out, x):
    """The tensor of a layer's output whose gradient marks the start of the layer's backward:
    the output itself, or among the tensors needing a gradient in what it returns (a tuple, a
    dict, transformers' ModelOutput: torch's pytree), the first shaped as the layer input x
    (the hidden states), else the first. None when no tensor of it needs a gradient. Up to
    2026-11-24 only a tensor or the first item of a tuple or list: a layer returning a dict, or
    (None, hidden), had no backward boundary (no prefetch, every copy waited on demand, and an
    iteration that never ended, so "auto" never planned)."""
    if torch.is_tensor(out):
        return out if out.requires_grad else None
    from torch.utils._pytree import tree_leaves

    leaves = [t for t in tree_leaves(out) if torch.is_tensor(t) and t.requires_grad]
    shape = x.shape if torch.is_tensor(x) else None
    return next((t for t in leaves if t.shape == shape), leaves[0] if leaves else None)


def _compiled_module(torch, layer):
    """The module torch.compile(module) wrapped, where ``layer`` is such a wrapper (an
    OptimizedModule, whose forward is the compiled call of that module); else None."""
    import sys

    # Not imported (dynamo takes a second to import): then no module was compiled.
    optimized = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    if optimized is None or not isinstance(layer, optimized):
        return None
    inner = layer.__dict__.get("_modules", {}).get("_orig_mod")
    return inner if isinstance(inner, torch.nn.Module) else None


def _new_measure():
    """What policy "auto" adds up over its measuring iteration (_iteration_done plans from it)."""
    return {"bytes": 0.0, "input": 0.0, "local": 0.0, "local_layers": 0, "times": [], "layers": 0}


def _storage_address(torch, t):
    """Where ``t``'s storage is (_storages: for FSDP2's DTensor parameters, their local shard's);
    None where there is none to read."""
    found = _storages(torch, t)
    return found[0][0] if found else None


def _warn(torch, message):
    """A UserWarning attributed to the first caller outside stitchalloc and torch: the model line
    that called the layer, not a frame of offload's wrappers or of torch.compiler.disable's (the
    location a fixed stacklevel gave). skip_file_prefixes does this from Python 3.12 on."""
    import sys
    import warnings

    skip = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__name__], torch))
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _live_ref(offload):
    """A weak reference to ``offload`` that also answers None once offload.remove() ran: what the
    wrapped forwards hold, so that a removed Offload's wrappers, still called through a wrapper
    someone put on top of them, run the module as it is."""
    ref = weakref.ref(offload)

    def live():
        me = ref()
        return None if me is None or me._removed else me

    return live


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


# Every module inside a live Offload's layers (the layers included): id(module) -> weak references
# to the module and to the Offload (by id: a module defining __eq__ is not hashable). A second
# offload of the same layers would nest its saved-tensor hooks inside the first's, and only the
# innermost ones see the tensors (the other's policy would silently not apply).
_OFFLOADED = {}


def offloaded(module):
    """The live (not removed) ``Offload`` whose layers hold ``module`` (a layer or a module inside
    one), or None: the handle of an offload whose return value was not kept, to remove it."""
    return _offloaded_by(module)


def _offloaded_by(module):
    """The live (not removed) Offload whose layers hold ``module``, or None."""
    entry = _OFFLOADED.get(id(module))
    if entry is None or entry[0]() is not module:
        return None
    owner = entry[1]()
    return owner if owner is not None and not owner._removed else None


def _modules_of(container):
    """A layer container's modules in order: an nn.ModuleDict's values (torchtitan keeps its
    layers in one), an nn.ModuleList's or a sequence's items."""
    import torch

    return list(container.values() if isinstance(container, torch.nn.ModuleDict) else container)


def _find_layers(model):
    """The model's layer stack: of its nonempty ModuleLists and ModuleDicts, the one holding the
    most parameters (then the longest, then the first). Not the longest: a mixture of experts'
    experts (or a layer's list of attention modules) may outnumber the layers holding them, and a
    vision tower's blocks a language model's layers, but the stack holding them holds more."""
    import torch

    best, best_key = None, None
    for container in model.modules():
        if isinstance(container, (torch.nn.ModuleList, torch.nn.ModuleDict)) and len(container):
            key = (sum(p.numel() for p in container.parameters()), len(container))
            if best_key is None or key > best_key:
                best, best_key = container, key
    if best is None:
        raise ValueError("stitchalloc.offload: found no nn.ModuleList or nn.ModuleDict of layers in the model; "
                         "pass layers=[...]")
    return _modules_of(best)


def _layer_list(layers):
    """``layers`` as a list of distinct modules, none inside another or offloaded already, given as
    a sequence of modules, an nn.ModuleList or an nn.ModuleDict (its values). Raises TypeError or
    ValueError naming the layer at fault, before anything is changed."""
    import torch

    if isinstance(layers, (str, bytes)) or (isinstance(layers, torch.nn.Module) and not hasattr(layers, "__iter__")):
        raise TypeError("stitchalloc.offload: layers must be a list of modules (a list, nn.ModuleList or "
                        "nn.ModuleDict), not "
                        + (f"one {type(layers).__name__}; pass [module] for a single layer"
                           if isinstance(layers, torch.nn.Module) else type(layers).__name__))
    else:
        try:
            layers = _modules_of(layers)
        except TypeError:
            raise TypeError("stitchalloc.offload: layers must be a list of modules (a list, nn.ModuleList or "
                            f"nn.ModuleDict), not {type(layers).__name__}") from None
    if not layers:
        raise ValueError("stitchalloc.offload: no layers to offload")
    index = {}
    for k, layer in enumerate(layers):
        if not isinstance(layer, torch.nn.Module):
            raise TypeError(f"stitchalloc.offload: layers[{k}] is of type {type(layer).__name__}, not an nn.Module")
        if id(layer) in index:
            raise ValueError(f"stitchalloc.offload: layers[{k}] is layers[{index[id(layer)]}] again "
                             f"({type(layer).__name__}); list each layer once (a layer called twice per forward "
                             "is still listed once)")
        index[id(layer)] = k
    for k, layer in enumerate(layers):
        for name, inner in layer.named_modules():
            j = index.get(id(inner))
            if name and j is not None:
                raise ValueError(f"stitchalloc.offload: layers[{j}] ({type(inner).__name__}) is inside layers[{k}] "
                                 f"({type(layer).__name__}, as {name!r}); layers must not hold one another: list "
                                 "the outer ones (the model's decoder layers)")
            if _offloaded_by(inner) is not None:
                what = "is, or is inside, a layer" if not name else f"holds {name!r}, which is, or is inside, a layer"
                raise ValueError(f"stitchalloc.offload: layers[{k}] ({type(layer).__name__}) {what} another "
                                 "stitchalloc.offload offloads; call its remove() (or leave its with block) first "
                                 "(stitchalloc.offloaded(module) returns it)")
    return layers


def offload(model, layers=None, policy="auto", *, recompute_chunk=8192, backend=None):
    """Offloads ``model``'s saved activations layer by layer (see the module docstring).

    ``layers``: the modules whose boundaries drive the schedule, in the order the forward calls
    them: a list, nn.ModuleList or nn.ModuleDict of modules of ``model``, none inside another
    (default: the model's nn.ModuleList or nn.ModuleDict holding the most parameters).
    ``policy``: "auto", "swap", "recompute" or an alpha in [0, 1].
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
