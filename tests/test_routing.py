"""Routing: softmax top-k, sigmoid scoring, selection bias, group-limited
choice, scaling (kernels vs reference vs a naive per-token loop), the backward kernel vs
torch.autograd through the reference, router statistics and losses, the bias update,
expert-choice and hash routing, and bad input."""

import math
from collections import Counter

import pytest
import torch

import moe_kernels
from moe_kernels import emulator, reference
from conftest import device_of, misaligned_copy, native, needs_observer, run

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRID_EXPERTS = [3, 8, 60, 64, 128, 160, 256, 384, 512, 1000, 4096]
GRID_KS = [1, 2, 4, 6, 8, 10, 22, 32]
# (scoring, with bias) combinations.
SCORINGS = [("softmax", False), ("softmax", True), ("sigmoid", False), ("sigmoid", True)]
# With sqrtsoftplus too (the kernel grids keep the four above: emulated time).
ALL_SCORINGS = SCORINGS + [("sqrtsoftplus", False), ("sqrtsoftplus", True)]

# Weights: float32 arithmetic on exactly converted logits in every implementation; they
# differ only in exp()/sigmoid rounding and summation order, a few float32 ulp of values
# <= 1 (measured <= 1.2e-7 absolute). rtol 1e-5 leaves room for the GPU's expf (2 ulp);
# atol scales with scaling_factor.
def weight_tol(scaling_factor=1.0):
    return dict(rtol=1e-5, atol=1e-6 * max(1.0, abs(scaling_factor)))


# Selection on computed values (score + bias, group scores) can flip between
# implementations only where two values are closer than their rounding error: a few
# float32 ulp of values below ~4 (<= 2e-6; the GPU's expf alone is up to 2 ulp from the
# host's, and the products and sums after it round alike on both targets, as nvcc builds
# with -fmad=false). Tokens whose deciding gap is below this margin
# are not compared on ids (ties, gap 0, are exact in all implementations: equal inputs give
# equal values, and the lower index wins everywhere).
SELECTION_MARGIN = 1e-5


def naive_topk_gating(logits, k, scoring="softmax", bias=None, num_groups=1, topk_groups=None,
                      group_scoring="top2_sum", renormalize=False, scaling_factor=1.0):
    """Independent oracle: float64 math and Python sorts per token. Also returns, per
    token, the smallest nonzero gap between computed values whose order decides the output
    (inf when only exact logit comparisons decide it)."""
    num_experts = logits.shape[1]
    group_size = num_experts // num_groups
    topk_groups = topk_groups or num_groups
    b = bias.double().tolist() if bias is not None else [0.0] * num_experts
    key = lambda v: float("-inf") if math.isnan(v) else v  # noqa: E731
    all_w, all_ids, margins = [], [], []
    for row in logits.double().tolist():
        if scoring == "softmax":
            finite_max = max((v for v in row if not math.isnan(v)), default=float("nan"))
            exps = [math.exp(v - finite_max) for v in row]
            scores = [e / sum(exps) for e in exps]
        elif scoring == "sigmoid":
            scores = [0.5 * (1.0 + math.tanh(v / 2.0)) for v in row]  # sigmoid, no overflow
        else:  # sqrt(softplus(v)); log1p(e^v) = v + log1p(e^-v) avoids overflow
            scores = [math.sqrt(v + math.log1p(math.exp(-v)) if v > 0 else math.log1p(math.exp(v)))
                      if not math.isnan(v) else float("nan") for v in row]
        biased = [scores[e] + b[e] for e in range(num_experts)]
        selection = biased if bias is not None else row
        gaps = []
        eligible = range(num_experts)
        if num_groups > 1:
            group_score = []
            for n in range(num_groups):
                top = sorted((key(v) for v in biased[n * group_size:(n + 1) * group_size]), reverse=True)
                topn = 1 if group_scoring == "max" else int(group_scoring[3:-4])
                group_score.append(sum(top[:topn]))
            order = sorted(range(num_groups), key=lambda n: (-key(group_score[n]), n))
            if topk_groups < num_groups:
                gaps.append(group_score[order[topk_groups - 1]] - group_score[order[topk_groups]])
            eligible = [e for n in sorted(order[:topk_groups])
                        for e in range(n * group_size, (n + 1) * group_size)]
        ranked = sorted(eligible, key=lambda e: (-key(selection[e]), e))
        ids = ranked[:k]
        if bias is not None:
            deciding = [key(selection[e]) for e in ranked[:k + 1]]
            gaps += [u - v for u, v in zip(deciding, deciding[1:])]
        w = [scores[e] for e in ids]
        if renormalize:
            w = [v / sum(w) for v in w]
        w = [v * scaling_factor for v in w]
        if any(math.isnan(v) for v in row):
            w = [float("nan")] * k
        all_w.append(w)
        all_ids.append(ids)
        margins.append(min((g for g in gaps if g > 0), default=float("inf")))
    return (torch.tensor(all_w, dtype=torch.float64).view(-1, k),
            torch.tensor(all_ids, dtype=torch.int32).view(-1, k),
            torch.tensor(margins, dtype=torch.float64))


def make_logits(tokens, experts, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, experts, generator=g) * 2).to(dtype)


def make_bias(experts, seed=1):
    # The scale of DeepSeek-V3's learned correction bias relative to sigmoid scores.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(experts, generator=g) * 0.1


def assert_routing_matches(weights, ids, expected_weights, expected_ids, margins, scaling_factor=1.0):
    """ids equal and weights close on the tokens whose decision is well separated; at
    least half of the tokens must be compared (else the test shape says nothing)."""
    decided = margins > SELECTION_MARGIN
    assert decided.float().mean() >= 0.5, f"only {int(decided.sum())}/{len(decided)} tokens decidable"
    assert torch.equal(ids.cpu()[decided], expected_ids[decided])
    torch.testing.assert_close(weights.cpu()[decided].double(), expected_weights[decided].double(),
                               **weight_tol(scaling_factor))


def group_config(experts, k):
    """A group-limited configuration valid for (experts, k), or None: the first of 8, 4, 3,
    2 groups dividing E with at least 2 experts each, half of them eligible (more if k
    needs it)."""
    for groups in (8, 4, 3, 2):
        if experts % groups == 0 and experts // groups >= 2:
            size = experts // groups
            topk_groups = max(groups // 2, -(-k // size))
            if topk_groups <= groups:
                return groups, topk_groups
    return None


# ----------------------------------------------------------------------------------------
# Plain softmax top-k (the Mixtral / Qwen / OLMoE router).

EXPERTS = [1, 2, 8, 60, 64, 160, 256, 384, 512]
KS = [1, 2, 6, 8]
TOKENS = [0, 1, 3, 257]



def naive_softmax_topk(logits, k, renormalize):
    """Independent oracle for plain softmax top-k: float64 softmax and a Python sort per token."""
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



@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts,k", [(e, k) for e in [1, 3, 8, 60, 160] for k in KS if k <= e])
def test_softmax_reference_matches_naive_loop(experts, k, dtype, renormalize):
    logits = make_logits(37, experts, dtype)
    weights, ids = reference.topk_gating(logits, k, renormalize=renormalize)
    naive_weights, naive_ids = naive_softmax_topk(logits, k, renormalize)
    assert torch.equal(ids, naive_ids)
    torch.testing.assert_close(weights.double(), naive_weights, **weight_tol())


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("experts,k", [(e, k) for e in EXPERTS for k in KS if k <= e])
def test_softmax_kernel_matches_reference(kernel_backend, experts, k, dtype, renormalize):
    for tokens in TOKENS:
        logits = make_logits(tokens, experts, dtype, seed=experts * 100 + k)
        weights, ids = run(kernel_backend, moe_kernels.topk_gating,
                           logits.to(device_of(kernel_backend)), k, renormalize=renormalize)
        ref_weights, ref_ids = reference.topk_gating(logits, k, renormalize=renormalize)
        assert weights.dtype == torch.float32 and ids.dtype == torch.int32
        assert weights.shape == ids.shape == (tokens, k)
        assert torch.equal(ids.cpu(), ref_ids), f"T={tokens}"
        torch.testing.assert_close(weights.cpu(), ref_weights, **weight_tol())


@pytest.mark.parametrize("experts,k", [(1000, 8), (4096, 32), (3, 3), (512, 512)])
def test_kernel_large_and_full_k(kernel_backend, experts, k):
    for dtype in DTYPES:
        logits = make_logits(5, experts, dtype, seed=experts)
        weights, ids = run(kernel_backend, moe_kernels.topk_gating,
                           logits.to(device_of(kernel_backend)), k, renormalize=True)
        ref_weights, ref_ids = reference.topk_gating(logits, k, renormalize=True)
        assert torch.equal(ids.cpu(), ref_ids)
        torch.testing.assert_close(weights.cpu(), ref_weights, **weight_tol())


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
    # Rows that start one element in: 16-byte vector loads would be misaligned.
    logits = make_logits(9, 64, torch.float32)
    weights, ids = run(kernel_backend, moe_kernels.topk_gating,
                       misaligned_copy(logits, device_of(kernel_backend)), 4)
    ref_weights, ref_ids = reference.topk_gating(logits, 4)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_weights, **weight_tol())


# ----------------------------------------------------------------------------------------
# The reference against the naive loop.

@pytest.mark.parametrize("scoring,with_bias", ALL_SCORINGS)
@pytest.mark.parametrize("experts,k", [(3, 2), (8, 2), (60, 4), (160, 6), (256, 8), (384, 8)])
def test_reference_matches_naive_loop(experts, k, scoring, with_bias):
    bias = make_bias(experts) if with_bias else None
    for renormalize, scaling in ((False, 1.0), (True, 2.5)):
        for dtype in DTYPES:
            logits = make_logits(23, experts, dtype, seed=experts + k)
            cfg = dict(scoring=scoring, bias=bias, renormalize=renormalize, scaling_factor=scaling)
            w, ids = reference.topk_gating(logits, k, **cfg)
            assert_routing_matches(w, ids, *naive_topk_gating(logits, k, **cfg), scaling)


@pytest.mark.parametrize("group_scoring", ["top2_sum", "max", "top3_sum"])
@pytest.mark.parametrize("scoring,with_bias", ALL_SCORINGS)
@pytest.mark.parametrize("experts,k,groups,topk_groups", [
    (8, 2, 4, 2), (60, 4, 6, 3), (160, 6, 8, 3), (256, 8, 8, 4), (384, 10, 12, 1)])
