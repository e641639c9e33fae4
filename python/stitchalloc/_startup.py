"""The startup hook behind ``PYTORCH_CUDA_ALLOC_CONF=backend:stitchalloc,...``.

``stitchalloc.pth`` (installed at the root of site-packages) imports this module at interpreter
startup, but only when PYTORCH_CUDA_ALLOC_CONF mentions stitchalloc or STITCHALLOC_AUTO_INSTALL
is set; otherwise it costs one environment lookup. On import it:

1. splits PYTORCH_CUDA_ALLOC_CONF (stitchalloc.split_alloc_conf): PyTorch keeps only what it
   should see (it rejects unknown keys), stitchalloc's keys move to STITCHALLOC_AUTO_INSTALL
   (inherited by child processes such as torchrun's workers, whose own hook then installs);
   honoured and ignored PyTorch keys are reported on stderr; an invalid value is reported at
   once and makes ``import torch`` fail with the same message;
2. arranges that stitchalloc.install(STITCHALLOC_AUTO_INSTALL) runs right after ``import torch``
   finishes, before any CUDA use.
"""

import importlib.abc
import os
import sys

INSTALL_VAR = "STITCHALLOC_AUTO_INSTALL"
CONF_VAR = "PYTORCH_CUDA_ALLOC_CONF"


def apply_environment(environ=os.environ, stderr=sys.stderr) -> bool:
    """Splits PYTORCH_CUDA_ALLOC_CONF in `environ`. Returns whether stitchalloc is selected."""
    import stitchalloc

    conf = environ.get(CONF_VAR)
    if conf is not None and "stitchalloc" in conf:
        try:
            enabled, ours, theirs, notes = stitchalloc.split_alloc_conf(conf)
        except ValueError as e:
            raise ValueError(f"stitchalloc: {e}") from None
        if enabled:
            for note in notes:
                print(f"stitchalloc: {note}", file=stderr)
            if theirs:
                environ[CONF_VAR] = theirs
            else:
                del environ[CONF_VAR]
            environ[INSTALL_VAR] = ours
    return INSTALL_VAR in environ


class _InstallAfterTorch(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of the top-level ``torch`` module so that
    stitchalloc.install runs as soon as torch's own initialisation completes. With `error` set,
    importing torch raises it instead (an invalid PYTORCH_CUDA_ALLOC_CONF must not silently fall
    back to PyTorch's allocator)."""

    def __init__(self, error=None):
        self.error = error

    def find_spec(self, fullname, path, target=None):
        if fullname != "torch":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        error = self.error

        def exec_module(module):
            if error is not None:
                raise error
            original(module)
            import stitchalloc

            stitchalloc.install(os.environ.get(INSTALL_VAR, ""))

        loader.exec_module = exec_module
        return spec


def install_hook(error=None) -> None:
    if error is not None:
        sys.meta_path.insert(0, _InstallAfterTorch(error))
        return
    if "torch" in sys.modules:  # imported already (e.g. by sitecustomize): install now
        import stitchalloc

        stitchalloc.install(os.environ.get(INSTALL_VAR, ""))
        return
    if not any(isinstance(f, _InstallAfterTorch) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstallAfterTorch())


def _run() -> None:
    try:
        selected = apply_environment()
    except ValueError as e:
        print(f"{e}", file=sys.stderr)
        install_hook(ImportError(f"{e} (importing torch fails so that the job does not run on another allocator)"))
        return
    if selected:
        install_hook()


_run()
