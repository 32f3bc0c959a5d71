"""4-bit expert weights: the QuantizedWeight container, the reference numerics and the
checkpoint importers/exporters (GPTQ, AWQ, compressed-tensors pack-quantized, MXFP4).

The oracles are independent of the code under test: bit orders are decoded with explicit
Python loops over small tensors, e2m1 from its sign/exponent/mantissa bits, and the
compressed-tensors checkpoints are produced and decompressed by the library itself."""

import math
import re

import pytest
import torch

from moe_kernels.quant import (QuantizedWeight, from_awq, from_compressed_tensors, from_gptq,
                               from_mxfp4, to_awq, to_compressed_tensors, to_gptq, to_mxfp4)
from moe_kernels.reference.quant import (MXFP4_VALUES, dequantize, e8m0_to_float, pack_codes,
                                         quantize_int4, unpack_codes)

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]


# ---------------------------------------------------------------- helpers (independent oracles)

def u32(word):
    """The unsigned bit pattern of an int32 element as a Python int."""
    return int(word) & 0xFFFFFFFF


def to_i32(value):
    """A Python int in [0, 2^32) as the int32 with that bit pattern."""
    return value - (1 << 32) if value >= 1 << 31 else value


def naive_unpack(codes):
    """uint8 [..., K/2] -> list-of-lists codes [..., K], byte by byte."""
    flat = codes.reshape(-1, codes.shape[-1]).tolist()
    rows = []
    for row in flat:
        out = []
        for byte in row:
            out += [byte & 15, byte >> 4]
        rows.append(out)
    return torch.tensor(rows, dtype=torch.uint8).reshape(*codes.shape[:-1], 2 * codes.shape[-1])


def e2m1_value(c):
    """An OCP e2m1 code decoded from its bits: sign (3), exponent (2..1, bias 1), mantissa (0)."""
    sign = -1.0 if (c >> 3) & 1 else 1.0
    exp, man = (c >> 1) & 3, c & 1
    magnitude = man * 0.5 if exp == 0 else (1.0 + man / 2) * 2.0 ** (exp - 1)
    return sign * magnitude


