"""grouped_gemm: the kernels (simt, cuda) against the reference, the reference against a
naive per-row loop, the backward against the reference's autograd.

Layout of the tests: a base case (3 experts with 5, 0 and 20 rows plus 3 rows past
offsets[E], N = K = 64, bf16, [E, N, K] weights, no epilogue) and one axis varied at a time
around it.

Tolerances. Products of bf16 (fp16) values are exact in fp32, so the kernel and the
reference add the same fp32 numbers in different orders: their fp32 results differ by at
most about K * 2^-24 * sum|x_i w_i|, far below the final rounding to bf16 (fp16). The two
may still round to neighbouring values: one unit in the last place, a relative 2^-7 for
bf16 (8 significant bits) and 2^-10 for fp16 (11 bits); `atol` covers results near zero,
where that fp32 difference is not small relative to the value, and the host's and the
GPU's expf/erff/tanhf (a few fp32 ulp) inside the activations.
"""

import math

import pytest
import torch

import moe_kernels
from moe_kernels import emulator
from moe_kernels.gemm import ACTIVATIONS, GATED_ACTIVATIONS, TILE_CONFIGS

from conftest import device_of, needs_observer, run

RTOL = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def make_case(counts=(5, 0, 20), tail=3, n=64, k=64, dtype=torch.bfloat16, layout="nk", seed=0,
              device="cpu"):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts, dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    m = int(offsets[-1]) + tail
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(len(counts), n, k, generator=g) / math.sqrt(k)).to(dtype)
    if layout == "kn":
        w = w.transpose(1, 2).contiguous()
    return x.to(device), w.to(device), offsets.to(device)


def assert_close(out, ref, dtype):
    scale = max(ref.float().abs().max().item(), 1.0)
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), rtol=RTOL[dtype], atol=RTOL[dtype] * scale * 0.5)


def naive_grouped_gemm(x, w, offsets, layout, bias, activation, alpha, limit, row_scale):
    """Row by row, dot product by dot product, in float64."""
    num_experts = w.shape[0]
    w_nk = w if layout == "nk" else w.transpose(1, 2)
    n = w_nk.shape[1]
    n_out = n // 2 if activation in GATED_ACTIVATIONS else n
    y = torch.zeros(x.shape[0], n_out, dtype=torch.float64)
    act = {None: lambda v: v, "relu": lambda v: max(v, 0.0),
           "gelu": lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))),
           "gelu_tanh": lambda v: 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))),
           "silu": lambda v: v / (1 + math.exp(-v))}
    for e in range(num_experts):
        for m in range(int(offsets[e]), int(offsets[e + 1])):
            h = [sum(float(x[m, kk]) * float(w_nk[e, j, kk]) for kk in range(x.shape[1])) +
                 (float(bias[e, j]) if bias is not None else 0.0) for j in range(n)]
            for j in range(n_out):
                if activation == "swiglu_oai":
                    gate, up = min(h[2 * j], limit), min(max(h[2 * j + 1], -limit), limit)
                    v = (up + 1) * gate / (1 + math.exp(-alpha * gate))
                elif activation in GATED_ACTIVATIONS:
                    v = act[activation.replace("_and_mul", "")](h[j]) * h[j + n_out]
                else:
                    v = act[activation](h[j])
                y[m, j] = v * (float(row_scale[m]) if row_scale is not None else 1.0)
    return y


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_reference_matches_naive_loop(activation, layout):
    x, w, offsets = make_case(counts=(2, 0, 3), tail=1, n=16, k=8, layout=layout)
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(3, 16, generator=g)
    row_scale = torch.rand(x.shape[0], generator=g)
    ref = moe_kernels.reference.grouped_gemm(x, w, offsets, w_layout=layout, bias=bias, activation=activation,
                                             alpha=1.702, limit=0.5, row_scale=row_scale)
    naive = naive_grouped_gemm(x, w, offsets, layout, bias, activation, 1.702, 0.5, row_scale)
    assert_close(ref, naive, torch.bfloat16)


def run_both(backend, x, w, offsets, **kwargs):
    ref = moe_kernels.reference.grouped_gemm(x.cpu(), w.cpu(), None if offsets is None else offsets.cpu(),
                                             **{k: v.cpu() if isinstance(v, torch.Tensor) else v
                                                for k, v in kwargs.items() if k != "config"})
    out = run(backend, moe_kernels.grouped_gemm, x, w, offsets, **kwargs)
    return out, ref


