"""PyTorch reference implementations: written for clarity, the oracle of the tests and
the path CPU tensors take by default. Same semantics as the kernels, bit for bit in the
integer outputs; floating-point outputs within the tolerances stated in the tests."""

import torch


def selection_order(scores, k):
    """Indices of the k largest `scores` per row, largest first; ties go to the lower
    index; NaN ranks as -inf; -0.0 equals +0.0."""
    keys = torch.nan_to_num(scores.float(), nan=float("-inf"), posinf=float("inf"),
                            neginf=float("-inf"))
    return torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :k]


def topk_gating(logits, k, *, renormalize=False):
    """Softmax top-k gating. See moe_kernels.topk_gating."""
    x = logits.float()
    probs = torch.softmax(x, dim=-1)
    # softmax is monotonic, so selecting on the logits selects the largest probabilities
    # and keeps ties decided by the logits, exactly as the kernel does.
    ids = selection_order(x, k)
    weights = probs.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
