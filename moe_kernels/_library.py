"""torch.library registration of the native ops, for torch.compile and opcheck.

Every function of the extension modules that the Python API calls is also a custom op
``torch.ops.moe_kernels.<name>(backend, *args)`` with a fake (meta) implementation, so
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


def _absent(like):
    return like.new_zeros(())


def _fake_topk_gating(backend, logits, k, renormalize, scoring, bias, num_groups, topk_groups,
                      group_scoring, scaling_factor):
    shape = (logits.shape[0], k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int32)


def _fake_topk_gating_backward(backend, grad_weights, logits, ids, scoring, renormalize,
                               scaling_factor):
    return torch.empty_like(logits)


def _fake_router_stats(backend, ids, num_experts):
    return ids.new_empty((num_experts,), dtype=torch.int32)


def _fake_expert_choice_gating(backend, logits, capacity):
    shape = (logits.shape[1], capacity)
    return logits.new_empty(shape, dtype=torch.int32), logits.new_empty(shape, dtype=torch.float32)


def _fake_hash_gating(backend, token_ids, num_experts, k):
    shape = (token_ids.shape[0], k)
    return (token_ids.new_empty(shape, dtype=torch.float32),
            token_ids.new_empty(shape, dtype=torch.int32))


def _fake_permute(backend, x, ids, weights, num_experts, capacity, align, drop_by_weight,
                  expert_begin, expert_end):
    from .reference import permute_num_rows_bound

    tokens, k = ids.shape
    rows = permute_num_rows_bound(tokens, k, num_experts, None if capacity < 0 else capacity, align)
    long = dict(dtype=torch.int64)
    return (x.new_empty((rows, x.shape[1])), ids.new_empty((tokens, k), **long),
            ids.new_empty((num_experts + 1,), **long), ids.new_empty((1,), **long),
            _absent(x) if weights is None else weights.new_empty((rows,)))


def _fake_unpermute(backend, y_perm, row_map, weights):
    return y_perm.new_empty((row_map.shape[0], y_perm.shape[1]))


def _fake_unpermute_backward(backend, grad_y, y_perm, row_map, weights, need_grad_y_perm,
                             need_grad_weights):
    grad_y_perm = torch.empty_like(y_perm) if need_grad_y_perm else _absent(y_perm)
    grad_weights = (row_map.new_empty(row_map.shape, dtype=torch.float32)
                    if need_grad_weights and weights is not None else _absent(y_perm))
    return grad_y_perm, grad_weights


# name -> (schema, fake implementation)
_OPS = {
    "topk_gating": (
        "(str backend, Tensor logits, int k, bool renormalize, str scoring, Tensor? bias, "
        "int num_groups, int topk_groups, str group_scoring, float scaling_factor) -> (Tensor, Tensor)",
        _fake_topk_gating),
    "topk_gating_backward": (
        "(str backend, Tensor grad_weights, Tensor logits, Tensor ids, str scoring, "
        "bool renormalize, float scaling_factor) -> Tensor",
        _fake_topk_gating_backward),
    "router_stats": ("(str backend, Tensor ids, int num_experts) -> Tensor", _fake_router_stats),
    "expert_choice_gating": ("(str backend, Tensor logits, int capacity) -> (Tensor, Tensor)",
                             _fake_expert_choice_gating),
    "hash_gating": ("(str backend, Tensor token_ids, int num_experts, int k) -> (Tensor, Tensor)",
                    _fake_hash_gating),
    "permute": (
        "(str backend, Tensor x, Tensor ids, Tensor? weights, int num_experts, int capacity, "
        "int align, bool drop_by_weight, int expert_begin, int expert_end) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        _fake_permute),
    "unpermute": ("(str backend, Tensor y_perm, Tensor row_map, Tensor? weights) -> Tensor",
                  _fake_unpermute),
    "unpermute_backward": (
        "(str backend, Tensor grad_y, Tensor y_perm, Tensor row_map, Tensor? weights, "
        "bool need_grad_y_perm, bool need_grad_weights) -> (Tensor, Tensor)",
        _fake_unpermute_backward),
}


def _register(name, schema, fake):
    def impl(backend, *args):
        out = getattr(native_module(backend), name)(*args)
        if isinstance(out, tuple):
            # Outputs may alias nothing: an optional output becomes a fresh 0-dim tensor.
            like = next(t for t in out if t is not None)
            return tuple(_absent(like) if t is None else t for t in out)
        return out

    op = torch.library.custom_op(f"{_NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


for _name, (_schema, _fake) in _OPS.items():
    _register(_name, _schema, _fake)


def _present(t):
    return None if isinstance(t, torch.Tensor) and t.dim() == 0 else t


def native_call(backend, name, *args):
    """Run native function `name` of `backend`: the pybind11 function in eager mode, the
    registered custom op while torch.compile traces."""
    if torch.compiler.is_compiling():
        out = getattr(torch.ops.moe_kernels, name)(backend, *args)
        return tuple(_present(t) for t in out) if isinstance(out, tuple) else out
    return getattr(native_module(backend), name)(*args)
