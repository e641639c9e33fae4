"""The swap manager from Python: saved tensors to pinned host memory at layer boundaries
(docs/offload.md). ``stitchalloc.offload(model)`` drives it for a whole model; these calls are
the layer-boundary API underneath, for custom training loops::

    stitchalloc.swap.begin_iteration(num_layers)
    t = stitchalloc.swap.offload(tensor, layer)   # a Ticket; drop your own reference afterwards
    stitchalloc.swap.forward_end(layer)           # layer's offloads are issued
    ...
    stitchalloc.swap.backward_begin(layer)        # the layers below come back (lookahead)
    x = stitchalloc.swap.wait(t)                  # the same dtype, shape and strides, usable in stream order
    stitchalloc.swap.cancel(t)                    # the tensor is no longer needed

Every call that names a layer also takes ``pass_id`` (0 by default): a forward pass whose backward
comes later, such as one micro-batch through one model. Each pass has its own layer count, and a
layer boundary concerns that pass's tickets only, so passes in flight together (a pipeline
schedule's micro-batches, two forwards before one backward, two models on one GPU) each prefetch
their own tensors. ``stitchalloc.offload`` gives every forward pass an id of its own.

A ticket stands for the tensor's whole storage; several views of one storage should share a
ticket (``restore`` rebuilds any view from the storage ``wait_storage`` returns). Settings are the
swap_* keys of the installed configuration (docs/configuration.md). Every call needs stitchalloc
installed as PyTorch's CUDA allocator; errors raise RuntimeError with the manager's reason.
"""

import ctypes
import dataclasses
import os

from .arena import _check, _device, _parse_stats

_STATES = ("registered", "kept", "offloading", "on_host", "prefetching")
_ops_loaded = False
_SIGNATURES = {
    "stitchalloc_torch_swap_begin_pass": ([ctypes.c_int, ctypes.c_int, ctypes.c_uint64], None),
    "stitchalloc_torch_swap_forward_end_pass": ([ctypes.c_int, ctypes.c_int, ctypes.c_uint64], None),
    "stitchalloc_torch_swap_backward_begin_pass": ([ctypes.c_int, ctypes.c_int, ctypes.c_uint64], None),
    "stitchalloc_torch_swap_synchronize": ([ctypes.c_int], None),
    "stitchalloc_torch_swap_state": ([ctypes.c_int, ctypes.c_uint64], None),
    "stitchalloc_torch_swap_stats": ([ctypes.c_int], ctypes.c_char_p),
}


def _lib():
    from . import _torch_plugin_with

    return _torch_plugin_with(_SIGNATURES)


def _ops():
    """torch.ops.stitchalloc, loading libstitchalloc_torch_ops.so on first use."""
    global _ops_loaded
    import torch

    from . import InstallError, library_path

    if not _ops_loaded:
        _lib()  # the allocator library first: the operators link against it
        path = library_path("stitchalloc_torch_ops")
        if not os.path.exists(path):
            raise InstallError(f"the stitchalloc PyTorch operators are missing: {path} (built without torch?)")
        torch.ops.load_library(path)
        _ops_loaded = True
    return torch.ops.stitchalloc


@dataclasses.dataclass(frozen=True)
class Ticket:
    """One offloaded storage: its id in the device's swap manager and the device index."""

    id: int
    device: int
    nbytes: int


def _whole(name, value):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def _pass(pass_id):
    if not 0 <= _whole("pass_id", pass_id) < 1 << 63:
        raise ValueError(f"pass_id must be in [0, 2**63), not {pass_id}")
    return pass_id


def begin_iteration(num_layers: int, device=None, *, pass_id: int = 0) -> None:
    """Starts forward pass ``pass_id`` over ``num_layers`` layers (fixes which of its layers are
    the last)."""
    _check(_lib().stitchalloc_torch_swap_begin_pass(_device(device), _whole("num_layers", num_layers), _pass(pass_id)))


def offload(tensor, layer: int, *, pass_id: int = 0) -> Ticket:
    """Hands ``tensor``'s storage, saved by layer ``layer`` of pass ``pass_id``, to the swap manager."""
    ops = _ops()
    ticket = ops.swap_offload(tensor, _whole("layer", layer), _pass(pass_id))
    return Ticket(int(ticket), tensor.device.index or 0, tensor.untyped_storage().nbytes())


def forward_end(layer: int, device=None, *, pass_id: int = 0) -> None:
    """Layer ``layer``'s forward in pass ``pass_id`` ended: its offloads are issued."""
    _check(_lib().stitchalloc_torch_swap_forward_end_pass(_device(device), _whole("layer", layer), _pass(pass_id)))


def backward_begin(layer: int, device=None, *, pass_id: int = 0) -> None:
    """Pass ``pass_id``'s backward reached layer ``layer``: the pass's layers below it come back."""
    _check(_lib().stitchalloc_torch_swap_backward_begin_pass(_device(device), _whole("layer", layer),
                                                             _pass(pass_id)))


def wait_storage(ticket: Ticket):
    """The storage back on the device as a flat uint8 tensor (the ticket ends)."""
    return _ops().swap_wait(ticket.id, ticket.device)


def restore(storage_bytes, dtype, size, stride, storage_offset):
    """A view of the given dtype, shape, strides and offset over ``wait_storage``'s result."""
    return storage_bytes.view(dtype).as_strided(size, stride, storage_offset)


def wait(ticket: Ticket, like):
    """The offloaded tensor back: ``like`` gives dtype, shape, strides and storage offset
    (the tensor that was offloaded, or its metadata as (dtype, size, stride, offset))."""
    if isinstance(like, tuple):
        dtype, size, stride, offset = like
    else:
        dtype, size, stride, offset = like.dtype, like.size(), like.stride(), like.storage_offset()
    return restore(wait_storage(ticket), dtype, size, stride, offset)


def cancel(ticket: Ticket) -> None:
    """The tensor is not needed any more: pending copies are dropped, memory returned."""
    _ops().swap_cancel(ticket.id, ticket.device)


def synchronize(device=None) -> None:
    """Blocks until the compute stream and both copy streams are idle (tests, shutdown)."""
    _check(_lib().stitchalloc_torch_swap_synchronize(_device(device)))


def state(ticket: Ticket) -> str:
    """'registered', 'kept', 'offloading', 'on_host' or 'prefetching'."""
    s = _lib().stitchalloc_torch_swap_state(ticket.device, ticket.id)
    if s < 0:
        _check(s)
    return _STATES[s]


def swap_stats(device=None) -> dict:
    """Counters of the device's swap session: swap.* (tickets, copies, evictions), pinned.*
    (pinned host pool) and copy.* (completed bytes, seconds, bytes per second per direction)."""
    return _parse_stats(_lib().stitchalloc_torch_swap_stats(_device(device)))