def test_reference_groups_match_naive_loop(experts, k, groups, topk_groups, scoring, with_bias,
                                           group_scoring):
    bias = make_bias(experts) if with_bias else None
    if group_scoring == "top3_sum" and experts // groups < 3:
        group_scoring = f"top{experts // groups}_sum"  # the whole group
    for dtype in DTYPES:
        logits = make_logits(23, experts, dtype, seed=experts)
        cfg = dict(scoring=scoring, bias=bias, num_groups=groups, topk_groups=topk_groups,
                   group_scoring=group_scoring, renormalize=True)
        w, ids = reference.topk_gating(logits, k, **cfg)
        assert_routing_matches(w, ids, *naive_topk_gating(logits, k, **cfg))


# ----------------------------------------------------------------------------------------
# Kernels against the reference, over the grid.

def grid_pairs():
    return [(e, k) for e in GRID_EXPERTS for k in GRID_KS if k <= e]


def check_kernel(kernel_backend, logits, k, **cfg):
    w, ids = run(kernel_backend, moe_kernels.topk_gating, logits.to(device_of(kernel_backend)), k, **cfg)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == (logits.shape[0], k)
    ref_w, ref_ids = reference.topk_gating(logits, k, **cfg)
    naive_w, naive_ids, margins = naive_topk_gating(logits, k, **cfg)
    scaling = cfg.get("scaling_factor", 1.0)
    assert_routing_matches(w, ids, ref_w, ref_ids, margins, scaling)
    # The oracle is already computed: the reference is checked on the whole grid too.
    assert_routing_matches(ref_w, ref_ids, naive_w, naive_ids, margins, scaling)


@pytest.mark.parametrize("experts,k", grid_pairs())
def test_kernel_grid(kernel_backend, experts, k):
    # Emulated cost grows with E: fewer tokens for wide rows (odd counts: partial blocks).
    tokens = 7 if experts <= 512 else 3
    for i, (scoring, with_bias) in enumerate(SCORINGS):
        for j, dtype in enumerate(DTYPES):
            logits = make_logits(tokens, experts, dtype, seed=experts * 100 + k * 10 + i)
            bias = make_bias(experts, seed=k) if with_bias else None
            renormalize = (i + j) % 2 == 0
            check_kernel(kernel_backend, logits, k, scoring=scoring, bias=bias,
                         renormalize=renormalize, scaling_factor=1.0 if j != 1 else 2.5)


@pytest.mark.parametrize("experts,k", [p for p in grid_pairs() if group_config(*p)])
def test_kernel_grid_groups(kernel_backend, experts, k):
    groups, topk_groups = group_config(experts, k)
    tokens = 5 if experts <= 512 else 2
    for i, (scoring, with_bias) in enumerate(SCORINGS):
        for j, dtype in enumerate(DTYPES):
            logits = make_logits(tokens, experts, dtype, seed=experts + k + i)
            bias = make_bias(experts, seed=k) if with_bias else None
            group_scoring = "top2_sum" if (i + j) % 2 == 0 else "max"
            check_kernel(kernel_backend, logits, k, scoring=scoring, bias=bias, num_groups=groups,
                         topk_groups=topk_groups, group_scoring=group_scoring,
                         renormalize=j != 2, scaling_factor=2.5)


@pytest.mark.parametrize("preset", [
    # DeepSeek-V3, DeepSeek-V2, Kimi K2, Qwen3-Next (DESIGN.md section 6)
    (256, 8, dict(scoring="sigmoid", bias=True, num_groups=8, topk_groups=4,
                  group_scoring="top2_sum", renormalize=True, scaling_factor=2.5)),
    (160, 6, dict(scoring="softmax", num_groups=8, topk_groups=3, group_scoring="max",
                  scaling_factor=16.0)),
    (384, 8, dict(scoring="sigmoid", bias=True, renormalize=True, scaling_factor=2.827)),
    (512, 10, dict(scoring="softmax", renormalize=True)),
], ids=["deepseek-v3", "deepseek-v2", "kimi-k2", "qwen3-next"])
def test_kernel_model_presets(kernel_backend, preset):
    experts, k, cfg = preset
    cfg = dict(cfg, bias=make_bias(experts) if cfg.get("bias") else None)
    for dtype in DTYPES:
        check_kernel(kernel_backend, make_logits(67, experts, dtype, seed=experts), k, **cfg)


def test_group_limit_keeps_choice_inside_best_groups(backend):
    # Property check without an oracle: every chosen expert lies in one of topk_groups groups.
    logits = make_logits(33, 256, seed=5)
    _, ids = run(backend, moe_kernels.topk_gating, logits.to(device_of(backend)), 8,
                 scoring="sigmoid", num_groups=8, topk_groups=2)
    for row in ids.cpu().tolist():
        assert len({e // 32 for e in row}) <= 2


def test_bias_steers_selection_not_weights(backend):
    logits = make_logits(9, 64, seed=3)
    bias = torch.zeros(64)
    bias[41] = 10.0  # expert 41 wins every token whatever its logit
    dev = device_of(backend)
    for scoring in ("softmax", "sigmoid"):
        w, ids = run(backend, moe_kernels.topk_gating, logits.to(dev), 2, scoring=scoring,
                     bias=bias.to(dev))
        assert (ids[:, 0].cpu() == 41).all()
        unbiased = reference.routing_scores(logits, scoring)
        torch.testing.assert_close(w.cpu(), unbiased.gather(1, ids.cpu().long()), **weight_tol())


def test_gpt_oss_is_softmax_renormalize(backend):
    # GPT-OSS: top-k of the logits, then softmax over the k selected logits.
    logits = make_logits(41, 128, seed=7)
    top = torch.topk(logits, 4, dim=-1)
    gpt_oss_weights = torch.softmax(top.values, dim=-1)
    w, ids = run(backend, moe_kernels.topk_gating, logits.to(device_of(backend)), 4,
                 scoring="softmax", renormalize=True)
    assert torch.equal(ids.cpu().long(), top.indices)
    torch.testing.assert_close(w.cpu(), gpt_oss_weights, **weight_tol())


@pytest.mark.parametrize("experts", [16, 128])
def test_llama4_is_sigmoid_top1(backend, experts):
    # Llama 4: the argmax expert, weighted by the sigmoid of its logit, no renormalize.
    logits = make_logits(41, experts, seed=experts)
    best = logits.max(dim=-1)
    w, ids = run(backend, moe_kernels.topk_gating, logits.to(device_of(backend)), 1, scoring="sigmoid")
    assert torch.equal(ids.cpu()[:, 0].long(), best.indices)
    torch.testing.assert_close(w.cpu()[:, 0], torch.sigmoid(best.values), **weight_tol())


def test_ties_with_bias_and_groups_go_to_lower_index(backend):
    dev = device_of(backend)
    logits = torch.zeros(2, 16, device=dev)  # every expert and every group ties
    _, ids = run(backend, moe_kernels.topk_gating, logits, 3, scoring="sigmoid",
                 bias=torch.zeros(16, device=dev), num_groups=4, topk_groups=2)
    assert ids.cpu().tolist() == [[0, 1, 2]] * 2
    # Groups 1 and 3 tie above the rest: the lower (1) and then 3 stay eligible.
    logits[:, 4:8] = 1.0
    logits[:, 12:16] = 1.0
    _, ids = run(backend, moe_kernels.topk_gating, logits, 6, scoring="sigmoid",
                 num_groups=4, topk_groups=2, group_scoring="max")
    assert ids.cpu().tolist() == [[4, 5, 6, 7, 12, 13]] * 2


@pytest.mark.parametrize("scoring,with_bias", SCORINGS)
def test_nan_logits_rank_last_and_poison_the_token(backend, scoring, with_bias):
    dev = device_of(backend)
    logits = make_logits(3, 16, seed=2)
    logits[1, 0] = float("nan")
    logits[1, 5] = 100.0
    bias = torch.zeros(16) if with_bias else None
    cfg = dict(scoring=scoring, bias=bias, renormalize=True)
    w, ids = run(backend, moe_kernels.topk_gating, logits.to(dev), 16,
                 **dict(cfg, bias=bias.to(dev) if with_bias else None))
    w, ids = w.cpu(), ids.cpu()
    if scoring == "softmax" and with_bias:
        # score + bias: a NaN logit makes every softmax score of its token NaN, so all
        # selection values rank as -inf and the ties go in index order.
        assert ids[1].tolist() == list(range(16))
    else:
        assert ids[1, 0] == 5 and ids[1, -1] == 0  # the NaN logit ranks last
    assert torch.isnan(w[1]).all() and torch.isfinite(w[[0, 2]]).all()
    assert torch.equal(ids, reference.topk_gating(logits, 16, **cfg)[1])


def test_grouped_deterministic(kernel_backend):
    logits = make_logits(129, 256, torch.bfloat16).to(device_of(kernel_backend))
    cfg = dict(scoring="sigmoid", bias=make_bias(256).to(logits.device), num_groups=8, topk_groups=4)
    first = run(kernel_backend, moe_kernels.topk_gating, logits, 8, **cfg)
    second = run(kernel_backend, moe_kernels.topk_gating, logits, 8, **cfg)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ----------------------------------------------------------------------------------------
# Backward: the kernel against torch.autograd through the reference.

# float32: both sides compute the same closed form in float32 with different rounding
# order; terms are O(1) products of O(1) values (scaling up to 2.5): a few ulp. Half
# types: the gradient is rounded to the logits' dtype, so within one ulp of the dtype
# (2^-8 bfloat16, 2^-11 float16 relative) plus float32 noise near zero.
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-5),
            torch.bfloat16: dict(rtol=8e-3, atol=1e-5)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("renormalize,scaling", [(False, 1.0), (True, 1.0), (True, 2.5), (False, 16.0)])
@pytest.mark.parametrize("experts,k", [(8, 2), (60, 4), (256, 8), (1000, 33)])
def test_backward_matches_autograd(kernel_backend, experts, k, scoring, renormalize, scaling, dtype):
    dev = device_of(kernel_backend)
    logits = make_logits(19, experts, dtype, seed=experts + k)
    grad_w = torch.randn(19, k, generator=torch.Generator().manual_seed(k))
    # Groups and bias change only the selection; the gradient follows the chosen ids.
    cfg = dict(scoring=scoring, renormalize=renormalize, scaling_factor=scaling)
    if experts == 256:
        cfg.update(bias=make_bias(256), num_groups=8, topk_groups=4)

    ref_logits = logits.clone().requires_grad_(True)
    ref_w, ref_ids = reference.topk_gating(ref_logits, k, **cfg)
    (ref_w * grad_w).sum().backward()

    kernel_logits = logits.to(dev).requires_grad_(True)
    if "bias" in cfg:
        cfg["bias"] = cfg["bias"].to(dev).requires_grad_(True)
    w, ids = run(kernel_backend, moe_kernels.topk_gating, kernel_logits, k, **cfg)
    assert torch.equal(ids.cpu(), ref_ids)
    (w * grad_w.to(dev)).sum().backward()
    assert kernel_logits.grad.dtype == dtype
    torch.testing.assert_close(kernel_logits.grad.cpu(), ref_logits.grad, **GRAD_TOL[dtype])
    if "bias" in cfg:
        assert cfg["bias"].grad is None  # selection only: no gradient


def test_backward_softmax_renormalize_zero_off_selection(kernel_backend):
    # Renormalized softmax weights are a softmax over the chosen logits only.
    logits = make_logits(5, 64).to(device_of(kernel_backend)).requires_grad_(True)
    w, ids = run(kernel_backend, moe_kernels.topk_gating, logits, 4, renormalize=True)
    w[:, 0].sum().backward()
    grad = logits.grad.cpu()
    off = torch.ones_like(grad, dtype=torch.bool).scatter_(1, ids.cpu().long(), False)
    assert grad[off].abs().max() == 0


def test_backward_empty(kernel_backend):
    logits = torch.zeros(0, 8, device=device_of(kernel_backend), requires_grad=True)
    w, _ = run(kernel_backend, moe_kernels.topk_gating, logits, 2)
    w.sum().backward()
    assert logits.grad.shape == (0, 8)


def test_backward_adapter_checks():
    mod = native("simt")
    logits, ids, g = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int32), torch.zeros(4, 2)
    with pytest.raises(TypeError, match="ids: expected dtype"):
        mod.topk_gating_backward(g, logits, ids.long(), "softmax", False, 1.0)
    with pytest.raises(ValueError, match="ids: expected shape"):
        mod.topk_gating_backward(g, logits, ids[:3], "softmax", False, 1.0)
    with pytest.raises(ValueError, match="grad_weights: expected shape"):
        mod.topk_gating_backward(torch.zeros(4, 1), logits, ids, "softmax", False, 1.0)
    with pytest.raises(ValueError, match="scoring: expected"):
        mod.topk_gating_backward(g, logits, ids, "relu", False, 1.0)
    # ids out of range are skipped, never read or written out of bounds
    out = mod.topk_gating_backward(torch.ones(4, 2), logits, ids - 5, "sigmoid", False, 1.0)
    assert torch.equal(out, torch.zeros(4, 8))


