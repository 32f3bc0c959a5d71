"""Memory traffic of every kernel, counted by the SIMT emulator (no GPU needed).

    python bench/traffic_report.py [--quick] [--out DIR] [--tokens N] [--hidden H]

Runs every op on the model presets' routing shapes (experts, k, scoring, groups: of
moe_kernels.presets.PRESETS, through harness.bench_preset) with the token count and hidden
size scaled down to what the emulator runs in seconds, and counts each kernel launch:
global bytes the threads asked for, the 32-byte sectors their warp-level instructions
touched (what the GPU's memory system moves), the minimum (every distinct byte read once
and written once) and their ratio, the traffic amplification; for shared memory, the
wavefronts against the conflict-free count and the worst bank conflict. Prints a table per
kernel (worst case over the presets) and writes <out>/traffic_report.json with every
launch.

This is our GPU-free performance figure for memory-bound kernels: an amplification near
1 means the kernel moves what it must; above it, re-reads or uncoalesced accesses.
"""

import json
import sys
from pathlib import Path

import torch

import harness
import moe_kernels
from moe_kernels import emulator

QUICK_PRESETS = harness.QUICK_PRESETS
# The model presets plus the largest expert count the kernels take (their widest rows).
# Assignments (tokens * k) of the multi-tile index case: four tiles of 1024.
MULTI_TILE_ASSIGNMENTS = 4096
PRESETS = dict({name: harness.bench_preset(name) for name in harness.PRESETS},
               e4096=dict(experts=4096, k=8, routing=dict(scoring="softmax"), bias=False))


def run_preset(name, tokens, hidden):
    """Every op once on one preset's shapes; returns (op, launch rows)."""
    p = PRESETS[name]
    E, k = p["experts"], p["k"]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, E, generator=g).to(torch.bfloat16).requires_grad_(True)
    gating_kwargs = dict(p["routing"])
    if p.get("bias"):
        gating_kwargs["bias"] = torch.randn(E, generator=g) * 0.1
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.bfloat16)
    results = []

    def count(op, fn):
        with emulator.traffic() as rows:
            out = fn()
        results.append((op, rows))
        return out

    with moe_kernels.use_backend("simt"):
        weights, ids = count("topk_gating", lambda: moe_kernels.topk_gating(logits, k, **gating_kwargs))
        count("topk_gating backward", lambda: weights.sum().backward())
        count("router_stats", lambda: moe_kernels.router_stats(ids, E))
        count("expert_choice_gating",
              lambda: moe_kernels.expert_choice_gating(logits.detach(), max(1, tokens * k // E)))
        count("hash_gating", lambda: moe_kernels.hash_gating(torch.arange(tokens), E, k))
        w = weights.detach()
        perm = count("permute", lambda: moe_kernels.permute(x, ids, E, weights=w))
        count("permute align=128", lambda: moe_kernels.permute(x, ids, E, align=128))
        count("permute_plan", lambda: moe_kernels.permute_plan(ids, E, weights=w))
        count("permute capacity drop=weight",
              lambda: moe_kernels.permute(x, ids, E, capacity=max(1, tokens * k // E),
                                          drop_policy="weight", weights=w))
        # The multi-tile index path (count, offsets and place kernels: more than one tile
        # of 1024 assignments), on the ids of a larger batch drawn on the host (topk of
        # random scores: running the gating kernel on that batch would only add run time).
        big_tokens = max(tokens, MULTI_TILE_ASSIGNMENTS // k)
        big_ids = torch.randn(big_tokens, E, generator=g).topk(k, dim=1).indices
        big_w = torch.rand(big_tokens, k, generator=g)
        count("permute_plan multi-tile", lambda: moe_kernels.permute_plan(big_ids, E, weights=big_w))
        count("permute_plan multi-tile capacity drop=weight",
              lambda: moe_kernels.permute_plan(big_ids, E, capacity=max(1, big_tokens * k // E),
                                               drop_policy="weight", weights=big_w))
        y_perm = perm.x.detach().requires_grad_(True)
        w_grad = w.clone().requires_grad_(True)
        y = count("unpermute", lambda: moe_kernels.unpermute(y_perm, perm.row_map, w_grad))
        count("unpermute backward", lambda: y.float().sum().backward())
    return results


def format_table(rows):
    header = ("kernel", "worst case", "sectors", "min bytes", "moved bytes", "amplification",
              "bank ways", "smem wavefronts/ideal")
    lines = [(r["kernel"], r["case"], str(r["sectors_read"] + r["sectors_written"]), str(r["min_bytes"]),
              str(r["moved_bytes"]), f"{r['amplification']:.2f}", str(r["max_bank_conflict_ways"]),
              f"{r['bank_conflict_factor']:.2f}" if r["shared_instructions"] else "-") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    out = lambda cells: "  ".join(c.rjust(w) if i >= 2 else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([out(header), out(["-" * w for w in widths])] + [out(line) for line in lines])


def main(argv=None):
    parser = harness.argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two presets, fewer tokens (CI)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--tokens", type=int, default=None, help="tokens per preset (default 64, quick 16)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the permuted rows")
    args = parser.parse_args(argv)
    tokens = args.tokens or (16 if args.quick else 64)
    presets = QUICK_PRESETS if args.quick else tuple(PRESETS)
    launches = []
    for i, name in enumerate(presets):
        print(f"[{i + 1}/{len(presets)}] {name} ...", file=sys.stderr, flush=True)
        for op, rows in run_preset(name, tokens, args.hidden):
            for row in rows:
                launches.append(dict(row, op=op, case=f"{name} {op}", preset=name, tokens=tokens,
                                     hidden=args.hidden))
    if not launches:
        raise SystemExit("no kernel launch was counted")
    # Per kernel: the launch with the worst amplification (ties: more bytes).
    worst = {}
    for row in launches:
        best = worst.get(row["kernel"])
        if best is None or (row["amplification"], row["moved_bytes"]) > (best["amplification"], best["moved_bytes"]):
            worst[row["kernel"]] = row
    table = sorted(worst.values(), key=lambda r: -r["amplification"])
    print(f"traffic_report: {len(launches)} launches, {len(presets)} presets, {tokens} tokens, "
          f"hidden {args.hidden} (simt emulator counters)\n{format_table(table)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(script="traffic_report", tokens=tokens, hidden=args.hidden, presets=list(presets),
                torch=torch.__version__, quick=args.quick)
    (out / "traffic_report.json").write_text(json.dumps(dict(meta=meta, worst=table, launches=launches), indent=1))
    print(f"wrote {out / 'traffic_report.json'}")
    return table


if __name__ == "__main__":
    main()
