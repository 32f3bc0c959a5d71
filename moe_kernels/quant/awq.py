"""AWQ checkpoints (AutoAWQ "GEMM" version, 4 bits) to and from QuantizedWeight.

Tensors of one linear layer (a leading expert dimension E is allowed on each):

- ``qweight``: int32 ``[K, N/8]``, packed along N in AWQ's interleaved order: nibble i
  (bits 4i..4i+3, the int32 read as its unsigned bit pattern) of ``qweight[k, c]`` holds
  output column ``8c + AWQ_ORDER[i]``, AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]. Equivalently
  column 8c + j is at nibble AWQ_REVERSE_ORDER[j] = [0, 4, 1, 5, 2, 6, 3, 7][j].
- ``qzeros``: int32 ``[K/g, N/8]``, the same packing; zero points stored as they are (no
  minus one), 0..15. AWQ is asymmetric: zeros are always present.
- ``scales``: float16 ``[K/g, N]`` (bfloat16 accepted too).

An element dequantizes to ``(q - zero) * scale``. The order was verified against the
installed compressed-tensors AutoAWQ converter
(compressed_tensors/entrypoints/convert/converters/autoawq.py: ``AWQ_REVERSE_ORDER``, nibbles
read with ``qweight >> arange(0, 32, 4)`` then columns reordered by it) and matches
AutoAWQ's ``WQLinear_GEMM`` packing (``qweight[:, col] |= intweight[:, col * 8 +
order_map[i]] << (i * 4)`` with order_map = [0, 2, 4, 6, 1, 3, 5, 7]); the tests decode our
exports with that converter.
"""

import torch

from .._checks import check_tensor
from ..reference import quant as _ref
from ._int32 import check_int4, check_packed, check_shape, nibbles_to_words, words_to_nibbles
from .weight import INT4_SCALE_DTYPES, QuantizedWeight, check_group_size

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def _unpack(words):
    """int32 [..., R, N/8] in AWQ order -> uint8 [..., R, N] in column order."""
    nibbles = words_to_nibbles(words).unflatten(-1, (-1, 8))
    return nibbles[..., list(AWQ_REVERSE_ORDER)].flatten(-2)


def _pack(values):
    """uint8 [..., R, N] in column order -> int32 [..., R, N/8] in AWQ order."""
    return nibbles_to_words(values.unflatten(-1, (-1, 8))[..., list(AWQ_ORDER)].flatten(-2))


def from_awq(qweight, qzeros, scales, *, group_size):
    """A QuantizedWeight (int4, with zeros) from AWQ GEMM tensors (layout: module docstring).

    Parameters
    ----------
    qweight : torch.Tensor int32 [K, N/8] or [E, K, N/8]
    qzeros : torch.Tensor int32 [G, N/8] or [E, G, N/8]
    scales : torch.Tensor float16/bfloat16 [G, N] or [E, G, N]
    group_size : int
        -1 (per-channel: G = 1) or a positive multiple of 32 dividing K.
    """
    check_packed(qweight, "qweight")
    lead = tuple(qweight.shape[:-2])
    k, n = qweight.shape[-2], 8 * qweight.shape[-1]
    if k % 2:
        raise ValueError(f"qweight: expected an even K, got shape {tuple(qweight.shape)}")
    group_size, groups = check_group_size(group_size, k)
    check_tensor(scales, "scales", dtypes=INT4_SCALE_DTYPES, contiguous=False)
    check_shape(scales, "scales", (*lead, groups, n), f"[G, N], {groups} groups for K={k}")
    check_tensor(qzeros, "qzeros", dtypes=(torch.int32,), contiguous=False)
    check_shape(qzeros, "qzeros", (*lead, groups, n // 8), "[G, N/8]")
    codes = _unpack(qweight).transpose(-1, -2)  # [*lead, N, K]
    return QuantizedWeight("int4", _ref.pack_codes(codes), scales.contiguous().clone(),
                           _unpack(qzeros).contiguous(), group_size=group_size)


def to_awq(qw):
    """AWQ GEMM tensors of an int4 QuantizedWeight without perm: dict(qweight, qzeros,
    scales, group_size), so that ``from_awq(**to_awq(qw))`` rebuilds it. zeros None is
    written as zero 8 everywhere (AWQ always stores zeros; the import then has explicit
    zeros of 8, which dequantize the same). A zero point 16 cannot be stored: ValueError."""
    check_int4(qw, max_zero=15, n_multiple=8, fmt="AWQ")
    zeros = torch.full_like(qw.scales, 8, dtype=torch.uint8) if qw.zeros is None else qw.zeros
    codes = _ref.unpack_codes(qw.codes).transpose(-1, -2)  # [*lead, K, N]
    return {
        "qweight": _pack(codes),
        "qzeros": _pack(zeros),
        "scales": qw.scales.clone(),
        "group_size": qw.group_size,
    }
