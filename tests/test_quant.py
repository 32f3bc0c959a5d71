"""4-bit weight kernels: dequantize and quantize_int4 against the reference bit for bit, and
the W4A16 grouped GEMM against the 16-bit GEMM of the dequantized weight (and the
reference backend), for every format, group size, epilogue and row layout."""

import pytest
import torch

import moe_kernels
from moe_kernels import emulator
from moe_kernels.quant import QuantizedWeight, dequantize, quantize_int4
from moe_kernels.reference import quant as ref

from conftest import device_of, needs_observer, run


def bits(t):
    """Bit patterns: equal bits, not only equal values (-0.0 is not 0.0)."""
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


def same_bits(a, b):
    """Bit for bit, NaN for NaN: a NaN's payload is the converter's (CUDA's bf16 NaN is
    0x7fff, PyTorch's CPU conversion keeps the sign and payload), so NaNs only need to sit
    at the same places."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(bits(a)[~nan], bits(b)[~nan])


def random_int4(experts, n, k, group_size, *, symmetric=True, scale_dtype=torch.bfloat16, act_order=False,
                seed=0):
    """A QuantizedWeight with random codes, scales of a few magnitudes and zero points 0..16."""
    g = torch.Generator().manual_seed(seed)
    lead = () if experts is None else (experts,)
    groups = 1 if group_size == -1 else k // group_size
    codes = torch.randint(0, 256, (*lead, n, k // 2), generator=g, dtype=torch.uint8)
    scales = (torch.rand(*lead, groups, n, generator=g) * 0.02 + 0.001).to(scale_dtype)
    zeros = None if symmetric else torch.randint(0, 17, (*lead, groups, n), generator=g, dtype=torch.uint8)
    perm = None
    if act_order:
        perm = torch.stack([torch.randperm(k, generator=g) for _ in range(experts or 1)]).to(torch.int32)
        perm = perm if experts is not None else perm[0]
    return QuantizedWeight("int4", codes, scales, zeros, group_size=group_size, perm=perm)


def random_mxfp4(experts, n, k, *, seed=0, extreme=False):
    g = torch.Generator().manual_seed(seed)
    lead = () if experts is None else (experts,)
    codes = torch.randint(0, 256, (*lead, n, k // 2), generator=g, dtype=torch.uint8)
    low, high = (0, 256) if extreme else (118, 126)
    scales = torch.randint(low, high, (*lead, k // 32, n), generator=g, dtype=torch.uint8)
    return QuantizedWeight("mxfp4", codes, scales, group_size=32)


# ----------------------------------------------------------------------------- dequantize

@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_dequantize_int4_matches_reference_bit_for_bit(kernel_backend, group_size, symmetric, scale_dtype):
    # N not a multiple of the 32-row tile, K past one 256-column tile.
    qw = random_int4(3, 40, 384, group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = run(kernel_backend, dequantize, qw.to(device_of(kernel_backend)), dtype).cpu()
        assert out.dtype == dtype and out.shape == (3, 40, 384)
        assert same_bits(out, ref.dequantize(qw, dtype))


def test_dequantize_reference_against_naive_loop():
    """The reference itself, against a per-element loop over the documented layout."""
    qw = random_int4(2, 3, 64, 32, symmetric=False, seed=3)
    out = ref.dequantize(qw, torch.float32)
    for e in range(2):
        for n in range(3):
            for k in range(64):
                byte = int(qw.codes[e, n, k // 2])
                code = (byte >> 4) if k % 2 else (byte & 15)
                zero = int(qw.zeros[e, k // 32, n])
                expected = (code - zero) * float(qw.scales[e, k // 32, n])
                assert float(out[e, n, k]) == expected


@pytest.mark.parametrize("extreme", [False, True])
def test_dequantize_mxfp4_matches_reference_bit_for_bit(kernel_backend, extreme):
    """Scales over all 256 e8m0 values when extreme: 0 (2^-127, a subnormal), 254, and
    255 (NaN); products that leave bf16/fp16 range become inf or round as the reference."""
    qw = random_mxfp4(2, 24, 320, seed=1, extreme=extreme)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = run(kernel_backend, dequantize, qw.to(device_of(kernel_backend)), dtype).cpu()
        assert same_bits(out, ref.dequantize(qw, dtype))


def test_dequantize_single_matrix_act_order_and_odd_k(kernel_backend):
    """[N, K] weights; act-order (logical column order back); per-channel with K not a
    multiple of 8 (the kernel's per-element path)."""
    cases = [random_int4(None, 16, 256, 64, symmetric=False, seed=4),
             random_int4(2, 16, 256, 128, act_order=True, seed=5),
             random_int4(None, 16, 128, 32, act_order=True, seed=6),
             random_int4(2, 5, 36, -1, symmetric=False, seed=7)]
    for qw in cases:
        for dtype in (torch.bfloat16, torch.float32):
            out = run(kernel_backend, dequantize, qw.to(device_of(kernel_backend)), dtype).cpu()
            assert out.shape == qw.shape
            assert same_bits(out, ref.dequantize(qw, dtype))


def test_dequantize_traffic_is_one_read_and_one_write():
    """Every code byte and scale read once, every output written once (the counters' bytes
    of whole 32-byte sectors against the minimum)."""
    needs_observer()
    qw = random_int4(2, 64, 1024, 32, symmetric=False, seed=8)
    with moe_kernels.use_backend("simt"), emulator.traffic() as rows:
        dequantize(qw, torch.bfloat16)
    (row,) = [r for r in rows if r["kernel"] == "dequantize_kernel"]
    minimum = qw.codes.numel() + qw.scales.numel() * 2 + qw.zeros.numel() + 2 * 64 * 1024 * 2
    moved = (row["sectors_read"] + row["sectors_written"]) * emulator.SECTOR_BYTES
    assert moved <= 1.02 * minimum, moved / minimum


# --------------------------------------------------------------------------- quantize_int4

@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_int4_matches_reference_bit_for_bit(kernel_backend, group_size, symmetric, dtype):
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(2, 24, 256, generator=g) * 0.05).to(dtype)
    w[0, 0, :64] = 0  # all-zero groups: scale 1
    w[1, 3, :] = 0.25  # constant rows
    w[1, 5, 2::7] = 1e-3  # ties and small values
    qw = run(kernel_backend, quantize_int4, w.to(device_of(kernel_backend)), group_size, symmetric).cpu()
    expected = ref.quantize_int4(w, group_size, symmetric)
    assert qw.equal(expected)
    # The RTN guarantee: within half a scale of w.
    err = (ref.dequantize(qw, torch.float32) - w.float()).abs()
    scale = ref._per_element(qw.scales.float(), qw.group_size, 256)
    assert bool((err <= scale / 2 * (1 + 1e-6)).all())


