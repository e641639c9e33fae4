"""What makes a token-wise block of ``stitchalloc.offload`` unfit to run token-wise in a call
(docs/offload.md, "Blocks run as they are"): hooks that would see or keep its tensors, looked at
before the call (``_why_whole``), and module state the call changes, looked at after it
(``_state_snapshot`` before, ``_changed_state`` after, ``_restore_state`` to undo).

Data structures and their invariants:

- A snapshot (``_state_snapshot``) is a list with one entry per module of the block (the two
  modules ``top`` the block is called through and every module inside them, ``_block_modules``):
  (module, a copy of its ``__dict__``, its buffers, its containers, its held tensors). The
  ``__dict__`` copy holds the attribute values themselves, so that an identity compared after
  the call is theirs and no object can be freed and another take its address in between.
  Buffers are {name: (tensor, version counter, copy or None)}: a copy only where the call may
  be undone (``copies``). Containers are None, or [(attribute name, [(container, copy)],
  [tensor])] for each attribute that is a tensor or is or holds a mutable container (list,
  dict, deque, set, subclasses included) or a tensor, ``_NESTING`` levels down through
  containers and tuples (``_tree``); a copy is a dict for a dict, else a list, of the very
  objects held. Held tensors are below.
- ``quiet`` (module -> the values of its ``__dict__``, kept by the caller between calls) holds a
  module only while none of those values is or holds a container or a tensor other than a
  parameter (``_NESTING`` levels down); while a module's attributes are exactly those objects
  the container look is skipped for it. The entry holds the values, so none can be replaced at
  the same address unseen, and it keeps no activation alive.
- ``_changed_state`` gives (module, kind, name, before) entries, kind one of ``_CHANGE_WORDS``;
  ``_restore_state`` puts each ``before`` back (containers through their builtin base's methods,
  so that a subclass's own, possibly refusing, ``update`` is not called; a tensor changed in
  place gets its copy's values, which moves its version counter on, so a snapshot is used for
  one call only).
- Held tensors are [(attribute name, (tensor, version counter, copy or None))]: each tensor a
  module holds outside its tables (a plain attribute, or an item of the containers or tuples
  ``_tree`` walks), once, not one of its buffers, not a parameter (a tied weight held twice is
  not copied at every call). An inference tensor has no version counter (reading it raises) and
  cannot change in place where blocks are checked: its version is None and it is never copied.

Both run at every token-wise block call, so the common case (a block whose modules hold no
container, tensor attribute or buffer, and no hooks) costs a few identity comparisons a module;
bench/offload_block_checks.py and bench/offload_container_scan.py measure it. Nothing here imports
torch at module level.
"""

import collections
import functools
import operator


# A module's hooks (its attribute -> the words of the warning). register_full_backward_hook and
# register_full_backward_pre_hook fill the last two.
_HOOK_KINDS = {"_forward_pre_hooks": "forward pre hook", "_forward_hooks": "forward hook",
               "_backward_pre_hooks": "full backward pre hook", "_backward_hooks": "full backward hook"}


# The words of the warnings for each kind of _changed_state entry: what the module does (in the
# forward's token-wise call), what it changes (in the recompute's), and why that call cannot stay
# token-wise. {} is the attribute's or buffer's name (for a held tensor, the attribute it is or
# is in).
_CHANGE_WORDS = {
    "attribute": ("keeps a tensor in its attribute '{}'", "its attribute '{}' (a tensor)",
                  "token-wise, the block would run without autograd in the forward, in token ranges, so what it "
                  "keeps would have no gradient and only the last range's tokens"),
    "container": ("changes what its attribute '{}' holds (a tensor)", "what its attribute '{}' holds (a tensor)",
                  "token-wise, the block would run without autograd in the forward, in token ranges, so what it "
                  "puts there would have no gradient, once per range, and again in the recompute"),
    "buffer": ("changes its buffer '{}'", "its buffer '{}'",
               "token-wise, the block would run in token ranges in the forward and again before its backward, "
               "changing the buffer once per range and again in the recompute"),
    "tensor": ("changes the tensor in its attribute '{}' in place", "the tensor in its attribute '{}'",
               "token-wise, the block would run in token ranges in the forward and again before its backward, "
               "changing the tensor once per range and again in the recompute"),
}


