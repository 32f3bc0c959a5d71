"""Token permutation: gather token rows into expert-contiguous order and back."""

import collections
import fractions

import torch

from . import reference
from ._backend import selected_backend
from ._checks import (FLOAT_DTYPES, check_int, check_number, check_pair_weights, check_same_device,
                      check_tensor)
from ._library import absent, native_call, register_op
from ._limits import MAX_ALIGN, MAX_EXPERTS

DROP_POLICIES = ("position", "weight")

PermuteResult = collections.namedtuple("PermuteResult", ["x", "row_map", "offsets", "num_rows", "weights"])
PermutePlan = collections.namedtuple("PermutePlan", ["row_map", "offsets", "gather", "weights", "num_rows"])

# Rows of the outputs (the static bound M): row indices, offsets and gather entries then fit
# in int32, as a grouped GEMM's tile schedule usually keeps them.
MAX_ROWS = (1 << 31) - 1
ID_DTYPES = (torch.int32, torch.int64)
ROW_MAP_DTYPES = (torch.int64, torch.int32)


def capacity_from_factor(num_tokens, k, num_experts, factor):
    """Rows per expert for a capacity factor: ``ceil(factor * num_tokens * k / num_experts)``.

    Computed exactly from the shortest decimal form of `factor` (1.1 means 11/10), so a
    product that should be whole is not pushed up by binary rounding. Integer arithmetic
    only, so torch.compile traces it (the argument checks are skipped while it traces).
    """
    if not torch.compiler.is_compiling():
        check_int(num_tokens, "num_tokens", 0, 1 << 62)
        check_int(k, "k", 1, 1 << 30)
        check_int(num_experts, "num_experts", 1, 1 << 30)
        factor = check_number(factor, "factor")
        if factor < 0:
            raise ValueError(f"factor: expected a finite number >= 0, got {factor!r}")
    ratio = fractions.Fraction(repr(float(factor)))
    return -(-(num_tokens * k * ratio.numerator) // (num_experts * ratio.denominator))


def _check_plan_args(ids, num_experts, capacity, align, drop_policy, weights, expert_range):
    """Checks the arguments of permute_plan (and permute's other than x); returns
    (ids, weights, start, end) with ids and weights contiguous (a copy if they were not)."""
    check_tensor(ids, "ids", dtypes=ID_DTYPES, dim=2, contiguous=False)
    if ids.shape[1] < 1:
        raise ValueError(f"ids: expected at least one column (k >= 1), got shape {tuple(ids.shape)}")
    if ids.numel() >= 1 << 31:
        raise ValueError(f"ids: expected fewer than 2^31 entries, got {ids.numel()}")
    num_experts = check_int(num_experts, "num_experts", 1, MAX_EXPERTS)
    if capacity is not None:
        capacity = check_int(capacity, "capacity", 0, MAX_ROWS)
    align = check_int(align, "align", 1, MAX_ALIGN)
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy: expected one of {DROP_POLICIES}, got {drop_policy!r}")
    if weights is not None:
        check_tensor(weights, "weights", dtypes=(torch.float32,), dim=2, contiguous=False)
        weights = weights.contiguous()
        check_pair_weights(weights, "weights", ids, "ids")
    elif drop_policy == "weight":
        raise ValueError("weights: drop_policy='weight' needs the routing weights")
    expert_map = None
    if isinstance(expert_range, torch.Tensor):
        expert_map = _check_expert_map(expert_range, num_experts, ids)
        expert_range = (0, num_experts)
    if expert_range is None:
        expert_range = (0, num_experts)
    if not isinstance(expert_range, (tuple, list)) or len(expert_range) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) for v in expert_range):
        raise TypeError(f"expert_range: expected a (start, end) pair of ints or an expert map "
                        f"(int tensor [num_experts]), got {expert_range!r}")
    start, end = expert_range
    if not 0 <= start < end <= num_experts:
        raise ValueError(f"expert_range: expected 0 <= start < end <= num_experts ({num_experts}), "
                         f"got ({start}, {end})")
    tokens, k = ids.shape
    rows = reference.permute_num_rows_bound(tokens, k, num_experts, capacity, align)
    if rows > MAX_ROWS:
        if capacity is not None:
            raise ValueError(f"capacity: the outputs would have num_experts * round_up(capacity, "
                             f"align) = {rows} rows; expected at most 2^31 - 1 (lower capacity)")
        raise ValueError(f"align: the outputs would have T*k + num_experts * (align - 1) = {rows} "
                         f"rows; expected at most 2^31 - 1 (lower align)")
    # Reading ids on a GPU would synchronize with the host: there, out-of-range ids are
    # dropped (row_map -1) by the kernels instead. CPU ids are checked here, in eager mode
    # (a traced graph cannot depend on the data; the kernels drop them there too).
    if ids.device.type == "cpu" and ids.numel() > 0 and not torch.compiler.is_compiling():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_experts:
            raise ValueError(f"ids: expected expert ids in [0, {num_experts}), got values in "
                             f"[{low}, {high}]")
    return ids.contiguous(), weights, start, end, expert_map


