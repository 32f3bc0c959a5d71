"""topk_gating: kernels (simt, cuda) vs the PyTorch reference vs a naive per-token loop."""

import math

import pytest
import torch

import moe_kernels
from moe_kernels import reference
from conftest import device_of, native, run

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EXPERTS = [1, 2, 8, 60, 64, 160, 256, 384, 512]
KS = [1, 2, 6, 8]
TOKENS = [0, 1, 3, 257]

# Tolerance of the weights, the same for every input dtype: the logits are converted to
# float32 exactly and all arithmetic is float32 in the kernel and in torch. The two differ
# only in exp() and summation order; each weight is a softmax term whose float32 error is
# a few ulp (measured: <= 6e-8 absolute). rtol 1e-5 leaves room for the GPU's expf (2 ulp).
WEIGHT_TOL = dict(rtol=1e-5, atol=1e-6)


def naive_topk_gating(logits, k, renormalize):
    """Independent oracle: float64 softmax and a Python sort per token."""
    weights, ids = [], []
    for row in logits.double().tolist():
        finite_max = max((v for v in row if not math.isnan(v)), default=float("nan"))
        exps = [math.exp(v - finite_max) for v in row]
        total = sum(exps)
        probs = [e / total for e in exps]
        key = [float("-inf") if math.isnan(v) else v for v in row]
        order = sorted(range(len(row)), key=lambda e: (-key[e], e))[:k]
        w = [probs[e] for e in order]
        if renormalize:
            s = sum(w)
            w = [v / s for v in w]
        weights.append(w)
        ids.append(order)
    return (torch.tensor(weights, dtype=torch.float64).view(-1, k),
            torch.tensor(ids, dtype=torch.int32).view(-1, k))


def make_logits(tokens, experts, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, experts, generator=g) * 2).to(dtype)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts,k", [(e, k) for e in [1, 3, 8, 60, 160] for k in KS if k <= e])
def test_reference_matches_naive_loop(experts, k, dtype, renormalize):
    logits = make_logits(37, experts, dtype)
    weights, ids = reference.topk_gating(logits, k, renormalize=renormalize)
    naive_weights, naive_ids = naive_topk_gating(logits, k, renormalize)
    assert torch.equal(ids, naive_ids)
    torch.testing.assert_close(weights.double(), naive_weights, **WEIGHT_TOL)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts,k", [(e, k) for e in EXPERTS for k in KS if k <= e])
def test_kernel_matches_reference(kernel_backend, experts, k, dtype, renormalize):
    for tokens in TOKENS:
        logits = make_logits(tokens, experts, dtype, seed=experts * 100 + k)
        weights, ids = run(kernel_backend, moe_kernels.topk_gating,
                           logits.to(device_of(kernel_backend)), k, renormalize=renormalize)
        ref_weights, ref_ids = reference.topk_gating(logits, k, renormalize=renormalize)
        assert weights.dtype == torch.float32 and ids.dtype == torch.int32
        assert weights.shape == ids.shape == (tokens, k)
        assert torch.equal(ids.cpu(), ref_ids), f"T={tokens}"
        torch.testing.assert_close(weights.cpu(), ref_weights, **WEIGHT_TOL)


@pytest.mark.parametrize("experts,k", [(1000, 8), (4096, 32), (3, 3), (512, 512)])
def test_kernel_large_and_full_k(kernel_backend, experts, k):
    for dtype in DTYPES:
        logits = make_logits(5, experts, dtype, seed=experts)
        weights, ids = run(kernel_backend, moe_kernels.topk_gating,
                           logits.to(device_of(kernel_backend)), k, renormalize=True)
        ref_weights, ref_ids = reference.topk_gating(logits, k, renormalize=True)
        assert torch.equal(ids.cpu(), ref_ids)
        torch.testing.assert_close(weights.cpu(), ref_weights, **WEIGHT_TOL)


def test_ties_go_to_lower_expert(backend):
    # Every row is a few distinct values repeated: most selections are ties.
    logits = torch.tensor([[1.0] * 8, [0.0, 2.0, 2.0, 1.0, 2.0, 0.0, 1.0, 2.0],
                           [-0.0, 0.0, -0.0, 0.0, -1.0, -1.0, -1.0, -1.0]])
    weights, ids = run(backend, moe_kernels.topk_gating, logits.to(device_of(backend)), 5)
    assert ids.cpu().tolist() == [[0, 1, 2, 3, 4], [1, 2, 4, 7, 3], [0, 1, 2, 3, 4]]
    assert torch.all(weights[0].cpu() == 0.125)


def test_bf16_ties_match_reference(kernel_backend):
    # bfloat16 logits rounded to a coarse grid tie often.
    logits = (torch.randn(257, 64) * 4).round().to(torch.bfloat16)
    _, ids = run(kernel_backend, moe_kernels.topk_gating, logits.to(device_of(kernel_backend)), 8)
    assert torch.equal(ids.cpu(), reference.topk_gating(logits, 8)[1])


