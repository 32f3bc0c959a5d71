"""torch.library registration of the native ops, for torch.compile and opcheck.

Every function of the extension modules that the Python API calls is also a custom op
``torch.ops.moe_kernels.<name>(backend, *args)`` with a fake (meta) implementation (each
family module registers its own, beside the op, with ``register_op``), so
``torch.compile(fullgraph=True)`` traces through our ops without a graph break. Eager calls
skip the dispatcher and go straight to the pybind11 function (``native_call``): the
dispatcher costs more than a small kernel launch.

An output that a native function may return as None (optional) travels through the
dispatcher as a 0-dim tensor, since an op schema cannot return None; no real output of
ours is 0-dim.
"""

import torch

from ._backend import native_module

_NAMESPACE = "moe_kernels"


def absent(like):
    return like.new_zeros(())


def register_op(name, schema, fake):
    """Registers native function `name` as ``torch.ops.moe_kernels.<name>(backend, *args)``
    with `schema` (its arguments after the backend name) and the fake implementation `fake`.
    Each op family calls this beside its Python op."""
    def impl(backend, *args):
        out = getattr(native_module(backend), name)(*args)
        if isinstance(out, tuple):
            # Outputs may alias nothing: an optional output becomes a fresh 0-dim tensor, on
            # the device of the first tensor argument (every output may be absent).
            like = next(t for t in args if isinstance(t, torch.Tensor))
            return tuple(absent(like) if t is None else t for t in out)
        return out

    op = torch.library.custom_op(f"{_NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


def _present(t):
    return None if isinstance(t, torch.Tensor) and t.dim() == 0 else t


def native_call(backend, name, *args):
    """Run native function `name` of `backend`: the pybind11 function in eager mode, the
    registered custom op while torch.compile traces."""
    if torch.compiler.is_compiling():
        out = getattr(torch.ops.moe_kernels, name)(backend, *args)
        return tuple(_present(t) for t in out) if isinstance(out, tuple) else out
    return getattr(native_module(backend), name)(*args)