# ----------------------------------------------------------------------------------------
# Renormalized weights where every chosen score underflows; their gradient.

def log_score64(v, scoring):
    """float64 log of the score (up to a per-token constant for softmax)."""
    if scoring == "softmax":
        return v
    if scoring == "sigmoid":
        return min(v, 0.0) - math.log1p(math.exp(-abs(v)))
    softplus = v + math.log1p(math.exp(-v)) if v > 0 else math.log1p(math.exp(v))
    return 0.5 * (math.log(softplus) if softplus > 1e-300 else v)


def dlog_score64(v, scoring):
    """d log(score) / dx in float64 (softmax: 1 on the chosen logits, renormalized)."""
    if scoring == "softmax":
        return 1.0
    if scoring == "sigmoid":
        return 1.0 / (1.0 + math.exp(v)) if v < 700 else 0.0  # 1 - sigmoid(v)
    sig = math.exp(v) / (1.0 + math.exp(v)) if v < 0 else 1.0 / (1.0 + math.exp(-v))
    softplus = math.log1p(math.exp(v))
    return 0.5 * (sig / softplus if softplus > 1e-300 else 1.0)


@pytest.mark.parametrize("scoring", ["sigmoid", "sqrtsoftplus", "softmax"])
def test_renormalized_weights_where_scores_underflow(backend, scoring):
    # sigmoid(x) underflows to 0 below about -88 (sqrtsoftplus: e^(x/2) below -206), so
    # s_j / sum s would be 0 / 0; w_j = exp(l_j - max l) / sum exp(l_i - max l) is finite.
    # Softmax selects the best logits, which never underflow; it is here as the control.
    g = torch.Generator().manual_seed(11)
    logits = -100.0 - 100.0 * torch.rand(6, 16, generator=g)
    if scoring == "sqrtsoftplus":
        logits = logits * 2.5  # -250 .. -500: e^(x/2) underflows too
    logits[0, :4] = torch.tensor([-150.0, -150.0, -151.0, -200.0])
    grad_w = torch.randn(6, 4, generator=g)
    x = logits.clone().to(device_of(backend)).requires_grad_(True)
    w, ids = run(backend, moe_kernels.topk_gating, x, 4, scoring=scoring, renormalize=True,
                 scaling_factor=2.0)
    (w * grad_w.to(x.device)).sum().backward()
    assert torch.isfinite(w).all() and torch.isfinite(x.grad).all()
    expected_ids = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :4]
    assert torch.equal(ids.cpu().long(), expected_ids)
    expected_w = torch.zeros(6, 4, dtype=torch.float64)
    expected_grad = torch.zeros(6, 16, dtype=torch.float64)
    for t in range(6):
        chosen = [logits[t, e].item() for e in expected_ids[t]]
        ls = [log_score64(v, scoring) for v in chosen]
        top = max(ls)
        r = [math.exp(v - top) for v in ls]
        r = [v / sum(r) for v in r]
        expected_w[t] = torch.tensor(r) * 2.0
        dot = sum(gj * rj for gj, rj in zip(grad_w[t].tolist(), r))
        for j, e in enumerate(expected_ids[t].tolist()):
            # d w_j / d x_k = c w_j (delta_jk - w_k) l'(x_k), summed against g_j
            expected_grad[t, e] = 2.0 * r[j] * (grad_w[t, j].item() - dot) * dlog_score64(chosen[j], scoring)
    torch.testing.assert_close(w.cpu().double(), expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.cpu().double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scoring", ["sigmoid", "sqrtsoftplus"])
def test_unrenormalized_gradient_where_scores_underflow(kernel_backend, scoring):
    # The backward matches autograd through the reference (finite, no 0 / 0) far out in
    # the tail, where the scores and their derivatives are denormal or 0.
    logits = torch.tensor([[-300.0, -200.0, -60.0, -40.0, -20.0, -14.0, 0.0, 30.0]])
    grad_w = torch.tensor([[1.0, -2.0, 0.5, 1.5, 3.0, -1.0, 2.0, 1.0]])
    ref_x = logits.clone().requires_grad_(True)
    ref_w, _ = reference.topk_gating(ref_x, 8, scoring=scoring)
    (ref_w * grad_w).sum().backward()
    x = logits.clone().to(device_of(kernel_backend)).requires_grad_(True)
    w, _ = run(kernel_backend, moe_kernels.topk_gating, x, 8, scoring=scoring)
    (w * grad_w.to(x.device)).sum().backward()
    assert torch.isfinite(ref_x.grad).all() and torch.isfinite(x.grad).all()
    # atol: values below float32's normal range (1.2e-38) may be flushed on one side
    torch.testing.assert_close(w.cpu(), ref_w, rtol=1e-5, atol=1e-37)
    torch.testing.assert_close(x.grad.cpu(), ref_x.grad, rtol=1e-5, atol=1e-37)
    if scoring == "sqrtsoftplus":  # d/dx sqrt(softplus(x)) = e^(x/2) / 2 in the tail
        order = torch.sort(logits[0], descending=True, stable=True).indices
        grad = torch.zeros(8, dtype=torch.float64).scatter_(0, order, grad_w[0].double())
        slope = torch.tensor([0.5 * math.exp(v / 2) for v in logits[0, 2:4].tolist()], dtype=torch.float64)
        torch.testing.assert_close(x.grad.cpu()[0, 2:4].double(), grad[2:4] * slope, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------
# The native op's own checks, empty inputs with groups, NaN ranking.

def test_native_op_rejects_negative_topk_groups():
    # Python resolves topk_groups=None itself; a negative value reaching the op is an error.
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="topk_groups: expected 1 <= topk_groups <= num_groups"):
        native("simt").topk_gating(logits, 2, False, "softmax", None, 4, -1, "max", 1.0)
    with pytest.raises(Exception, match="topk_groups: expected"):
        torch.ops.moe_kernels.topk_gating("simt", logits, 2, False, "softmax", None, 4, -2,
                                          "max", 1.0)
    # Absent (only possible through pybind): every group stays eligible.
    w, ids = native("simt").topk_gating(logits, 2, False, num_groups=4)
    assert torch.equal(ids, reference.topk_gating(logits, 2)[1])


@pytest.mark.parametrize("group_scoring", ["max", "top2_sum", "top3_sum"])
def test_empty_input_with_groups(backend, group_scoring):
    logits = torch.zeros(0, 12, device=device_of(backend), requires_grad=True)
    bias = torch.zeros(12, device=device_of(backend))
    w, ids = run(backend, moe_kernels.topk_gating, logits, 2, scoring="sigmoid", bias=bias,
                 num_groups=4, topk_groups=2, group_scoring=group_scoring, renormalize=True)
    assert w.shape == ids.shape == (0, 2) and w.dtype == torch.float32 and ids.dtype == torch.int32
    w.sum().backward()
    assert logits.grad.shape == (0, 12)


def test_reference_selection_order_nan_ties_minus_inf():
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[nan, -inf, 1.0, nan, -inf, -2.0, inf, -0.0, 0.0]])
    # numbers first (inf, 1, -0 and 0 tied in index order, -2), then NaN and -inf tied in
    # index order
    assert reference.selection_order(scores, 9).tolist() == [[6, 2, 7, 8, 5, 0, 1, 3, 4]]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_nan_ties_minus_inf_in_index_order(backend, scoring):
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[nan, -inf, 1.0, nan, -inf, -2.0, 3.0, 0.5],
                           [-inf, nan, 1.0, -inf, nan, -2.0, 3.0, 0.5]])
    _, ids = run(backend, moe_kernels.topk_gating, logits.to(device_of(backend)), 8, scoring=scoring)
    assert ids.cpu().tolist() == [[6, 2, 7, 5, 0, 1, 3, 4], [6, 2, 7, 5, 0, 1, 3, 4]]


