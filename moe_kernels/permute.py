"""Token permutation: gather token rows into expert-contiguous order and back."""

import collections
import fractions
import math

import torch

from . import reference
from ._backend import selected_backend
from ._checks import (FLOAT_DTYPES, check_int, check_number, check_pair_weights, check_same_device,
                      check_tensor)
from ._library import absent, native_call, register_op
from ._limits import MAX_ALIGN, MAX_EXPERTS

DROP_POLICIES = ("position", "weight")

PermuteResult = collections.namedtuple("PermuteResult", ["x", "row_map", "offsets", "num_rows", "weights"])


def capacity_from_factor(num_tokens, k, num_experts, factor):
    """Rows per expert for a capacity factor: ``ceil(factor * num_tokens * k / num_experts)``.

    Computed exactly from the shortest decimal form of `factor` (1.1 means 11/10), so a
    product that should be whole is not pushed up by binary rounding.
    """
    check_int(num_tokens, "num_tokens", 0, 1 << 62)
    check_int(k, "k", 1, 1 << 30)
    check_int(num_experts, "num_experts", 1, 1 << 30)
    factor = check_number(factor, "factor")
    if factor < 0:
        raise ValueError(f"factor: expected a finite number >= 0, got {factor!r}")
    exact = fractions.Fraction(repr(factor)) * num_tokens * k / num_experts
    return math.ceil(exact)


def _check_permute_args(x, ids, num_experts, capacity, align, drop_policy, weights, expert_range):
    check_tensor(x, "x", dtypes=FLOAT_DTYPES, dim=2)
    check_tensor(ids, "ids", dtypes=(torch.int32,), dim=2)
    check_same_device(ids, "ids", x, "x")
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"ids: expected {x.shape[0]} rows (one per token of x), got shape "
                         f"{tuple(ids.shape)}")
    if ids.shape[1] < 1:
        raise ValueError(f"ids: expected at least one column (k >= 1), got shape {tuple(ids.shape)}")
    if ids.numel() >= 1 << 31:
        raise ValueError(f"ids: expected fewer than 2^31 entries, got {ids.numel()}")
    check_int(num_experts, "num_experts", 1, MAX_EXPERTS)
    if capacity is not None:
        check_int(capacity, "capacity", 0, (1 << 31) - 1)
    check_int(align, "align", 1, MAX_ALIGN)
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy: expected one of {DROP_POLICIES}, got {drop_policy!r}")
    if weights is not None:
        check_pair_weights(weights, "weights", ids, "ids")
    elif drop_policy == "weight":
        raise ValueError("weights: drop_policy='weight' needs the routing weights")
    if expert_range is None:
        expert_range = (0, num_experts)
    if not isinstance(expert_range, (tuple, list)) or len(expert_range) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) for v in expert_range):
        raise TypeError(f"expert_range: expected a (start, end) pair of ints, got {expert_range!r}")
    start, end = expert_range
    if not 0 <= start < end <= num_experts:
        raise ValueError(f"expert_range: expected 0 <= start < end <= num_experts ({num_experts}), "
                         f"got ({start}, {end})")
    # Reading ids on a GPU would synchronize with the host: there, out-of-range ids are
    # dropped (row_map -1) by the kernels instead. CPU ids are checked here, in eager mode
    # (a traced graph cannot depend on the data; the kernels drop them there too).
    if ids.device.type == "cpu" and ids.numel() > 0 and not torch.compiler.is_compiling():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_experts:
            raise ValueError(f"ids: expected expert ids in [0, {num_experts}), got values in "
                             f"[{low}, {high}]")
    return start, end


def _fake_permute(backend, x, ids, weights, num_experts, capacity, align, drop_by_weight,
                  expert_begin, expert_end):
    tokens, k = ids.shape
    rows = reference.permute_num_rows_bound(tokens, k, num_experts, None if capacity < 0 else capacity,
                                            align)
    long = dict(dtype=torch.int64)
    return (x.new_empty((rows, x.shape[1])), ids.new_empty((tokens, k), **long),
            ids.new_empty((num_experts + 1,), **long), ids.new_empty((1,), **long),
            absent(x) if weights is None else weights.new_empty((rows,)))


register_op("permute",
            "(str backend, Tensor x, Tensor ids, Tensor? weights, int num_experts, int capacity, "
            "int align, bool drop_by_weight, int expert_begin, int expert_end) "
            "-> (Tensor, Tensor, Tensor, Tensor, Tensor)", _fake_permute)


