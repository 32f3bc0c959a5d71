"""Reference token permutation: permute_plan (argsort, bincount, cumsum), permute (the plan
plus a row copy) and unpermute."""

import torch


def permute_num_rows_bound(num_tokens, k, num_experts, capacity, align):
    """Rows of permute's outputs: a static bound, known without reading the ids."""
    if capacity is None:
        return num_tokens * k + num_experts * (align - 1)
    return num_experts * (-(-capacity // align) * align)


def weight_rank_key(weights):
    """The drop-by-weight order as plain floats: NaN ranks as -inf (and ties with it)."""
    w = weights.reshape(-1).float()
    return torch.where(torch.isnan(w), float("-inf"), w)


def expert_segments(num_experts, expert_range, device):
    """(segment_of [E], has_segment [E]): the offsets index of each global expert's rows
    (-1: not local), and which of the E segments exist.

    (start, end) or None: expert e keeps segment e (offsets in global order, non-local
    experts empty). An expert map (tensor [E], local index or -1): expert e gets segment
    map[e], offsets run in local order, segments 0..L-1 exist (L = entries >= 0) and the
    rest are empty. Map entries outside [-1, E) count as -1.
    """
    experts = torch.arange(num_experts, device=device)
    if isinstance(expert_range, torch.Tensor):
        segment_of = expert_range.to(device=device, dtype=torch.long)
        segment_of = torch.where((segment_of >= 0) & (segment_of < num_experts), segment_of, -1)
        return segment_of, experts < (segment_of >= 0).sum()
    start, end = expert_range if expert_range is not None else (0, num_experts)
    has_segment = (experts >= start) & (experts < end)
    return torch.where(has_segment, experts, -1), has_segment


def permute_plan(ids, num_experts, *, capacity=None, align=1, drop_policy="position",
                 weights=None, expert_range=None):
    """The index stage of permute with argsort/bincount/cumsum. See moe_kernels.permute_plan.

    Returns (row_map, offsets, gather, weights_perm, num_rows); weights_perm is
    differentiable in weights. Ids outside the local experts (out-of-range ones included)
    are dropped.
    """
    num_tokens, k = ids.shape
    device = ids.device
    n = num_tokens * k
    segment_of, has_segment = expert_segments(num_experts, expert_range, device)
    flat = ids.reshape(-1).long()
    in_range = (flat >= 0) & (flat < num_experts)
    segment = torch.where(in_range, segment_of[flat.clamp(0, num_experts - 1)], -1)
    local = (segment >= 0) & has_segment[segment.clamp(min=0)]
    # Stable sort by segment: inside one, assignments stay in (token, slot) order. From
    # here on an "expert" is a segment (an index of offsets).
    expert_key = torch.where(local, segment, num_experts)
    order = torch.sort(expert_key, stable=True).indices
    counts = torch.bincount(expert_key, minlength=num_experts + 1)[:num_experts]
    list_start = torch.cumsum(counts, 0) - counts
    sorted_key = expert_key[order]
    sorted_local = sorted_key < num_experts
    safe_key = sorted_key.clamp(max=num_experts - 1)
    rank_sorted = torch.arange(n, device=device) - list_start[safe_key]

    if capacity is None:
        kept_sorted = sorted_local
    elif drop_policy == "position":
        kept_sorted = sorted_local & (rank_sorted < capacity)
    else:
        # Keep the `capacity` largest weights of each expert; ties to the lower
        # (token, slot). NaN ranks as -inf, -0 equals +0 (the sort compares values).
        w = weight_rank_key(weights)
        by_weight = torch.sort(w, descending=True, stable=True).indices
        by_expert = by_weight[torch.sort(expert_key[by_weight], stable=True).indices]
        weight_rank = torch.empty(n, dtype=torch.long, device=device)
        weight_rank[by_expert] = torch.arange(n, device=device) - list_start[
            expert_key[by_expert].clamp(max=num_experts - 1)]
        kept_sorted = sorted_local & (weight_rank[order] < capacity)

    # Rows: kept assignments of an expert in (token, slot) order from its segment start.
    kept_long = kept_sorted.long()
    kept_before = torch.cumsum(kept_long, 0) - kept_long
    kept_rank = kept_before - kept_before[list_start[safe_key]]
    if capacity is None:
        sizes = (counts + align - 1) // align * align
    else:
        sizes = torch.full_like(counts, -(-capacity // align) * align)
    sizes = torch.where(has_segment, sizes, 0)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=device), torch.cumsum(sizes, 0)])
    rows_sorted = torch.where(kept_sorted, offsets[safe_key] + kept_rank, -1)
    row_map = torch.empty(n, dtype=torch.long, device=device)
    row_map[order] = rows_sorted
    row_map = row_map.view(num_tokens, k)

    num_out = permute_num_rows_bound(num_tokens, k, num_experts, capacity, align)
    kept_flat = row_map.reshape(-1) >= 0
    dest = row_map.reshape(-1)[kept_flat]
    source_token = torch.arange(n, device=device)[kept_flat] // k
    gather = torch.full((num_out,), -1, dtype=torch.long, device=device).index_put((dest,), source_token)
    weights_perm = None
    if weights is not None:
        weights_perm = weights.new_zeros(num_out).index_put((dest,), weights.reshape(-1)[kept_flat])
    num_rows = offsets[-1:].clone()
    return row_map, offsets, gather, weights_perm, num_rows


def permute(x, ids, num_experts, *, capacity=None, align=1, drop_policy="position",
            weights=None, expert_range=None):
    """Token permutation: permute_plan, then x_perm[row_map[t, j]] = x[t] (so row i holds
    x[gather[i]]; zero where gather is -1). See moe_kernels.permute.

    Returns (x_perm, row_map, offsets, num_rows, weights_perm); differentiable in x and
    weights. The rows are placed in (token, slot) order, so the x gradient sums a token's
    rows in slot order, as the kernels' backward (an unpermute) does.
    """
    row_map, offsets, gather, weights_perm, num_rows = permute_plan(
        ids, num_experts, capacity=capacity, align=align, drop_policy=drop_policy,
        weights=weights, expert_range=expert_range)
    flat = row_map.reshape(-1)
    kept = flat >= 0
    source_token = torch.arange(flat.shape[0], device=flat.device)[kept] // row_map.shape[1]
    x_perm = x.new_zeros(gather.shape[0], x.shape[1]).index_put((flat[kept],), x[source_token])
    return x_perm, row_map, offsets, num_rows, weights_perm


def unpermute(y_perm, row_map, weights=None):
    """y[t] = sum_j weights[t, j] * y_perm[row_map[t, j]] over rows in range, summed in
    float32 in slot order, returned in y_perm.dtype. See moe_kernels.unpermute."""
    num_rows, hidden = y_perm.shape
    valid = (row_map >= 0) & (row_map < num_rows)
    # Masked before any product: a skipped entry reads an appended zero row with weight 0,
    # so neither a NaN weight of a dropped slot nor a non-finite row reaches a gradient
    # (and a y_perm without rows still gives a result connected to the graph).
    rows = torch.where(valid, row_map, num_rows)
    padded = torch.cat([y_perm, y_perm.new_zeros(1, hidden)])
    acc = torch.zeros(row_map.shape[0], hidden, dtype=torch.float32, device=y_perm.device)
    for j in range(row_map.shape[1]):
        term = padded[rows[:, j]].float()
        if weights is not None:
            term = torch.where(valid[:, j], weights[:, j], 0.0)[:, None] * term
        acc = acc + term
    return acc.to(y_perm.dtype)