@pytest.mark.parametrize("group_scoring", ["max", "top2_sum"])
def test_nan_group_ties_minus_inf_group(backend, group_scoring):
    # The bias makes group 1's values NaN and group 2's -inf: the two groups tie, the
    # lower index wins, and inside the kept groups the NaN experts rank last.
    nan, inf = float("nan"), float("-inf")
    dev = device_of(backend)
    logits = torch.tensor([[0.5, -1.0, 2.0, 1.0, 3.0, 0.0, 0.25, -0.5]], device=dev)
    for bias in ([0, 0, nan, nan, inf, inf, 0, 0], [0, 0, inf, inf, nan, nan, 0, 0]):
        _, ids = run(backend, moe_kernels.topk_gating, logits, 6, scoring="sigmoid",
                     bias=torch.tensor(bias, device=dev), num_groups=4, topk_groups=3,
                     group_scoring=group_scoring)
        assert ids.cpu().tolist() == [[0, 6, 7, 1, 2, 3]]


# ----------------------------------------------------------------------------------------
# Accepting what users pass: leading dimensions, views, float64 logits, half-type bias.

def test_leading_dimensions(backend):
    dev = device_of(backend)
    logits = make_logits(2 * 3 * 5, 64, seed=21).view(2, 3, 5, 64)
    bias = make_bias(64)
    cfg = dict(scoring="sigmoid", bias=bias.to(dev), num_groups=8, topk_groups=4, renormalize=True)
    w, ids = run(backend, moe_kernels.topk_gating, logits.to(dev), 6, **cfg)
    flat_w, flat_ids = run(backend, moe_kernels.topk_gating, logits.reshape(-1, 64).to(dev), 6, **cfg)
    assert w.shape == ids.shape == (2, 3, 5, 6)
    assert torch.equal(w.reshape(-1, 6), flat_w) and torch.equal(ids.reshape(-1, 6), flat_ids)
    single_w, single_ids = run(backend, moe_kernels.topk_gating, logits[1, 2, 3].to(dev), 6, **cfg)
    assert single_w.shape == (6,) and torch.equal(single_ids, flat_ids[1 * 15 + 2 * 5 + 3])


@pytest.mark.parametrize("scoring,renormalize", [("softmax", False), ("sigmoid", True)])
def test_leading_dimensions_backward(backend, scoring, renormalize):
    dev = device_of(backend)
    logits = make_logits(12, 32, seed=22)
    grad_w = torch.randn(12, 4, generator=torch.Generator().manual_seed(3))
    ref = logits.clone().requires_grad_(True)
    ref_w, _ = reference.topk_gating(ref, 4, scoring=scoring, renormalize=renormalize)
    (ref_w * grad_w).sum().backward()
    x = logits.view(3, 4, 32).to(dev).requires_grad_(True)
    w, _ = run(backend, moe_kernels.topk_gating, x, 4, scoring=scoring, renormalize=renormalize)
    (w * grad_w.view(3, 4, 4).to(dev)).sum().backward()
    assert x.grad.shape == (3, 4, 32)
    torch.testing.assert_close(x.grad.cpu().reshape(12, 32), ref.grad, **GRAD_TOL[torch.float32])


def test_non_contiguous_logits(backend):
    dev = device_of(backend)
    wide = make_logits(9, 128, seed=23).to(dev)
    for view in (wide[:, ::2], wide.t().contiguous().t()[:, :64], wide[::3, 32:96]):
        assert not view.is_contiguous()
        w, ids = run(backend, moe_kernels.topk_gating, view, 5, scoring="sigmoid", renormalize=True)
        ref_w, ref_ids = run(backend, moe_kernels.topk_gating, view.contiguous(), 5,
                             scoring="sigmoid", renormalize=True)
        assert torch.equal(w, ref_w) and torch.equal(ids, ref_ids)


def test_float64_logits(backend):
    dev = device_of(backend)
    logits = make_logits(7, 60, torch.float64, seed=24).to(dev).requires_grad_(True)
    w, ids = run(backend, moe_kernels.topk_gating, logits, 4, renormalize=True)
    as_float = logits.detach().float().requires_grad_(True)
    w32, ids32 = run(backend, moe_kernels.topk_gating, as_float, 4, renormalize=True)
    assert w.dtype == torch.float32 and torch.equal(w, w32) and torch.equal(ids, ids32)
    grad_w = torch.randn(7, 4, generator=torch.Generator().manual_seed(5)).to(dev)
    (w * grad_w).sum().backward()
    (w32 * grad_w).sum().backward()
    assert logits.grad.dtype == torch.float64
    assert torch.equal(logits.grad, as_float.grad.double())


@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_bias_of_other_float_types(backend, bias_dtype):
    dev = device_of(backend)
    logits = make_logits(11, 64, seed=25).to(dev)
    bias = make_bias(64).to(bias_dtype).to(dev)
    cfg = dict(scoring="sigmoid", num_groups=8, topk_groups=4, renormalize=True)
    w, ids = run(backend, moe_kernels.topk_gating, logits, 8, bias=bias, **cfg)
    w32, ids32 = run(backend, moe_kernels.topk_gating, logits, 8, bias=bias.float(), **cfg)
    assert torch.equal(w, w32) and torch.equal(ids, ids32)
    strided = torch.stack([bias.float(), bias.float()], 1)[:, 0]  # a non-contiguous view
    w_view, ids_view = run(backend, moe_kernels.topk_gating, logits, 8, bias=strided, **cfg)
    assert torch.equal(w_view, w32) and torch.equal(ids_view, ids32)


# ----------------------------------------------------------------------------------------
# Variants: group score = sum of the top n values, sqrtsoftplus scores.

@pytest.mark.parametrize("experts,k,groups,topk_groups,group_scoring", [
    (64, 4, 8, 3, "top1_sum"), (64, 6, 8, 3, "top3_sum"), (64, 6, 8, 2, "top8_sum"),
    (256, 8, 8, 4, "top4_sum"), (60, 4, 6, 2, "top10_sum"), (512, 8, 16, 4, "top5_sum")])
def test_kernel_group_topn(kernel_backend, experts, k, groups, topk_groups, group_scoring):
    for i, (scoring, with_bias) in enumerate(ALL_SCORINGS):
        dtype = DTYPES[i % 3]
        logits = make_logits(5, experts, dtype, seed=experts + i)
        bias = make_bias(experts, seed=i) if with_bias else None
        check_kernel(kernel_backend, logits, k, scoring=scoring, bias=bias, num_groups=groups,
                     topk_groups=topk_groups, group_scoring=group_scoring, renormalize=i % 2 == 0,
                     scaling_factor=2.5)


def test_group_max_equals_top1_sum(backend):
    logits = make_logits(9, 64, seed=26).to(device_of(backend))
    cfg = dict(scoring="sigmoid", bias=make_bias(64).to(logits.device), num_groups=8, topk_groups=2)
    first = run(backend, moe_kernels.topk_gating, logits, 6, group_scoring="max", **cfg)
    second = run(backend, moe_kernels.topk_gating, logits, 6, group_scoring="top1_sum", **cfg)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("experts,k", [(8, 2), (60, 4), (256, 8), (1000, 33), (4096, 8)])
def test_kernel_sqrtsoftplus(kernel_backend, experts, k):
    tokens = 5 if experts <= 512 else 2
    for j, dtype in enumerate(DTYPES):
        logits = make_logits(tokens, experts, dtype, seed=experts + j)
        bias = make_bias(experts, seed=k) if j != 1 else None
        check_kernel(kernel_backend, logits, k, scoring="sqrtsoftplus", bias=bias,
                     renormalize=j != 0, scaling_factor=2.5 if j == 2 else 1.0)


# ----------------------------------------------------------------------------------------
# Router statistics, losses and the bias update.

@pytest.mark.parametrize("experts,shape", [(8, (37, 2)), (160, (257, 6)), (4096, (65, 32)),
                                           (5000, (3000,)), (3, (0, 2)),
                                           (20000, (4000,))])  # > 12288: global counters
def test_router_stats(backend, experts, shape):
    g = torch.Generator().manual_seed(experts)
    ids = torch.randint(-1, experts, shape, generator=g, dtype=torch.int32)  # -1: not counted
    counts = run(backend, moe_kernels.router_stats, ids.to(device_of(backend)), experts)
    assert counts.dtype == torch.int32 and counts.shape == (experts,)
    naive = Counter(e for e in ids.flatten().tolist() if e >= 0)
    assert counts.cpu().tolist() == [naive[e] for e in range(experts)]


def test_router_stats_counts_topk_ids(kernel_backend):
    logits = make_logits(513, 64, seed=4)
    _, ids = reference.topk_gating(logits, 8)
    counts = run(kernel_backend, moe_kernels.router_stats, ids.to(device_of(kernel_backend)), 64)
    assert torch.equal(counts.cpu(), reference.router_stats(ids, 64))
    assert counts.sum() == 513 * 8


def test_load_balancing_loss(backend):
    logits = make_logits(45, 16, seed=8)
    _, ids = reference.topk_gating(logits, 2)
    dev = device_of(backend)
    x = logits.to(dev).requires_grad_(True)
    loss = run(backend, moe_kernels.load_balancing_loss, x, ids.to(dev), 16, alpha=0.02)
    # Naive: f_i = share of the T*k assignments, P_i = mean softmax probability.
    probs = torch.softmax(logits.double(), -1)
    f = torch.tensor([sum(r.count(e) for r in ids.tolist()) / ids.numel() for e in range(16)],
                     dtype=torch.float64)
    expected = 0.02 * 16 * sum(f[e] * probs[:, e].mean() for e in range(16))
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-5, atol=1e-7)
    loss.backward()
    # d loss / d x_tj = alpha * E / T * p_tj * (f_j - sum_i f_i p_ti)
    analytic = 0.02 * 16 / 45 * probs * (f - (probs * f).sum(-1, keepdim=True))
    torch.testing.assert_close(x.grad.cpu().double(), analytic, rtol=1e-4, atol=1e-8)


