"""Plan-guided arena marks for the installed allocator (docs/arena.md).

A training loop that repeats the same requests every iteration marks its iterations and layers;
the first iteration of each signature (for example the sequence length) is recorded and planned,
later ones are served at planned offsets. Requests that do not match the plan fall back to the
caching allocator and are counted (``arena_stats()["arena.misses"]``)::

    for step, batch in enumerate(loader):
        with stitchalloc.iteration(signature=batch.shape[1]):
            for i, block in enumerate(model.layers):
                with stitchalloc.layer("decoder", i, "forward"):
                    x = block(x)
            ...

Marks outside an iteration are accepted and ignored. Every call needs stitchalloc installed as
PyTorch's CUDA allocator; otherwise, and for marks out of order, it raises RuntimeError with the
allocator's reason.
"""

import contextlib
import ctypes

_PHASES = {"forward": 0, "backward": 1}
_SIGNATURES = {
    "stitchalloc_torch_iteration_begin": ([ctypes.c_int, ctypes.c_uint64], None),
    "stitchalloc_torch_iteration_end": ([ctypes.c_int], None),
    "stitchalloc_torch_layer_begin": ([ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int], None),
    "stitchalloc_torch_layer_end": ([ctypes.c_int], None),
    "stitchalloc_torch_arena_drop_plans": ([ctypes.c_int], None),
    "stitchalloc_torch_arena_stats": ([ctypes.c_int], ctypes.c_char_p),
}


def _lib():
    from . import _torch_plugin_with

    return _torch_plugin_with(_SIGNATURES)


def _device(device) -> int:
    """-1 (the current device), an index, or a torch.device / "cuda:N" string."""
    if device is None:
        return -1
    if isinstance(device, int):
        return device
    index = getattr(device, "index", None)
    if index is None and isinstance(device, str):
        _, _, tail = device.partition(":")
        index = int(tail) if tail else None
    return -1 if index is None else int(index)


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(_lib().stitchalloc_torch_last_error().decode())


def _signature(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"iteration signature must be an int (for example the sequence length), not {value!r}")
    if not 0 <= value < 1 << 64:
        raise ValueError(f"iteration signature {value} is outside [0, 2**64)")
    return value


@contextlib.contextmanager
def iteration(signature: int = 0, device=None):
    """Marks one training iteration; iterations with the same signature share one plan."""
    dev = _device(device)
    _check(_lib().stitchalloc_torch_iteration_begin(dev, _signature(signature)))
    try:
        yield
    finally:
        _check(_lib().stitchalloc_torch_iteration_end(dev))


@contextlib.contextmanager
def layer(kind: str, index: int, phase: str = "forward", device=None):
    """Marks one layer's forward or backward; layers of one kind share one layer plan."""
    if phase not in _PHASES:
        raise ValueError(f"phase must be 'forward' or 'backward', not {phase!r}")
    if not kind:
        raise ValueError("layer kind must be a non-empty string")
    dev = _device(device)
    _check(_lib().stitchalloc_torch_layer_begin(dev, kind.encode(), int(index), _PHASES[phase]))
    try:
        yield
    finally:
        _check(_lib().stitchalloc_torch_layer_end(dev))


def _parse_stats(text) -> dict:
    """The "name value" lines of the plugin's statistics entry points (NULL: raise its error)."""
    if text is None:
        _check(-1)
    out = {}
    for line in text.decode().splitlines():
        name, _, value = line.partition(" ")
        out[name] = float(value) if "." in value or "e" in value else int(value)
    return out


def arena_stats(device=None) -> dict:
    """The arena's statistics: hits, misses, plans, arena bytes, ... (name -> int)."""
    return _parse_stats(_lib().stitchalloc_torch_arena_stats(_device(device)))


def drop_plans(device=None) -> None:
    """Frees every cached plan's arena (RuntimeError while arena allocations are live)."""
    _check(_lib().stitchalloc_torch_arena_drop_plans(_device(device)))