def test_quantize_int4_scale_dtype_and_single_matrix(kernel_backend):
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    qw = run(kernel_backend, quantize_int4, w.to(device_of(kernel_backend)), 32, scale_dtype=torch.float16).cpu()
    assert qw.shape == (32, 64) and qw.scales.dtype == torch.float16
    assert qw.equal(ref.quantize_int4(w, 32, True, torch.float16))


@pytest.mark.parametrize("backend", ["simt", "reference"])
def test_quantize_int4_bad_inputs(backend):
    with moe_kernels.use_backend(backend):
        with pytest.raises(ValueError, match="w"):
            quantize_int4(torch.tensor([[1.0, float("nan")] * 16]), 32)
        with pytest.raises(ValueError, match="group_size"):
            quantize_int4(torch.randn(4, 96), 64)
        with pytest.raises(TypeError, match="scale_dtype"):
            quantize_int4(torch.randn(4, 64), 32, scale_dtype=torch.float32)
        with pytest.raises(TypeError, match="w"):
            quantize_int4(torch.randint(0, 3, (4, 64)), 32)
    with pytest.raises(TypeError, match="qw"):
        dequantize(torch.zeros(4, 4))
    with pytest.raises(TypeError, match="dtype"):
        dequantize(random_int4(None, 8, 64, 32), torch.int32)


