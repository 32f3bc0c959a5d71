"""Token permute / unpermute vs the PyTorch reference (argsort + indexing) on the model presets.

    python bench/bench_permute.py [--quick] [--out DIR]

permute: dropless with align 1 for every preset (moe_kernels.presets.PRESETS through
harness.bench_preset), plus align 128 (grouped-GEMM tiles) and, for the capacity-factor
models (those with a capacity_factor: Switch 1.25, GShard 2.0), their capacity factor
with the position policy. permute_plan: the same layouts without the row copy (dropless only).
unpermute: the weighted sum over k back to token order.
"""

import torch

import harness
import moe_kernels

TOKENS = (16, 256, 4096, 16384)
QUICK_TOKENS = (4, 64)


def routing(tokens, experts, k, device):
    """k distinct random experts per token and softmax-like weights."""
    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(tokens, experts, generator=g, device=device)
    weights, ids = scores.topk(k, dim=1)
    return ids.to(torch.int32).contiguous(), (weights / weights.sum(1, keepdim=True)).contiguous()


def permute_bytes(x, ids, out):
    """Ideal traffic: x and ids read once; the rows of the segments (tokens and padding),
    row_map and offsets written once. Rows past offsets[E] are not written."""
    used_rows = int(out.offsets[-1])  # setup only, outside the timed call
    return (x.numel() * x.element_size() + ids.numel() * 4 + used_rows * x.shape[1] * x.element_size()
            + out.row_map.numel() * 8 + out.offsets.numel() * 8)


def plan_bytes(ids, weights, plan):
    """Ideal traffic: ids and weights read once; row_map, offsets, gather and the permuted
    weights written once."""
    return (ids.numel() * (ids.element_size() + 4) + plan.row_map.numel() * 8
            + plan.offsets.numel() * 8 + plan.gather.numel() * 12)


def unpermute_bytes(out, weights, hidden):
    """Ideal traffic: the kept rows of y_perm, row_map and weights read once; y written once."""
    tokens, k = out.row_map.shape
    element = out.x.element_size()
    kept = int((out.row_map >= 0).sum())  # setup only, outside the timed call
    return kept * hidden * element + tokens * k * 12 + tokens * hidden * element


def main():
    args = harness.parse_args(__doc__.splitlines()[0])
    presets = harness.QUICK_PRESETS if args.quick else tuple(harness.PRESETS)
    if args.quick:
        presets = presets + ("switch",)  # a capacity model too
    cases = []
    for backend, device in harness.backends(args):
        for name in presets:
            preset = harness.bench_preset(name)
            experts, k, hidden = preset["experts"], preset["k"], preset["hidden"]
            for tokens in QUICK_TOKENS if args.quick else TOKENS:
                x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
                ids, weights = routing(tokens, experts, k, device)
                variants = [("", {})]
                if not args.quick or name == "mixtral":  # keeps --quick under seconds
                    variants.append((" align=128", dict(align=128)))
                factor = preset["capacity_factor"]
                if factor:
                    cap = moe_kernels.capacity_from_factor(tokens, k, experts, factor)
                    variants.append((f" cf={factor:g}", dict(capacity=cap)))
                shape = dict(T=tokens, H=hidden, E=experts, k=k)
                for suffix, kw in variants:
                    with moe_kernels.use_backend(backend):
                        out = moe_kernels.permute(x, ids, experts, weights=weights, **kw)
                    cases.append(harness.Case(
                        op="permute", label=f"{name} T={tokens}{suffix}", shape=dict(shape, **kw),
                        backend=backend,
                        fn=lambda x=x, ids=ids, w=weights, kw=kw, e=experts:
                            moe_kernels.permute(x, ids, e, weights=w, **kw),
                        bytes_moved=permute_bytes(x, ids, out)))
                    if suffix:
                        continue  # unpermute reads the same rows whatever the padding
                    with moe_kernels.use_backend(backend):
                        plan = moe_kernels.permute_plan(ids, experts, weights=weights)
                    cases.append(harness.Case(
                        op="permute_plan", label=f"{name} T={tokens}", shape=shape, backend=backend,
                        fn=lambda ids=ids, w=weights, e=experts: moe_kernels.permute_plan(ids, e, weights=w),
                        bytes_moved=plan_bytes(ids, weights, plan)))
                    y_perm = out.x
                    cases.append(harness.Case(
                        op="unpermute", label=f"{name} T={tokens}", shape=shape, backend=backend,
                        fn=lambda y=y_perm, r=out.row_map, w=weights: moe_kernels.unpermute(y, r, w),
                        bytes_moved=unpermute_bytes(out, weights, hidden)))
    harness.run(cases, args)


if __name__ == "__main__":
    main()
