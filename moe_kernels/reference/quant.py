"""Reference 4-bit weight numerics: code packing, e2m1/e8m0 decoding, dequantization and
round-to-nearest int4 quantization. These are the bit-level definitions: the CUDA kernels
are tested bit for bit against them.

Layout of a QuantizedWeight: see moe_kernels.quant.weight.QuantizedWeight."""

import torch

from .._checks import FLOAT_DTYPES, check_bool, check_tensor
from ..quant.weight import INT4_SCALE_DTYPES, QuantizedWeight, check_group_size

# The 16 OCP e2m1 values by code: bit 3 sign, bits 2..1 exponent (bias 1), bit 0 mantissa;
# exponent 0 is subnormal (0 or 0.5). Code 8 is -0.0.
MXFP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                             -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32)

_E8M0_ZERO_BITS = 0x00400000  # 2^-127: a float32 subnormal, its only set bit is mantissa bit 22
_FLOAT32_NAN_BITS = 0x7FC00000


def pack_codes(q):
    """uint8 [..., K] of values 0..15 -> uint8 [..., K/2]: byte j holds element 2j in its low
    nibble and element 2j+1 in its high nibble."""
    check_tensor(q, "q", dtypes=(torch.uint8,), contiguous=False)
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"q: expected an even last dimension, got shape {tuple(q.shape)}")
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"q: expected 4-bit values 0..15, got {int(q.max())}")
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def unpack_codes(codes):
    """The inverse of pack_codes: uint8 [..., K/2] -> uint8 [..., K]."""
    check_tensor(codes, "codes", dtypes=(torch.uint8,), contiguous=False)
    return torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)


def e8m0_to_float(s):
    """e8m0 scale bytes -> float32 2**(s - 127), built from the bit pattern (exact: exp2 or
    pow may flush or round the subnormal 2^-127). s == 255 is NaN."""
    check_tensor(s, "s", dtypes=(torch.uint8,), contiguous=False)
    s32 = s.to(torch.int32)
    bits = torch.where(s32 == 0, _E8M0_ZERO_BITS, s32 << 23)
    bits = torch.where(s32 == 255, _FLOAT32_NAN_BITS, bits)
    return bits.view(torch.float32)


def _per_element(t, group_size, k):
    """Group-major [..., G, N] -> [..., N, K], each group's entry repeated over its columns."""
    span = k if group_size == -1 else group_size
    return t.transpose(-1, -2).repeat_interleave(span, dim=-1)