def test_load_balancing_loss_uniform_router_is_alpha(backend):
    dev = device_of(backend)
    ids = (torch.arange(32, dtype=torch.int32) % 8).view(16, 2).to(dev)  # every expert 4 times
    loss = run(backend, moe_kernels.load_balancing_loss, torch.zeros(16, 8, device=dev), ids, 8, alpha=0.5)
    assert loss.item() == pytest.approx(0.5)


def test_router_z_loss(backend):
    logits = make_logits(13, 10, seed=9)
    x = logits.to(device_of(backend)).requires_grad_(True)
    loss = run(backend, moe_kernels.router_z_loss, x)
    rows = logits.double().tolist()
    lse = [max(r) + math.log(sum(math.exp(v - max(r)) for v in r)) for r in rows]
    assert loss.item() == pytest.approx(sum(v * v for v in lse) / len(lse), rel=1e-6)
    loss.backward()
    analytic = 2.0 / 13 * torch.tensor(lse, dtype=torch.float64)[:, None] * torch.softmax(logits.double(), -1)
    torch.testing.assert_close(x.grad.cpu().double(), analytic, rtol=1e-5, atol=1e-8)


def test_update_routing_bias(backend):
    dev = device_of(backend)
    bias = torch.tensor([0.0, 0.5, -0.5, 1.0], device=dev)
    counts = torch.tensor([10, 2, 4, 0], dtype=torch.int32, device=dev)  # mean 4
    out = run(backend, moe_kernels.update_routing_bias, bias, counts, 0.25)
    assert out is bias  # in place
    # over-loaded (10) down, under-loaded (2, 0) up, exactly balanced (4) unchanged
    assert bias.cpu().tolist() == [-0.25, 0.75, -0.5, 1.25]


def test_update_routing_bias_balances_a_skewed_router(backend):
    # Closed loop: a strong static preference gets evened out by the bias alone.
    dev = device_of(backend)
    logits = (make_logits(256, 16, seed=3) + torch.linspace(0, 3, 16)).to(dev)
    bias = torch.zeros(16, device=dev)

    def spread():
        _, ids = run(backend, moe_kernels.topk_gating, logits, 2, scoring="sigmoid", bias=bias)
        counts = run(backend, moe_kernels.router_stats, ids, 16)
        return counts, (counts.max() - counts.min()).item()

    _, before = spread()
    for _ in range(40):
        counts, _ = spread()
        run(backend, moe_kernels.update_routing_bias, bias, counts, 0.005)
    # sign updates settle into a small oscillation: max - min from 75 to ~11 assignments
    assert spread()[1] < before / 4


# ----------------------------------------------------------------------------------------
# Expert-choice routing.

def naive_expert_choice(logits, capacity):
    """Per expert: sort its column of float64 softmax probabilities (ties: lower token)."""
    probs = torch.softmax(logits.double(), -1).tolist()
    T, E = len(probs), logits.shape[1]
    idx, w, margins = [], [], []
    for e in range(E):
        order = sorted(range(T), key=lambda t: (-probs[t][e], t))
        taken = order[:capacity]
        idx.append(taken + [-1] * (capacity - len(taken)))
        w.append([probs[t][e] for t in taken] + [0.0] * (capacity - len(taken)))
        vals = [probs[t][e] for t in order[:capacity + 1]]
        margins.append(min((a - b for a, b in zip(vals, vals[1:]) if a - b > 0), default=float("inf")))
    return (torch.tensor(idx, dtype=torch.int32).view(E, capacity),
            torch.tensor(w, dtype=torch.float64).view(E, capacity), torch.tensor(margins))


# Probabilities of different tokens come from different normalizers; implementations may
# order two within a few ulp differently. Experts whose deciding gap is below 1e-6 (>> the
# 1e-7 absolute float32 error of a probability) are not compared on indices.
CHOICE_MARGIN = 1e-6


@pytest.mark.parametrize("tokens,experts,capacity", [(16, 8, 4), (37, 60, 5), (257, 16, 40),
                                                     (5, 8, 9), (0, 4, 3), (12, 3, 0), (600, 2, 300),
                                                     (12300, 2, 3)])  # > 12288: no smem cache
def test_expert_choice(backend, tokens, experts, capacity):
    for dtype in DTYPES:
        logits = make_logits(tokens, experts, dtype, seed=tokens + experts)
        idx, w = run(backend, moe_kernels.expert_choice_gating, logits.to(device_of(backend)), capacity)
        assert idx.dtype == torch.int32 and w.dtype == torch.float32
        assert idx.shape == w.shape == (experts, capacity)
        naive_idx, naive_w, margins = naive_expert_choice(logits, capacity)
        decided = margins > CHOICE_MARGIN
        assert decided.float().mean() >= 0.5
        assert torch.equal(idx.cpu()[decided], naive_idx[decided])
        torch.testing.assert_close(w.cpu()[decided].double(), naive_w[decided], **weight_tol())
        if backend != "reference":
            ref_idx, ref_w = reference.expert_choice_gating(logits, capacity)
            assert torch.equal(idx.cpu()[decided], ref_idx[decided])


@pytest.mark.parametrize("tokens", [12272, 12280, 12288, 12289])
def test_expert_choice_shared_memory_boundary(kernel_backend, tokens):
    """Up to 12288 tokens the column of probabilities is cached in dynamic shared memory
    (4 bytes a token) beside 64 bytes of static shared memory: past 12272 tokens the block
    needs more than 48 KiB and the launch must opt in (the emulator refuses it otherwise,
    as a GPU does)."""
    logits = make_logits(tokens, 2, torch.float32, seed=tokens)
    idx, w = run(kernel_backend, moe_kernels.expert_choice_gating, logits.to(device_of(kernel_backend)), 3)
    ref_idx, ref_w = reference.expert_choice_gating(logits, 3)
    decided = naive_expert_choice(logits, 3)[2] > CHOICE_MARGIN
    assert decided.any()
    assert torch.equal(idx.cpu()[decided], ref_idx[decided])
    torch.testing.assert_close(w.cpu(), ref_w, **weight_tol())


def test_expert_choice_ties_and_padding(backend):
    logits = torch.zeros(3, 4, device=device_of(backend))  # every probability ties
    idx, w = run(backend, moe_kernels.expert_choice_gating, logits, 5)
    assert idx.cpu().tolist() == [[0, 1, 2, -1, -1]] * 4
    assert w.cpu().tolist() == [[0.25, 0.25, 0.25, 0.0, 0.0]] * 4


def test_expert_choice_nan_ranks_last(backend):
    logits = make_logits(6, 4, seed=1)
    logits[2, 1] = float("nan")  # token 2's probabilities are all NaN
    idx, w = run(backend, moe_kernels.expert_choice_gating, logits.to(device_of(backend)), 6)
    assert (idx[:, -1].cpu() == 2).all() and torch.isnan(w[:, -1].cpu()).all()
    assert torch.isfinite(w[:, :-1].cpu()).all()


# ----------------------------------------------------------------------------------------
# Hash routing.

