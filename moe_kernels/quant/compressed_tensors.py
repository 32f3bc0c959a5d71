"""compressed-tensors ``pack-quantized`` checkpoints (4-bit int weights, as in llm-compressor
W4A16 models and Kimi K2, which uses group size 32, symmetric) to and from QuantizedWeight.

Tensors of one linear layer (a leading expert dimension E is allowed on each):

- ``weight_packed``: int32 ``[N, K/8]``, packed along K: element k = 8w + i of row n at
  bits 4i..4i+3 of ``weight_packed[n, w]`` (the int32 read as its unsigned bit pattern),
  each stored as the signed value q (-8..7) plus 8, which is our code.
- ``weight_scale``: ``[N, K/g]`` (strategy "group"), or ``[N, 1]`` (strategy "channel":
  group_size -1 here), float16 or bfloat16.
- ``weight_zero_point`` (asymmetric only; symmetric checkpoints have none): int32
  ``[ceil(N/8), K/g]``, packed along N (``packed_dim=0``): the zero point of row 8r + i,
  group g at bits 4i of ``weight_zero_point[r, g]``, stored as the signed zero point
  (-8..7) plus 8, which is our effective zero in code space; padding nibbles (N not a
  multiple of 8) are 0.

The library dequantizes ``(q - zp) * scale`` = ``(code - zero) * scale``. Verified against
the installed compressed-tensors 0.20.1 source:
compressed_tensors/compressors/pack_quantized/helpers.py (``pack_to_int32``: value + 2^(b-1),
element i at bit i*num_bits, 32 elements per num_bits words; ``unpack_from_int32``) and
compressed_tensors/compressors/pack_quantized/base.py (``compress`` packs the zero point
with ``packed_dim=0``, only for asymmetric group/channel strategies); the tests compress
real weights with the library and compare both directions bit for bit.

K must be a multiple of 8 (the importer reads K from weight_packed: 8 per word; the
checkpoint's weight_shape is not needed).
"""

import torch

from .._checks import check_bool, check_tensor
from ..reference import quant as _ref
from ._int32 import check_int4, check_packed, check_shape, nibbles_to_words, words_to_nibbles
from .weight import INT4_SCALE_DTYPES, QuantizedWeight, check_group_size


def from_compressed_tensors(weight_packed, weight_scale, weight_zero_point=None, *, group_size,
                            symmetric=True):
    """A QuantizedWeight (int4) from pack-quantized tensors (layout: module docstring).

    Parameters
    ----------
    weight_packed : torch.Tensor int32 [N, K/8] or [E, N, K/8]
    weight_scale : torch.Tensor float16/bfloat16 [N, G] or [E, N, G]
    weight_zero_point : torch.Tensor int32 [ceil(N/8), G] or [E, ceil(N/8), G], or None
        Required when not symmetric, None when symmetric.
    group_size : int
        The group strategy's group_size, or -1 for the channel strategy (G = 1).
    symmetric : bool
    """
    check_packed(weight_packed, "weight_packed")
    lead = tuple(weight_packed.shape[:-2])
    n, k = weight_packed.shape[-2], 8 * weight_packed.shape[-1]
    group_size, groups = check_group_size(group_size, k)
    symmetric = check_bool(symmetric, "symmetric")
    check_tensor(weight_scale, "weight_scale", dtypes=INT4_SCALE_DTYPES, contiguous=False)
    check_shape(weight_scale, "weight_scale", (*lead, n, groups), f"[N, G], {groups} groups for K={k}")

    zeros = None
    if symmetric:
        if weight_zero_point is not None:
            raise ValueError("weight_zero_point: a symmetric checkpoint has no zero point "
                             "(expected None; pass symmetric=False for an asymmetric one)")
    else:
        if weight_zero_point is None:
            raise ValueError("weight_zero_point: required when symmetric=False")
        check_tensor(weight_zero_point, "weight_zero_point", dtypes=(torch.int32,), contiguous=False)
        check_shape(weight_zero_point, "weight_zero_point", (*lead, -(-n // 8), groups),
                    "[ceil(N/8), G], packed along N")
        zeros = words_to_nibbles(weight_zero_point.transpose(-1, -2))[..., :n].contiguous()

    codes = words_to_nibbles(weight_packed)  # [*lead, N, K]
    return QuantizedWeight("int4", _ref.pack_codes(codes),
                           weight_scale.transpose(-1, -2).contiguous(), zeros,
                           group_size=group_size)


def to_compressed_tensors(qw):
    """pack-quantized tensors of an int4 QuantizedWeight without perm: dict(weight_packed,
    weight_scale, weight_zero_point, group_size, symmetric), so that
    ``from_compressed_tensors(**to_compressed_tensors(qw))`` rebuilds it. zeros None gives
    a symmetric checkpoint (weight_zero_point None); a zero point 16 cannot be stored."""
    check_int4(qw, max_zero=15, k_multiple=8, fmt="compressed-tensors")
    n = qw.out_features
    zero_point = None
    if qw.zeros is not None:
        padded = torch.nn.functional.pad(qw.zeros, (0, -n % 8))  # padding nibbles 0, as the library
        zero_point = nibbles_to_words(padded).transpose(-1, -2).contiguous()
    return {
        "weight_packed": nibbles_to_words(_ref.unpack_codes(qw.codes)),
        "weight_scale": qw.scales.transpose(-1, -2).contiguous(),
        "weight_zero_point": zero_point,
        "group_size": qw.group_size,
        "symmetric": qw.zeros is None,
    }