def dequantize(qw, dtype=torch.bfloat16):
    """The logical weights [E, N, K] (or [N, K]) of a QuantizedWeight, in `dtype`.

    int4: ``((code - zero).float() * scale.float()).to(dtype)``, zero 8 when zeros is None
    (the product of a 5-bit integer and a 16-bit float is exact in float32: one rounding).
    mxfp4: ``(MXFP4_VALUES[code] * e8m0_to_float(scale)).to(dtype)`` (also exact in float32
    but for NaN scales). With perm set, out[..., perm[j]] = stored column j.
    """
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw: expected a QuantizedWeight, got {type(qw).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    codes = unpack_codes(qw.codes)
    k = qw.in_features
    scale = _per_element(qw.scales, qw.group_size, k)
    if qw.format == "int4":
        zero = 8 if qw.zeros is None else _per_element(qw.zeros, qw.group_size, k).to(torch.int32)
        stored = (codes.to(torch.int32) - zero).float() * scale.float()
    else:
        stored = MXFP4_VALUES.to(codes.device)[codes.long()] * e8m0_to_float(scale)
    stored = stored.to(dtype)
    if qw.perm is None:
        return stored
    index = qw.perm.long().unsqueeze(-2).expand(stored.shape)
    return torch.empty_like(stored).scatter_(-1, index, stored)


def _round_up(s32, dtype):
    """Positive finite float32 -> `dtype` (bf16/fp16), the nearest value not below it: round
    to nearest, then one step toward +inf (the next 16-bit pattern) if that fell below."""
    s = s32.to(dtype)
    below = s.float() < s32
    bits = s.view(torch.int16)
    return torch.where(below, bits + 1, bits).view(dtype)


def check_quantize_int4_args(w, group_size, symmetric, scale_dtype):
    """The arguments of quantize_int4 (every backend's), checked; returns (group_size,
    symmetric, scale_dtype) with the default scale dtype filled in. Reads w (finite):
    one host synchronization, fine for an offline step."""
    check_tensor(w, "w", dtypes=FLOAT_DTYPES, contiguous=False)
    if w.dim() not in (2, 3):
        raise ValueError(f"w: expected [E, N, K] or [N, K], got shape {tuple(w.shape)}")
    if 0 in w.shape or w.shape[-1] % 2:
        raise ValueError(f"w: expected non-empty dimensions and an even K, got shape {tuple(w.shape)}")
    group_size, _ = check_group_size(group_size, w.shape[-1])
    symmetric = check_bool(symmetric, "symmetric")
    if scale_dtype is None:
        scale_dtype = w.dtype if w.dtype in INT4_SCALE_DTYPES else torch.bfloat16
    if scale_dtype not in INT4_SCALE_DTYPES:
        raise TypeError(f"scale_dtype: expected torch.bfloat16 or torch.float16, got {scale_dtype}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w: expected finite values (found NaN or infinity)")
    return group_size, symmetric, scale_dtype


def quantize_int4(w, group_size=128, symmetric=True, scale_dtype=None):
    """Round-to-nearest int4 quantization of w (bf16/fp16/fp32, [E, N, K] or [N, K]) into a
    QuantizedWeight, computed in float32.

    Per group (row n, a K-range of group_size; -1: all of K):

    - symmetric: s32 = max|w| / 7.5, q = clamp(round(w / s), -8, 7) + 8, no zeros.
    - asymmetric: lo = min(min(w), 0), hi = max(max(w), 0), s32 = (hi - lo) / 15,
      z = clamp(round(-lo / s), 0, 15), q = clamp(round(w / s) + z, 0, 15).

    A zero s32 (an all-zero group) becomes 1.0. s is s32 rounded *upward* to scale_dtype
    (so |w| / s never exceeds the range the code covers), and rounding is half to even
    (torch.round). Then |dequantize(qw, float32) - w| <= s / 2 for every element (up to
    float32 division rounding).

    Parameters
    ----------
    w : torch.Tensor
    group_size : int
        -1 (per-channel) or a positive multiple of 32 dividing K.
    symmetric : bool
    scale_dtype : torch.dtype or None
        bfloat16 or float16; None: w's dtype if 16-bit, else bfloat16.
    """
    group_size, symmetric, scale_dtype = check_quantize_int4_args(w, group_size, symmetric, scale_dtype)
    k = w.shape[-1]
    groups = 1 if group_size == -1 else k // group_size

    w32 = w.float().unflatten(-1, (groups, k // groups))  # [..., N, G, span]
    if symmetric:
        s32 = w32.abs().amax(-1) / 7.5
    else:
        lo = w32.amin(-1).clamp(max=0)
        s32 = (w32.amax(-1).clamp(min=0) - lo) / 15
    # Also catches a nonzero amax whose fp32 quotient underflows to 0 (fp32 subnormals):
    # dividing by a zero scale would make NaN codes.
    s32 = torch.where(s32 == 0, torch.ones_like(s32), s32)
    s = _round_up(s32, scale_dtype)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"w: a group's scale overflows {scale_dtype} (|w| too large); use "
                         f"scale_dtype=torch.bfloat16")
    sf = s.float()
    if symmetric:
        q = torch.round(w32 / sf.unsqueeze(-1)).clamp(-8, 7) + 8
        zeros = None
    else:
        z = torch.round(-lo / sf).clamp(0, 15)
        q = (torch.round(w32 / sf.unsqueeze(-1)) + z.unsqueeze(-1)).clamp(0, 15)
        zeros = z.to(torch.uint8).transpose(-1, -2).contiguous()
    codes = pack_codes(q.to(torch.uint8).flatten(-2))
    return QuantizedWeight("int4", codes, s.transpose(-1, -2).contiguous(), zeros,
                           group_size=group_size)