def _hooks(module):
    """(kind, hook) for every hook on ``module``, kind one of _HOOK_KINDS. Empty tables (the usual
    case) are passed over at once: this runs at every token-wise block call."""
    tables = module.__dict__
    for kind in _HOOK_KINDS:
        table = tables.get(kind)
        if table:
            for hook in table.values():
                yield kind, hook


def _why_whole(torch, top, ours):
    """Why a token-wise block must run as it is now (a reason, for the warning), or None.

    In the forward a token-wise block runs without autograd (its recompute in the backward has
    the graph), called through two modules ``top`` (a norm, then mlp or self_attn) whose
    forwards offload replaced (``ours``). Neither fits:
    - a hook on one of those two: it would see the whole block's output or input, not its own
      module's, and a pre-hook would not run before the block (FSDP2's unshard, on a module
      sharded on its own);
    - something inside the block that can keep what it sees: a forward hook (transformers'
      output recorders while they record, such as router_logits for a mixture of experts'
      load-balancing loss), or a forward replaced by someone else (transformers 4's recorders).
      What it keeps has no autograd graph: a loss computed from it would get no gradient;
    - a pre-hook or backward hook inside the block: a pre-hook would see each token range two
      or three times (the forward, the recompute, the attention's replays), a backward hook
      each recompute range's gradient instead of the whole one.
    Harmless inside the block: hooks of torch's own (FSDP2's, the module tracker of
    FlopCounterMode), transformers' recorders while they do not record, accelerate's device
    hooks. A forward that keeps a tensor in an attribute (or a container it holds) or changes
    a buffer is seen after the call (_changed_state)."""
    for hook in getattr(torch.nn.modules.module, "_global_forward_hooks", {}).values():
        if not (_torch_own(hook) or _recording(hook) is False):
            return f"a global forward hook ({_hook_name(hook)}) is registered"
    for owner in top:
        for kind, hook in _hooks(owner):
            if _recording(hook) is not False:
                return f"{type(owner).__name__} has a {_HOOK_KINDS[kind]} ({_hook_name(hook)})"
    for module in _block_modules(top):
        if module not in top:
            for kind, hook in _hooks(module):
                key = _recording(hook) if kind == "_forward_hooks" else None
                if key is False or _torch_own(hook):
                    continue
                return (f"transformers records {key} from {type(module).__name__} (output_{key}=True)"
                        if isinstance(key, str) else
                        f"{type(module).__name__} has a {_HOOK_KINDS[kind]} ({_hook_name(hook)})")
        forward = module.__dict__.get("forward")
        if forward is not None and forward not in ours and not _accelerate_hooked(module):
            return f"{type(module).__name__}'s forward is replaced ({_hook_name(forward)})"
    return None


def _block_modules(top):
    """The modules ``top`` and every module inside them, by a plain walk of their ``_modules``
    tables: this runs at every token-wise block call, and ``modules()`` (which builds each
    module's name) cost 6.5 us of the hook check's 8 us for a Llama MLP block."""
    found, stack = [], list(top)
    while stack:
        module = stack.pop()
        if module is None:  # register_module(name, None)
            continue
        found.append(module)
        children = module.__dict__.get("_modules")
        if children:
            stack.extend(children.values())
    return found


