"""QuantizedWeight: the one 4-bit expert weight type every kernel reads (a pure container)."""

import json
import os

import torch

from .._checks import check_choice, check_int, check_same_device, check_tensor

FORMATS = ("int4", "mxfp4")
INT4_SCALE_DTYPES = (torch.bfloat16, torch.float16)
MXFP4_GROUP_SIZE = 32
# state_dict() stores the format as this index (a small int tensor, like group_size and shape).
_FORMAT_CODE = {name: code for code, name in enumerate(FORMATS)}
_TENSORS = ("codes", "scales", "zeros", "perm")


def check_group_size(group_size, k, name="group_size"):
    """group_size is -1 (per-channel) or a positive multiple of 32 dividing K; returns
    (group_size, number of groups)."""
    group_size = check_int(group_size, name, -1, 1 << 62)
    if group_size != -1 and (group_size <= 0 or group_size % 32):
        raise ValueError(f"{name}: expected -1 (per-channel) or a positive multiple of 32, got "
                         f"{group_size}")
    if group_size != -1 and k % group_size:
        raise ValueError(f"{name}: expected a divisor of K={k}, got {group_size}")
    return group_size, 1 if group_size == -1 else k // group_size


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


class QuantizedWeight:
    """4-bit expert weights of logical shape ``[E, N, K]`` (E experts, N output features, K
    input features: the nn.Linear out x in orientation) or ``[N, K]`` for a single matrix,
    where every tensor below simply lacks the leading E dim.

    Layout (a contract shared with the CUDA kernels):

    - ``format``: ``"int4"`` or ``"mxfp4"``.
    - ``codes``: torch.uint8 ``[E, N, K/2]``, contiguous. Byte j of a row holds element
      k=2j in the low nibble and k=2j+1 in the high nibble. int4: unsigned code 0..15.
      mxfp4: an OCP e2m1 code (bit 3 sign, bits 2..1 exponent, bit 0 mantissa; values 0,
      0.5, 1, 1.5, 2, 3, 4, 6 and their negatives).
    - ``scales``: group-major ``[E, G, N]`` (G = K / group_size groups; per-channel: G = 1),
      contiguous. int4: torch.bfloat16 or torch.float16. mxfp4: torch.uint8 e8m0 (value
      2**(s-127); s == 255 is NaN).
    - ``zeros``: None (symmetric: zero point 8) or torch.uint8 ``[E, G, N]`` holding the
      effective zero point, 0..16 (16 only arises from GPTQ's stored-minus-one convention).
      int4 only.
    - ``group_size``: -1 (per-channel, one group spanning K) or a positive multiple of 32
      dividing K. mxfp4: always 32.
    - ``perm``: None, or torch.int32 ``[E, K]`` (or ``[K]``), act-order: the codes and scales
      are stored with K reordered so that each quantization group is contiguous; stored
      column j holds logical column ``perm[..., j]``. (GPU kernels apply perm to the
      activations.)
    - ``shape``: the logical shape tuple.

    An int4 element dequantizes to ``(code - zero) * scale``, an mxfp4 one to
    ``e2m1(code) * 2**(scale - 127)``; ``moe_kernels.reference.quant.dequantize`` is the
    bit-exact definition.

    The constructor checks dtypes, shapes, devices and group_size. It does not read tensor
    values (that would synchronize with the GPU): zeros in 0..16 and perm being a
    permutation are checked by the importers, not here.

    Parameters
    ----------
    format : str
    codes, scales : torch.Tensor
    zeros : torch.Tensor or None
    group_size : int (keyword)
    perm : torch.Tensor or None (keyword)
    """

    def __init__(self, format, codes, scales, zeros=None, *, group_size, perm=None):
        check_choice(format, "format", FORMATS)
        check_tensor(codes, "codes", dtypes=(torch.uint8,))
        if codes.dim() not in (2, 3):
            raise ValueError(f"codes: expected [E, N, K/2] or [N, K/2], got shape {tuple(codes.shape)}")
        if 0 in codes.shape:
            raise ValueError(f"codes: expected no empty dimension, got shape {tuple(codes.shape)}")
        lead = tuple(codes.shape[:-2])
        n, k = codes.shape[-2], 2 * codes.shape[-1]

        group_size, groups = check_group_size(group_size, k)
        if format == "mxfp4" and group_size != MXFP4_GROUP_SIZE:
            raise ValueError(f"group_size: mxfp4 scales blocks of 32 elements, expected 32, got "
                             f"{group_size}")

        scale_dtypes = (torch.uint8,) if format == "mxfp4" else INT4_SCALE_DTYPES
        check_tensor(scales, "scales", dtypes=scale_dtypes)
        check_same_device(scales, "scales", codes, "codes")
        expected = (*lead, groups, n)
        if tuple(scales.shape) != expected:
            raise ValueError(f"scales: expected group-major shape {list(expected)} ([E, G, N], G = "
                             f"{groups} groups of {group_size} for K={k}), got {tuple(scales.shape)}")
        if zeros is not None:
            if format == "mxfp4":
                raise ValueError("zeros: mxfp4 has no zero points (expected None)")
            check_tensor(zeros, "zeros", dtypes=(torch.uint8,))
            check_same_device(zeros, "zeros", codes, "codes")
            if tuple(zeros.shape) != expected:
                raise ValueError(f"zeros: expected the shape of scales {list(expected)}, got "
                                 f"{tuple(zeros.shape)}")
        if perm is not None:
            if format == "mxfp4":
                raise ValueError("perm: mxfp4 has no act-order permutation (expected None)")
            check_tensor(perm, "perm", dtypes=(torch.int32,))
            check_same_device(perm, "perm", codes, "codes")
            if tuple(perm.shape) != (*lead, k):
                raise ValueError(f"perm: expected shape {[*lead, k]} (one permutation of K per "
                                 f"expert), got {tuple(perm.shape)}")

        self.format = format
        self.codes = codes
        self.scales = scales
        self.zeros = zeros
        self.group_size = group_size
        self.perm = perm
        self.shape = (*lead, n, k)

    # ------------------------------------------------------------------ properties

    @property
    def num_experts(self):
        """E, or None for a single [N, K] matrix."""
        return self.shape[0] if len(self.shape) == 3 else None

    @property
    def out_features(self):
        return self.shape[-2]

    @property
    def in_features(self):
        return self.shape[-1]

    @property
    def num_groups(self):
        return self.scales.shape[-2]

    @property
    def device(self):
        return self.codes.device

    @property
    def nbytes(self):
        """Bytes of all tensors (codes, scales, zeros, perm)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def _tensors(self):
        return {name: getattr(self, name) for name in _TENSORS if getattr(self, name) is not None}

    def _replace(self, **tensors):
        fields = dict(self._tensors(), **tensors)
        return QuantizedWeight(self.format, fields["codes"], fields["scales"], fields.get("zeros"),
                               group_size=self.group_size, perm=fields.get("perm"))

    # ------------------------------------------------------------------ devices, dtypes

    def to(self, device=None, dtype=None):
        """A copy on `device` (tensors moved as they are) whose int4 scales have `dtype`.

        dtype converts the int4 scales only (bf16 <-> fp16, rounding to nearest: the
        dequantized values may change); codes, zeros and perm keep their integer dtypes.
        mxfp4 scales are e8m0 bytes and take no dtype.
        """
        scales = self.scales
        if dtype is not None:
            if self.format == "mxfp4":
                raise ValueError("dtype: mxfp4 scales are e8m0 bytes; expected dtype=None")
            if dtype not in INT4_SCALE_DTYPES:
                raise TypeError(f"dtype: expected bfloat16 or float16 for the int4 scales, got "
                                f"{dtype}")
            scales = scales.to(dtype)
        moved = {name: t.to(device) if device is not None else t
                 for name, t in dict(self._tensors(), scales=scales).items()}
        return self._replace(**moved)

    def cuda(self, device=None):
        """A copy on the current CUDA device, or on `device` (an index or a device)."""
        if device is None:
            device = "cuda"
        elif isinstance(device, int):
            device = torch.device("cuda", device)
        return self.to(device)

    def cpu(self):
        return self.to("cpu")

    # ------------------------------------------------------------------ comparison, repr

    def equal(self, other):
        """Bit-exact equality: same format, group_size, shape, and the same bytes in every
        tensor (so 0.0 and -0.0 scales differ, and NaN scales equal themselves)."""
        if not isinstance(other, QuantizedWeight):
            return False
        if (self.format, self.group_size, self.shape) != (other.format, other.group_size, other.shape):
            return False
        mine, theirs = self._tensors(), other._tensors()
        if mine.keys() != theirs.keys():
            return False
        for name, t in mine.items():
            o = theirs[name]
            if t.dtype != o.dtype or t.shape != o.shape:
                return False
            if not torch.equal(_bits(t), _bits(o.to(t.device))):
                return False
        return True

    def __repr__(self):
        parts = [f"format={self.format!r}", f"shape={self.shape}", f"group_size={self.group_size}",
                 f"scales={_dtype_name(self.scales.dtype) if self.format == 'int4' else 'e8m0'}",
                 f"zeros={'uint8' if self.zeros is not None else None}",
                 f"perm={'int32' if self.perm is not None else None}", f"device={self.device}"]
        return f"QuantizedWeight({', '.join(parts)})"

    # ------------------------------------------------------------------ serialization

    def state_dict(self):
        """The tensors (codes, scales, and zeros and perm when set) plus the metadata as
        small int64 tensors: ``format`` (0 int4, 1 mxfp4), ``group_size`` (a scalar) and
        ``shape`` (1-D). ``QuantizedWeight.from_state_dict`` inverts it exactly."""
        sd = dict(self._tensors())
        sd["format"] = torch.tensor(_FORMAT_CODE[self.format], dtype=torch.int64)
        sd["group_size"] = torch.tensor(self.group_size, dtype=torch.int64)
        sd["shape"] = torch.tensor(self.shape, dtype=torch.int64)
        return sd

    @classmethod
    def from_state_dict(cls, state_dict):
        """The QuantizedWeight of a ``state_dict()``; the stored shape must match the codes."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
        missing = [key for key in ("codes", "scales", "format", "group_size", "shape") if key not in state_dict]
        if missing:
            raise ValueError(f"state_dict: missing entries {missing}")
        code = int(state_dict["format"])
        if not 0 <= code < len(FORMATS):
            raise ValueError(f"state_dict: unknown format code {code} (expected 0 int4 or 1 mxfp4)")
        qw = cls(FORMATS[code], state_dict["codes"], state_dict["scales"], state_dict.get("zeros"),
                 group_size=int(state_dict["group_size"]), perm=state_dict.get("perm"))
        shape = tuple(int(v) for v in state_dict["shape"].reshape(-1))
        if shape != qw.shape:
            raise ValueError(f"state_dict: shape {shape} does not match the codes (logical shape "
                             f"{qw.shape})")
        return qw

    def save(self, path):
        """Write a safetensors file: the tensors under their names (moved to the CPU), and
        format, group_size and shape as header metadata (strings: "int4", "128",
        "[8, 256, 512]")."""
        from safetensors.torch import save_file
        tensors = {name: t.detach().cpu().contiguous() for name, t in self._tensors().items()}
        metadata = {"format": self.format, "group_size": str(self.group_size),
                    "shape": json.dumps(list(self.shape))}
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path, device="cpu"):
        """Read a file written by ``save`` onto `device`."""
        from safetensors import safe_open
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        missing = [key for key in ("format", "group_size", "shape") if key not in metadata]
        if missing or "codes" not in tensors or "scales" not in tensors:
            raise ValueError(f"path: {os.fspath(path)} is not a QuantizedWeight file (missing "
                             f"{missing or 'codes/scales'})")
        qw = cls(metadata["format"], tensors["codes"], tensors["scales"], tensors.get("zeros"),
                 group_size=int(metadata["group_size"]), perm=tensors.get("perm"))
        if tuple(json.loads(metadata["shape"])) != qw.shape:
            raise ValueError(f"path: the stored shape {metadata['shape']} does not match the codes "
                             f"(logical shape {qw.shape})")
        return qw


def _bits(t):
    """t's raw bits as an integer tensor (floating-point compared bit for bit)."""
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t