def _check_expert_map(expert_map, num_experts, ids):
    """An expert map (vLLM's expert_map): [E] ints, global expert -> local index or -1.
    Checked on the CPU (the local indices must be a permutation of 0..L-1); returned as
    contiguous int32 (a copy unless it already is)."""
    check_tensor(expert_map, "expert_range", dtypes=ID_DTYPES, dim=1, contiguous=False)
    check_same_device(expert_map, "expert_range", ids, "ids")
    if expert_map.shape[0] != num_experts:
        raise ValueError(f"expert_range: expected an expert map of num_experts ({num_experts}) "
                         f"entries, got shape {tuple(expert_map.shape)}")
    if expert_map.device.type == "cpu" and not torch.compiler.is_compiling():
        local = expert_map[expert_map >= 0].long()
        if bool((expert_map < -1).any()) or not torch.equal(
                local.sort().values, torch.arange(local.numel())):
            raise ValueError("expert_range: expected an expert map of -1 (not local) and local "
                             "indices that are a permutation of 0..L-1, got "
                             f"{expert_map.tolist()}")
    return expert_map.to(torch.int32).contiguous()


def _check_permute_args(x, ids, num_experts, capacity, align, drop_policy, weights, expert_range):
    check_tensor(x, "x", dtypes=FLOAT_DTYPES, dim=2, contiguous=False)
    check_tensor(ids, "ids", dtypes=ID_DTYPES, dim=2, contiguous=False)
    check_same_device(ids, "ids", x, "x")
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"ids: expected {x.shape[0]} rows (one per token of x), got shape "
                         f"{tuple(ids.shape)}")
    ids, weights, start, end, expert_map = _check_plan_args(
        ids, num_experts, capacity, align, drop_policy, weights, expert_range)
    return x.contiguous(), ids, weights, start, end, expert_map


def _weights_grad(grad_weights_perm, row_map):
    """weights_perm[row_map[t, j]] = weights[t, j]: the gradient reads each kept row back
    (zero for dropped assignments, and when there are no rows at all, e.g. capacity 0)."""
    if grad_weights_perm is None or grad_weights_perm.shape[0] == 0:
        return torch.zeros(row_map.shape, dtype=torch.float32, device=row_map.device)
    return torch.where(row_map >= 0, grad_weights_perm[row_map.clamp(min=0)], 0.0)


def _fake_permute_plan(backend, ids, weights, num_experts, capacity, align, drop_by_weight,
                       expert_begin, expert_end, expert_map=None):
    tokens, k = ids.shape
    rows = reference.permute_num_rows_bound(tokens, k, num_experts, None if capacity < 0 else capacity,
                                            align)
    long = dict(dtype=torch.int64)
    return (ids.new_empty((tokens, k), **long), ids.new_empty((num_experts + 1,), **long),
            ids.new_empty((rows,), **long), ids.new_empty((1,), **long),
            absent(ids) if weights is None else weights.new_empty((rows,)))


register_op("permute_plan",
            "(str backend, Tensor ids, Tensor? weights, int num_experts, int capacity, int align, "
            "bool drop_by_weight, int expert_begin, int expert_end, Tensor? expert_map=None) "
            "-> (Tensor, Tensor, Tensor, Tensor, Tensor)", _fake_permute_plan)


class _PermutePlanFunction(torch.autograd.Function):
    """Only the permuted weights carry gradient (to the weights); the indices are integers."""

    @staticmethod
    def forward(ctx, weights, ids, num_experts, capacity, align, by_weight, start, end, expert_map,
                backend):
        row_map, offsets, gather, num_rows, weights_perm = native_call(
            backend, "permute_plan", ids, weights, num_experts, capacity, align, by_weight, start, end,
            expert_map)
        ctx.save_for_backward(row_map)
        ctx.mark_non_differentiable(row_map, offsets, gather, num_rows)
        return row_map, offsets, gather, weights_perm, num_rows

    @staticmethod
    def backward(ctx, _row_map, _offsets, _gather, grad_weights_perm, _num_rows):
        (row_map,) = ctx.saved_tensors
        grad_weights = _weights_grad(grad_weights_perm, row_map) if ctx.needs_input_grad[0] else None
        return grad_weights, None, None, None, None, None, None, None, None, None


