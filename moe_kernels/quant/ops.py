"""The 4-bit weight ops: ``quantize_int4`` and ``dequantize``, kernels on the simt and cuda
backends, the PyTorch reference (moe_kernels.reference.quant, the bit-level definition)
for CPU tensors by default. The W4A16 product is ``moe_kernels.grouped_gemm(x, qw, ...)``."""

import torch

from ..reference import quant as reference_quant
from .._backend import selected_backend
from .._checks import FLOAT_DTYPES
from .._library import absent, native_call, register_op
from .weight import QuantizedWeight

# Codes of the kernels' QuantFormat enum (csrc/kernels/quant/quant.h).
FORMAT_CODES = {"int4": 0, "mxfp4": 1}


def check_quantized_weight(qw, name="qw"):
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"{name}: expected a moe_kernels.quant.QuantizedWeight, got {type(qw).__name__}")
    return qw


def kernel_operands(qw):
    """(codes, scales, zeros, format code, group size) as the kernels take them: 3-D
    (a single [N, K] matrix is one expert), the per-channel group size as K."""
    def experts(t):
        return None if t is None else (t if t.dim() == 3 else t.unsqueeze(0))
    group_size = qw.in_features if qw.group_size == -1 else qw.group_size
    return experts(qw.codes), experts(qw.scales), experts(qw.zeros), FORMAT_CODES[qw.format], group_size


def _fake_dequantize(backend, codes, scales, zeros, format, group_size, dtype):
    return codes.new_empty((codes.shape[0], codes.shape[1], 2 * codes.shape[2]), dtype=dtype)


register_op("dequantize",
            "(str backend, Tensor codes, Tensor scales, Tensor? zeros, int format, int group_size, "
            "ScalarType dtype) -> Tensor", _fake_dequantize)


def _fake_quantize_int4(backend, w, group_size, symmetric, scale_dtype):
    experts, n, k = w.shape
    groups = k // group_size
    zeros = absent(w) if symmetric else w.new_empty((experts, groups, n), dtype=torch.uint8)
    return (w.new_empty((experts, n, k // 2), dtype=torch.uint8),
            w.new_empty((experts, groups, n), dtype=scale_dtype), zeros)


register_op("quantize_int4",
            "(str backend, Tensor w, int group_size, bool symmetric, ScalarType scale_dtype) "
            "-> (Tensor, Tensor, Tensor)", _fake_quantize_int4)


def unpermute_columns(stored, perm):
    """The logical order of act-order columns: out[..., perm[j]] = stored[..., j]."""
    index = perm.long().unsqueeze(-2).expand_as(stored)
    return torch.empty_like(stored).scatter_(-1, index, stored)


def dequantize(qw, dtype=torch.bfloat16):
    """The weight a QuantizedWeight stands for, ``[E, N, K]`` (or ``[N, K]``), in `dtype`.

    A standalone, bandwidth-bound kernel on the simt and cuda backends: each code byte and
    scale (and zero point) read once, each value written once. Every value is computed in
    float32, where it is exact, and rounded once to `dtype`: int4 ``(code - zero) *
    scale``, mxfp4 ``e2m1(code) * 2**(scale - 127)``. Bit for bit the reference's values.

    Parameters
    ----------
    qw : QuantizedWeight
    dtype : torch.dtype
        bfloat16, float16 or float32.

    Notes
    -----
    Act-order weights (``qw.perm`` set) come back in the logical column order: one more
    pass over the output (a scatter along K).
    """
    check_quantized_weight(qw)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    backend = selected_backend(qw.codes, "qw.codes")
    if backend == "reference":
        return reference_quant.dequantize(qw, dtype)
    codes, scales, zeros, format_code, group_size = kernel_operands(qw)
    out = native_call(backend, "dequantize", codes, scales, zeros, format_code, group_size, dtype)
    out = out.reshape(qw.shape)
    return out if qw.perm is None else unpermute_columns(out, qw.perm)


def quantize_int4(w, group_size=128, symmetric=True, scale_dtype=None):
    """Round-to-nearest int4 quantization of ``w`` ``[E, N, K]`` (or ``[N, K]``) along K.

    Per group of `group_size` inputs (-1: all of K, per-channel), in float32:

    - symmetric: ``s = max|w| / 7.5``, ``code = clamp(round(w / s), -8, 7) + 8`` (zero point
      8, ``zeros`` None);
    - asymmetric: ``lo = min(min w, 0)``, ``hi = max(max w, 0)``, ``s = (hi - lo) / 15``,
      ``z = clamp(round(-lo / s), 0, 15)``, ``code = clamp(round(w / s) + z, 0, 15)``.

    ``s`` is 1 for a group of zeros and is rounded *up* to `scale_dtype`, so the largest
    magnitude still maps inside the code range: every value dequantizes within ``s / 2`` of
    ``w``. Rounding is half to even. A kernel on the simt and cuda backends, bit for bit the
    reference.

    Parameters
    ----------
    w : torch.Tensor
        float32, float16 or bfloat16, finite (checked: one host synchronization; this is an
        offline step).
    group_size : int
        32, 64, 128, ... (a multiple of 32 dividing K) or -1.
    symmetric : bool
    scale_dtype : torch.dtype or None
        bfloat16 or float16; None: w's dtype when 16-bit, else bfloat16.

    Returns
    -------
    QuantizedWeight (format "int4").
    """
    group_size, symmetric, scale_dtype = reference_quant.check_quantize_int4_args(w, group_size, symmetric,
                                                                                 scale_dtype)
    backend = selected_backend(w, "w")
    if backend == "reference":
        return reference_quant.quantize_int4(w, group_size, symmetric, scale_dtype)
    w3 = (w if w.dim() == 3 else w.unsqueeze(0)).contiguous()
    span = w.shape[-1] if group_size == -1 else group_size
    codes, scales, zeros = native_call(backend, "quantize_int4", w3, span, symmetric, scale_dtype)
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"w: a group's scale overflows {scale_dtype} (values too large for its range)")
    if w.dim() == 2:
        codes, scales = codes[0], scales[0]
        zeros = None if zeros is None else zeros[0]
    return QuantizedWeight("int4", codes, scales, zeros, group_size=group_size)
