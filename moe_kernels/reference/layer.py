"""Reference pieces of the MoE layer that are not ops of their own."""

import torch


def token_sum(rows, gather, num_tokens):
    """y[t] = sum of rows[i] with gather[i] = t (-1: no token), summed in float32 in row
    order and rounded once to rows.dtype. Differentiable by autograd."""
    valid = gather >= 0
    index = torch.where(valid, gather.long(), num_tokens)  # invalid rows land in a dropped extra row
    acc = torch.zeros(num_tokens + 1, rows.shape[1], dtype=torch.float32, device=rows.device)
    acc = acc.index_add(0, index, rows.float())
    return acc[:num_tokens].to(rows.dtype)