def _fake_permute(backend, x, ids, weights, num_experts, capacity, align, drop_by_weight,
                  expert_begin, expert_end, expert_map=None):
    tokens, k = ids.shape
    rows = reference.permute_num_rows_bound(tokens, k, num_experts, None if capacity < 0 else capacity,
                                            align)
    long = dict(dtype=torch.int64)
    return (x.new_empty((rows, x.shape[1])), ids.new_empty((tokens, k), **long),
            ids.new_empty((num_experts + 1,), **long), ids.new_empty((1,), **long),
            absent(x) if weights is None else weights.new_empty((rows,)))


register_op("permute",
            "(str backend, Tensor x, Tensor ids, Tensor? weights, int num_experts, int capacity, "
            "int align, bool drop_by_weight, int expert_begin, int expert_end, "
            "Tensor? expert_map=None) "
            "-> (Tensor, Tensor, Tensor, Tensor, Tensor)", _fake_permute)


class _PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, ids, num_experts, capacity, align, by_weight, start, end, expert_map,
                backend):
        x_perm, row_map, offsets, num_rows, weights_perm = native_call(
            backend, "permute", x, ids, weights, num_experts, capacity, align, by_weight, start, end,
            expert_map)
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
            grad_weights = _weights_grad(grad_weights_perm, row_map)
        return grad_x, grad_weights, None, None, None, None, None, None, None, None, None


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


def permute_plan(ids, num_experts, *, capacity=None, align=1, drop_policy="position",
                 weights=None, expert_range=None):
    """The row layout of ``permute`` without moving any row: for a grouped GEMM that reads
    the tokens in place (``x[gather[i]]`` for row i).

    The arguments are permute's (without x) and the layout is exactly permute's: rows
    grouped by expert ascending, inside an expert in (token, slot) order; the same
    capacity, drop policies, align padding, expert_range and static row bound M (with
    ``align=1`` and no capacity nothing is padded and ``M = T*k``; an expert map orders the
    segments by local index, see permute's expert_range). Only the index stage
    runs (no row copy, no zero fill).

    Returns
    -------
    PermutePlan (named tuple)
        row_map : ``[T, k]`` int64, the row of assignment (t, j), or -1 (dropped or not
            local).
        offsets : ``[E + 1]`` int64, expert e's segment is ``[offsets[e], offsets[e+1])``.
        gather : ``[M]`` int64, the token whose row i is: ``gather[row_map[t, j]] = t``;
            -1 for padding rows and for the rows at or past ``offsets[E]``.
        weights : ``[M]`` float32, ``weights[t, j]`` at row ``row_map[t, j]``, 0 elsewhere;
            None without weights. Differentiable in the input weights (the only output
            that carries a gradient).
        num_rows : ``[1]`` int64, ``offsets[E]`` (the rows the segments use), on the
            device of ids.

    Notes
    -----
    No host synchronization, deterministic bit for bit. ids may be int32 or int64 (what
    ``torch.topk`` returns; the kernels read both); non-contiguous ids or weights are
    copied to contiguous ones first.
    """
    ids, weights, start, end, expert_map = _check_plan_args(
        ids, num_experts, capacity, align, drop_policy, weights, expert_range)
    backend = selected_backend(ids, "ids")
    if backend == "reference":
        row_map, offsets, gather, weights_perm, num_rows = reference.permute_plan(
            ids, num_experts, capacity=capacity, align=align, drop_policy=drop_policy,
            weights=weights, expert_range=(start, end) if expert_map is None else expert_map)
        return PermutePlan(row_map, offsets, gather, weights_perm, num_rows)
    return PermutePlan(*_PermutePlanFunction.apply(
        weights, ids, num_experts, -1 if capacity is None else capacity, align,
        drop_policy == "weight", start, end, expert_map, backend))


