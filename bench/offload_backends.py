"""Stand-ins for the swap manager under stitchalloc.offload(..., backend=...), for benchmarks:

- InPlace: every "offloaded" tensor stays where it is; the policy's recompute runs, no copy does.
  Step time with it against step time with the real swap manager, at the same alpha, is what the
  copies cost the step (bench/offload_seq.py's copy-hiding figure).
- Counter: InPlace that also counts the bytes offloaded per layer (bench/offload_bytes.py).
- Mover: the swap manager's schedule on the host, for bench/offload_memory.py's count of what
  stays on the device: a layer's tensors leave when its forward ends (the last `keep_last`
  layers' stay), copied with PyTorch's dispatch modes off so that a counting mode does not see
  the host copy, and come back (a new storage, seen) when the backward of the layer above begins
  in the same forward pass (micro-batch), as the real manager schedules each pass on its own.
"""

import torch
from torch.utils._python_dispatch import _disable_current_modes


def _flat(storage):
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


class InPlace:
    def __init__(self):
        self.tensors = {}
        self.next = 0

    def accepts(self, t):
        return True

    def begin(self, num_layers, device, pass_id=0):
        pass

    def offload(self, t, layer, pass_id=0):
        self.next += 1
        self.tensors[self.next] = t
        return self.next

    def forward_end(self, layer, device, pass_id=0):
        pass

    def backward_begin(self, layer, device, pass_id=0):
        pass

    def wait_storage(self, ticket):
        return _flat(self.tensors.pop(ticket).untyped_storage())

    def cancel(self, ticket):
        self.tensors.pop(ticket, None)

    def copy_bytes_per_second(self, device):
        return 0.0  # "auto" then stays at alpha 1: give the alpha to compare as the policy

    def host_bytes(self, device):
        return 0.0


class Counter(InPlace):
    def __init__(self):
        super().__init__()
        self.by_layer = {}

    def offload(self, t, layer, pass_id=0):
        self.by_layer[layer] = self.by_layer.get(layer, 0) + t.untyped_storage().nbytes()
        return super().offload(t, layer, pass_id)


class Mover(InPlace):
    def __init__(self, layers, lookahead=1, keep_last=1):
        super().__init__()
        self.layers, self.lookahead, self.keep_last = layers, lookahead, keep_last
        self.layer_of, self.host, self.back = {}, {}, {}  # layer_of: ticket -> (pass, layer)

    def offload(self, t, layer, pass_id=0):
        ticket = super().offload(t, layer, pass_id)
        self.layer_of[ticket] = (pass_id, layer)
        return ticket

    def forward_end(self, layer, device, pass_id=0):
        if layer >= self.layers - self.keep_last:
            return
        for ticket in [k for k, at in self.layer_of.items() if at == (pass_id, layer) and k in self.tensors]:
            with _disable_current_modes():
                self.host[ticket] = _flat(self.tensors.pop(ticket).untyped_storage()).clone()

    def backward_begin(self, layer, device, pass_id=0):
        for ticket in [k for k, (p, n) in self.layer_of.items()
                       if p == pass_id and layer - self.lookahead <= n < layer and k in self.host]:
            self.back[ticket] = self.host.pop(ticket).clone()  # a new storage, seen by a counting mode

    def wait_storage(self, ticket):
        self.layer_of.pop(ticket, None)
        if ticket in self.tensors:
            return super().wait_storage(ticket)
        return self.back.pop(ticket) if ticket in self.back else self.host.pop(ticket).clone()

    def cancel(self, ticket):
        for store in (self.tensors, self.layer_of, self.host, self.back):
            store.pop(ticket, None)