@pytest.mark.parametrize("experts,k", [(1, 1), (3, 2), (8, 2), (60, 4), (64, 8), (160, 6), (384, 32),
                                       (4096, 8), (7, 7)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_hash_gating(backend, experts, k, id_dtype):
    start = -3 * experts - 1 if id_dtype == torch.int32 else 2**40 + 5
    token_ids = torch.arange(start, start + 2 * experts, dtype=id_dtype)
    w, ids = run(backend, moe_kernels.hash_gating, token_ids.to(device_of(backend)), experts, k)
    w, ids = w.cpu(), ids.cpu()
    assert ids.dtype == torch.int32 and ids.shape == w.shape == (2 * experts, k)
    a = reference.hash_multiplier(experts)
    assert math.gcd(a, experts) == 1
    naive = [[a * (((t % experts) * k + j) % experts) % experts for j in range(k)]
             for t in token_ids.tolist()]
    assert ids.tolist() == naive
    torch.testing.assert_close(w, torch.full((2 * experts, k), 1.0 / k))
    assert all(len(set(row)) == k for row in naive)  # distinct experts per token
    # Balance: any E consecutive token ids give each expert exactly k tokens.
    for offset in (0, 1, experts // 2):
        window = ids[offset:offset + experts].flatten().tolist()
        assert Counter(window) == {e: k for e in range(experts)}


def test_hash_multiplier_matches_native():
    for experts in (1, 2, 3, 8, 60, 64, 100, 160, 384, 4096, 65536):
        assert native("simt").hash_multiplier(experts) == reference.hash_multiplier(experts)


def test_hash_gating_is_a_real_permutation():
    # Not the identity: consecutive slots land on scattered experts.
    _, ids = reference.hash_gating(torch.arange(4), 64, 4)
    assert ids.flatten().tolist() != list(range(16))


# ----------------------------------------------------------------------------------------
# Bad input: each validated argument raises an error that names it.

def call_topk(backend, k=2, experts=8, **kwargs):
    logits = torch.randn(4, experts, device=device_of(backend))
    return run(backend, moe_kernels.topk_gating, logits, k, **kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(scoring="relu"), ValueError, "scoring: expected 'softmax' or 'sigmoid' or 'sqrtsoftplus'"),
    (dict(scoring=None), ValueError, "scoring: expected"),
    (dict(bias=torch.zeros(7)), ValueError, "bias: expected 8 elements"),
    (dict(bias=torch.zeros(8, dtype=torch.int32)), TypeError, "bias: expected dtype float32"),
    (dict(bias=torch.zeros(1, 8)), ValueError, "bias: expected a 1-D tensor"),
    (dict(bias=[0.0] * 8), TypeError, "bias: expected a torch.Tensor"),
    (dict(num_groups=3), ValueError, "num_groups: expected a divisor"),
    (dict(num_groups=0), ValueError, "num_groups: expected"),
    (dict(num_groups=16), ValueError, "num_groups: expected"),
    (dict(num_groups=2.0), TypeError, "num_groups: expected an int"),
    (dict(num_groups=4, topk_groups=5), ValueError, "topk_groups: expected 1 <= topk_groups <= 4"),
    (dict(num_groups=4, topk_groups=0), ValueError, "topk_groups: expected"),
    (dict(topk_groups=2), ValueError, "topk_groups: expected 1 <= topk_groups <= 1"),
    (dict(num_groups=4, group_scoring="sum"), ValueError, "group_scoring: expected 'max' or 'top{n}_sum'"),
    (dict(num_groups=4, group_scoring="top0_sum"), ValueError, "group_scoring: expected"),
    (dict(num_groups=4, group_scoring="top02_sum"), ValueError, "group_scoring: expected"),
    (dict(num_groups=4, group_scoring="topx_sum"), ValueError, "group_scoring: expected"),
    (dict(num_groups=4, group_scoring="top_sum"), ValueError, "group_scoring: expected"),
    (dict(num_groups=4, group_scoring=2), ValueError, "group_scoring: expected"),
    (dict(num_groups=8), ValueError, "group_scoring: 'top2_sum' needs at least 2 experts per group"),
    (dict(num_groups=4, group_scoring="top3_sum"), ValueError,
     "group_scoring: 'top3_sum' needs at least 3 experts per group"),
    (dict(k=3, num_groups=4, topk_groups=1), ValueError, "k: expected k <= the eligible experts"),
    (dict(k=9), ValueError, "k: expected"),
    (dict(renormalize=1), TypeError, "renormalize: expected a bool"),
    (dict(scaling_factor="2"), TypeError, "scaling_factor: expected a number"),
    (dict(scaling_factor=True), TypeError, "scaling_factor: expected a number"),
    (dict(scaling_factor=float("inf")), ValueError, "scaling_factor: expected a finite number"),
    (dict(scaling_factor=1e39), ValueError, "scaling_factor: expected .scaling_factor. <= 3.4028235e"),
    (dict(scaling_factor=-1e39), ValueError, "scaling_factor: expected"),
])
def test_bad_topk_arguments(backend, kwargs, error, match):
    kwargs = {key: (v.to(device_of(backend)) if isinstance(v, torch.Tensor) else v)
              for key, v in kwargs.items()}
    with pytest.raises(error, match=match):
        call_topk(backend, **kwargs)


def test_groups_of_one_expert_with_max(kernel_backend):
    # 8 groups of 1: the 3 best groups are the 3 best experts.
    check_kernel(kernel_backend, make_logits(9, 8, seed=4), 3, num_groups=8, topk_groups=3,
                 group_scoring="max")


def test_unaligned_bias_uses_scalar_loads(kernel_backend):
    bias = make_bias(256)
    device = device_of(kernel_backend)
    cfg = dict(scoring="sigmoid", num_groups=8, topk_groups=4, renormalize=True)
    for dtype in (torch.float32, torch.bfloat16):
        logits = make_logits(9, 256, dtype, seed=6)
        w, ids = run(kernel_backend, moe_kernels.topk_gating, logits.to(device), 8,
                     bias=misaligned_copy(bias, device), **cfg)
        ref_w, ref_ids = reference.topk_gating(logits, 8, bias=bias, **cfg)
        assert torch.equal(ids.cpu(), ref_ids)
        torch.testing.assert_close(w.cpu(), ref_w, **weight_tol())


def test_bias_on_another_device():
    logits = torch.randn(4, 8, device="meta")
    with pytest.raises(ValueError, match="bias: expected a tensor on meta"):
        moe_kernels.topk_gating(logits, 2, bias=torch.zeros(8))


@pytest.mark.parametrize("kwargs,match", [
    (dict(scoring="relu"), "scoring: expected"),
    (dict(bias=torch.zeros(7)), "bias: expected 8 elements"),
    (dict(bias=torch.zeros(8, dtype=torch.float64)), "bias: expected dtype"),
    (dict(num_groups=3), "num_groups: expected a divisor"),
    (dict(num_groups=4, topk_groups=5), "topk_groups: expected"),
    (dict(num_groups=4, group_scoring="sum"), "group_scoring: expected"),
    (dict(num_groups=4, group_scoring="top0_sum"), "group_scoring: expected"),
    (dict(num_groups=4, group_scoring="top2x_sum"), "group_scoring: expected"),
    (dict(num_groups=8, topk_groups=2), "group_scoring: 'top2_sum' needs"),
    (dict(num_groups=4, topk_groups=2, group_scoring="top3_sum"), "group_scoring: 'top3_sum' needs"),
    (dict(num_groups=4, topk_groups=-1), "topk_groups: expected 1 <= topk_groups <= num_groups"),
    (dict(num_groups=4, topk_groups=0), "topk_groups: expected"),
    (dict(scaling_factor=1e39), "scaling_factor: expected"),
    (dict(scaling_factor=float("nan")), "scaling_factor: expected"),
    (dict(num_groups=4, topk_groups=1, k=3), "k: expected k <= the eligible experts"),
])
def test_native_adapter_checks_routing(kwargs, match):
    """A direct call to the C++ adapter validates too: never a crash."""
    k = kwargs.pop("k", 2)
    with pytest.raises((ValueError, TypeError), match=match):
        native("simt").topk_gating(torch.randn(4, 8), k, False, **kwargs)


@pytest.mark.parametrize("args,error,match", [
    ((torch.zeros(4, dtype=torch.int16), 8), TypeError, "ids: expected dtype int32, int64"),
    ((torch.zeros(4), 8), TypeError, "ids: expected dtype int32, int64"),
    ((torch.zeros(4, dtype=torch.int32), 0), ValueError, "num_experts: expected"),
    ((torch.zeros(4, dtype=torch.int32), 65537), ValueError, "num_experts: expected"),
    (([0, 1], 8), TypeError, "ids: expected a torch.Tensor"),
])
def test_bad_router_stats(backend, args, error, match):
    ids, experts = args
    if isinstance(ids, torch.Tensor):
        ids = ids.to(device_of(backend))
    with pytest.raises(error, match=match):
        run(backend, moe_kernels.router_stats, ids, experts)


def test_bad_losses(backend):
    dev = device_of(backend)
    logits, ids = torch.randn(4, 8, device=dev), torch.zeros(4, 2, dtype=torch.int32, device=dev)
    f = moe_kernels.load_balancing_loss
    with pytest.raises(ValueError, match="logits: expected 6 experts in the last dimension"):
        run(backend, f, logits, ids, 6)
    with pytest.raises(ValueError, match=r"ids: expected shape \[..., k\] with the leading dimensions of logits \(4,\)"):
        run(backend, f, logits, ids[:3], 8)
    with pytest.raises(TypeError, match="ids: expected dtype int32, int64"):
        run(backend, f, logits, ids.float(), 8)
    with pytest.raises(TypeError, match="alpha: expected a number"):
        run(backend, f, logits, ids, 8, alpha=None)
    with pytest.raises(TypeError, match="logits: expected dtype"):
        run(backend, f, logits.int(), ids, 8)
    with pytest.raises(ValueError, match="num_experts: expected"):
        run(backend, f, logits, ids, 0)
    with pytest.raises(ValueError, match="ids: expected shape"):
        run(backend, f, logits, ids[:, 0].contiguous(), 8)
    with pytest.raises(ValueError, match="scoring: expected 'softmax' or 'sigmoid'"):
        run(backend, f, logits, ids, 8, scoring="relu")
    with pytest.raises(ValueError, match="logits: expected a tensor of shape"):
        run(backend, moe_kernels.router_z_loss, logits[0, 0])


def test_bad_update_routing_bias(backend):
    dev = device_of(backend)
    bias, counts = torch.zeros(4, device=dev), torch.zeros(4, dtype=torch.int32, device=dev)
    f = moe_kernels.update_routing_bias
    with pytest.raises(TypeError, match="bias: expected dtype float32"):
        run(backend, f, bias.double(), counts, 0.1)
    with pytest.raises(ValueError, match="counts: expected 4 elements"):
        run(backend, f, bias, counts[:3], 0.1)
    with pytest.raises(TypeError, match="counts: expected dtype"):
        run(backend, f, bias, counts.to(torch.int8), 0.1)
    with pytest.raises(TypeError, match="rate: expected a number"):
        run(backend, f, bias, counts, "0.1")
    with pytest.raises(ValueError, match="rate: expected a finite number"):
        run(backend, f, bias, counts, float("nan"))


def test_bad_expert_choice(backend):
    dev = device_of(backend)
    f = moe_kernels.expert_choice_gating
    with pytest.raises(ValueError, match="capacity: expected"):
        run(backend, f, torch.randn(4, 8, device=dev), -1)
    with pytest.raises(TypeError, match="capacity: expected an int"):
        run(backend, f, torch.randn(4, 8, device=dev), 2.0)
    with pytest.raises(TypeError, match="logits: expected dtype"):
        run(backend, f, torch.randn(4, 8, device=dev).int(), 2)
    with pytest.raises(ValueError, match="logits: expected 1 to 4096 experts"):
        run(backend, f, torch.randn(4, 0, device=dev), 2)
    with pytest.raises(ValueError, match="logits: expected a tensor of shape"):
        run(backend, f, torch.tensor(1.0, device=dev), 2)


def test_bad_hash_gating(backend):
    dev = device_of(backend)
    f = moe_kernels.hash_gating
    ids = torch.arange(4, device=dev)
    with pytest.raises(TypeError, match="token_ids: expected dtype int32, int64"):
        run(backend, f, ids.float(), 8, 2)
    with pytest.raises(ValueError, match="token_ids: expected a 1-D tensor"):
        run(backend, f, ids.view(2, 2), 8, 2)
    with pytest.raises(ValueError, match="num_experts: expected"):
        run(backend, f, ids, 0, 1)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= 8"):
        run(backend, f, ids, 8, 9)


def test_native_adapter_checks_other_ops():
    mod = native("simt")
    with pytest.raises(ValueError, match="capacity: expected"):
        mod.expert_choice_gating(torch.randn(4, 8), -1)
    with pytest.raises(TypeError, match="token_ids: expected int32 or int64"):
        mod.hash_gating(torch.zeros(4), 8, 2)
    with pytest.raises(ValueError, match="k: expected"):
        mod.hash_gating(torch.zeros(4, dtype=torch.int32), 8, 9)
    with pytest.raises(TypeError, match="ids: expected dtype"):
        mod.router_stats(torch.zeros(4), 8)


# ----------------------------------------------------------------------------------------
# Bad input to topk_gating: each argument that is validated raises an error that names it.

@pytest.mark.parametrize("logits,error,match", [
    ([[1.0, 2.0]], TypeError, "logits: expected a torch.Tensor"),
    (torch.randint(0, 3, (4, 8)), TypeError, "logits: expected dtype"),
    (torch.tensor(1.0), ValueError, "logits: expected a tensor of shape"),
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


# ----------------------------------------------------------------------------------------
# Expert choice: one gradient contract on every backend, inputs users pass.

def test_expert_choice_backward_matches_reference_autograd(kernel_backend):
    dev = device_of(kernel_backend)
    for dtype in DTYPES:
        logits = make_logits(37, 6, dtype, seed=11)
        grad_w = torch.randn(6, 9, generator=torch.Generator().manual_seed(3))
        ref_logits = logits.clone().requires_grad_(True)
        ref_idx, ref_w = reference.expert_choice_gating(ref_logits, 9)
        (ref_w * grad_w).sum().backward()
        x = logits.to(dev).requires_grad_(True)
        idx, w = run(kernel_backend, moe_kernels.expert_choice_gating, x, 9)
        assert w.requires_grad and not idx.requires_grad
        assert torch.equal(idx.cpu(), ref_idx)
        (w * grad_w.to(dev)).sum().backward()
        assert x.grad.dtype == dtype
        torch.testing.assert_close(x.grad.cpu(), ref_logits.grad, **GRAD_TOL[dtype])


def test_expert_choice_backward_padding_and_repeats(kernel_backend):
    # C > T: padding slots (token -1) get gradients that must be ignored; with T < C every
    # token is taken by every expert, so G sums over all experts of a token.
    logits = make_logits(3, 4, seed=5)
    grad_w = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    ref_logits = logits.clone().requires_grad_(True)
    (reference.expert_choice_gating(ref_logits, 6)[1] * grad_w).sum().backward()
    x = logits.clone().requires_grad_(True)
    _, w = run(kernel_backend, moe_kernels.expert_choice_gating, x.to(device_of(kernel_backend)), 6)
    (w * grad_w.to(w.device)).sum().backward()
    torch.testing.assert_close(x.grad, ref_logits.grad, **GRAD_TOL[torch.float32])


def well_separated_logits(tokens, experts, seed):
    """Logits whose expert-choice selections stay put under a 1e-3 perturbation."""
    for attempt in range(100):
        logits = make_logits(tokens, experts, torch.float64, seed=seed + attempt)
        if naive_expert_choice(logits, 3)[2].min() > 0.02:
            return logits
    raise AssertionError("no well separated logits found")


def test_expert_choice_gradcheck_float64(backend):
    # float64 logits are accepted (computed in float32), so finite differences use a
    # step of 1e-3 and float32-level tolerances.
    logits = well_separated_logits(5, 3, seed=20).to(device_of(backend)).requires_grad_(True)
    with moe_kernels.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x: moe_kernels.expert_choice_gating(x, 3)[1],
                                        (logits,), eps=1e-3, atol=1e-4, rtol=1e-3)


def test_expert_choice_leading_dims_noncontiguous_float64(backend):
    dev = device_of(backend)
    logits = make_logits(2 * 7, 5, seed=12).view(2, 7, 5)
    idx, w = run(backend, moe_kernels.expert_choice_gating, logits.to(dev), 4)
    ref_idx, ref_w = reference.expert_choice_gating(logits.reshape(14, 5), 4)
    assert torch.equal(idx.cpu(), ref_idx)  # token b * 7 + s
    torch.testing.assert_close(w.cpu(), ref_w, **weight_tol())
    strided = make_logits(5, 14, seed=12).t()  # [14, 5], not contiguous
    idx, w = run(backend, moe_kernels.expert_choice_gating, strided.to(dev), 4)
    ref_idx, ref_w = reference.expert_choice_gating(strided.contiguous(), 4)
    assert torch.equal(idx.cpu(), ref_idx)
    torch.testing.assert_close(w.cpu(), ref_w, **weight_tol())
    as_double = logits.double().reshape(14, 5)
    idx, w = run(backend, moe_kernels.expert_choice_gating, as_double.to(dev), 4)
    ref_idx, ref_w = reference.expert_choice_gating(as_double.float(), 4)
    assert torch.equal(idx.cpu(), ref_idx)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.cpu(), ref_w, **weight_tol())


def test_softmax_with_inf_logit_is_nan(backend):
    # Documented: torch.softmax semantics (inf - inf), for both softmax ops.
    logits = make_logits(4, 6, seed=2)
    logits[1, 3] = float("inf")
    dev = device_of(backend)
    idx, w = run(backend, moe_kernels.expert_choice_gating, logits.to(dev), 4)
    assert (idx[:, -1].cpu() == 1).all() and torch.isnan(w[:, -1].cpu()).all()
    assert torch.isfinite(w[:, :-1].cpu()).all()
    tw, _ = run(backend, moe_kernels.topk_gating, logits.to(dev), 2)
    assert torch.isnan(tw[1].cpu()).all() and torch.isfinite(tw[[0, 2, 3]].cpu()).all()


# ----------------------------------------------------------------------------------------
# Router statistics: int64 ids, meta tensors, views.

def test_router_stats_int64_ids(backend):
    logits = make_logits(33, 16, seed=6)
    ids64 = torch.topk(logits, 4, dim=-1).indices  # int64, what users have
    ids64[0, 0] = 2**40  # out of range: not counted (never truncated into range)
    ids64[1, 0] = -(2**40)
    counts = run(backend, moe_kernels.router_stats, ids64.to(device_of(backend)), 16)
    naive = Counter(e for e in ids64.flatten().tolist() if 0 <= e < 16)
    assert counts.dtype == torch.int32
    assert counts.cpu().tolist() == [naive[e] for e in range(16)]


def test_router_stats_noncontiguous(backend):
    ids = torch.randint(0, 8, (6, 10), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    view = ids[:, ::3]
    counts = run(backend, moe_kernels.router_stats, view.to(device_of(backend)), 8)
    naive = Counter(view.flatten().tolist())
    assert counts.cpu().tolist() == [naive[e] for e in range(8)]


def test_router_stats_on_meta():
    for dtype in (torch.int32, torch.int64):
        counts = moe_kernels.router_stats(torch.zeros(5, 2, dtype=dtype, device="meta"), 12)
        assert counts.device.type == "meta" and counts.shape == (12,) and counts.dtype == torch.int32


def test_native_router_stats_int64():
    ids = torch.tensor([0, 3, 3, -1, 2**33 + 3, 7], dtype=torch.int64)
    assert native("simt").router_stats(ids, 4).tolist() == [1, 0, 0, 2]


# ----------------------------------------------------------------------------------------
# update_routing_bias with non-finite counts.

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_update_routing_bias_nonfinite_counts(backend, bad):
    dev = device_of(backend)
    bias = torch.zeros(4, device=dev)
    counts = torch.tensor([1.0, bad, 3.0, 4.0], device=dev)
    if dev == "cpu":
        with pytest.raises(ValueError, match="counts: expected finite counts"):
            run(backend, moe_kernels.update_routing_bias, bias, counts, 0.1)
        assert bias.tolist() == [0.0] * 4  # untouched
    else:
        run(backend, moe_kernels.update_routing_bias, bias, counts, 0.1)
        assert torch.isnan(bias.cpu()).all()


def test_update_routing_bias_no_host_sync_on_meta():
    # Off the CPU the check must not synchronize (bool() of a meta tensor would raise).
    bias = torch.zeros(4, device="meta")
    moe_kernels.update_routing_bias(bias, torch.zeros(4, device="meta"), 0.1)


# ----------------------------------------------------------------------------------------
# Losses: leading dims, int64 ids, float64, sigmoid scoring, Hugging Face's formula and
# DeepSeek-V3's sequence-wise loss.

def naive_balance_scores(logits, scoring):
    """float64 s'[t][i] per token, Python loops: softmax, or sigmoid / sum of sigmoids."""
    out = []
    for row in logits.double().tolist():
        if scoring == "softmax":
            m = max(row)
            e = [math.exp(v - m) for v in row]
        else:
            e = [1.0 / (1.0 + math.exp(-v)) for v in row]
        out.append([v / sum(e) for v in e])
    return out


def naive_load_balancing_loss(logits, ids, num_experts, alpha, scoring):
    s = naive_balance_scores(logits, scoring)
    flat = [e for row in ids.tolist() for e in row]
    f = [flat.count(i) / len(flat) for i in range(num_experts)]
    P = [sum(r[i] for r in s) / len(s) for i in range(num_experts)]
    return alpha * num_experts * sum(f[i] * P[i] for i in range(num_experts))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_load_balancing_loss_scorings_match_naive(backend, scoring):
    logits = make_logits(30, 12, seed=21)
    _, ids = reference.topk_gating(logits, 3, scoring=scoring)
    dev = device_of(backend)
    x = logits.clone().to(dev).requires_grad_(True)
    loss = run(backend, moe_kernels.load_balancing_loss, x, ids.to(dev), 12, 0.3, scoring=scoring)
    expected = naive_load_balancing_loss(logits, ids, 12, 0.3, scoring)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    # Gradient against float64 autograd of the same formula.
    x64 = logits.double().requires_grad_(True)
    scores = torch.softmax(x64, -1) if scoring == "softmax" else torch.sigmoid(x64)
    scores = scores / scores.sum(-1, keepdim=True)
    f = torch.bincount(ids.long().flatten(), minlength=12).double() / ids.numel()
    (0.3 * 12 * (f * scores.mean(0)).sum()).backward()
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=1e-4, atol=1e-8)


def test_load_balancing_loss_accepts_user_inputs(backend):
    dev = device_of(backend)
    logits = make_logits(2 * 9, 8, seed=22)
    ids64 = torch.topk(logits, 2, dim=-1).indices  # int64
    expected = naive_load_balancing_loss(logits, ids64, 8, 0.1, "softmax")
    cases = [(logits.view(2, 9, 8), ids64.view(2, 9, 2)),        # leading dims, int64 ids
             (logits.double(), ids64.int()),                     # float64 logits
             (logits.t().contiguous().t(), ids64.t().contiguous().t())]  # non-contiguous
    for x, ids in cases:
        loss = run(backend, moe_kernels.load_balancing_loss, x.to(dev), ids.to(dev), 8, 0.1)
        assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="ids: expected shape"):
        run(backend, moe_kernels.load_balancing_loss, logits.view(2, 9, 8).to(dev),
            ids64.to(dev), 8)


