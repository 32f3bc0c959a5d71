"""PyTorch reference implementations: written for clarity, the oracle of the tests and
the path CPU tensors take by default. Same semantics as the kernels, bit for bit in the
integer outputs; floating-point outputs within the tolerances stated in the tests."""

import math

import torch


def selection_order(scores, k, eligible=None):
    """Indices of the k largest `scores` per row, largest first; ties go to the lower
    index; NaN ranks as -inf; -0.0 equals +0.0. With a boolean mask `eligible`, every
    eligible entry ranks ahead of every ineligible one."""
    keys = torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=float("inf"),
                            neginf=float("-inf"))
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    if eligible is not None:
        first = torch.sort(eligible.gather(-1, order).to(torch.int8), dim=-1, descending=True,
                           stable=True).indices
        order = order.gather(-1, first)
    return order[..., :k]


def routing_scores(logits, scoring):
    """float32 scores: softmax over the experts or elementwise sigmoid."""
    x = logits.float()
    return torch.softmax(x, dim=-1) if scoring == "softmax" else torch.sigmoid(x)


def group_scores(values, num_groups, group_scoring):
    """[T, num_groups]: the max, or the sum of the two largest, of each group's values
    (NaN counts as -inf)."""
    grouped = torch.nan_to_num(values, nan=float("-inf"), posinf=float("inf"),
                               neginf=float("-inf")).view(values.shape[0], num_groups, -1)
    if group_scoring == "max":
        return grouped.max(dim=-1).values
    return grouped.topk(2, dim=-1).values.sum(dim=-1)


def topk_gating(logits, k, *, scoring="softmax", bias=None, num_groups=1, topk_groups=None,
                group_scoring="top2_sum", renormalize=False, scaling_factor=1.0):
    """Top-k gating. See moe_kernels.topk_gating. Differentiable in `logits` (the bias and
    the selection carry no gradient)."""
    x = logits.float()
    scores = routing_scores(x, scoring)
    with torch.no_grad():
        biased = scores + bias if bias is not None else scores
        # Without a bias, select on the logits: the scores are monotonic in them, and the
        # logits never round two different values to one score.
        selection = biased if bias is not None else x
        eligible = None
        if num_groups > 1:
            top_groups = selection_order(group_scores(biased, num_groups, group_scoring),
                                         topk_groups or num_groups)
            group_mask = torch.zeros(x.shape[0], num_groups, dtype=torch.bool, device=x.device)
            group_mask.scatter_(1, top_groups, True)
            eligible = group_mask.repeat_interleave(x.shape[1] // num_groups, dim=1)
        ids = selection_order(selection, k, eligible)
    weights = scores.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * scaling_factor
    # A NaN logit makes all of its token's weights NaN (softmax does that by itself).
    nan_rows = torch.isnan(x).any(dim=-1, keepdim=True)
    weights = torch.where(nan_rows, torch.full_like(weights, float("nan")), weights)
    return weights, ids.to(torch.int32)


def router_stats(ids, num_experts):
    """int32 [num_experts]: how many entries of `ids` name each expert (ids outside
    [0, num_experts) are not counted)."""
    flat = ids.reshape(-1).long()
    valid = flat[(flat >= 0) & (flat < num_experts)]
    return torch.bincount(valid, minlength=num_experts).to(torch.int32)


def expert_choice_gating(logits, capacity):
    """Expert-choice routing. See moe_kernels.expert_choice_gating."""
    probs = torch.softmax(logits.float(), dim=-1).t()  # [E, T]
    num_experts, num_tokens = probs.shape
    taken = min(capacity, num_tokens)
    token_idx = selection_order(probs, taken)
    weights = probs.gather(1, token_idx)
    pad = capacity - taken
    token_idx = torch.cat([token_idx.to(torch.int32),
                           torch.full((num_experts, pad), -1, dtype=torch.int32, device=probs.device)], 1)
    weights = torch.cat([weights, torch.zeros(num_experts, pad, device=probs.device)], 1)
    return token_idx, weights


def hash_multiplier(num_experts):
    """The expert permutation of hash_gating: the smallest integer >= round(0.618034 * E)
    coprime to E."""
    a = max(1, int(0.6180339887 * num_experts + 0.5))
    while math.gcd(a, num_experts) != 1:
        a += 1
    return a


def hash_gating(token_ids, num_experts, k):
    """Hash routing. See moe_kernels.hash_gating."""
    residue = token_ids.long() % num_experts  # floor modulo: negative ids work too
    slots = (residue[:, None] * k + torch.arange(k, device=token_ids.device)) % num_experts
    ids = slots * hash_multiplier(num_experts) % num_experts
    weights = torch.full(ids.shape, 1.0 / k, device=token_ids.device)
    return weights, ids.to(torch.int32)


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