def random_qw(fmt="int4", *, experts=2, n=16, k=128, group_size=32, zeros=False,
              scale_dtype=torch.bfloat16, perm=False, seed=0):
    """A QuantizedWeight with random codes (and zeros, scales, an act-order perm)."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if experts is None else (experts,)
    groups = 1 if group_size == -1 else k // group_size
    codes = torch.randint(0, 256, (*lead, n, k // 2), generator=gen, dtype=torch.uint8)
    if fmt == "mxfp4":
        scales = torch.randint(110, 140, (*lead, groups, n), generator=gen, dtype=torch.uint8)
        return QuantizedWeight("mxfp4", codes, scales, group_size=32)
    scales = (torch.rand((*lead, groups, n), generator=gen) * 0.1 + 0.01).to(scale_dtype)
    z = torch.randint(1, 16, (*lead, groups, n), generator=gen, dtype=torch.uint8) if zeros else None
    p = None
    if perm:
        rows = [torch.randperm(k, generator=gen) for _ in range(experts or 1)]
        p = torch.stack(rows).to(torch.int32) if experts is not None else rows[0].to(torch.int32)
    return QuantizedWeight("int4", codes, scales, z, group_size=group_size, perm=p)


def naive_dequant(qw):
    """Per-element dequantization [..., N, K] in float32 in the logical order (loops)."""
    codes = naive_unpack(qw.codes)
    lead = codes.shape[:-2]
    n, k = codes.shape[-2:]
    gs = k if qw.group_size == -1 else qw.group_size
    out = torch.empty(codes.shape, dtype=torch.float32)
    c3, s3 = codes.reshape(-1, n, k), qw.scales.reshape(-1, qw.num_groups, n)
    z3 = None if qw.zeros is None else qw.zeros.reshape(-1, qw.num_groups, n)
    p2 = None if qw.perm is None else qw.perm.reshape(-1, k)
    o3 = out.view(-1, n, k)
    for e in range(c3.shape[0]):
        for row in range(n):
            for j in range(k):
                g = j // gs
                c = int(c3[e, row, j])
                if qw.format == "int4":
                    zero = 8 if z3 is None else int(z3[e, g, row])
                    v = (c - zero) * float(s3[e, g, row].float())
                else:
                    v = e2m1_value(c) * 2.0 ** (int(s3[e, g, row]) - 127)
                col = j if p2 is None else int(p2[e, j])
                o3[e, row, col] = v
    return out.reshape(*lead, n, k)


def assert_named(exc_type, name, fn, *args, **kwargs):
    """fn raises exc_type and its message starts by naming the argument `name`."""
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert re.match(rf"{re.escape(name)}\b", str(info.value)), str(info.value)


# ---------------------------------------------------------------- reference numerics

def test_pack_codes_nibble_order():
    q = torch.randint(0, 16, (2, 3, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack_codes(q)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5)
    for idx in range(q.numel() // 10):
        row, prow = q.reshape(-1, 10)[idx].tolist(), packed.reshape(-1, 5)[idx].tolist()
        assert prow == [row[2 * j] | (row[2 * j + 1] << 4) for j in range(5)]
    assert torch.equal(unpack_codes(packed), q)
    assert torch.equal(naive_unpack(packed), q)


def test_mxfp4_values_are_e2m1():
    assert MXFP4_VALUES.dtype == torch.float32 and MXFP4_VALUES.shape == (16,)
    assert MXFP4_VALUES.tolist() == [e2m1_value(c) for c in range(16)]
    # code 8 is -0.0: the sign bit survives
    assert math.copysign(1.0, float(MXFP4_VALUES[8])) == -1.0


def test_e8m0_to_float_every_code():
    s = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    v = e8m0_to_float(s)
    assert v.dtype == torch.float32
    for code in range(255):
        assert float(v[code]) == 2.0 ** (code - 127), code  # exact, subnormal 2^-127 included
    assert math.isnan(float(v[255]))
    assert v[0].view(torch.int32).item() == 0x00400000


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("perm", [False, True])
def test_dequantize_int4_matches_naive(group_size, zeros, perm):
    qw = random_qw(experts=2, n=3, k=128, group_size=group_size, zeros=zeros, perm=perm,
                   scale_dtype=torch.float16)
    expected = naive_dequant(qw)
    assert torch.equal(dequantize(qw, torch.float32), expected)
    for dtype in (torch.bfloat16, torch.float16):
        got = dequantize(qw, dtype)
        assert got.dtype == dtype and got.shape == (2, 3, 128)
        assert torch.equal(got, expected.to(dtype))


def test_dequantize_two_dim_and_mxfp4_matches_naive():
    qw = random_qw(experts=None, n=4, k=64, group_size=32, zeros=True)
    assert torch.equal(dequantize(qw, torch.float32), naive_dequant(qw))
    mx = random_qw("mxfp4", experts=2, n=3, k=64)
    expected = naive_dequant(mx)
    assert torch.equal(dequantize(mx, torch.float32), expected)
    assert torch.equal(dequantize(mx), expected.to(torch.bfloat16))


def test_dequantize_mxfp4_nan_scale_and_bad_dtype():
    mx = random_qw("mxfp4", experts=None, n=2, k=32)
    mx.scales[0, 1] = 255
    out = dequantize(mx, torch.float32)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    assert_named(TypeError, "dtype", dequantize, mx, torch.int32)
    assert_named(TypeError, "qw", dequantize, mx.codes)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("w_dtype,scale_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                                 (torch.float32, None), (torch.float32, torch.float16)])
def test_quantize_int4_error_bound(group_size, symmetric, w_dtype, scale_dtype):
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(2, 8, 256, generator=gen) * torch.rand(2, 8, 1, generator=gen)).to(w_dtype)
    w[0, 0, :64] = 0  # an all-zero group: scale 1.0
    w[1, 1] += 0.5  # an all-positive row: asymmetric lo clamps to 0
    qw = quantize_int4(w, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    expected_scale = scale_dtype or (w_dtype if w_dtype != torch.float32 else torch.bfloat16)
    assert qw.format == "int4" and qw.group_size == group_size and qw.shape == (2, 8, 256)
    assert qw.scales.dtype == expected_scale and qw.perm is None
    assert (qw.zeros is None) == symmetric
    gs = 256 if group_size == -1 else group_size
    w32 = w.float()
    groups = w32.unflatten(-1, (-1, gs))  # [E, N, G, gs]
    scale = qw.scales.float().transpose(-1, -2)  # [E, N, G]
    # the scale is the fp32 one rounded upward: never below it, at most one step above
    if symmetric:
        s32 = groups.abs().amax(-1) / 7.5
    else:
        s32 = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / 15
    s32 = torch.where(s32 == 0, torch.ones_like(s32), s32)
    assert (scale >= s32).all()
    assert (scale.to(expected_scale).view(torch.int16) - s32.to(expected_scale).view(torch.int16)).abs().max() <= 1
    err = (dequantize(qw, torch.float32) - w32).abs().unflatten(-1, (-1, gs))
    assert (err <= (scale / 2 * (1 + 1e-6)).unsqueeze(-1)).all()
    if gs <= 64:  # w[0, 0, :64] is a whole group of zeros
        assert float(qw.scales[0, 0, 0]) == 1.0


def test_quantize_int4_zero_group_scale_one_and_codes():
    w = torch.zeros(4, 64, dtype=torch.bfloat16)
    w[1, 40] = 1.5
    qw = quantize_int4(w, group_size=32)
    assert qw.shape == (4, 64) and qw.num_experts is None
    assert qw.scales[0].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert float(qw.scales[1, 1]) == 0.2001953125  # 1.5/7.5 = 0.2 rounded up in bf16
    codes = unpack_codes(qw.codes)
    assert (codes[0] == 8).all() and codes[1, 40] == 8 + round(1.5 / 0.2001953125)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_pack_unpack_consistency(symmetric):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(3, 8, 64, generator=gen, dtype=torch.float32).to(torch.float16)
    qw = quantize_int4(w, group_size=32, symmetric=symmetric)
    codes = unpack_codes(qw.codes)
    assert codes.max() <= 15
    assert torch.equal(pack_codes(codes), qw.codes)
    s = qw.scales.float().transpose(-1, -2).repeat_interleave(32, -1)
    if symmetric:
        expected = (torch.round(w.float() / s).clamp(-8, 7) + 8).to(torch.uint8)
    else:
        z = qw.zeros.float().transpose(-1, -2).repeat_interleave(32, -1)
        expected = (torch.round(w.float() / s) + z).clamp(0, 15).to(torch.uint8)
    assert torch.equal(codes, expected)


def test_quantize_int4_rounds_half_to_even():
    # amax 7.5 -> scale 1.0 exactly: w/s = 2.5 and 3.5 land on a tie
    w = torch.tensor([[7.5, 2.5, 3.5, -2.5] + [0.0] * 28], dtype=torch.float32)
    codes = unpack_codes(quantize_int4(w, group_size=32).codes)
    assert codes[0, :4].tolist() == [15, 10, 12, 6]  # round(7.5)=8 clamps to 7; 2.5->2, 3.5->4


def test_quantize_int4_bad_inputs():
    w = torch.randn(4, 64)
    bad = w.clone()
    bad[0, 0] = float("nan")
    assert_named(ValueError, "w", quantize_int4, bad, group_size=64)
    bad[0, 0] = float("inf")
    assert_named(ValueError, "w", quantize_int4, bad, group_size=32)
    assert_named(ValueError, "group_size", quantize_int4, w, group_size=48)
    assert_named(ValueError, "group_size", quantize_int4, w, group_size=128)
    assert_named(TypeError, "group_size", quantize_int4, w, group_size=32.0)
    assert_named(TypeError, "w", quantize_int4, w.to(torch.int32))
    assert_named(ValueError, "w", quantize_int4, w[0])
    assert_named(TypeError, "scale_dtype", quantize_int4, w, group_size=32, scale_dtype=torch.float32)
    assert_named(TypeError, "symmetric", quantize_int4, w, group_size=32, symmetric=1)
    assert_named(ValueError, "w", quantize_int4, torch.randn(4, 63), group_size=-1)
    assert_named(ValueError, "w", quantize_int4, torch.full((2, 32), 1e6), group_size=32,
                 scale_dtype=torch.float16)  # the scale overflows fp16


# ---------------------------------------------------------------- the container

def test_quantized_weight_properties_and_repr():
    qw = random_qw(experts=3, n=16, k=128, group_size=64, zeros=True, perm=True)
    assert qw.shape == (3, 16, 128) and qw.num_experts == 3
    assert qw.out_features == 16 and qw.in_features == 128 and qw.num_groups == 2
    assert qw.device == torch.device("cpu")
    assert qw.nbytes == 3 * 16 * 64 + 3 * 2 * 16 * 2 + 3 * 2 * 16 + 3 * 128 * 4
    text = repr(qw)
    for part in ("int4", "(3, 16, 128)", "group_size=64", "bfloat16", "zeros", "perm"):
        assert part in text, text
    two = random_qw(experts=None, n=8, k=64, group_size=-1)
    assert two.num_experts is None and two.num_groups == 1 and two.shape == (8, 64)


def test_equal_is_bit_exact():
    a = random_qw(zeros=True, perm=True)
    assert a.equal(random_qw(zeros=True, perm=True))

    def changed(field):
        c = random_qw(zeros=True, perm=True)
        t = getattr(c, field)
        if field == "perm":
            t[0, [0, 1]] = t[0, [1, 0]]
        elif field == "scales":
            t.view(torch.int16).view(-1)[0] += 1  # one ulp
        else:
            t.view(-1)[0] ^= 1
        return c

    for field in ("codes", "scales", "zeros", "perm"):
        assert not a.equal(changed(field)), field
    assert not a.equal(random_qw(zeros=False, perm=True))
    assert not a.equal(random_qw(zeros=True, perm=False))
    assert not a.equal(random_qw(zeros=True, perm=True, scale_dtype=torch.float16))
    # -0.0 and 0.0 are different bits
    s1 = random_qw(experts=None, n=2, k=32)
    s2 = random_qw(experts=None, n=2, k=32)
    s1.scales[0, 0], s2.scales[0, 0] = 0.0, -0.0
    assert not s1.equal(s2)


@pytest.mark.parametrize("kwargs", [dict(zeros=True, perm=True, group_size=32),
                                    dict(zeros=False, perm=False, group_size=-1, experts=None),
                                    dict(fmt="mxfp4")])
def test_state_dict_and_safetensors_round_trip(tmp_path, kwargs):
    qw = random_qw(**kwargs)
    sd = qw.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    back = QuantizedWeight.from_state_dict(sd)
    assert back.equal(qw) and back.format == qw.format and back.group_size == qw.group_size
    assert back.shape == qw.shape
    path = tmp_path / "w.safetensors"
    qw.save(path)
    loaded = QuantizedWeight.load(path)
    assert loaded.equal(qw) and loaded.shape == qw.shape and loaded.group_size == qw.group_size
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == qw.format and int(meta["group_size"]) == qw.group_size


def test_from_state_dict_bad_inputs(tmp_path):
    sd = random_qw().state_dict()
    missing = dict(sd)
    del missing["codes"]
    assert_named(ValueError, "state_dict", QuantizedWeight.from_state_dict, missing)
    bad_shape = dict(sd, shape=torch.tensor([2, 16, 64]))
    assert_named(ValueError, "state_dict", QuantizedWeight.from_state_dict, bad_shape)
    bad_format = dict(sd, format=torch.tensor(7))
    assert_named(ValueError, "state_dict", QuantizedWeight.from_state_dict, bad_format)
    from safetensors.torch import save_file
    save_file({"codes": sd["codes"]}, str(tmp_path / "x.safetensors"))
    assert_named(ValueError, "path", QuantizedWeight.load, tmp_path / "x.safetensors")


def test_to_device_and_dtype():
    qw = random_qw(zeros=True, perm=True)
    same = qw.to("cpu")
    assert same.equal(qw)
    assert qw.cpu().equal(qw)
    half = qw.to(dtype=torch.float16)
    assert half.scales.dtype == torch.float16
    assert torch.equal(half.scales, qw.scales.to(torch.float16))
    assert torch.equal(half.codes, qw.codes) and torch.equal(half.zeros, qw.zeros)
    assert qw.scales.dtype == torch.bfloat16  # not modified in place
    assert_named(TypeError, "dtype", qw.to, dtype=torch.float32)
    assert_named(ValueError, "dtype", random_qw("mxfp4").to, dtype=torch.float16)
    if torch.cuda.is_available():
        gpu = qw.cuda()
        assert gpu.device.type == "cuda" and gpu.perm.device.type == "cuda"
        assert gpu.cpu().equal(qw)


def _base(**over):
    gen = torch.Generator().manual_seed(5)
    args = dict(format="int4", codes=torch.randint(0, 256, (2, 8, 32), generator=gen, dtype=torch.uint8),
                scales=torch.ones(2, 2, 8, dtype=torch.bfloat16), zeros=None, group_size=32,
                perm=None)
    args.update(over)
    fmt, codes, scales, zeros = args.pop("format"), args.pop("codes"), args.pop("scales"), args.pop("zeros")
    return QuantizedWeight(fmt, codes, scales, zeros, **args)


@pytest.mark.parametrize("over,exc,name", [
    (dict(format="int8"), ValueError, "format"),
    (dict(codes=torch.zeros(2, 8, 32, dtype=torch.int8)), TypeError, "codes"),
    (dict(codes=torch.zeros(8, dtype=torch.uint8)), ValueError, "codes"),
    (dict(codes=torch.zeros(2, 32, 8, dtype=torch.uint8).transpose(1, 2)), ValueError, "codes"),
    (dict(codes=torch.zeros(2, 8, 0, dtype=torch.uint8)), ValueError, "codes"),
    (dict(scales=torch.ones(2, 2, 8)), TypeError, "scales"),
    (dict(scales=torch.ones(2, 3, 8, dtype=torch.bfloat16)), ValueError, "scales"),
    (dict(scales=torch.ones(2, 8, 2, dtype=torch.bfloat16)), ValueError, "scales"),
    (dict(scales=torch.ones(2, 8, dtype=torch.bfloat16)), ValueError, "scales"),
    (dict(zeros=torch.zeros(2, 2, 8, dtype=torch.int32)), TypeError, "zeros"),
    (dict(zeros=torch.zeros(2, 1, 8, dtype=torch.uint8)), ValueError, "zeros"),
    (dict(group_size=48), ValueError, "group_size"),
    (dict(group_size=0), ValueError, "group_size"),
    (dict(group_size=128), ValueError, "group_size"),
    (dict(group_size="32"), TypeError, "group_size"),
    (dict(group_size=-1), ValueError, "scales"),  # one group, but scales has 2
    (dict(perm=torch.arange(64)), TypeError, "perm"),
    (dict(perm=torch.arange(64, dtype=torch.int32)), ValueError, "perm"),
    (dict(perm=torch.zeros(2, 32, dtype=torch.int32)), ValueError, "perm"),
    (dict(format="mxfp4", scales=torch.zeros(2, 2, 8, dtype=torch.uint8),
          zeros=torch.zeros(2, 2, 8, dtype=torch.uint8)), ValueError, "zeros"),
    (dict(format="mxfp4", scales=torch.zeros(2, 2, 8, dtype=torch.bfloat16)), TypeError, "scales"),
    (dict(format="mxfp4", scales=torch.zeros(2, 1, 8, dtype=torch.uint8), group_size=-1), ValueError,
     "group_size"),
    (dict(format="mxfp4", scales=torch.zeros(2, 2, 8, dtype=torch.uint8),
          perm=torch.zeros(2, 64, dtype=torch.int32)), ValueError, "perm"),
    (dict(scales=torch.ones(2, 2, 8, dtype=torch.bfloat16, device="meta")), ValueError, "scales"),
])
def test_constructor_bad_inputs(over, exc, name):
    assert_named(exc, name, _base, **over)


def test_constructor_accepts_valid():
    qw = _base(zeros=torch.full((2, 2, 8), 16, dtype=torch.uint8), perm=torch.zeros(2, 64, dtype=torch.int32))
    assert qw.shape == (2, 8, 64)
    mx = _base(format="mxfp4", scales=torch.zeros(2, 2, 8, dtype=torch.uint8))
    assert mx.format == "mxfp4" and mx.zeros is None


# ---------------------------------------------------------------- GPTQ

def naive_gptq_pack(qw_codes, zeros, group_size, n, k):
    """Build GPTQ qweight/qzeros for one expert with explicit shifts (logical K order)."""
    codes = naive_unpack(qw_codes)  # [N, K]
    qweight = [[0] * n for _ in range(k // 8)]
    for r in range(k // 8):
        for col in range(n):
            word = 0
            for i in range(8):
                word |= int(codes[col, 8 * r + i]) << (4 * i)
            qweight[r][col] = to_i32(word)
    groups = zeros.shape[0]
    qzeros = [[0] * (n // 8) for _ in range(groups)]
    for g in range(groups):
        for c in range(n // 8):
            word = 0
            for i in range(8):
                word |= (int(zeros[g, 8 * c + i]) - 1) << (4 * i)
            qzeros[g][c] = to_i32(word)
    return torch.tensor(qweight, dtype=torch.int32), torch.tensor(qzeros, dtype=torch.int32)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_gptq_import_matches_naive_words(group_size, sym, scale_dtype):
    n, k = 16, 128
    ref = random_qw(experts=None, n=n, k=k, group_size=group_size, zeros=not sym, scale_dtype=scale_dtype)
    zeros = torch.full((ref.num_groups, n), 8) if sym else ref.zeros.int()
    qweight, qzeros = naive_gptq_pack(ref.codes, zeros, group_size, n, k)
    scales = ref.scales.clone()
    got = from_gptq(qweight, qzeros, scales, group_size=group_size, sym=sym)
    assert got.equal(ref)
    out = to_gptq(got)
    assert torch.equal(out["qweight"], qweight) and torch.equal(out["qzeros"], qzeros)
    assert torch.equal(out["scales"], scales) and out["sym"] == sym and out["group_size"] == group_size
    gs = k if group_size == -1 else group_size
    assert torch.equal(out["g_idx"], torch.arange(k, dtype=torch.int32) // gs)
    assert from_gptq(**out).equal(ref)


def test_gptq_symmetric_without_qzeros_and_high_bit_words():
    ref = random_qw(experts=None, n=8, k=64, group_size=32)
    ref.codes.fill_(0xFF)  # every nibble 15: the word is 0xFFFFFFFF, a negative int32
    qweight, qzeros = naive_gptq_pack(ref.codes, torch.full((2, 8), 8), 32, 8, 64)
    assert (qweight == -1).all()
    got = from_gptq(qweight, None, ref.scales, group_size=32)
    assert got.equal(ref)
    assert from_gptq(qweight, qzeros, ref.scales, group_size=32, sym=True).equal(ref)


def test_gptq_stacked_round_trip():
    ref = random_qw(experts=3, n=16, k=128, group_size=64, zeros=True, scale_dtype=torch.float16)
    out = to_gptq(ref)
    assert out["qweight"].shape == (3, 16, 16) and out["qzeros"].shape == (3, 2, 2)
    assert out["g_idx"].shape == (3, 128)
    for e in range(3):
        qweight, qzeros = naive_gptq_pack(ref.codes[e], ref.zeros[e].int(), 64, 16, 128)
        assert torch.equal(out["qweight"][e], qweight) and torch.equal(out["qzeros"][e], qzeros)
    assert from_gptq(**out).equal(ref)
    again = to_gptq(from_gptq(**out))
    assert all(torch.equal(again[key], out[key]) for key in ("qweight", "qzeros", "scales", "g_idx"))


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_act_order(stacked, sym):
    n, k, gs = 8, 128, 32
    experts = 2 if stacked else 1
    gen = torch.Generator().manual_seed(7)
    # a desc_act checkpoint: g_idx[k] is the group of logical column k, any permutation
    g_idx = torch.stack([(torch.arange(k) // gs)[torch.randperm(k, generator=gen)] for _ in range(experts)])
    logical = torch.randint(0, 16, (experts, n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(experts, k // gs, n, generator=gen) + 0.5).to(torch.float16)
    zeros = torch.full((experts, k // gs, n), 8) if sym else torch.randint(1, 17, (experts, k // gs, n), generator=gen)
    words = [naive_gptq_pack(pack_codes(logical[e]), zeros[e], gs, n, k) for e in range(experts)]
    qweight = torch.stack([w for w, _ in words])
    qzeros = torch.stack([z for _, z in words])
    g = g_idx.to(torch.int32)
    s = scales
    if not stacked:
        qweight, qzeros, s, g = qweight[0], qzeros[0], s[0], g[0]
    qw = from_gptq(qweight, qzeros, s, g, group_size=gs, sym=sym)
    assert qw.perm is not None and qw.perm.dtype == torch.int32
    assert qw.perm.shape == ((experts, k) if stacked else (k,))
    # stored column j is logical column perm[j]; stored groups are contiguous
    perm = qw.perm.reshape(experts, k).long()
    stored = unpack_codes(qw.codes).reshape(experts, n, k)
    for e in range(experts):
        assert torch.equal(stored[e], logical[e][:, perm[e]])
        assert torch.equal(g_idx[e][perm[e]], torch.arange(k) // gs)
    # dequantize returns the logical order: a naive per-column dequant through g_idx
    expected = torch.empty(experts, n, k)
    for e in range(experts):
        for col in range(k):
            grp = int(g_idx[e, col])
            expected[e, :, col] = (logical[e, :, col].float() - zeros[e, grp].float()) * scales[e, grp].float()
    got = dequantize(qw, torch.float32)
    assert torch.equal(got, expected if stacked else expected[0])
    assert torch.equal(dequantize(qw, torch.float16), got.to(torch.float16))
    out = to_gptq(qw)
    assert torch.equal(out["qweight"], qweight) and torch.equal(out["g_idx"], g)
    assert torch.equal(out["qzeros"], qzeros)
    assert from_gptq(**out).equal(qw)


def test_gptq_trivial_g_idx_means_no_perm():
    ref = random_qw(experts=2, n=8, k=64, group_size=32)
    out = to_gptq(ref)
    assert from_gptq(out["qweight"], out["qzeros"], out["scales"], out["g_idx"].long(), group_size=32).perm is None


def test_gptq_bad_inputs():
    ref = random_qw(experts=None, n=16, k=128, group_size=32, zeros=True)
    d = to_gptq(ref)
    qweight, qzeros, scales = d["qweight"], d["qzeros"], d["scales"]

    def call(**over):
        args = dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=None, group_size=32, sym=False)
        args.update(over)
        return from_gptq(**args)

    assert_named(TypeError, "qweight", call, qweight=qweight.to(torch.int64))
    assert_named(ValueError, "qweight", call, qweight=qweight[None, None])
    assert_named(ValueError, "group_size", call, group_size=48)
    assert_named(ValueError, "group_size", call, group_size=256)
    assert_named(ValueError, "scales", call, group_size=64)
    assert_named(TypeError, "scales", call, scales=scales.float())
    assert_named(ValueError, "scales", call, scales=scales[:, :8])
    assert_named(ValueError, "qzeros", call, qzeros=qzeros[:2])
    assert_named(TypeError, "qzeros", call, qzeros=qzeros.to(torch.int16))
    assert_named(ValueError, "qzeros", call, qzeros=None)
    assert_named(ValueError, "qzeros", call, sym=True)  # zeros other than 8
    assert_named(TypeError, "sym", call, sym=1)
    assert_named(ValueError, "g_idx", call, g_idx=torch.zeros(64, dtype=torch.int32))
    assert_named(TypeError, "g_idx", call, g_idx=torch.zeros(128, dtype=torch.float32))
    uneven = torch.arange(128, dtype=torch.int32) // 32
    uneven[0] = 1  # group 1 gets 33 members
    assert_named(ValueError, "g_idx", call, g_idx=uneven)
    out_of_range = torch.arange(128, dtype=torch.int32) // 32
    out_of_range[0] = 4
    assert_named(ValueError, "g_idx", call, g_idx=out_of_range)
    assert_named(ValueError, "qweight", call, qweight=qweight[:, :12], qzeros=qzeros[:, :1], scales=scales[:, :12])
    assert_named(ValueError, "scales", call, scales=scales.to(torch.float16)[None].expand(2, -1, -1))
    # exporting zero 0 (stored as -1) is impossible; only int4 exports
    zero0 = random_qw(experts=None, n=8, k=64, zeros=True)
    zero0.zeros[0, 3] = 0
    assert_named(ValueError, "qw", to_gptq, zero0)
    assert_named(ValueError, "qw", to_gptq, random_qw("mxfp4"))
    assert_named(TypeError, "qw", to_gptq, qweight)


# ---------------------------------------------------------------- AWQ

def naive_awq_pack(values):
    """[rows, N] ints -> int32 [rows, N/8], nibble i of word c = column 8c + AWQ_ORDER[i]."""
    rows, n = values.shape
    out = [[0] * (n // 8) for _ in range(rows)]
    for r in range(rows):
        for c in range(n // 8):
            word = 0
            for i in range(8):
                word |= int(values[r, 8 * c + AWQ_ORDER[i]]) << (4 * i)
            out[r][c] = to_i32(word)
    return torch.tensor(out, dtype=torch.int32)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_awq_import_matches_naive_words(group_size):
    n, k = 16, 128
    ref = random_qw(experts=None, n=n, k=k, group_size=group_size, zeros=True, scale_dtype=torch.float16)
    ref.zeros[0, 0] = 0  # AWQ stores zeros directly: 0 is fine
    qweight = naive_awq_pack(naive_unpack(ref.codes).t())  # [K, N/8]
    qzeros = naive_awq_pack(ref.zeros)
    got = from_awq(qweight, qzeros, ref.scales.clone(), group_size=group_size)
    assert got.equal(ref)
    out = to_awq(got)
    assert torch.equal(out["qweight"], qweight) and torch.equal(out["qzeros"], qzeros)
    assert out["group_size"] == group_size
    assert from_awq(**out).equal(ref)


def test_awq_against_compressed_tensors_converter():
    """The compressed-tensors AutoAWQ converter (its own unpack + AWQ_REVERSE_ORDER) reads
    our exported words as the same codes and zeros."""
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
    ref = random_qw(experts=None, n=32, k=128, group_size=64, zeros=True, scale_dtype=torch.float16)
    out = to_awq(ref)
    conv = AutoAWQConverter(group_size=64)
    weight, scale, zero_point = conv._convert_gemm_module(out["qweight"], out["scales"], out["qzeros"])
    assert torch.equal(weight.int() + 8, unpack_codes(ref.codes).int())
    assert torch.equal(zero_point.int() + 8, ref.zeros.int().t())
    assert torch.equal(scale, ref.scales.t())


def test_awq_stacked_and_symmetric_export():
    ref = random_qw(experts=2, n=16, k=64, group_size=32, zeros=True, scale_dtype=torch.float16)
    out = to_awq(ref)
    assert out["qweight"].shape == (2, 64, 2) and out["qzeros"].shape == (2, 2, 2)
    assert from_awq(**out).equal(ref)
    sym = random_qw(experts=2, n=16, k=64, group_size=32, scale_dtype=torch.float16)
    back = from_awq(**to_awq(sym))
    assert back.zeros is not None and (back.zeros == 8).all()  # AWQ always stores zeros
    assert torch.equal(dequantize(back, torch.float32), dequantize(sym, torch.float32))


def test_awq_bad_inputs():
    ref = random_qw(experts=None, n=16, k=128, group_size=32, zeros=True, scale_dtype=torch.float16)
    d = to_awq(ref)

    def call(**over):
        args = dict(d)
        args.update(over)
        return from_awq(**args)

    assert_named(TypeError, "qweight", call, qweight=d["qweight"].to(torch.int64))
    assert_named(ValueError, "qweight", call, qweight=d["qweight"][0])
    assert_named(ValueError, "group_size", call, qweight=d["qweight"][:100])  # K=100
    assert_named(ValueError, "scales", call, qweight=d["qweight"][:96])  # K=96: 3 groups
    assert_named(ValueError, "group_size", call, group_size=100)
    assert_named(ValueError, "scales", call, group_size=64)
    assert_named(TypeError, "scales", call, scales=d["scales"].float())
    assert_named(ValueError, "qzeros", call, qzeros=d["qzeros"][:, :1])
    assert_named(TypeError, "qzeros", call, qzeros=None)
    sixteen = random_qw(experts=None, n=8, k=64, zeros=True)
    sixteen.zeros[0, 0] = 16
    assert_named(ValueError, "qw", to_awq, sixteen)
    assert_named(ValueError, "qw", to_awq, random_qw(perm=True))
    assert_named(ValueError, "qw", to_awq, random_qw("mxfp4"))


# ---------------------------------------------------------------- compressed-tensors

def _ct_checkpoint(w, strategy, group_size, symmetric):
    """(weight_packed, weight_scale, weight_zero_point, decompressed weight) produced by the
    compressed-tensors library itself."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    args = QuantizationArgs(num_bits=4, type="int", strategy=strategy,
                            group_size=group_size if strategy == "group" else None, symmetric=symmetric)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    groups = w.unflatten(-1, (-1, group_size)) if strategy == "group" else w.unsqueeze(-2)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    compressed = PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}, scheme)
    decompressed = PackedQuantizationCompressor.decompress(dict(compressed), scheme)["weight"]
    return (compressed["weight_packed"], compressed["weight_scale"],
            compressed.get("weight_zero_point"), decompressed)