# ------------------------------------------------------------------------------ W4A16 GEMM

def expert_rows(counts):
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(counts).cumsum(0)])


def to_device(value, device):
    return value.to(device) if isinstance(value, (torch.Tensor, QuantizedWeight)) else value


def both_ways(backend, x, qw, offsets, **kwargs):
    """(W4A16, the 16-bit GEMM of the dequantized weight), both on `backend`, on the CPU."""
    dev = device_of(backend)
    x, qw, offsets = x.to(dev), qw.to(dev), None if offsets is None else offsets.to(dev)
    kwargs = {key: to_device(value, dev) for key, value in kwargs.items()}
    with moe_kernels.use_backend(backend):
        y = moe_kernels.grouped_gemm(x, qw, offsets, **kwargs)
        w = dequantize(qw, x.dtype)
        y16 = moe_kernels.grouped_gemm(x, w if w.dim() == 3 else w.unsqueeze(0), offsets, **kwargs)
    return y.cpu(), y16.cpu()


WEIGHTS = {
    "int4-g32-asym": lambda: random_int4(3, 64, 128, 32, symmetric=False, seed=20),
    "int4-g64-sym-fp16scales": lambda: random_int4(3, 64, 128, 64, scale_dtype=torch.float16, seed=21),
    "int4-g128-asym": lambda: random_int4(3, 64, 256, 128, symmetric=False, seed=22),
    "int4-perchannel": lambda: random_int4(3, 64, 96, -1, symmetric=False, seed=23),
    "int4-actorder": lambda: random_int4(3, 64, 128, 32, act_order=True, seed=24),
    "mxfp4": lambda: random_mxfp4(3, 64, 160, seed=25),
}


@pytest.mark.parametrize("weight", sorted(WEIGHTS))
@pytest.mark.parametrize("config", ["128x128", "64x64", "16x64"])
def test_w4a16_equals_gemm_of_dequantized_weight(kernel_backend, weight, config):
    """Uneven experts (one empty), every tile: the same sums in the same order, so equal
    bit for bit; and the reference backend (float32 matmul of the dequantized weight)
    within accumulation tolerance."""
    qw = WEIGHTS[weight]()
    g = torch.Generator().manual_seed(30)
    offsets = expert_rows([7, 0, 18])
    x = torch.randn(25, qw.shape[-1], generator=g).to(torch.bfloat16)
    y, y16 = both_ways(kernel_backend, x, qw, offsets, activation="silu_and_mul", config=config)
    assert torch.equal(y, y16)
    expected = moe_kernels.grouped_gemm(x, qw, offsets, activation="silu_and_mul")  # CPU: reference
    torch.testing.assert_close(y.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu", "silu_and_mul",
                                        "gelu_and_mul", "gelu_tanh_and_mul", "swiglu_oai"])
def test_w4a16_every_epilogue(kernel_backend, activation):
    """bias, row_scale and every activation; N/2 = 20 (gated halves straddle a scale piece)."""
    qw = random_int4(3, 40, 128, 32, symmetric=False, seed=31)
    g = torch.Generator().manual_seed(32)
    offsets = expert_rows([5, 9, 3])
    x = torch.randn(17, 128, generator=g).to(torch.float16)
    bias = torch.randn(3, 40, generator=g)
    row_scale = torch.rand(17, generator=g)
    qw = qw.to(dtype=torch.float16) if qw.scales.dtype != torch.float16 else qw
    for config in ("64x64", "16x64"):
        y, y16 = both_ways(kernel_backend, x, qw, offsets, activation=activation, bias=bias, row_scale=row_scale,
                           config=config)
        assert torch.equal(y, y16)