def test_router_z_loss_accepts_user_inputs(backend):
    dev = device_of(backend)
    logits = make_logits(12, 10, seed=9)
    expected = torch.logsumexp(logits.double(), -1).square().mean().item()
    for x in (logits.view(3, 4, 10), logits.t().contiguous().t(), logits.double()):
        loss = run(backend, moe_kernels.router_z_loss, x.to(dev))
        assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected, rel=1e-6)


def test_hugging_face_loss_is_k_times_switch_loss(backend):
    # transformers' load_balancing_loss_func (Mixtral; no attention mask), by hand:
    #   routing_weights = softmax(gate_logits); selected = topk(routing_weights, k)
    #   expert_mask = one_hot(selected, E)                 # [T, k, E]
    #   tokens_per_expert = mean(expert_mask, dim=0)       # [k, E], over tokens only
    #   router_prob_per_expert = mean(routing_weights, 0)  # [E]
    #   loss = sum(tokens_per_expert * router_prob_per_expert) * E
    E, k = 8, 2
    logits = make_logits(50, E, seed=23)
    routing_weights = torch.softmax(logits.double(), dim=-1)
    selected = torch.topk(routing_weights, k, dim=-1).indices
    expert_mask = torch.nn.functional.one_hot(selected, E).double()
    tokens_per_expert = expert_mask.mean(dim=0)
    hf = (tokens_per_expert * routing_weights.mean(dim=0).unsqueeze(0)).sum() * E
    dev = device_of(backend)
    ours = run(backend, moe_kernels.load_balancing_loss, logits.to(dev), selected.to(dev), E, 1.0)
    assert hf.item() == pytest.approx(k * ours.item(), rel=1e-5)
    assert hf.item() != pytest.approx(ours.item(), rel=1e-2)  # the factor k is real


