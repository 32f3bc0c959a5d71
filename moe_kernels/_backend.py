"""Backend selection: which implementation runs an op.

- ``cuda``: the CUDA kernels in ``moe_kernels._C``, for CUDA tensors.
- ``simt``: the same kernel sources run by the SIMT emulator (``moe_kernels._simt``), for
  CPU tensors.
- ``reference``: plain PyTorch (``moe_kernels.reference``), any device.

By default CUDA tensors go to ``cuda`` and CPU tensors to ``reference``.
``use_backend(name)`` or ``MOE_KERNELS_BACKEND=name`` picks one explicitly.
"""

import contextlib
import contextvars
import importlib
import os
import warnings

import torch

BACKENDS = ("cuda", "simt", "reference")

_forced = contextvars.ContextVar("moe_kernels_backend", default=None)
_modules = {}
_import_errors = {}


def _native(name):
    """The extension module of backend `name` ("cuda" -> _C, "simt" -> _simt), or None."""
    if name not in _modules:
        module_name = {"cuda": "moe_kernels._C", "simt": "moe_kernels._simt"}[name]
        try:
            _modules[name] = importlib.import_module(module_name)
        except ImportError as exc:
            _modules[name] = None
            _import_errors[name] = _missing_reason(name, exc)
            if name == "cuda":
                warnings.warn(f"moe_kernels: CUDA kernels unavailable: {_import_errors[name]}",
                              RuntimeWarning, stacklevel=3)
    return _modules[name]


def _missing_reason(name, exc):
    try:
        from . import _build_info
    except ImportError:
        return (f"{exc}: {__package__} at {os.path.dirname(__file__)} has no built extensions "
                "(install it with pip, or build in place: python setup.py build_ext --inplace)")
    if name == "cuda" and not _build_info.cuda_built:
        return f"it was not built: {_build_info.cuda_reason}"
    return str(exc)


def available_backends():
    """Names of the backends that can run here, e.g. ``["cuda", "simt", "reference"]``
    ("cuda" needs the built kernels and a visible GPU)."""
    names = []
    if _native("cuda") is not None and torch.cuda.is_available():
        names.append("cuda")
    if _native("simt") is not None:
        names.append("simt")
    return names + ["reference"]


def _validate_name(name):
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name):
    """Run moe_kernels ops inside the ``with`` block on backend `name`.

    ``"simt"`` runs the CUDA kernel sources in the emulator (CPU tensors),
    ``"reference"`` the PyTorch implementation, ``"cuda"`` the CUDA kernels.
    """
    token = _forced.set(_validate_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def selected_backend(tensor, arg):
    """The backend an op whose main input is `tensor` (argument `arg`) runs on."""
    device = tensor.device
    name = _forced.get() or os.environ.get("MOE_KERNELS_BACKEND") or None
    if name is None:
        return "cuda" if device.type == "cuda" else "reference"
    name = _validate_name(name)
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"{arg}: backend 'cuda' runs CUDA tensors, got a tensor on {device}")
    if name == "simt" and device.type != "cpu":
        raise ValueError(f"{arg}: backend 'simt' runs CPU tensors, got a tensor on {device}")
    return name


def native_module(name):
    """The extension module for backend `name` ("cuda" or "simt"); a clear error when it is
    missing or `name` is not one."""
    if name not in ("cuda", "simt"):
        raise ValueError(f"backend: expected 'cuda' or 'simt' (the backends with native ops), "
                         f"got {name!r}")
    module = _native(name)
    if module is None:
        raise RuntimeError(f"moe_kernels backend {name!r} is not available: {_import_errors[name]}")
    return module