@pytest.mark.parametrize("config", TILE_CONFIGS)
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_base_case_every_config(kernel_backend, config, layout):
    x, w, offsets = make_case(layout=layout, device=device_of(kernel_backend))
    out, ref = run_both(kernel_backend, x, w, offsets, w_layout=layout, config=config)
    assert out.shape == ref.shape == (28, 64)
    assert_close(out, ref, torch.bfloat16)
    assert out[25:].abs().sum() == 0  # rows past offsets[E]


@pytest.mark.parametrize("counts", [(1,), (5, 0, 20), (7, 1, 0, 64, 3, 0, 2, 9),
                                    tuple((i * 7) % 5 for i in range(60)), (0, 0, 0), (200, 0, 64)])
def test_expert_counts_and_rows(kernel_backend, counts):
    x, w, offsets = make_case(counts=counts, device=device_of(kernel_backend))
    out, ref = run_both(kernel_backend, x, w, offsets)
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("n,k", [(8, 64), (24, 64), (136, 64), (512, 64), (64, 8), (64, 24), (64, 136),
                                 (64, 512), (8, 8)])
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_sizes(kernel_backend, n, k, layout):
    x, w, offsets = make_case(counts=(7, 0, 30), n=n, k=k, layout=layout, device=device_of(kernel_backend))
    out, ref = run_both(kernel_backend, x, w, offsets, w_layout=layout)
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("activation", ACTIVATIONS[1:])
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("config", [None, "16x64"])
def test_activations_bias_row_scale(kernel_backend, activation, layout, config):
    dev = device_of(kernel_backend)
    x, w, offsets = make_case(counts=(9, 0, 40), n=64, k=32, layout=layout, device=dev)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(3, 64, generator=g).to(dev)
    row_scale = torch.rand(x.shape[0], generator=g).to(dev)
    out, ref = run_both(kernel_backend, x, w, offsets, w_layout=layout, activation=activation, bias=bias,
                        row_scale=row_scale, limit=1.0, config=config)
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("n", [8, 24, 136])
@pytest.mark.parametrize("config", [None, "64x64"])
def test_gated_halves_with_kn_weights_and_n_not_multiple_of_16(kernel_backend, n, config):
    """[E, K, N] weights whose up half starts 8 bytes off a 16-byte boundary (N/2 = 4 mod 8):
    those rows are copied 8 bytes at a time."""
    x, w, offsets = make_case(counts=(9, 0, 30), n=n, k=32, layout="kn", device=device_of(kernel_backend))
    for activation in ("silu_and_mul", "gelu_and_mul"):
        out, ref = run_both(kernel_backend, x, w, offsets, w_layout="kn", activation=activation, config=config)
        assert out.shape == (x.shape[0], n // 2)
        assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("activation", [None, "silu_and_mul", "swiglu_oai"])
def test_float16(kernel_backend, activation):
    x, w, offsets = make_case(dtype=torch.float16, device=device_of(kernel_backend))
    out, ref = run_both(kernel_backend, x, w, offsets, activation=activation)
    assert out.dtype == torch.float16
    assert_close(out, ref, torch.float16)


@pytest.mark.parametrize("gather_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_gather(kernel_backend, gather_dtype, layout):
    """Row i reads x[gather[i]]; -1 rows are zero rows (permute_plan's padding)."""
    dev = device_of(kernel_backend)
    g = torch.Generator().manual_seed(4)
    tokens, k_slots, E = 13, 2, 4
    ids = torch.stack([torch.randperm(E, generator=g)[:k_slots] for _ in range(tokens)]).to(dev)
    plan = moe_kernels.permute_plan(ids, E, align=8)
    x = torch.randn(tokens, 64, generator=g).to(torch.bfloat16).to(dev)
    w = (torch.randn(E, 64, 64, generator=g) / 8).to(torch.bfloat16).to(dev)
    if layout == "kn":
        w = w.transpose(1, 2).contiguous()
    gather = plan.gather.to(gather_dtype)
    assert bool((gather == -1).any())
    out, ref = run_both(kernel_backend, x, w, plan.offsets, gather=gather, w_layout=layout,
                        activation="silu_and_mul")
    dense = moe_kernels.reference.grouped_gemm(
        torch.where(plan.gather[:, None] >= 0, x.cpu()[plan.gather.cpu().clamp(min=0)], 0), w.cpu(),
        plan.offsets.cpu(), w_layout=layout, activation="silu_and_mul")
    torch.testing.assert_close(ref, dense, rtol=0, atol=0)
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("config", [None, "64x64"])
@pytest.mark.parametrize("counts_dtype", [torch.int32, torch.int64])
def test_masked_layout(kernel_backend, config, counts_dtype):
    dev = device_of(kernel_backend)
    g = torch.Generator().manual_seed(5)
    E, S = 4, 24
    x = torch.randn(E, S, 64, generator=g).to(torch.bfloat16).to(dev)
    w = (torch.randn(E, 48, 64, generator=g) / 8).to(torch.bfloat16).to(dev)
    counts = torch.tensor([3, 0, 24, 17], dtype=counts_dtype, device=dev)
    out, ref = run_both(kernel_backend, x, w, None, counts=counts, activation="swiglu_oai", config=config)
    assert out.shape == (E, S, 24)
    assert_close(out, ref, torch.bfloat16)
    assert out[0, 3:].abs().sum() == 0 and out[1].abs().sum() == 0


def test_empty_inputs(kernel_backend):
    dev = device_of(kernel_backend)
    x = torch.zeros(0, 16, dtype=torch.bfloat16, device=dev)
    w = torch.randn(2, 8, 16).to(torch.bfloat16).to(dev)
    offsets = torch.zeros(3, dtype=torch.long, device=dev)
    out = run(kernel_backend, moe_kernels.grouped_gemm, x, w, offsets)
    assert out.shape == (0, 8)
    x = torch.randn(5, 16).to(torch.bfloat16).to(dev)
    out = run(kernel_backend, moe_kernels.grouped_gemm, x, w, offsets)  # no expert has a row
    assert out.shape == (5, 8) and out.abs().sum() == 0


def grads(backend, x, w, offsets, seed=7, **kwargs):
    """Gradients of sum(y * r) for a fixed random r, of every floating input."""
    inputs = {"x": x, "w": w, **{k: v for k, v in kwargs.items() if k in ("bias", "row_scale")}}
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    rest = {k: v for k, v in kwargs.items() if k not in leaves}
    y = run(backend, moe_kernels.grouped_gemm, leaves["x"], leaves["w"], offsets,
            **{k: v for k, v in leaves.items() if k not in ("x", "w")}, **rest)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    (y.float() * r).sum().backward()
    return {k: v.grad for k, v in leaves.items()}


def assert_grad_close(got, want, dtype):
    """Gradients pass through the product once more, with the epilogue's gradient rounded to
    the input dtype first (the kernels feed it to tensor cores): a relative error of a few
    units of the dtype's last place in norm."""
    for name in want:
        a, b = got[name].float().cpu(), want[name].float().cpu()
        err = (a - b).norm().item()
        assert err <= 4 * RTOL[dtype] * max(b.norm().item(), 1e-3), (name, err, b.norm().item())


@pytest.mark.parametrize("activation", [None, "gelu", "silu_and_mul", "swiglu_oai"])
@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_backward(kernel_backend, activation, layout):
    dev = device_of(kernel_backend)
    x, w, offsets = make_case(counts=(9, 0, 30), n=32, k=24, layout=layout, device=dev)
    g = torch.Generator().manual_seed(8)
    kwargs = dict(w_layout=layout, activation=activation, limit=1.0,
                  bias=torch.randn(3, 32, generator=g).to(dev),
                  row_scale=torch.rand(x.shape[0], generator=g).to(dev))
    want = grads("reference", x.cpu(), w.cpu(), offsets.cpu(),
                 **{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    got = grads(kernel_backend, x, w, offsets, **kwargs)
    assert_grad_close(got, want, torch.bfloat16)
    again = grads(kernel_backend, x, w, offsets, **kwargs)
    for name in got:
        assert torch.equal(got[name], again[name]), name  # bit for bit across runs


@pytest.mark.parametrize("layout", ["nk", "kn"])
def test_backward_gather_and_masked(kernel_backend, layout):
    dev = device_of(kernel_backend)
    g = torch.Generator().manual_seed(9)
    ids = torch.stack([torch.randperm(3, generator=g)[:2] for _ in range(11)]).to(dev)
    plan = moe_kernels.permute_plan(ids, 3, align=4)
    x = torch.randn(11, 16, generator=g).to(torch.bfloat16).to(dev)
    w = (torch.randn(3, 32, 16, generator=g) / 4).to(torch.bfloat16).to(dev)
    if layout == "kn":
        w = w.transpose(1, 2).contiguous()
    kwargs = dict(gather=plan.gather, w_layout=layout, activation="silu_and_mul")
    want = grads("reference", x.cpu(), w.cpu(), plan.offsets.cpu(),
                 **{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    got = grads(kernel_backend, x, w, plan.offsets, **kwargs)
    assert_grad_close(got, want, torch.bfloat16)

    xm = torch.randn(3, 8, 16, generator=g).to(torch.bfloat16).to(dev)
    counts = torch.tensor([8, 0, 5], device=dev)
    kwargs = dict(counts=counts, w_layout=layout, activation="gelu_tanh")
    want = grads("reference", xm.cpu(), w.cpu(), None, counts=counts.cpu(), w_layout=layout,
                 activation="gelu_tanh")
    got = grads(kernel_backend, xm, w, None, **kwargs)
    assert_grad_close(got, want, torch.bfloat16)


def test_bad_inputs():
    x, w, offsets = make_case()
    gg = moe_kernels.grouped_gemm
    with pytest.raises(TypeError, match="w: expected the dtype of x"):
        gg(x, w.half(), offsets)
    with pytest.raises(TypeError, match="x: expected dtype"):
        gg(x.float(), w, offsets)
    with pytest.raises(ValueError, match=r"x: expected \[rows, 64\]"):
        gg(x[:, :32], w, offsets)
    with pytest.raises(ValueError, match="offsets: expected 4 entries"):
        gg(x, w, offsets[:3])
    with pytest.raises(TypeError, match="offsets: expected dtype"):
        gg(x, w, offsets.float())
    with pytest.raises(ValueError, match="offsets: expected 0 = offsets"):
        gg(x, w, torch.tensor([0, 5, 3, 25]))
    with pytest.raises(ValueError, match="multiples of 8"):
        gg(x[:, :12].contiguous(), w[:, :, :12].contiguous(), offsets)
    with pytest.raises(ValueError, match="multiples of 8"):
        gg(x, w[:, :12].contiguous(), offsets)
    with pytest.raises(ValueError, match="gather: expected row indices"):
        gg(x, w, offsets, gather=torch.tensor([0] * 27 + [28]))
    with pytest.raises(ValueError, match="gather: expected 28 entries|gather: expected"):
        gg(x, w, offsets, gather=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of offsets"):
        gg(x, w)
    with pytest.raises(ValueError, match="counts: expected 0 <= counts"):
        gg(x.reshape(4, 7, 64)[:3].contiguous(), w, counts=torch.tensor([1, 8, 0]))
    with pytest.raises(ValueError, match="activation"):
        gg(x, w, offsets, activation="swish")
    with pytest.raises(ValueError, match="w_layout"):
        gg(x, w, offsets, w_layout="mn")
    with pytest.raises(ValueError, match="bias: expected shape"):
        gg(x, w, offsets, bias=torch.zeros(3, 32))
    with pytest.raises(ValueError, match="row_scale: expected 28 entries"):
        gg(x, w, offsets, row_scale=torch.ones(5))
    with pytest.raises(ValueError, match="config"):
        gg(x, w, offsets, config="256x256")
    with pytest.raises(ValueError, match="limit: expected a finite number"):
        gg(x, w, offsets, limit=float("inf"))
    with pytest.raises(ValueError, match="alpha: expected a finite number"):
        gg(x, w, offsets, alpha=float("nan"))
    with pytest.raises(TypeError, match="gather: expected dtype"):
        gg(x, w, offsets, gather=torch.zeros(28))
    with pytest.raises(ValueError, match="counts: expected 3 entries"):
        gg(x.reshape(4, 7, 64)[:3].contiguous(), w, counts=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="counts: expected dtype"):
        gg(x.reshape(4, 7, 64)[:3].contiguous(), w, counts=torch.ones(3))
    with pytest.raises(ValueError, match=r"x: expected \[3, S, 64\]"):
        gg(x, w, counts=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="gather: applies to the contiguous layout only"):
        gg(x.reshape(4, 7, 64)[:3].contiguous(), w, counts=torch.tensor([1, 2, 3]),
           gather=torch.zeros(21, dtype=torch.long))
    with pytest.raises(ValueError, match="w: expected 1 to 4096 experts"):
        gg(x, torch.zeros(0, 64, 64, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.long))


def test_non_contiguous_and_misaligned_inputs(kernel_backend):
    dev = device_of(kernel_backend)
    x, w, offsets = make_case(device=dev)
    base = torch.empty(x.numel() + 1, dtype=x.dtype, device=dev)
    misaligned = base[1:].view(x.shape)
    misaligned.copy_(x)
    out, ref = run_both(kernel_backend, misaligned, w.transpose(1, 2).contiguous().transpose(1, 2), offsets)
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("arch,m,experts,expected", [
    (90, 8, 8, "16x64"),          # decode: one token, k = 8
    (90, 64, 8, "16x64"),         # 8 rows per expert on average
    (90, 72, 8, "64x64"),         # 9: an uneven expert could pass 16 rows
    (90, 16384 * 8, 8, "128x128"),
    (80, 512, 2, "64x64"),        # fewer 128x128 tiles than multiprocessors
    (120, 65536, 64, "128x128"),
])
def test_gemm_config_pinned(arch, m, experts, expected):
    c = moe_kernels.gemm_config(m, 4096, 4096, experts, arch=arch, num_sms=132)
    assert c.name == expected
    assert c.split_k == 1 and c.tile_m * c.tile_n > 0


def test_decode_reads_each_active_experts_weights_once():
    """Decode shape: 8 experts, 3 with rows (1 to 16 each). Weight bytes read / active
    experts' weight bytes <= 1.05: inactive experts are never touched and no weight is read
    twice. The counters see every global read; the activation rows are read once per n-tile
    (from L2 on a GPU: 22 rows here against 256 weight rows per expert), so they are
    subtracted exactly and everything else (offsets, the schedule) is counted as weight
    traffic."""
    needs_observer()
    g = torch.Generator().manual_seed(10)
    E, N, K = 8, 256, 512
    counts = torch.tensor([1, 0, 0, 16, 0, 5, 0, 0])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    x = torch.randn(int(counts.sum()), K, generator=g).to(torch.bfloat16)
    w = (torch.randn(E, N, K, generator=g) / 16).to(torch.bfloat16)
    with moe_kernels.use_backend("simt"), emulator.traffic() as rows:
        moe_kernels.grouped_gemm(x, w, offsets, activation="silu_and_mul")
    config = moe_kernels.gemm_config(x.shape[0], N, K, E, activation="silu_and_mul")
    assert config.variant == "decode"
    n_tiles = -(-(N // 2) // (config.tile_n // 2))  # gated: tile_n / 2 outputs per tile
    activation_bytes = n_tiles * x.numel() * 2
    weight_bytes = 3 * N * K * 2
    read = sum(r["sectors_read"] for r in rows) * emulator.SECTOR_BYTES
    assert read - activation_bytes <= 1.05 * weight_bytes, (read - activation_bytes) / weight_bytes


def test_inference_saves_nothing_for_a_backward():
    """Under torch.no_grad, weights that require grad (an nn.Module in inference) must not
    make the kernel write the float32 pre-activation it saves for a backward: y is all it
    writes. With grad enabled it writes both."""
    needs_observer()
    x, w, offsets = make_case(counts=(5, 0, 20), tail=0)
    w = w.requires_grad_(True)
    y_bytes = x.shape[0] * 32 * 2  # silu_and_mul: N/2 bf16 outputs per row
    pre_bytes = x.shape[0] * 64 * 4
    for grad, written in ((False, y_bytes), (True, y_bytes + pre_bytes)):
        with torch.set_grad_enabled(grad), moe_kernels.use_backend("simt"), emulator.traffic() as rows:
            moe_kernels.grouped_gemm(x, w, offsets, activation="silu_and_mul")
        gemm = [r for r in rows if r["kernel"].startswith("grouped_gemm_kernel")]
        assert sum(r["unique_bytes_written"] for r in gemm) == written, grad


@pytest.mark.parametrize("k", [176, 64])
def test_traffic_counts_every_byte_read(k):
    """The sectors the counters see cover every distinct byte read, also when a k-tile is
    partly zero-filled (lanes whose cp.async reads nothing must not shift the others' reads
    into another instruction)."""
    needs_observer()
    x, w, offsets = make_case(counts=(3, 0, 5), n=64, k=k)
    with moe_kernels.use_backend("simt"), emulator.traffic() as rows:
        moe_kernels.grouped_gemm(x, w, offsets, config="16x64")
    for r in rows:
        assert r["sectors_read"] * emulator.SECTOR_BYTES >= r["unique_bytes_read"], r


def test_opcheck_and_compile():
    from torch.library import opcheck

    x, w, offsets = make_case(counts=(3, 0, 4), tail=1, n=16, k=16)
    gather = torch.tensor([0, 1, 2, -1, 4, 5, 6, 7])
    with moe_kernels.use_backend("simt"):
        opcheck(torch.ops.moe_kernels.grouped_gemm,
                ("simt", x, w, offsets, None, gather, False, None, 5, 1.702, 7.0, None, True, -1))

        def f(x, w):
            return moe_kernels.grouped_gemm(x, w, offsets, activation="silu_and_mul").float().sum()

        compiled = torch.compile(f, fullgraph=True, backend="eager")
        assert torch.equal(compiled(x, w), f(x, w))