def _state_snapshot(torch, top, quiet=None, copies=True):
    """What the modules ``top`` and those inside them hold, as a call is about to run them
    (_changed_state): for each module, a copy of its ``__dict__`` (its plain attributes; the
    copy holds the values, so that an identity compared later is theirs; parameters, buffers
    and submodules sit in tables of their own there, whose identity does not change), a copy of
    each list, dict, deque or set among those attributes or inside them (_containers: an
    auxiliary loss appended to a list the module holds), each buffer with its version counter,
    and each other tensor it holds (a plain attribute, or in those containers or tuples; not a
    parameter) with its version counter: a running count kept outside the buffers. ``copies``:
    whether the buffers' and those tensors' values are copied too, to undo a change made in
    place, which only a snapshot that may be undone (_restore_state, after the forward's
    token-wise call) needs; the recompute's and the watch's compare versions only. A module
    whose buffers are large (a quantized linear's packed weights, scales and zeros are buffers)
    would otherwise have them copied once per recomputed range of every layer. This runs at
    every token-wise block call; of transformers' Llama family only DeepSeek-V3 has a buffer
    inside its blocks (its router's, a float per expert; the rotary tables are the model's),
    and none a container or a tensor attribute. ``quiet``: the caller's dict for _containers,
    kept between calls."""
    snapshot = []
    for module in _block_modules(top):
        tables = module.__dict__
        buffers = tables.get("_buffers")
        saved = None
        if buffers:
            saved = {name: _versioned(torch, b, copies) for name, b in buffers.items() if b is not None}
        # _containers' look, skipped here for a module whose attributes are as quiet has them
        # (its call would cost a fifth of the check; such a module holds no tensor).
        values = quiet.get(module) if quiet is not None else None
        containers = (None if values is not None and len(values) == len(tables)
                      and all(map(operator.is_, values, tables.values())) else _containers(module, tables, quiet))
        held = _held(torch, containers, saved, copies) if containers is not None else None
        snapshot.append((module, tables.copy(), saved, containers, held))
    return snapshot


def _held(torch, containers, buffers, copies):
    """[(attribute name, _versioned entry)] for the tensors _containers found, each once, none
    that is among ``buffers`` (a module's _versioned buffers: copied there already). The set
    of those seen is made only for a module that holds a tensor."""
    held, seen = [], None
    for name, _, tensors in containers:
        for t in tensors:
            if seen is None:
                seen = {id(entry[0]) for entry in buffers.values()} if buffers else set()
            if id(t) not in seen:
                seen.add(id(t))
                held.append((name, _versioned(torch, t, copies)))
    return held


def _versioned(torch, t, copies):
    """(t, its version counter, a copy of its values if ``copies`` else None). An inference
    tensor has no version counter (reading it raises) and cannot be changed in place outside
    inference mode, where blocks are not checked (they run as they are without autograd): its
    version is None, and it is not copied."""
    if t.is_inference():
        return t, None, None
    if not copies:
        return t, t._version, None
    with torch.no_grad():
        return t, t._version, t.clone()


def _changed_in_place(entry):
    """Whether a _versioned entry's tensor was changed in place since."""
    t, version, _ = entry
    return version is not None and t._version != version


# The mutable containers a module's attributes are looked into for (_containers), subclasses
# included: a dict subclass keeps OrderedDict's methods (which it lists first) or dict's, and so
# on, for _restore_state. Tuples and frozensets cannot change, but are walked for containers
# inside them.
_MUTABLE = (collections.OrderedDict, dict, list, collections.deque, set)
_NESTED = _MUTABLE + (tuple, frozenset)
# How deep containers are walked from a module's attribute (1: the attribute's own value): an
# auxiliary loss appended to a list inside a dict the module holds is at depth 3.
_NESTING = 4


@functools.cache
def _module_tables():
    """The names of the tables nn.Module keeps in every module's ``__dict__``."""
    import torch

    return frozenset(torch.nn.Module().__dict__)


def _containers(module, tables, quiet=None):
    """[(name, [(container, copy)], [tensor])] for each of a module's plain attributes
    (``tables``, its ``__dict__``; not nn.Module's own tables of parameters, buffers, submodules
    and hooks) that is a tensor, or is or holds a mutable container or a tensor (_tree: lists,
    dicts, deques and sets, subclasses included, and those nested in them or in tuples,
    _NESTING levels down, and the tensors among their items), each container with a copy of
    what it holds; None where there is none. Parameters are not among the tensors (nn.Module's
    own are not watched either; a forward does not change them, and copying them would copy
    weights at every call).

    ``quiet`` (module -> the values of its ``__dict__``) saves this look at every value, which made
    the state check 23-28 us a Llama block call instead of 8-12 (13-17 with ``quiet``;
    bench/offload_block_checks.py): a module found with neither a container nor a tensor among
    its attributes is entered there, and while its attributes are the very objects entered (an
    identity comparison, at C speed; _state_snapshot) it has none. The entry holds those values,
    so none can be freed and another object take its address unseen; none but nn.Module's own
    tables (its parameters, buffers and submodules, which the module holds anyway) holds a tensor
    other than a parameter (_NESTING levels down, as _tree looks), so no activation is kept alive
    by it. A module holding a tensor or a container is looked at in full at each call."""
    own = _module_tables()
    tensor = _tensor_type()
    found = []
    for name, value in tables.items():
        if name in own:
            continue
        if isinstance(value, tensor):
            if _watched(value):
                found.append((name, [], [value]))
        elif isinstance(value, _NESTED):
            pairs, tensors = [], []
            _tree(value, pairs, _NESTING, tensors)
            if pairs or tensors:
                found.append((name, pairs, tensors))
    if found:
        if quiet is not None:
            quiet.pop(module, None)
        return found
    if quiet is not None:
        quiet[module] = tuple(tables.values())
    return None