class _PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, ids, num_experts, capacity, align, by_weight, start, end, backend):
        x_perm, row_map, offsets, num_rows, weights_perm = native_call(
            backend, "permute", x, ids, weights, num_experts, capacity, align, by_weight, start, end)
        ctx.backend = backend
        ctx.save_for_backward(row_map)
        ctx.mark_non_differentiable(row_map, offsets, num_rows)
        return x_perm, row_map, offsets, num_rows, weights_perm

    @staticmethod
    def backward(ctx, grad_x_perm, _row_map, _offsets, _num_rows, grad_weights_perm):
        (row_map,) = ctx.saved_tensors
        grad_x = grad_weights = None
        if ctx.needs_input_grad[0]:
            # x_perm[row_map[t, j]] = x[t]: the gradient sums a token's rows (an unpermute).
            grad_x = native_call(ctx.backend, "unpermute", grad_x_perm.contiguous(), row_map, None)
        if ctx.needs_input_grad[1]:
            kept = row_map >= 0
            if grad_weights_perm is None:
                grad_weights = torch.zeros(row_map.shape, dtype=torch.float32, device=row_map.device)
            else:
                grad_weights = torch.where(kept, grad_weights_perm[row_map.clamp(min=0)], 0.0)
        return grad_x, grad_weights, None, None, None, None, None, None, None, None


def _fake_unpermute(backend, y_perm, row_map, weights):
    return y_perm.new_empty((row_map.shape[0], y_perm.shape[1]))


register_op("unpermute", "(str backend, Tensor y_perm, Tensor row_map, Tensor? weights) -> Tensor",
            _fake_unpermute)


def _fake_unpermute_backward(backend, grad_y, y_perm, row_map, weights, need_grad_y_perm,
                             need_grad_weights):
    grad_y_perm = torch.empty_like(y_perm) if need_grad_y_perm else absent(y_perm)
    grad_weights = (row_map.new_empty(row_map.shape, dtype=torch.float32)
                    if need_grad_weights and weights is not None else absent(y_perm))
    return grad_y_perm, grad_weights


register_op("unpermute_backward",
            "(str backend, Tensor grad_y, Tensor y_perm, Tensor row_map, Tensor? weights, "
            "bool need_grad_y_perm, bool need_grad_weights) -> (Tensor, Tensor)",
            _fake_unpermute_backward)


class _UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_perm, weights, row_map, backend):
        ctx.backend = backend
        ctx.save_for_backward(y_perm, weights, row_map)
        return native_call(backend, "unpermute", y_perm, row_map, weights)

    @staticmethod
    def backward(ctx, grad_y):
        y_perm, weights, row_map = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_y_perm, grad_weights = native_call(ctx.backend, "unpermute_backward", grad_y.contiguous(),
                                                y_perm, row_map, weights, need_y, need_w)
        return grad_y_perm, grad_weights, None, None


