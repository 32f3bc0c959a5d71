"""Fused top-k gating vs the PyTorch reference on the model presets.

    python bench/bench_routing.py [--quick] [--out DIR]

Each preset's full routing configuration (moe_kernels.presets.PRESETS through
harness.bench_preset: scoring, selection bias, group-limited choice, renormalize, scaling)
runs at T in {1, 16, 256, 4096, 16384} tokens with bfloat16 logits; --quick takes
harness.QUICK_PRESETS at T in {1, 16}.
"""

import torch

import harness
import moe_kernels

TOKENS = (1, 16, 256, 4096, 16384)
QUICK_TOKENS = (1, 16)


def routing_kwargs(preset, device):
    """topk_gating keyword arguments of a preset (the bias, when it has one, is random:
    only its presence changes the work)."""
    kwargs = dict(preset["routing"])
    if preset.get("bias"):
        kwargs["bias"] = torch.randn(preset["experts"], device=device) * 0.1
    return kwargs


def main():
    args = harness.parse_args(__doc__.splitlines()[0])
    presets = harness.QUICK_PRESETS if args.quick else tuple(harness.PRESETS)
    cases = []
    for backend, device in harness.backends(args):
        for name in presets:
            preset = harness.bench_preset(name)
            experts, k = preset["experts"], preset["k"]
            kwargs = routing_kwargs(preset, device)
            for tokens in QUICK_TOKENS if args.quick else TOKENS:
                logits = torch.randn(tokens, experts, device=device, dtype=torch.bfloat16)
                cases.append(harness.Case(
                    op="topk_gating", label=f"{name} T={tokens}",
                    shape=dict(T=tokens, E=experts, k=k), backend=backend,
                    fn=lambda logits=logits, k=k, kw=kwargs: moe_kernels.topk_gating(logits, k, **kw),
                    # ideal traffic: one read of the logits (and the bias), one write of
                    # the weights (fp32) and ids (int32)
                    bytes_moved=logits.numel() * logits.element_size() + tokens * k * 8
                    + (experts * 4 if "bias" in kwargs else 0)))
    harness.run(cases, args)


if __name__ == "__main__":
    main()
