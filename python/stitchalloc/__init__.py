"""stitchalloc: a GPU memory allocator for long-context LLM training.

Three ways in (README.md, docs/torch.md):

* ``stitchalloc.install("key:value,...")`` before the first CUDA use;
* ``PYTORCH_CUDA_ALLOC_CONF=backend:stitchalloc,...`` with the package installed (the startup
  hook in ``stitchalloc.pth`` runs ``stitchalloc._startup``);
* ``LD_PRELOAD=$(python -m stitchalloc --preload-path) python train.py``.

Importing this package never imports torch; the trace tools (stitchalloc.snapshot,
``python -m stitchalloc.convert``) work without it. The native libraries live in
``stitchalloc/lib`` (or in ``$STITCHALLOC_LIBRARY_DIR``, for a build tree).
"""

import ctypes
import os

__version__ = "0.1.0"

__all__ = [
    "install", "installed", "library_path", "split_alloc_conf", "InstallError",
    "iteration", "layer", "arena_stats", "drop_plans",
]


class InstallError(RuntimeError):
    """stitchalloc could not be installed as PyTorch's CUDA allocator (the message says why)."""


def library_path(name: str) -> str:
    """Path of one of the package's native libraries: "stitchalloc", "stitchalloc_torch" or
    "stitchalloc_preload"."""
    folder = os.environ.get("STITCHALLOC_LIBRARY_DIR") or os.path.join(os.path.dirname(__file__), "lib")
    return os.path.join(folder, f"lib{name}.so")


_capi = None


def _c_api() -> ctypes.CDLL:
    """libstitchalloc.so (the C API, no torch dependency), loaded once."""
    global _capi
    if _capi is None:
        path = library_path("stitchalloc")
        if not os.path.exists(path):
            raise InstallError(f"stitchalloc's native library is missing: {path} (was the package built?)")
        lib = ctypes.CDLL(path)
        lib.stitchalloc_last_error.restype = ctypes.c_char_p
        lib.stitchalloc_split_torch_conf.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.stitchalloc_conf_split_enabled.argtypes = [ctypes.c_void_p]
        lib.stitchalloc_conf_split_part.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.stitchalloc_conf_split_part.restype = ctypes.c_char_p
        lib.stitchalloc_conf_split_free.argtypes = [ctypes.c_void_p]
        lib.stitchalloc_version.restype = ctypes.c_char_p
        _capi = lib
    return _capi


def split_alloc_conf(text: str):
    """Splits a PYTORCH_CUDA_ALLOC_CONF value.

    Returns ``(enabled, stitchalloc_part, torch_part, notes)``: whether backend:stitchalloc was
    given, the keys stitchalloc applies, what PyTorch should still see, and one note per PyTorch
    key that was honoured or has no effect. Raises ValueError naming a malformed or unknown
    entry. Without backend:stitchalloc the text comes back unchanged as the PyTorch part.
    """
    lib = _c_api()
    handle = ctypes.c_void_p()
    if lib.stitchalloc_split_torch_conf(text.encode(), ctypes.byref(handle)) != 0:
        raise ValueError(lib.stitchalloc_last_error().decode())
    try:
        enabled = bool(lib.stitchalloc_conf_split_enabled(handle))
        ours = lib.stitchalloc_conf_split_part(handle, b"stitchalloc").decode()
        theirs = lib.stitchalloc_conf_split_part(handle, b"torch").decode()
        notes = [n for n in lib.stitchalloc_conf_split_part(handle, b"notes").decode().split("\n") if n]
    finally:
        lib.stitchalloc_conf_split_free(handle)
    return enabled, ours, theirs, notes


_torch_lib = None


def _torch_plugin() -> ctypes.CDLL:
    global _torch_lib
    if _torch_lib is None:
        import torch  # noqa: F401  (loads libc10 / libc10_cuda first)

        path = library_path("stitchalloc_torch")
        if not os.path.exists(path):
            raise InstallError(f"the stitchalloc PyTorch plugin is missing: {path} (built without torch?)")
        lib = ctypes.CDLL(path)
        lib.stitchalloc_torch_install.argtypes = [ctypes.c_char_p]
        lib.stitchalloc_torch_last_error.restype = ctypes.c_char_p
        lib.stitchalloc_torch_built_for.restype = ctypes.c_char_p
        built_for = lib.stitchalloc_torch_built_for().decode()
        running = torch.__version__.split("+")[0]
        if built_for.split(".")[:2] != running.split(".")[:2]:
            raise InstallError(
                f"the stitchalloc plugin was built against torch {built_for}, but torch {running} is "
                "running; reinstall stitchalloc (pip install .) in this environment")
        _torch_lib = lib
    return _torch_lib


_declared = set()


def _torch_plugin_with(signatures: dict) -> ctypes.CDLL:
    """The plugin, with the ctypes signatures of ``signatures`` (function name -> (argtypes,
    restype or None for int)) declared on first use. Modules pass a table of their own."""
    lib = _torch_plugin()
    if id(signatures) not in _declared:
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            if restype is not None:
                fn.restype = restype
        _declared.add(id(signatures))
    return lib


def install(config: str = "") -> None:
    """Makes stitchalloc PyTorch's CUDA allocator for this process.

    ``config`` is "key:value,..." (docs/configuration.md), applied on top of STITCHALLOC_CONF.
    Call it before the first CUDA tensor or torch.cuda call: afterwards it raises InstallError
    saying so and changes nothing. Calling it again with the same configuration does nothing.
    """
    lib = _torch_plugin()
    if lib.stitchalloc_torch_install(config.encode()) != 0:
        raise InstallError(lib.stitchalloc_torch_last_error().decode())


def installed() -> bool:
    """Whether stitchalloc is PyTorch's current CUDA allocator (never imports torch)."""
    if _torch_lib is None:
        import sys

        if "torch" not in sys.modules or not os.path.exists(library_path("stitchalloc_torch")):
            return False
        try:
            # Already loaded by the preload library or the startup hook? RTLD_NOLOAD answers
            # without loading it.
            lib = ctypes.CDLL(library_path("stitchalloc_torch"), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            return False
        return bool(lib.stitchalloc_torch_installed())
    return bool(_torch_lib.stitchalloc_torch_installed())


from .arena import arena_stats, drop_plans, iteration, layer  # noqa: E402  (needs _torch_plugin above)
from . import swap  # noqa: E402
from .offload import Offload, offload, offload_plan, offloaded  # noqa: E402