@pytest.mark.parametrize("renormalize", [False, True])
def test_nan_logits(backend, renormalize):
    logits = torch.randn(3, 16)
    logits[1, 0] = float("nan")
    logits[1, 5] = 100.0
    weights, ids = run(backend, moe_kernels.topk_gating, logits.to(device_of(backend)), 16,
                       renormalize=renormalize)
    weights, ids = weights.cpu(), ids.cpu()
    assert ids[1, 0] == 5 and ids[1, -1] == 0  # NaN ranks last
    assert torch.isnan(weights[1]).all()       # and poisons its token's weights
    assert torch.isfinite(weights[[0, 2]]).all()


def test_weights_descend_and_sum(kernel_backend):
    logits = make_logits(64, 128, torch.float32)
    weights, _ = run(kernel_backend, moe_kernels.topk_gating, logits.to(device_of(kernel_backend)),
                     8, renormalize=True)
    weights = weights.cpu()
    assert torch.all(weights[:, :-1] >= weights[:, 1:])
    torch.testing.assert_close(weights.sum(1), torch.ones(64))


def test_deterministic(kernel_backend):
    logits = make_logits(257, 384, torch.bfloat16).to(device_of(kernel_backend))
    first = run(kernel_backend, moe_kernels.topk_gating, logits, 8)
    second = run(kernel_backend, moe_kernels.topk_gating, logits, 8)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_unaligned_rows_use_scalar_loads(kernel_backend):
    # A view that starts one element in: 16-byte vector loads would be misaligned.
    base = make_logits(9 * 64 + 1, 1, torch.float32).view(-1)
    logits = base[1:].view(9, 64)
    assert logits.data_ptr() % 16 != 0
    weights, ids = run(kernel_backend, moe_kernels.topk_gating, logits.to(device_of(kernel_backend)), 4)
    ref_weights, ref_ids = reference.topk_gating(logits, 4)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_weights, **WEIGHT_TOL)


# ----------------------------------------------------------------------------------------
# Bad input: each argument that is validated raises an error that names it.

@pytest.mark.parametrize("logits,error,match", [
    ([[1.0, 2.0]], TypeError, "logits: expected a torch.Tensor"),
    (torch.randn(4, 8, dtype=torch.float64), TypeError, "logits: expected dtype"),
    (torch.randint(0, 3, (4, 8)), TypeError, "logits: expected dtype"),
    (torch.randn(8), ValueError, "logits: expected a 2-D tensor"),
    (torch.randn(2, 4, 8), ValueError, "logits: expected a 2-D tensor"),
    (torch.randn(8, 4).t(), ValueError, "logits: expected a contiguous tensor"),
    (torch.randn(4, 0), ValueError, "logits: expected 1 to 4096 experts"),
    (torch.randn(1, 4097), ValueError, "logits: expected 1 to 4096 experts"),
])
def test_bad_logits(backend, logits, error, match):
    if isinstance(logits, torch.Tensor):
        logits = logits.to(device_of(backend))
    with pytest.raises(error, match=match):
        run(backend, moe_kernels.topk_gating, logits, 1)


@pytest.mark.parametrize("k,error", [(0, ValueError), (9, ValueError), (-1, ValueError),
                                     (2.0, TypeError), (True, TypeError)])
def test_bad_k(backend, k, error):
    with pytest.raises(error, match="k: expected"):
        run(backend, moe_kernels.topk_gating, torch.randn(4, 8, device=device_of(backend)), k)


def test_bad_renormalize(backend):
    with pytest.raises(TypeError, match="renormalize: expected a bool"):
        run(backend, moe_kernels.topk_gating, torch.randn(4, 8, device=device_of(backend)), 2,
            renormalize="yes")


def test_wrong_device_for_backend():
    with pytest.raises(ValueError, match="logits: backend 'simt' runs CPU tensors"):
        run("simt", moe_kernels.topk_gating, torch.randn(4, 8, device="meta"), 2)
    with pytest.raises(ValueError, match="logits: backend 'cuda' runs CUDA tensors"):
        run("cuda", moe_kernels.topk_gating, torch.randn(4, 8), 2)


@pytest.mark.parametrize("logits,k,match", [
    (torch.randn(4, 8, device="meta"), 2, "logits: expected a CPU tensor for the simt backend"),
    (torch.randn(4, 8, dtype=torch.float64), 2, "logits: expected float32, float16 or bfloat16"),
    (torch.randn(8, 4).t(), 2, "logits: expected a contiguous tensor"),
    (torch.randn(4, 8), 9, "k: expected 1 <= k <= num_experts"),
    (torch.randn(8), 1, "logits: expected 2-D"),
])
def test_native_adapter_checks(logits, k, match):
    """The C++ adapter validates on its own too: a direct call never crashes."""
    with pytest.raises((ValueError, TypeError), match=match):
        native("simt").topk_gating(logits, k, False)