def permute(x, ids, num_experts, *, capacity=None, align=1, drop_policy="position",
            weights=None, expert_range=None):
    """Gather token rows into expert-contiguous order.

    ``permute`` is ``permute_plan`` (the row layout) followed by the row copy
    ``x_perm[i] = x[gather[i]]`` (zero where gather is -1).

    Parameters
    ----------
    x : torch.Tensor
        ``[T, H]`` float32 / float16 / bfloat16; any H (16-byte vector copies when a row
        is a multiple of 16 bytes, element copies otherwise). A non-contiguous x is copied
        to a contiguous one first.
    ids : torch.Tensor
        ``[T, k]`` int32 or int64 expert ids (``topk_gating``'s int32, ``torch.topk``'s
        int64: the kernels read both without a conversion). Non-contiguous ids are copied.
    num_experts : int
        E, ``1 <= E <= 4096``.
    capacity : int or None
        Rows per expert. None: dropless. Else each local expert gets a fixed slot of
        ``round_up(capacity, align)`` rows starting at ``(e - start) * round_up(capacity,
        align)`` (the Switch/GShard layout: ``x.view(L, slot, H)`` is a batch of experts),
        and assignments beyond `capacity` are dropped (``row_map = -1``).
        ``capacity_from_factor`` turns a capacity factor into one. The outputs' rows
        ``E * round_up(capacity, align)`` must not exceed ``2^31 - 1`` (ValueError naming
        capacity; dropless, ``T*k + E*(align-1)`` likewise, naming align); below that the
        allocation can still fail for lack of memory.
    align : int
        Each segment's size is a multiple of `align` (GEMM tiles); padding rows are zero.
    drop_policy : {"position", "weight"}
        With a capacity: keep the earliest assignments in (token, slot) order, or the
        largest `weights`. The weight order is the float order with NaN ranked as -inf
        (NaN and -inf tie) and -0 equal to +0; ties keep the lower (token, slot). Kept rows
        are laid out in (token, slot) order either way.
    weights : torch.Tensor or None
        ``[T, k]`` float32 routing weights; returned permuted. Non-contiguous: copied.
    expert_range : (int, int), torch.Tensor or None
        Expert parallelism: only the local experts get rows; other assignments get
        ``row_map = -1``. ``(start, end)``: experts ``start <= e < end`` are local and
        offsets stay in global expert order (non-local experts have empty segments).
        An expert map (vLLM's ``expert_map``): an int32/int64 tensor ``[E]`` on the
        device of ids, global expert -> local index or -1 (not local), the local indices a
        permutation of ``0..L-1``. Segments are then in local order: segment l (rows
        ``[offsets[l], offsets[l+1])``) belongs to the expert with ``map[e] = l``, and
        ``offsets[L:]`` are all equal (empty segments), so ``offsets[:L+1]`` is what a
        grouped GEMM over the L local weights takes. offsets keeps E + 1 entries (L is not
        known on the host without reading the map). A CPU map is checked (ValueError); a
        GPU map is not (that would need a host sync): there entries outside ``[-1, E)``
        count as -1, L is the number of entries >= 0, and assignments to a local index
        >= L are dropped; duplicate local indices share one segment. ``(start, end)`` is
        the map ``e - start`` (for ``start <= e < end``) with segments kept at the global
        positions.

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
    x, ids, weights, start, end, expert_map = _check_permute_args(
        x, ids, num_experts, capacity, align, drop_policy, weights, expert_range)
    backend = selected_backend(x, "x")
    if backend == "reference":
        return PermuteResult(*reference.permute(
            x, ids, num_experts, capacity=capacity, align=align, drop_policy=drop_policy,
            weights=weights, expert_range=(start, end) if expert_map is None else expert_map))
    return PermuteResult(*_PermuteFunction.apply(
        x, weights, ids, num_experts, -1 if capacity is None else capacity, align,
        drop_policy == "weight", start, end, expert_map, backend))


def unpermute(y_perm, row_map, weights=None):
    """Combine each token's expert rows: ``y[t] = sum_j weights[t, j] * y_perm[row_map[t, j]]``.

    Parameters
    ----------
    y_perm : torch.Tensor
        ``[M, H]`` float32 / float16 / bfloat16 (e.g. expert outputs on ``permute``'s
        rows). A non-contiguous y_perm is copied to a contiguous one first.
    row_map : torch.Tensor
        ``[T, k]`` int64 from ``permute`` (int32 is accepted and converted, a copy);
        entries of -1 (dropped) are skipped.
    weights : torch.Tensor or None
        ``[T, k]`` float32; None sums the rows. Non-contiguous: copied.

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
    sync) they are skipped like -1. Differentiable in y_perm and weights; a skipped entry
    contributes nothing to either gradient, whatever its weight (NaN included).
    """
    check_tensor(y_perm, "y_perm", dtypes=FLOAT_DTYPES, dim=2, contiguous=False)
    check_tensor(row_map, "row_map", dtypes=ROW_MAP_DTYPES, dim=2, contiguous=False)
    check_same_device(row_map, "row_map", y_perm, "y_perm")
    y_perm = y_perm.contiguous()
    row_map = row_map.to(torch.int64).contiguous()
    if weights is not None:
        check_tensor(weights, "weights", dtypes=(torch.float32,), dim=2, contiguous=False)
        weights = weights.contiguous()
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
