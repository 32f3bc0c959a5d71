"""Reference token permutation: permute (argsort, bincount, cumsum) and unpermute."""

import torch


def permute_num_rows_bound(num_tokens, k, num_experts, capacity, align):
    """Rows of permute's outputs: a static bound, known without reading the ids."""
    if capacity is None:
        return num_tokens * k + num_experts * (align - 1)
    return num_experts * (-(-capacity // align) * align)


def permute(x, ids, num_experts, *, capacity=None, align=1, drop_policy="position",
            weights=None, expert_range=None):
    """Token permutation with argsort/bincount/cumsum. See moe_kernels.permute.

    Returns (x_perm, row_map, offsets, num_rows, weights_perm); differentiable in x and
    weights. Ids outside the local experts (out-of-range ones included) are dropped.
    """
    num_tokens, k = ids.shape
    start, end = expert_range if expert_range is not None else (0, num_experts)
    device = ids.device
    n = num_tokens * k
    flat = ids.reshape(-1).long()
    local = (flat >= start) & (flat < end)
    # Stable sort by expert: inside an expert, assignments stay in (token, slot) order.
    expert_key = torch.where(local, flat, num_experts)
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
        # (token, slot). NaN ranks as -inf, -0 equals +0.
        w = torch.nan_to_num(weights.reshape(-1).float(), nan=float("-inf"))
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
    is_local = (torch.arange(num_experts, device=device) >= start) & (
        torch.arange(num_experts, device=device) < end)
    if capacity is None:
        sizes = (counts + align - 1) // align * align
    else:
        sizes = torch.full_like(counts, -(-capacity // align) * align)
    sizes = torch.where(is_local, sizes, 0)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=device), torch.cumsum(sizes, 0)])
    rows_sorted = torch.where(kept_sorted, offsets[safe_key] + kept_rank, -1)
    row_map = torch.empty(n, dtype=torch.long, device=device)
    row_map[order] = rows_sorted
    row_map = row_map.view(num_tokens, k)

    num_out = permute_num_rows_bound(num_tokens, k, num_experts, capacity, align)
    kept_flat = row_map.reshape(-1) >= 0
    dest = row_map.reshape(-1)[kept_flat]
    source_token = torch.arange(n, device=device)[kept_flat] // k
    x_perm = x.new_zeros(num_out, x.shape[1]).index_put((dest,), x[source_token])
    weights_perm = None
    if weights is not None:
        weights_perm = weights.new_zeros(num_out).index_put((dest,), weights.reshape(-1)[kept_flat])
    num_rows = offsets[-1:].clone()
    return x_perm, row_map, offsets, num_rows, weights_perm


def unpermute(y_perm, row_map, weights=None):
    """y[t] = sum_j weights[t, j] * y_perm[row_map[t, j]] over rows in range, summed in
    float32 in slot order, returned in y_perm.dtype. See moe_kernels.unpermute."""
    valid = (row_map >= 0) & (row_map < y_perm.shape[0])
    rows = torch.where(valid, row_map, 0)
    acc = torch.zeros(row_map.shape[0], y_perm.shape[1], dtype=torch.float32, device=y_perm.device)
    if y_perm.shape[0] == 0:  # nothing to gather (e.g. capacity 0): every token sums to zero
        return acc.to(y_perm.dtype)
    for j in range(row_map.shape[1]):
        term = y_perm[rows[:, j]].float()
        if weights is not None:
            term = weights[:, j, None] * term
        acc = acc + torch.where(valid[:, j, None], term, 0.0)
    return acc.to(y_perm.dtype)
