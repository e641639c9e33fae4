"""The forwards ``stitchalloc.offload`` puts on modules, and what a copy of such a module gets.

Offload replaces a module's ``forward`` by an instance attribute (as accelerate's hooks do):
the layer's own, and in a Llama-family layer its norms', attention's and MLP's. A module's
instance attributes go with it into a copy: ``copy.deepcopy(model)`` (an EMA model,
``torch.optim.swa_utils.AveragedModel``, a frozen reference model) and pickling
(``torch.save(model)``, a model sent to a spawned process). A plain function there would have
made the copy's layers run the original's forward, with the original's parameters (a copy
computing with its own embeddings and the original's layers, silently), and made pickling fail
("Can't pickle local object").

Data structures and their invariants:

- ``_Forward``: what offload puts in ``module.__dict__["forward"]``. ``call`` is offload's
  wrapper; ``module`` the module it was put on; ``before`` the instance forward the module had
  before (``_MISSING``: none, the class's). A copy of the module is not offloaded (offload's
  layers are the ones given to it; ``stitchalloc.offload(copy)`` offloads a copy): it gets a
  copy of ``before``, or, where there was none, the class's forward: ``_ClassForward`` for
  ``copy.deepcopy``, the bound method for pickling (so that loading needs no stitchalloc).
- ``_ClassForward``: a module's class forward as an instance attribute, holding the module
  weakly, so that the copy forms no reference cycle (a cycle would keep a discarded copy's
  device memory until the collector's next full pass). It copies and pickles as ``_Forward``
  does where there was none.
"""

import operator
import weakref

from ._block_checks import _MISSING


def _twin(module, memo):
    """The copy ``copy.deepcopy`` is making of ``module`` (registered in ``memo`` before its
    attributes are copied), or None when the module itself is not being copied."""
    return memo.get(id(module)) if module is not None else None


class _Forward:
    """A forward offload put on ``module`` (see the module docstring)."""

    __slots__ = ("call", "module", "before", "__weakref__")

    def __init__(self, call, module, before):
        self.call = call
        self.module = module
        self.before = before

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def __deepcopy__(self, memo):
        import copy

        twin = _twin(self.module, memo)
        if twin is None:
            return self  # the forward copied alone (not with its module): it stays this module's
        if self.before is not _MISSING:
            return copy.deepcopy(self.before, memo)
        return _ClassForward(twin)

    def __reduce__(self):
        if self.before is not _MISSING:
            # Pickled as what it replaced, whatever that is (operator.itemgetter, so that loading
            # needs no stitchalloc).
            return operator.itemgetter(0), ((self.before,),)
        return getattr, (self.module, "forward")


class _ClassForward:
    """The class forward of a copy of a module that offload had wrapped (see the module
    docstring)."""

    __slots__ = ("module", "__weakref__")

    def __init__(self, module):
        self.module = weakref.ref(module)

    def __call__(self, *args, **kwargs):
        module = self.module()
        return type(module).forward(module, *args, **kwargs)

    def __deepcopy__(self, memo):
        twin = _twin(self.module(), memo)
        return _ClassForward(twin) if twin is not None else self

    def __reduce__(self):
        return getattr, (self.module(), "forward")
