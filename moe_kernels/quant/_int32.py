"""Nibbles in int32 words, the packing every GPU checkpoint format uses: value i of a word at
bits 4i..4i+3, the int32 read as its unsigned bit pattern. Shifts, not a byte view, so the
result does not depend on the host's byte order."""

import torch

from .._checks import check_tensor
from .weight import QuantizedWeight


def words_to_nibbles(words):
    """int32 [..., W] -> uint8 [..., 8W]: out[..., 8w + i] = (words[..., w] >> 4i) & 15."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    # An arithmetic shift copies the sign bit in from the left; the mask drops it.
    return ((words.unsqueeze(-1) >> shifts) & 15).to(torch.uint8).flatten(-2)


def nibbles_to_words(nibbles):
    """uint8 [..., 8W] of values 0..15 -> int32 [..., W], the inverse of words_to_nibbles."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=nibbles.device)
    words = (nibbles.unflatten(-1, (-1, 8)).to(torch.int64) << shifts).sum(-1)  # disjoint bits
    # Words with bit 31 set are negative int32s: wrap explicitly (int64 -> int32 casts of
    # out-of-range values are not defined to wrap).
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def check_packed(t, name, *, dims=(2, 3)):
    """An int32 packed tensor of one matrix or a stack of them (any layout)."""
    check_tensor(t, name, dtypes=(torch.int32,), contiguous=False)
    if t.dim() not in dims or 0 in t.shape:
        raise ValueError(f"{name}: expected a non-empty 2-D tensor or a stack of them on a leading "
                         f"expert dimension (3-D), got shape {tuple(t.shape)}")


def check_shape(t, name, expected, what):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {list(expected)} ({what}), got {tuple(t.shape)}")


def check_int4(qw, *, perm_ok=False, max_zero=16, n_multiple=1, k_multiple=1, fmt):
    """The QuantizedWeight an exporter to `fmt` can write."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw: expected a QuantizedWeight, got {type(qw).__name__}")
    if qw.format != "int4":
        raise ValueError(f"qw: {fmt} stores int4 weights, got format {qw.format!r}")
    if not perm_ok and qw.perm is not None:
        raise ValueError(f"qw: {fmt} has no act-order permutation; got a QuantizedWeight with perm")
    n, k = qw.out_features, qw.in_features
    if n % n_multiple or k % k_multiple:
        raise ValueError(f"qw: {fmt} packs 8 values per int32 and needs N a multiple of {n_multiple} "
                         f"and K a multiple of {k_multiple}, got shape {qw.shape}")
    if qw.zeros is not None and qw.zeros.numel() and int(qw.zeros.max()) > max_zero:
        raise ValueError(f"qw: {fmt} stores zero points 0..{max_zero}, got {int(qw.zeros.max())}")