def test_w4a16_gather_and_masked_layouts(kernel_backend):
    qw = random_mxfp4(4, 32, 64, seed=33)
    g = torch.Generator().manual_seed(34)
    x = torch.randn(9, 64, generator=g).to(torch.bfloat16)
    gather = torch.tensor([3, -1, 0, 8, 8, 2, -1, 5, 1, 7, 4, 6])
    offsets = expert_rows([4, 0, 5, 3])
    y, y16 = both_ways(kernel_backend, x, qw, offsets, gather=gather, activation="gelu")
    assert torch.equal(y, y16)
    xm = torch.randn(4, 6, 64, generator=g).to(torch.bfloat16)
    counts = torch.tensor([6, 0, 2, 5])
    y, y16 = both_ways(kernel_backend, xm, qw, None, counts=counts, activation="swiglu_oai")
    assert torch.equal(y, y16)


def test_w4a16_act_order_with_gather_and_masked(kernel_backend):
    """Act-order weights permute each row's columns by its expert's perm (gather and
    masked layouts too); the reference multiplies by the logical-order dequantized weight."""
    qw = random_int4(3, 32, 64, 32, act_order=True, seed=35)
    g = torch.Generator().manual_seed(36)
    x = torch.randn(6, 64, generator=g).to(torch.bfloat16)
    gather = torch.tensor([5, 0, -1, 3, 3, 1, 2])
    offsets = expert_rows([2, 3, 2])
    y, y16 = both_ways(kernel_backend, x, qw, offsets, gather=gather)
    torch.testing.assert_close(y.float(), y16.float(), atol=1e-2, rtol=1e-2)  # summed in another k order
    expected = moe_kernels.grouped_gemm(x, qw, offsets, gather=gather)
    torch.testing.assert_close(y.float(), expected.float(), atol=1e-2, rtol=1e-2)
    xm = torch.randn(3, 4, 64, generator=g).to(torch.bfloat16)
    counts = torch.tensor([4, 1, 0])
    y, _ = both_ways(kernel_backend, xm, qw, None, counts=counts)
    expected = moe_kernels.grouped_gemm(xm, qw, counts=counts)
    torch.testing.assert_close(y.float(), expected.float(), atol=1e-2, rtol=1e-2)


def test_w4a16_single_matrix_and_k_not_multiple_of_32(kernel_backend):
    """A [N, K] weight is one expert; a per-channel weight with K = 40 takes the
    dequantize-then-GEMM path (K not a multiple of 32), with the same result."""
    g = torch.Generator().manual_seed(37)
    for qw in (random_int4(None, 16, 64, 32, seed=38), random_int4(None, 16, 40, -1, seed=39)):
        x = torch.randn(5, qw.shape[-1], generator=g).to(torch.bfloat16)
        offsets = torch.tensor([0, 5])
        y, y16 = both_ways(kernel_backend, x, qw, offsets)
        assert torch.equal(y, y16)


