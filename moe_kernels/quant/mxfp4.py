"""MXFP4 checkpoints in the GPT-OSS layout to and from QuantizedWeight.

Tensors of one expert weight (``*_blocks`` / ``*_scales`` in the GPT-OSS safetensors; a
leading expert dimension E is allowed):

- ``blocks``: uint8 ``[E, N, K/32, 16]``: 32-element blocks along K, byte j of a block holds
  element 2j in its low nibble and element 2j+1 in its high nibble, each an OCP e2m1 code
  (bit 3 sign, bits 2..1 exponent, bit 0 mantissa).
- ``scales``: uint8 ``[E, N, K/32]``, e8m0: the block's scale is 2**(s - 127).

So the codes are the blocks reshaped to ``[E, N, K/2]`` (the same nibble order as
QuantizedWeight) and the scales are transposed to group-major ``[E, K/32, N]``. Verified
against transformers' GPT-OSS dequantization (transformers/integrations/mxfp4.py:
``FP4_VALUES``, ``blk & 0x0F`` to even and ``blk >> 4`` to odd elements, ``scales - 127`` as
the ldexp exponent), which the tests compare with bit for bit.
"""

import torch

from .._checks import check_tensor
from .weight import QuantizedWeight

BLOCK = 32


def from_mxfp4(blocks, scales):
    """A QuantizedWeight (mxfp4) from GPT-OSS blocks [E, N, K/32, 16] (or [N, K/32, 16])
    and scales [E, N, K/32] (or [N, K/32])."""
    check_tensor(blocks, "blocks", dtypes=(torch.uint8,), contiguous=False)
    if blocks.dim() not in (3, 4) or blocks.shape[-1] != BLOCK // 2 or 0 in blocks.shape:
        raise ValueError(f"blocks: expected [E, N, K/32, 16] or [N, K/32, 16] (16 bytes per block "
                         f"of 32), got shape {tuple(blocks.shape)}")
    check_tensor(scales, "scales", dtypes=(torch.uint8,), contiguous=False)
    if tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ValueError(f"scales: expected shape {list(blocks.shape[:-1])} (one e8m0 byte per "
                         f"block), got {tuple(scales.shape)}")
    codes = blocks.reshape(*blocks.shape[:-2], -1).contiguous().clone()
    return QuantizedWeight("mxfp4", codes, scales.transpose(-1, -2).contiguous(), group_size=BLOCK)


def to_mxfp4(qw):
    """GPT-OSS tensors of an mxfp4 QuantizedWeight: dict(blocks, scales), so that
    ``from_mxfp4(**to_mxfp4(qw))`` rebuilds it."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw: expected a QuantizedWeight, got {type(qw).__name__}")
    if qw.format != "mxfp4":
        raise ValueError(f"qw: expected format 'mxfp4', got {qw.format!r}")
    return {
        "blocks": qw.codes.reshape(*qw.codes.shape[:-1], qw.num_groups, BLOCK // 2).clone(),
        "scales": qw.scales.transpose(-1, -2).contiguous(),
    }