def permute(x, ids, num_experts, *, capacity=None, align=1, drop_policy="position",
            weights=None, expert_range=None):
    """Gather token rows into expert-contiguous order.

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` float32 / float16 / bfloat16, contiguous; any H (16-byte vector copies
        when a row is a multiple of 16 bytes, element copies otherwise).
    ids : torch.Tensor
        ``[T, k]`` int32 expert ids (e.g. from ``topk_gating``), contiguous.
    num_experts : int
        E, ``1 <= E <= 4096``.
    capacity : int or None
        Rows per expert. None: dropless. Else each local expert gets a fixed slot of
        ``round_up(capacity, align)`` rows starting at ``(e - start) * round_up(capacity,
        align)`` (the Switch/GShard layout: ``x.view(L, slot, H)`` is a batch of experts),
        and assignments beyond `capacity` are dropped (``row_map = -1``).
        ``capacity_from_factor`` turns a capacity factor into one.
    align : int
        Each segment's size is a multiple of `align` (GEMM tiles); padding rows are zero.
    drop_policy : {"position", "weight"}
        With a capacity: keep the earliest assignments in (token, slot) order, or the
        largest `weights` (ties to the lower (token, slot); NaN ranks lowest). Kept rows
        are laid out in (token, slot) order either way.
    weights : torch.Tensor or None
        ``[T, k]`` float32 routing weights; returned permuted.
    expert_range : (int, int) or None
        ``(start, end)``: only experts ``start <= e < end`` are local (expert
        parallelism); other assignments get ``row_map = -1`` and no rows.

    Returns
    -------
    PermuteResult (named tuple)
        x : ``[M, H]``, x.dtype. Rows grouped by expert ascending, inside an expert in
            (token, slot) order; a token routed twice to one expert gets two rows, in slot
            order. Rows without a token are zero: a segment's rows past its tokens (align
            padding, unused capacity) and the rows at or past ``offsets[E]``, which belong
            to no segment (M is a static bound; with a large align and few tokens, zeroing
            that tail is most of the bandwidth).
            ``M = T*k + E*(align-1)`` dropless, ``E * round_up(capacity, align)`` with a
            capacity: independent of the ids (with an expert_range only the local experts'
            segments are used).
        row_map : ``[T, k]`` int64, the row of assignment (t, j), or -1 (dropped or not
            local).
        offsets : ``[E + 1]`` int64, expert e's segment is ``[offsets[e], offsets[e+1])``;
            ``offsets[E]`` = rows the segments use (padding included). Non-local experts
            have empty segments.
        num_rows : ``[1]`` int64 (on x's device): how many leading rows of x are valid,
            i.e. ``offsets[E]`` (the segments, align padding included), without a host sync.
        weights : ``[M]`` float32, ``weights[t, j]`` at row ``row_map[t, j]``, 0 elsewhere;
            None without weights.

    Notes
    -----
    No host synchronization: outputs are allocated at the static bound M. Ids are checked
    to lie in ``[0, E)`` for CPU tensors (ValueError); on a GPU that check would need a
    host sync, so an out-of-range id is dropped (row_map -1) instead. Deterministic bit for
    bit. Differentiable in x (backward: an unpermute) and in weights.
    """
    start, end = _check_permute_args(x, ids, num_experts, capacity, align, drop_policy, weights,
                                     expert_range)
    backend = selected_backend(x, "x")
    if backend == "reference":
        return PermuteResult(*reference.permute(
            x, ids, num_experts, capacity=capacity, align=align, drop_policy=drop_policy,
            weights=weights, expert_range=(start, end)))
    return PermuteResult(*_PermuteFunction.apply(
        x, weights, ids, num_experts, -1 if capacity is None else capacity, align,
        drop_policy == "weight", start, end, backend))


def unpermute(y_perm, row_map, weights=None):
    """Combine each token's expert rows: ``y[t] = sum_j weights[t, j] * y_perm[row_map[t, j]]``.

    Parameters
    ----------
    y_perm : torch.Tensor
        ``[M, H]`` float32 / float16 / bfloat16, contiguous (e.g. expert outputs on
        ``permute``'s rows).
    row_map : torch.Tensor
        ``[T, k]`` int64 from ``permute``; entries of -1 (dropped) are skipped.
    weights : torch.Tensor or None
        ``[T, k]`` float32; None sums the rows.

    Returns
    -------
    torch.Tensor
        ``[T, H]`` in y_perm.dtype; the sum runs in float32 in slot order (j = 0..k-1),
        each product rounded on its own (as PyTorch's mul then add), then rounds once.
        A token with no kept assignment gets zeros.

    Notes
    -----
    Rows of row_map must be distinct (as permute makes them) for the y_perm gradient.
    row_map values outside ``[-1, M)`` raise ValueError for CPU tensors; on a GPU (no host
    sync) they are skipped like -1. Differentiable in y_perm and weights.
    """
    check_tensor(y_perm, "y_perm", dtypes=FLOAT_DTYPES, dim=2)
    check_tensor(row_map, "row_map", dtypes=(torch.int64,), dim=2)
    check_same_device(row_map, "row_map", y_perm, "y_perm")
    if weights is not None:
        check_pair_weights(weights, "weights", row_map, "row_map")
    if row_map.device.type == "cpu" and row_map.numel() > 0 and not torch.compiler.is_compiling():
        low, high = int(row_map.min()), int(row_map.max())
        if low < -1 or high >= y_perm.shape[0]:
            raise ValueError(f"row_map: expected values in [-1, {y_perm.shape[0]}) (rows of y_perm), "
                             f"got values in [{low}, {high}]")
    backend = selected_backend(y_perm, "y_perm")
    if backend == "reference":
        return reference.unpermute(y_perm, row_map, weights)
    return _UnpermuteFunction.apply(y_perm, weights, row_map, backend)