def test_w4a16_backward_matches_dequantized_weight(kernel_backend):
    """Gradients of x, bias and row_scale (the weight gets none): those of the 16-bit GEMM
    with the dequantized weight."""
    qw = random_int4(2, 32, 64, 32, symmetric=False, seed=40)
    g = torch.Generator().manual_seed(41)
    x = torch.randn(7, 64, generator=g).to(torch.bfloat16)
    bias = torch.randn(2, 32, generator=g)
    row_scale = torch.rand(7, generator=g)
    offsets = expert_rows([3, 4])
    dev = device_of(kernel_backend)
    qw, x, bias, row_scale, offsets = qw.to(dev), x.to(dev), bias.to(dev), row_scale.to(dev), offsets.to(dev)
    grads = []
    with moe_kernels.use_backend(kernel_backend):
        for w in (qw, dequantize(qw, torch.bfloat16)):
            leaves = [t.clone().requires_grad_(True) for t in (x, bias, row_scale)]
            y = moe_kernels.grouped_gemm(leaves[0], w, offsets, bias=leaves[1], row_scale=leaves[2],
                                         activation="gelu_and_mul")
            y.float().square().sum().backward()
            grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_w4a16_decode_reads_active_experts_weights_once():
    """Decode: 8 experts, 3 with rows. Bytes read, less the activation rows (re-read per
    n-tile, from L2 on a GPU), over the active experts' codes + scales + zero points <= 1.05."""
    needs_observer()
    E, N, K = 8, 256, 512
    for qw in (random_int4(E, N, K, 32, symmetric=False, seed=42), random_int4(E, N, K, 128, seed=43),
               random_mxfp4(E, N, K, seed=44)):
        counts = torch.tensor([1, 0, 0, 16, 0, 5, 0, 0])
        offsets = expert_rows(counts.tolist())
        x = torch.randn(int(counts.sum()), K).to(torch.bfloat16)
        with moe_kernels.use_backend("simt"), emulator.traffic() as rows:
            moe_kernels.grouped_gemm(x, qw, offsets, activation="silu_and_mul")
        config = moe_kernels.gemm_config(x.shape[0], N, K, E, activation="silu_and_mul")
        assert config.variant == "decode"
        n_tiles = -(-(N // 2) // (config.tile_n // 2))
        activation_bytes = n_tiles * x.numel() * 2
        per_expert = N * K // 2 + qw.scales[0].numel() * qw.scales.element_size()
        per_expert += 0 if qw.zeros is None else qw.zeros[0].numel()
        read = sum(r["sectors_read"] for r in rows) * emulator.SECTOR_BYTES
        assert read - activation_bytes <= 1.05 * 3 * per_expert, (read - activation_bytes) / (3 * per_expert)


def test_w4a16_bad_inputs():
    qw = random_int4(2, 16, 64, 32)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    offsets = expert_rows([2, 2])
    with pytest.raises(ValueError, match="w_layout"):
        moe_kernels.grouped_gemm(x, qw, offsets, w_layout="kn")
    with pytest.raises(ValueError, match="x"):
        moe_kernels.grouped_gemm(torch.randn(4, 32, dtype=torch.bfloat16), qw, offsets)
    with pytest.raises(TypeError, match="x"):
        moe_kernels.grouped_gemm(x.float(), qw, offsets)
    with pytest.raises(ValueError, match="w"):
        moe_kernels.grouped_gemm(torch.randn(4, 64, dtype=torch.bfloat16), random_int4(2, 12, 64, 32), offsets)
    with pytest.raises(ValueError, match="offsets"):
        moe_kernels.grouped_gemm(x, qw, expert_rows([2, 2, 0]))


def test_opcheck_and_compile():
    """The custom ops' fakes agree with the kernels, and torch.compile traces the W4A16
    GEMM and dequantize without a graph break."""
    from torch.library import opcheck

    from moe_kernels.quant.ops import kernel_operands

    qw = random_int4(2, 16, 64, 32, symmetric=False, seed=50)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    offsets = expert_rows([2, 3])
    codes, scales, zeros, fmt, group = kernel_operands(qw)
    with moe_kernels.use_backend("simt"):
        opcheck(torch.ops.moe_kernels.dequantize, ("simt", codes, scales, zeros, fmt, group, torch.bfloat16))
        opcheck(torch.ops.moe_kernels.quantize_int4, ("simt", torch.randn(2, 8, 64), 32, False, torch.float16))
        opcheck(torch.ops.moe_kernels.quantize_int4, ("simt", torch.randn(2, 8, 64), 32, True, torch.bfloat16))
        opcheck(torch.ops.moe_kernels.grouped_gemm_q4,
                ("simt", x, codes, scales, zeros, fmt, group, offsets, None, None, None, 5, 1.702, 7.0, None,
                 True, -1))

        def f(x):
            return moe_kernels.grouped_gemm(x, qw, offsets, activation="silu_and_mul").float().sum() + \
                dequantize(qw).float().sum()

        compiled = torch.compile(f, fullgraph=True, backend="eager")
        assert torch.equal(compiled(x), f(x))
