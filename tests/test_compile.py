"""torch.library registration: torch.compile(fullgraph=True) traces the ops, opcheck passes."""

import pytest
import torch

import moe_kernels
from moe_kernels import _library  # noqa: F401  (registers the ops)
from conftest import KERNEL_BACKENDS, device_of


def moe_routing_step(logits, x, bias):
    weights, ids = moe_kernels.topk_gating(logits, 2, scoring="sigmoid", bias=bias,
                                           renormalize=True, scaling_factor=2.5)
    out = moe_kernels.permute(x, ids, logits.shape[1], align=4, weights=weights)
    y = moe_kernels.unpermute(out.x * 2, out.row_map, weights)
    counts = moe_kernels.router_stats(ids, logits.shape[1])
    return y, counts, out.offsets, out.num_rows


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    dev = device_of(backend)
    logits = torch.randn(9, 16, device=dev, requires_grad=True)
    x = torch.randn(9, 24, device=dev, requires_grad=True)
    bias = torch.randn(16, device=dev)
    torch._dynamo.reset()
    compiled = torch.compile(moe_routing_step, fullgraph=True, backend="aot_eager")
    with moe_kernels.use_backend(backend):
        eager = moe_routing_step(logits, x, bias)
        traced = compiled(logits, x, bias)
        for a, b in zip(eager, traced):
            assert torch.equal(a, b)
        # Gradients flow through the compiled graph's backward kernels too.
        grads_eager = torch.autograd.grad(eager[0].sum(), (logits, x))
        grads_traced = torch.autograd.grad(traced[0].sum(), (logits, x))
    for a, b in zip(grads_eager, grads_traced):
        torch.testing.assert_close(a, b)


def test_compile_other_routing_ops():
    def fn(logits, token_ids):
        return (moe_kernels.expert_choice_gating(logits, 3),
                moe_kernels.hash_gating(token_ids, 8, 2))

    logits, token_ids = torch.randn(5, 8), torch.arange(5)
    torch._dynamo.reset()
    with moe_kernels.use_backend("simt"):
        eager = fn(logits, token_ids)
        traced = torch.compile(fn, fullgraph=True, backend="aot_eager")(logits, token_ids)
    for a, b in zip(eager, traced):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def opcheck_cases():
    logits = torch.randn(6, 12)
    ids = torch.randint(0, 12, (6, 2), dtype=torch.int32)
    weights = torch.rand(6, 2)
    x = torch.randn(6, 8)
    row_map = torch.randperm(12)[:12].view(6, 2).long()
    y_perm = torch.randn(12, 8)
    return [
        ("topk_gating", (logits, 3, True, "softmax", None, 1, 1, "top2_sum", 1.0)),
        ("topk_gating", (logits, 2, False, "sigmoid", torch.randn(12), 3, 2, "max", 2.5)),
        ("topk_gating_backward", (torch.randn(6, 2), logits, ids, "softmax", True, 1.0)),
        ("router_stats", (ids, 12)),
        ("expert_choice_gating", (logits, 4)),
        ("hash_gating", (torch.arange(6), 12, 2)),
        ("permute", (x, ids, weights, 12, -1, 4, False, 0, 12)),
        ("permute", (x, ids, None, 12, 1, 1, False, 2, 10)),
        ("unpermute", (y_perm, row_map, weights)),
        ("unpermute_backward", (torch.randn(6, 8), y_perm, row_map, weights, True, True)),
        ("unpermute_backward", (torch.randn(6, 8), y_perm, row_map, None, True, False)),
    ]


@pytest.mark.parametrize("name,args", opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    op = getattr(torch.ops.moe_kernels, name).default
    torch.library.opcheck(op, ("simt",) + args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