def _tree(value, pairs, depth, tensors=None):
    """``pairs`` with (container, copy) appended for ``value`` if it is a mutable container, and
    for each one inside it (a dict's values, the items of the others, tuples and frozensets
    walked too) down to ``depth`` levels; and ``tensors`` (if given) with the tensors among
    their items (_watched ones). A copy is a dict for a dict, else a list: the very objects
    held (_same_contents compares by identity)."""
    if isinstance(value, dict):
        items = dict(value)
        pairs.append((value, items))
        items = items.values()
    else:
        items = list(value)
        if not isinstance(value, (tuple, frozenset)):
            pairs.append((value, items))
    types = _types(items)
    tensor = _tensor_type()
    if tensors is not None and _any_of(types, tensor):
        tensors.extend(item for item in items if isinstance(item, tensor) and _watched(item))
    if depth > 1 and _any_of(types, _NESTED):
        for item in items:
            if isinstance(item, _NESTED):
                _tree(item, pairs, depth - 1, tensors)
    return pairs


def _watched(t):
    """Whether a tensor a module holds outside its tables is compared by version counter: not a
    parameter (one held twice, a tied weight, say, is not copied at every call)."""
    return not isinstance(t, _parameter_type())


def _types(items):
    """The set of the types of ``items``: a C loop of some 20 ns an item, where asking each item
    ``isinstance`` costs 150-200 ns (torch.is_tensor on an object that is not a tensor too:
    _holds_tensor on a list of 1,000 floats took 198-370 us so, 22-24 now;
    bench/offload_container_scan.py). The state check pays this at each call for each container
    a module holds (_tree looks for containers inside it)."""
    return set(map(type, items))


def _any_of(types, kinds):
    """Whether a type in ``types`` (_types) is one of ``kinds`` or a subclass of one."""
    return any(issubclass(kind, kinds) for kind in types)


def _base(container):
    """The builtin type in _MUTABLE whose methods ``container`` is compared and given back with
    (OrderedDict before dict: a subclass's own methods, such as ModelOutput's refusing update,
    are not called)."""
    return next(base for base in _MUTABLE if isinstance(container, base))


def _same_contents(container, copy):
    """Whether ``container`` holds the very objects ``copy`` (its copy, _tree) held, in the same
    order (a dict's keys too: a forward may reorder an OrderedDict)."""
    if len(container) != len(copy):
        return False
    if isinstance(container, dict):
        # An OrderedDict's own order is not its dict's (move_to_end changes only the former).
        base = _base(container)
        return (all(map(operator.is_, base.keys(container), copy.keys()))
                and all(map(operator.is_, base.values(container), copy.values())))
    if isinstance(container, set):
        return set(map(id, container)) == set(map(id, copy))  # both alive, ids unique
    return all(map(operator.is_, container, copy))


