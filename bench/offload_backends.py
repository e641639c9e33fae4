"""Stand-ins for the swap manager under stitchalloc.offload(..., backend=...), for benchmarks:

- InPlace: every "offloaded" tensor stays where it is; the policy's recompute runs, no copy does.
  Step time with it against step time with the real swap manager, at the same alpha, is what the
  copies cost the step (bench/offload_seq.py's copy-hiding figure).
- Counter: InPlace that also counts the bytes offloaded per layer (bench/offload_bytes.py).
"""

import torch


class InPlace:
    def __init__(self):
        self.tensors = {}
        self.next = 0

    def accepts(self, t):
        return True

    def begin(self, num_layers, device):
        pass

    def offload(self, t, layer):
        self.next += 1
        self.tensors[self.next] = t
        return self.next

    def forward_end(self, layer, device):
        pass

    def backward_begin(self, layer, device):
        pass

    def wait_storage(self, ticket):
        s = self.tensors.pop(ticket).untyped_storage()
        return torch.empty(0, dtype=torch.uint8, device=s.device).set_(s, 0, (s.nbytes(),), (1,))

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

    def offload(self, t, layer):
        self.by_layer[layer] = self.by_layer.get(layer, 0) + t.untyped_storage().nbytes()
        return super().offload(t, layer)
