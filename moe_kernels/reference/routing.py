"""Reference routing: top-k gating, router statistics, expert choice, hash routing."""

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


def log_softplus(x):
    """log(softplus(x)), finite for every x: below -15, softplus(x) equals e^x to float32
    precision, so the log is x (softplus itself underflows below -103). The clamp keeps the
    unused branch finite, so its gradient is 0, not NaN."""
    safe = torch.nn.functional.softplus(torch.clamp(x, min=-15.0))
    return torch.where(x < -15.0, x, torch.log(safe))


def log_routing_scores(x, scoring):
    """log of the scores up to a per-row constant (softmax: the logits themselves), finite
    where the scores underflow to 0."""
    if scoring == "softmax":
        return x
    if scoring == "sigmoid":
        return torch.nn.functional.logsigmoid(x)
    return 0.5 * log_softplus(x)


def routing_scores(logits, scoring):
    """float32 scores: softmax over the experts, elementwise sigmoid, or elementwise
    sqrt(softplus(x)) (computed as exp(log(softplus(x)) / 2): right, and with the right
    gradient, where softplus underflows)."""
    x = logits.float()
    if scoring == "softmax":
        return torch.softmax(x, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(x)
    return torch.exp(0.5 * log_softplus(x))


def group_topn(group_scoring):
    """The n of a group scoring: "max" is 1, "top{n}_sum" is n."""
    return 1 if group_scoring == "max" else int(group_scoring[3:-4])


def group_scores(values, num_groups, topn):
    """[T, num_groups]: the sum of the `topn` largest values of each group, added largest
    first (NaN counts as -inf)."""
    grouped = torch.nan_to_num(values, nan=float("-inf"), posinf=float("inf"),
                               neginf=float("-inf")).view(values.shape[0], num_groups,
                                                          values.shape[1] // num_groups)
    top = grouped.topk(topn, dim=-1).values
    total = top[..., 0]
    for i in range(1, topn):  # in order, as the kernel adds them
        total = total + top[..., i]
    return total


def topk_gating(logits, k, *, scoring="softmax", bias=None, num_groups=1, topk_groups=None,
                group_scoring="top2_sum", renormalize=False, scaling_factor=1.0):
    """Top-k gating. See moe_kernels.topk_gating. Differentiable in `logits` (the bias and
    the selection carry no gradient)."""
    x = logits.float()
    scores = routing_scores(x, scoring)
    with torch.no_grad():
        biased = scores + bias.float() if bias is not None else scores
        # Without a bias, select on the logits: the scores are monotonic in them, and the
        # logits never round two different values to one score.
        selection = biased if bias is not None else x
        eligible = None
        if num_groups > 1:
            top_groups = selection_order(group_scores(biased, num_groups, group_topn(group_scoring)),
                                         topk_groups or num_groups)
            group_mask = torch.zeros(x.shape[0], num_groups, dtype=torch.bool, device=x.device)
            group_mask.scatter_(1, top_groups, True)
            eligible = group_mask.repeat_interleave(x.shape[1] // num_groups, dim=1)
        ids = selection_order(selection, k, eligible)
    if renormalize:
        # s_j / sum_i s_i as a softmax of the log scores: finite (and so is its gradient)
        # where every chosen score underflows to 0.
        weights = torch.softmax(log_routing_scores(x.gather(-1, ids), scoring), dim=-1)
    else:
        weights = scores.gather(-1, ids)
    weights = weights * scaling_factor
    # A NaN logit makes all of its token's weights NaN (softmax does that by itself).
    nan_rows = torch.isnan(x).any(dim=-1, keepdim=True)
    weights = torch.where(nan_rows, torch.full_like(weights, float("nan")), weights)
    return weights, ids.to(torch.int32)


def router_stats(ids, num_experts):
    """int32 [num_experts]: how many entries of `ids` name each expert (ids outside
    [0, num_experts) are not counted). Shapes only depend on the arguments, so it runs on
    the meta device too."""
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    # Uncounted ids go to one extra bin past the end, dropped after the sum.
    bins = torch.where(valid, flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, bins, torch.ones_like(bins, dtype=torch.int32))
    return counts[:num_experts]


def balance_scores(logits, scoring):
    """float32 [T, E] scores normalized to sum 1 over the experts, the P_i of the balance
    losses: softmax probabilities, or sigmoid scores divided by their sum."""
    scores = routing_scores(logits, scoring)
    return scores if scoring == "softmax" else scores / scores.sum(dim=-1, keepdim=True)


def sequence_load_balancing_loss(logits, ids, num_experts, seq_len, alpha, scoring="sigmoid"):
    """DeepSeek-V3's sequence-wise balance loss. See moe_kernels.sequence_load_balancing_loss.
    `logits` [T, E], `ids` [T, k], seq_len divides T."""
    num_tokens, k = ids.shape
    num_sequences = num_tokens // seq_len
    flat = ids.long()
    valid = (flat >= 0) & (flat < num_experts)
    sequence = torch.arange(num_tokens, device=ids.device).div(seq_len, rounding_mode="floor")
    # Per (sequence, expert) assignment counts; uncounted ids go to an extra column.
    bins = sequence.unsqueeze(1) * (num_experts + 1) + torch.where(valid, flat, num_experts)
    counts = torch.zeros(num_sequences * (num_experts + 1), dtype=torch.float32, device=ids.device)
    counts.scatter_add_(0, bins.reshape(-1), torch.ones(bins.numel(), device=ids.device))
    counts = counts.view(num_sequences, num_experts + 1)[:, :num_experts]
    f = counts * (num_experts / (k * seq_len))
    p = balance_scores(logits, scoring).view(num_sequences, seq_len, num_experts).mean(dim=1)
    return alpha * (f * p).sum(dim=-1).mean()


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