def _changed_state(snapshot):
    """(module, kind, name, before) for what the call since ``snapshot`` changed: an attribute
    (kind "attribute") now holding a tensor, or a list, tuple or dict holding one (``before``
    _MISSING where it is new), looked into as _holds_tensor does; an attribute (kind "container",
    ``before``: [(container, copy)] for those whose contents changed) that is or holds lists,
    dicts, deques or sets (_containers) one of which now holds other objects, a tensor among them
    before or after; a buffer (kind "buffer") added, replaced or changed in place (``before``:
    (tensor, version, copy), or _MISSING); another tensor the module held (kind "tensor", the
    name of the attribute it is or is in; ``before``: (tensor, version, copy)) changed in place.
    Not seen: a tensor put into a container more than _NESTING levels down (or changed in place
    there, one level further), or into an attribute of an object the module holds that is
    neither a container nor a module (a tracker object's list), or kept outside the block's
    modules; a parameter changed in place."""
    changed = []
    for module, before, buffers, containers, held in snapshot:
        now = module.__dict__
        if not (len(now) == len(before) and all(map(operator.is_, now.values(), before.values()))):
            for name, value in now.items():
                old = before.get(name, _MISSING)
                if old is not value and _holds_tensor(value):
                    changed.append((module, "attribute", name, old))
        if containers is not None:
            for name, pairs, _ in containers:
                differ = [(c, copy) for c, copy in pairs if not _same_contents(c, copy)]
                if any(_holds_tensor(c) or _holds_tensor(copy) for c, copy in differ):
                    changed.append((module, "container", name, differ))
        if held:
            changed.extend((module, "tensor", name, entry) for name, entry in held if _changed_in_place(entry))
        current = now.get("_buffers")
        if buffers is None and not current:
            continue
        buffers = buffers or {}
        for name, value in current.items():
            old = buffers.get(name, _MISSING)
            if value is None and old is _MISSING:
                continue
            if old is _MISSING or old[0] is not value or _changed_in_place(old):
                changed.append((module, "buffer", name, old))
        changed.extend((module, "buffer", name, old) for name, old in buffers.items() if name not in current)
    return changed


def _restore_state(torch, changed):
    """Undoes what _changed_state found: attributes, containers and buffers get back what they
    held, tensors changed in place their values (from a snapshot taken with ``copies``)."""
    for module, kind, name, before in changed:
        if kind == "attribute":
            if before is _MISSING:
                del module.__dict__[name]
            else:
                module.__dict__[name] = before
            continue
        if kind == "container":
            for container, copy in before:
                base = _base(container)
                base.clear(container)
                (base.extend if base in (list, collections.deque) else base.update)(container, copy)
            continue
        if before is _MISSING:
            del module._buffers[name]
            continue
        tensor, _, values = before
        if _changed_in_place(before):
            with torch.no_grad():
                tensor.copy_(values)
        if kind == "buffer":
            module._buffers[name] = tensor


def _holds_tensor(value, depth=_NESTING):
    """Whether ``value`` is a tensor or holds one: in a dict's values or a list's, tuple's, deque's
    or set's items (subclasses included), down to ``depth`` levels of them."""
    tensor = _tensor_type()
    kind = type(value)
    if issubclass(kind, tensor):
        return True
    if issubclass(kind, dict):
        value = value.values()
    elif not issubclass(kind, _NESTED):
        return False
    types = _types(value)
    if _any_of(types, tensor):
        return True
    return (depth > 1 and _any_of(types, _NESTED)
            and any(_holds_tensor(v, depth - 1) for v in value if isinstance(v, _NESTED)))


@functools.cache
def _tensor_type():
    import torch

    return torch.Tensor


@functools.cache
def _parameter_type():
    import torch

    return torch.nn.Parameter


def _recording(hook):
    """For transformers' output recorder (utils/output_capturing.py): the key it records now, or
    False while it does not record; None for any other hook."""
    code = getattr(hook, "__code__", None)
    if code is None or code.co_name != "output_capturing_hook" or "key" not in code.co_freevars:
        return None
    try:
        key = hook.__closure__[code.co_freevars.index("key")].cell_contents
        collector = hook.__globals__["_active_collector"].get()
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return str(getattr(hook, "__qualname__", "?"))  # another version: assume it records
    return key if collector is not None and key in collector else False


def _torch_own(hook):
    """A hook of torch's own (FSDP2's, the module tracker's): it keeps nothing it sees."""
    target = getattr(hook, "func", hook)  # functools.partial
    module = getattr(target, "__module__", None) or ""
    return module == "torch" or module.startswith("torch.")


def _accelerate_hooked(module):
    """accelerate's hooks (device placement, CPU offload of weights) replace a module's forward."""
    hook = getattr(module, "_hf_hook", None)
    return hook is not None and type(hook).__module__.startswith("accelerate.")


def _hook_name(hook):
    target = getattr(hook, "func", hook)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"


_MISSING = object()