@pytest.mark.parametrize("strategy,group_size", [("group", 32), ("group", 128), ("channel", -1)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("stacked", [False, True])
def test_compressed_tensors_matches_library(strategy, group_size, symmetric, stacked):
    gen = torch.Generator().manual_seed(11)
    dtype = torch.bfloat16 if symmetric else torch.float16
    # N = 20: the zero-point words of rows 16..19 are half padding
    w = (torch.randn((2, 20, 256) if stacked else (20, 256), generator=gen) * 0.05).to(dtype)
    packed, scale, zero_point, decompressed = _ct_checkpoint(w, strategy, group_size, symmetric)
    assert (zero_point is None) == symmetric
    qw = from_compressed_tensors(packed, scale, zero_point, group_size=group_size, symmetric=symmetric)
    assert qw.shape == tuple(w.shape) and qw.group_size == group_size
    assert torch.equal(dequantize(qw, dtype), decompressed.to(dtype))
    out = to_compressed_tensors(qw)
    assert torch.equal(out["weight_packed"], packed)
    assert torch.equal(out["weight_scale"], scale)
    if symmetric:
        assert out["weight_zero_point"] is None
    else:
        assert torch.equal(out["weight_zero_point"], zero_point)
    assert out["group_size"] == group_size and out["symmetric"] == symmetric
    assert from_compressed_tensors(**out).equal(qw)


def test_compressed_tensors_naive_words():
    """value i of a word at bits 4i, stored as signed q + 8 (our code); zero points packed
    along N, 8 rows of N per word, as zero + 8 (our code-space zero)."""
    ref = random_qw(experts=None, n=16, k=64, group_size=32, zeros=True)
    out = to_compressed_tensors(ref)
    codes = naive_unpack(ref.codes)
    packed = out["weight_packed"]
    assert packed.shape == (16, 8)
    for row in range(16):
        for c in range(8):
            word = u32(packed[row, c])
            assert [(word >> (4 * i)) & 15 for i in range(8)] == codes[row, 8 * c:8 * c + 8].tolist()
    zp = out["weight_zero_point"]
    assert zp.shape == (2, 2)  # [N/8, G]
    for r in range(2):
        for g in range(2):
            word = u32(zp[r, g])
            assert [(word >> (4 * i)) & 15 for i in range(8)] == ref.zeros[g, 8 * r:8 * r + 8].tolist()
    assert torch.equal(out["weight_scale"], ref.scales.t())


def test_compressed_tensors_zero_point_padding():
    """N not a multiple of 8: the zero-point words of the last rows are partly padding."""
    ref = random_qw(experts=None, n=12, k=64, group_size=32, zeros=True)
    out = to_compressed_tensors(ref)
    assert out["weight_zero_point"].shape == (2, 2)
    assert from_compressed_tensors(**out).equal(ref)


def test_compressed_tensors_bad_inputs():
    ref = random_qw(experts=None, n=16, k=128, group_size=32, zeros=True)
    d = to_compressed_tensors(ref)

    def call(**over):
        args = dict(d)
        args.update(over)
        return from_compressed_tensors(**args)

    assert_named(TypeError, "weight_packed", call, weight_packed=d["weight_packed"].to(torch.int64))
    assert_named(ValueError, "weight_packed", call, weight_packed=d["weight_packed"][0])
    assert_named(ValueError, "group_size", call, group_size=40)
    assert_named(ValueError, "weight_scale", call, group_size=64)
    assert_named(ValueError, "weight_scale", call, weight_scale=d["weight_scale"][:8])
    assert_named(TypeError, "weight_scale", call, weight_scale=d["weight_scale"].float())
    assert_named(ValueError, "weight_zero_point", call, weight_zero_point=d["weight_zero_point"][:1])
    assert_named(ValueError, "weight_zero_point", call, weight_zero_point=None)
    assert_named(ValueError, "weight_zero_point", call, symmetric=True)
    assert_named(TypeError, "weight_zero_point", call, weight_zero_point=d["weight_zero_point"].to(torch.int8))
    assert_named(TypeError, "symmetric", call, symmetric="no")
    assert_named(ValueError, "qw", to_compressed_tensors, random_qw(perm=True))
    sixteen = random_qw(experts=None, n=8, k=64, zeros=True)
    sixteen.zeros[0, 0] = 16
    assert_named(ValueError, "qw", to_compressed_tensors, sixteen)


# ---------------------------------------------------------------- MXFP4 (GPT-OSS)

def test_mxfp4_round_trip_and_layout():
    gen = torch.Generator().manual_seed(13)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(100, 150, (3, 8, 4), generator=gen, dtype=torch.uint8)
    qw = from_mxfp4(blocks, scales)
    assert qw.format == "mxfp4" and qw.shape == (3, 8, 128) and qw.group_size == 32
    assert qw.scales.shape == (3, 4, 8) and torch.equal(qw.scales, scales.transpose(1, 2))
    out = to_mxfp4(qw)
    assert torch.equal(out["blocks"], blocks) and torch.equal(out["scales"], scales)
    assert from_mxfp4(**out).equal(qw)
    two = from_mxfp4(blocks[0], scales[0])
    assert two.shape == (8, 128) and torch.equal(to_mxfp4(two)["blocks"], blocks[0])
    # element k of row n: block k // 32, byte (k % 32) // 2, low nibble for even k
    deq = dequantize(qw, torch.float32)
    for e, n, k in [(0, 0, 0), (1, 3, 33), (2, 7, 127), (0, 5, 64)]:
        byte = int(blocks[e, n, k // 32, (k % 32) // 2])
        code = byte & 15 if k % 2 == 0 else byte >> 4
        assert float(deq[e, n, k]) == e2m1_value(code) * 2.0 ** (int(scales[e, n, k // 32]) - 127)


def test_mxfp4_matches_transformers_gpt_oss_dequant():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    gen = torch.Generator().manual_seed(17)
    blocks = torch.randint(0, 256, (2, 16, 3, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(115, 135, (2, 16, 3), generator=gen, dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # [E, K, N]
    ours = dequantize(from_mxfp4(blocks, scales), torch.bfloat16)  # [E, N, K]
    assert torch.equal(ours, theirs.transpose(1, 2))


def test_mxfp4_bad_inputs():
    blocks = torch.zeros(2, 8, 4, 16, dtype=torch.uint8)
    scales = torch.zeros(2, 8, 4, dtype=torch.uint8)
    assert_named(TypeError, "blocks", from_mxfp4, blocks.to(torch.int8), scales)
    assert_named(ValueError, "blocks", from_mxfp4, blocks[..., :8], scales)
    assert_named(ValueError, "blocks", from_mxfp4, blocks[0, 0, 0], scales)
    assert_named(TypeError, "scales", from_mxfp4, blocks, scales.float())
    assert_named(ValueError, "scales", from_mxfp4, blocks, scales[:, :4])
    assert_named(ValueError, "scales", from_mxfp4, blocks, scales[0])
    assert_named(ValueError, "qw", to_mxfp4, random_qw())
    assert_named(TypeError, "qw", to_mxfp4, blocks)
