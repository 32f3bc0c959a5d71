"""Fused top-k gating vs the PyTorch reference on the model presets.

    python bench/bench_gating.py [--quick] [--out DIR]
"""

import torch

import harness
import moe_kernels

TOKENS = (1, 16, 256, 4096, 16384)
QUICK_TOKENS = (1, 16)


def main():
    args = harness.parse_args(__doc__.splitlines()[0])
    presets = harness.QUICK_PRESETS if args.quick else harness.MODEL_PRESETS
    cases = []
    for backend, device in harness.backends(args):
        for name in presets:
            preset = harness.MODEL_PRESETS[name]
            experts, k = preset["experts"], preset["k"]
            for tokens in QUICK_TOKENS if args.quick else TOKENS:
                logits = torch.randn(tokens, experts, device=device, dtype=torch.bfloat16)
                renormalize = preset.get("renormalize", False)
                cases.append(harness.Case(
                    op="topk_gating", label=f"{name} T={tokens}",
                    shape=dict(T=tokens, E=experts, k=k), backend=backend,
                    fn=lambda logits=logits, k=k, r=renormalize: moe_kernels.topk_gating(logits, k, renormalize=r),
                    # one read of the logits, one write of weights (fp32) and ids (int32)
                    bytes_moved=logits.numel() * logits.element_size() + tokens * k * 8))
    harness.run(cases, args)


if __name__ == "__main__":
    main()
