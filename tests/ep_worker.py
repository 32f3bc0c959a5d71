"""One rank of the expert-parallel tests (tests/test_distributed.py starts W of these).

    python tests/ep_worker.py --rank R --world W --store FILE --specs FILE --out DIR

Joins a gloo group through a file store, runs every scenario of the specs file (the same
list on every rank) through ``ExpertParallelMoE`` built from the full single-process layer
(same seed on every rank), and saves, per scenario, the rank's output, its input
gradient, the parameters' gradients, the drop counter and the exchange figures to
``DIR/rank{R}.pt``. The test process computes the single-process references and compares.
The layers, tokens and output gradients come from the functions below, which the test
imports too.
"""

import argparse
import datetime
import json
import os
import sys
import traceback

import torch

HIDDEN, INTER = 64, 32


def build_layer(spec):
    """The full single-process layer of a scenario (identical on every rank)."""
    from moe_kernels import MoE
    torch.manual_seed(spec.get("seed", 0))
    config = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_experts=8, k=2, router_bias=True)
    config.update(spec.get("config", {}))
    layer = MoE(**config)
    with torch.no_grad():
        if layer.b13 is not None:
            layer.b13.normal_(0, 0.1)
            layer.b2.normal_(0, 0.1)
        layer.router_bias.normal_(0, 0.1)
        for e, v in spec.get("router_bias", {}).items():  # skew the routing
            layer.router_bias[int(e)] += v
    return layer


def rank_tokens(spec, rank):
    """(x, grad_y) of `rank`: its own tokens and the gradient of its output."""
    counts = spec["tokens"]
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(counts[rank], HIDDEN, generator=g).to(torch.bfloat16)
    grad_y = torch.randn(counts[rank], HIDDEN, generator=g).to(torch.bfloat16)
    return x, grad_y


def run_scenario(spec, group):
    import moe_kernels
    from moe_kernels.distributed import ExpertParallelMoE
    rank = torch.distributed.get_rank()
    layer = build_layer(spec)
    if spec.get("expect_error"):
        try:
            ExpertParallelMoE.from_moe(layer, group, mode=spec["mode"])
        except ValueError as exc:
            return dict(error=str(exc))
        return dict(error=None)
    ep = ExpertParallelMoE.from_moe(layer, group, mode=spec["mode"], capacity=spec.get("capacity"),
                                    capacity_factor=spec.get("capacity_factor", 1.0))
    del layer
    x, grad_y = rank_tokens(spec, rank)
    x.requires_grad_()
    with moe_kernels.use_backend(spec["backend"]):
        y = ep(x)
        (y.float() * grad_y.float()).sum().backward()
    grads = {name: p.grad for name, p in ep.named_parameters()}
    return dict(y=y.detach(), x_grad=x.grad, grads=grads, dropped=int(ep.dropped),
                exchange=ep.last_exchange, local=(ep.expert_start, ep.expert_end))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--specs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # A collective that waits this long fails (the test's own timeout is the backstop).
    torch.distributed.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank,
                                         world_size=args.world, timeout=datetime.timedelta(seconds=90))
    with open(args.specs) as f:
        specs = json.load(f)
    results = {}
    for spec in specs:
        try:
            results[spec["name"]] = run_scenario(spec, None)
        except Exception:  # recorded; a collective left half-done fails the others by timeout
            results[spec["name"]] = dict(traceback=traceback.format_exc())
    torch.save(results, os.path.join(args.out, f"rank{args.rank}.pt"))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