def naive_sequence_loss(logits, ids, num_experts, seq_len, alpha, scoring):
    """DeepSeek-V3 eqs. (17)-(20), one sequence at a time, Python loops in float64."""
    s = naive_balance_scores(logits, scoring)
    rows = ids.tolist()
    k = len(rows[0])
    total = 0.0
    sequences = len(rows) // seq_len
    for q in range(sequences):
        tokens = range(q * seq_len, (q + 1) * seq_len)
        loss = 0.0
        for i in range(num_experts):
            f = num_experts / (k * seq_len) * sum(rows[t].count(i) for t in tokens)
            P = sum(s[t][i] for t in tokens) / seq_len
            loss += f * P
        total += loss
    return alpha * total / sequences


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_sequence_load_balancing_loss_matches_naive(backend, scoring):
    dev = device_of(backend)
    B, S, E, k = 3, 10, 16, 4
    logits = make_logits(B * S, E, seed=24)
    _, ids = reference.topk_gating(logits, k, scoring=scoring)
    expected = naive_sequence_loss(logits, ids, E, S, 0.01, scoring)
    x = logits.view(B, S, E).to(dev).requires_grad_(True)
    loss = run(backend, moe_kernels.sequence_load_balancing_loss, x, ids.view(B, S, k).long().to(dev),
               E, S, 0.01, scoring=scoring)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected, rel=1e-5)
    # A different sequence length changes the loss (sequences are really separate).
    other = run(backend, moe_kernels.sequence_load_balancing_loss, logits.to(dev), ids.to(dev),
                E, 5, 0.01, scoring=scoring)
    assert other.item() == pytest.approx(naive_sequence_loss(logits, ids, E, 5, 0.01, scoring), rel=1e-5)
    assert other.item() != pytest.approx(loss.item(), rel=1e-4)
    # Gradient against float64 autograd of the loop's formula (f constant).
    loss.backward()
    x64 = logits.double().requires_grad_(True)
    sc = torch.softmax(x64, -1) if scoring == "softmax" else torch.sigmoid(x64)
    sc = sc / sc.sum(-1, keepdim=True)
    total = 0
    for q in range(B):
        part = slice(q * S, (q + 1) * S)
        f = torch.bincount(ids[part].long().flatten(), minlength=E).double() * E / (k * S)
        total = total + (f * sc[part].mean(0)).sum()
    (0.01 * total / B).backward()
    torch.testing.assert_close(x.grad.cpu().double().view(B * S, E), x64.grad, rtol=1e-4, atol=1e-9)


def test_sequence_load_balancing_loss_balanced_is_alpha(backend):
    # Every expert chosen equally often in each sequence, uniform scores: loss = alpha.
    dev = device_of(backend)
    E, k, S = 8, 2, 4
    ids = (torch.arange(2 * S * k) % E).view(2 * S, k).to(dev)
    loss = run(backend, moe_kernels.sequence_load_balancing_loss, torch.zeros(2 * S, E, device=dev),
               ids, E, S, 0.5)
    assert loss.item() == pytest.approx(0.5)


def test_bad_sequence_load_balancing_loss(backend):
    dev = device_of(backend)
    logits, ids = torch.randn(6, 8, device=dev), torch.zeros(6, 2, dtype=torch.int32, device=dev)
    f = moe_kernels.sequence_load_balancing_loss
    with pytest.raises(ValueError, match="seq_len: expected a divisor of the number of tokens"):
        run(backend, f, logits, ids, 8, 4)
    with pytest.raises(ValueError, match="seq_len: expected"):
        run(backend, f, logits, ids, 8, 0)
    with pytest.raises(ValueError, match="scoring: expected"):
        run(backend, f, logits, ids, 8, 3, scoring="relu")
    with pytest.raises(ValueError, match="logits: expected 6 experts"):
        run(backend, f, logits, ids, 6, 3)
    with pytest.raises(TypeError, match="ids: expected dtype"):
        run(backend, f, logits, ids.float(), 8, 3)
    with pytest.raises(ValueError, match="ids: expected at least one expert per token"):
        run(backend, f, logits, ids[:, :0], 8, 3)


# ----------------------------------------------------------------------------------------
# Memory traffic of expert choice (the emulator's counters): each kernel moves at most
# 1.5x its minimum bytes (coalesced; the old kernel read a column strided by E, 23x) with
# shared-memory accesses at most 2-way bank conflicted.

@pytest.mark.parametrize("experts,k", [(256, 8), (512, 10), (4096, 8)])
def test_expert_choice_traffic(experts, k):
    needs_observer()
    tokens = 64
    logits = make_logits(tokens, experts, torch.bfloat16, seed=experts)
    with moe_kernels.use_backend("simt"), emulator.traffic() as rows:
        moe_kernels.expert_choice_gating(logits, max(1, tokens * k // experts))
    assert {r["kernel"] for r in rows} == {"expert_choice_probs_kernel", "expert_choice_kernel"}
    for r in rows:
        assert r["amplification"] <= 1.5, (r["kernel"], r["amplification"])
        assert r["max_bank_conflict_ways"] <= 2, (r["kernel"], r["max_bank_conflict_ways"])


@pytest.mark.parametrize("experts,dtype", [(2048, torch.float32), (4096, torch.float32),
                                           (4096, torch.bfloat16)])
def test_backward_softmax_long_rows(kernel_backend, experts, dtype):
    # Softmax without renormalize keeps rows of up to 8 KiB in shared memory for the
    # gradient pass (2048 fp32, 4096 bf16) and reads longer ones twice (4096 fp32).
    dev = device_of(kernel_backend)
    logits = make_logits(5, experts, dtype, seed=experts)
    grad_w = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    ref_logits = logits.clone().requires_grad_(True)
    ref_w, ref_ids = reference.topk_gating(ref_logits, 8)
    (ref_w * grad_w).sum().backward()
    kernel_logits = logits.to(dev).requires_grad_(True)
    w, ids = run(kernel_backend, moe_kernels.topk_gating, kernel_logits, 8)
    assert torch.equal(ids.cpu(), ref_ids)
    (w * grad_w.to(dev)).sum().backward()
    torch.testing.assert_close(kernel_logits.grad.cpu(), ref_logits.grad, **GRAD_TOL[dtype])


# Memory traffic of top-k gating, its backward and router_stats on the goal presets
# (DeepSeek-V3, Qwen3-Next, 4096 experts; bench/traffic_report.py's shapes): at most 1.5x
# the minimum bytes, shared memory at most 2-way bank conflicted (router_stats: traffic
# only; its histogram's conflicts depend on the ids).
TRAFFIC_PRESETS = {
    "deepseek-v3": (256, 8, dict(scoring="sigmoid", bias=True, num_groups=8, topk_groups=4,
                                 renormalize=True, scaling_factor=2.5)),
    "qwen3-next": (512, 10, dict(renormalize=True)),
    "e4096": (4096, 8, dict()),
}


@pytest.mark.parametrize("preset", sorted(TRAFFIC_PRESETS))
def test_topk_gating_traffic(preset):
    needs_observer()
    experts, k, cfg = TRAFFIC_PRESETS[preset]
    cfg = dict(cfg, bias=make_bias(experts) if cfg.get("bias") else None)
    tokens = 64
    logits = make_logits(tokens, experts, torch.bfloat16, seed=experts).requires_grad_(True)
    with moe_kernels.use_backend("simt"):
        with emulator.traffic() as rows:
            w, ids = moe_kernels.topk_gating(logits, k, **cfg)
        with emulator.traffic() as backward_rows:
            w.sum().backward()
        with emulator.traffic() as stats_rows:
            moe_kernels.router_stats(ids, experts)
    assert [r["kernel"] for r in rows + backward_rows + stats_rows] == [
        "topk_gating_kernel", "topk_gating_backward_kernel", "router_stats_shared_kernel"]
    for r in rows + backward_rows + stats_rows:
        assert r["amplification"] <= 1.5, (r["kernel"], r["amplification"])
    for r in rows + backward_rows:
        assert r["max_bank_conflict_ways"] <= 2, (r["kernel"], r["max_bank_conflict_ways"])
