"""W4A16 grouped expert GEMM (4-bit weights) vs our bf16 grouped GEMM, and the dequant kernel.

    python bench/bench_int4.py [--quick] [--out DIR]

For each preset's expert shapes (bench_grouped_gemm.GEMM_PRESETS) at T in {1, 16, 256,
4096, 16384} tokens, routed and laid out as bench_grouped_gemm does (seeded random top-k,
``permute_plan``, M = T*k rows), the two GEMMs of the layer, forward only:

- gemm1: ``x [T, H]`` through the plan's gather, times w13 ``[E, 2I, H]``, silu_and_mul
  (GPT-OSS: swiglu_oai + bias);
- gemm2: ``h [M, I]`` times w2 ``[E, H, I]``, the routing weights as row_scale (GPT-OSS:
  + bias);

each with the weights as bf16 (our grouped GEMM, the baseline), "int4-g32" and
"int4-g128" (``moe_kernels.quant.quantize_int4(w, group_size)`` of the same bf16 weights,
symmetric, bf16 scales, quantized once at setup) and "mxfp4" (random e2m1 codes, e8m0
scales in 118..126). A group size that does not divide K (GPT-OSS's 2880 at 128) is left
out with a note. Then the standalone ``moe_kernels.quant.dequantize(qw, bfloat16)`` of
each preset's w13 and w2 in the three 4-bit formats.

On a GPU: the cuda backend, timed by the harness (CUDA events, L2 flush, median, NVTX
ranges op/case/backend; the weight format is part of op). A second table gives per GEMM
problem the tile configuration, rows per active expert, the weight bandwidth of the decode
forwards (T = 1 and 16, and any other given the decode tile): active experts * (N*K/2 +
scale bytes + zero-point bytes) over the time (bf16: N*K*2), its fraction of the HBM peak
(harness.DEVICE_PEAKS), and the speed-up over the bf16 grouped GEMM of the same run (the
goal: >= 3x and >= 70% of HBM at 1..16 rows per expert). Dequant rows give GB/s of codes +
scales read + output written.

On a CPU: the simt backend (the kernels in the emulator), one call per case with the
traffic counters on, on shapes scaled down as bench_grouped_gemm scales them (H and I
divided by cpu_div; E capped at 16 with --quick; T capped at 64). The table gives bytes
read and written (32-byte sectors), moved / minimum, bytes read relative to the bf16
GEMM's, the wall time of the counted call and, for the decode forwards, the weight-read
ratio (bytes read - activation re-reads per n-tile) / (active experts * (N*K/2 + scale +
zero bytes)): 1.0 when each active expert's 4-bit weights are read once (the bound is
1.05; offsets, gather, bias and row_scale reads count as weight traffic), and that excess in
bytes ("other bytes", equal across formats when each reads its weights once). ``--backends
simt,reference`` also times the reference by wall clock.

Every GEMM row of the JSON records ``gemm_config(...)`` of its problem (the 4-bit product
launches the tile the bf16 heuristic picks for the same m, n, k).
"""

import sys

import torch

import bench_grouped_gemm as bgg
import harness
import moe_kernels
from moe_kernels.quant import QuantizedWeight, dequantize, quantize_int4

FORMATS = ("bf16", "int4-g32", "int4-g128", "mxfp4")
QUANT_FORMATS = FORMATS[1:]
MXFP4_SCALES = (118, 127)  # e8m0 exponents drawn in [118, 126]: values 2**-9 .. 2**-1
WEIGHT_READ_BOUND = 1.05
GOAL_SPEEDUP, GOAL_HBM = 3.0, 0.70


def group_of(fmt):
    return {"int4-g32": 32, "int4-g128": 128, "mxfp4": 32}[fmt]


def quantized(fmt, w, g):
    """The 4-bit weight of format fmt standing for the bf16 w [E, N, K] (setup, untimed)."""
    experts, n, k = w.shape
    if fmt == "mxfp4":
        codes = torch.randint(0, 256, (experts, n, k // 2), generator=g, device=w.device, dtype=torch.uint8)
        scales = torch.randint(*MXFP4_SCALES, (experts, k // 32, n), generator=g, device=w.device,
                               dtype=torch.uint8)
        return QuantizedWeight("mxfp4", codes, scales, group_size=32)
    native = w.is_cuda and "cuda" in moe_kernels.available_backends()
    with moe_kernels.use_backend("cuda" if native else "reference"):
        return quantize_int4(w, group_of(fmt))


def weight_bytes_per_expert(fmt, n, k, qw=None):
    """Bytes of one expert's weight: N*K*2 (bf16), or N*K/2 codes + scales + zero points."""
    if qw is None:
        return n * k * 2
    per = lambda t: 0 if t is None else t[0].numel() * t.element_size()  # noqa: E731
    return n * k // 2 + per(qw.scales) + per(qw.zeros)


def fits(fmt, k, what):
    if fmt != "bf16" and k % group_of(fmt):
        harness.note(f"{fmt} left out for {what}: K={k} is not a multiple of group size {group_of(fmt)}")
        return False
    return True


# --- cases ----------------------------------------------------------------------------------

def gemm_cases(name, args, gpu, backends):
    """Yields (Case, extra) for one preset's GEMMs, every weight format."""
    p = bgg.gemm_preset(name)
    experts, hidden, inter, k = bgg.problem_shape(name, gpu, args.quick)
    device = "cuda" if gpu else "cpu"
    activation = p.get("activation", "silu_and_mul")
    g = torch.Generator(device=device).manual_seed(1)
    w13 = bgg.randn((experts, 2 * inter, hidden), device, hidden ** -0.5, g)
    w2 = bgg.randn((experts, hidden, inter), device, inter ** -0.5, g)
    b13 = bgg.randn((experts, 2 * inter), device, 0.1, g) if p["expert_bias"] else None
    b2 = bgg.randn((experts, hidden), device, 0.1, g) if p["expert_bias"] else None
    weights = {}
    for fmt in FORMATS:
        for key, w in (("w13", w13), ("w2", w2)):
            if fits(fmt, w.shape[2], f"{name} {key} [E={experts} N={w.shape[1]} K={w.shape[2]}]"):
                weights[(fmt, key)] = w if fmt == "bf16" else quantized(fmt, w, g)
    for tokens in bgg.token_counts(gpu, args.quick):
        plan, active = bgg.routed_plan(tokens, experts, k, device)
        m = tokens * k
        offsets, gather = plan.offsets, plan.gather
        row_scale = plan.weights.detach()
        x = bgg.randn((tokens, hidden), device, 1.0, g)
        h = bgg.randn((m, inter), device, 1.0, g)
        label = f"{name} T={tokens}" + ("" if gpu else f" [E={experts} H={hidden} I={inter}]")
        gemms = (("gemm1", "w13", dict(x=x, offsets=offsets, gather=gather, bias=b13, activation=activation,
                                       row_scale=None)),
                 ("gemm2", "w2", dict(x=h, offsets=offsets, gather=None, bias=b2, activation=None,
                                      row_scale=row_scale)))
        for gemm, key, inputs in gemms:
            n, kk = (w13 if key == "w13" else w2).shape[1:]
            act = inputs["activation"]
            shape = dict(T=tokens, E=experts, k=k, M=m, N=n, K=kk, H=hidden, I=inter, activation=act,
                         bias=inputs["bias"] is not None, row_scale=inputs["row_scale"] is not None,
                         scaled_for_cpu=not gpu)
            for fmt in FORMATS:
                if (fmt, key) not in weights:
                    continue
                w = weights[(fmt, key)]
                config = bgg.config_of(m, n, kk, experts, act, gpu, quantized=fmt != "bf16")
                per_expert = weight_bytes_per_expert(fmt, n, kk, None if fmt == "bf16" else w)
                extra = dict(gemm=gemm, weights=fmt, gemm_config=config._asdict(), active_experts=active,
                             rows_per_expert=m / active if active else None,
                             weight_bytes=active * per_expert,
                             decode=tokens in bgg.DECODE_TOKENS or config.variant == "decode",
                             n_out=n // 2 if act else n, tile_n=config.tile_n, gated=act is not None,
                             backward=False, x_bytes=m * kk * 2)
                for backend in backends:
                    fn = bgg.forward_only(bgg.kernel_call, dict(inputs, w=w))
                    yield harness.Case(op=f"{gemm} fwd {fmt}", label=label, shape=dict(shape, weights=fmt),
                                       backend=backend, fn=fn,
                                       flops=2 * m * n * kk if gpu else None), extra


def dequant_cases(name, args, gpu, backends):
    """Yields (Case, extra) for the dequantization of one preset's w13 and w2."""
    experts, hidden, inter, _ = bgg.problem_shape(name, gpu, args.quick)
    device = "cuda" if gpu else "cpu"
    g = torch.Generator(device=device).manual_seed(2)
    for key, (n, kk) in (("w13", (2 * inter, hidden)), ("w2", (hidden, inter))):
        w = bgg.randn((experts, n, kk), device, kk ** -0.5, g)
        label = f"{name} {key}" + ("" if gpu else f" [E={experts} N={n} K={kk}]")
        for fmt in QUANT_FORMATS:
            if not fits(fmt, kk, f"dequant {label}"):
                continue
            qw = quantized(fmt, w, g)
            moved = qw.nbytes + experts * n * kk * 2  # codes + scales (+ zeros) read, bf16 written
            extra = dict(gemm=None, weights=fmt, gemm_config=None, active_experts=None, rows_per_expert=None,
                         weight_bytes=qw.nbytes, decode=False, backward=False)
            for backend in backends:
                yield harness.Case(op=f"dequant {fmt}", label=label,
                                   shape=dict(E=experts, N=n, K=kk, weights=fmt, scaled_for_cpu=not gpu),
                                   backend=backend, fn=lambda qw=qw: dequantize(qw, torch.bfloat16),
                                   bytes_moved=moved), extra
        del w


# --- tables ---------------------------------------------------------------------------------

def bf16_row(rows, r):
    """The bf16 GEMM row of r's problem and backend (None for dequant rows or when absent)."""
    if not r.get("gemm"):
        return None
    for other in rows:
        if (other.get("gemm") == r["gemm"] and other["weights"] == "bf16" and other["label"] == r["label"]
                and other["backend"] == r["backend"]):
            return other
    return None


def gpu_table(rows, peaks):
    lines = []
    for r in rows:
        if r["backend"] != "cuda" or not r.get("gemm"):
            continue
        base = bf16_row(rows, r)
        speedup = base["median_us"] / r["median_us"] if base and r is not base and r["median_us"] else None
        goal = "-"
        if speedup is not None and r["weight_hbm_fraction"] is not None and r["rows_per_expert"] <= 16:
            goal = "met" if speedup >= GOAL_SPEEDUP and r["weight_hbm_fraction"] >= GOAL_HBM else "missed"
        lines.append((r["op"], r["label"], r["gemm_config"]["name"], str(r["active_experts"]),
                      bgg.fmt(r["rows_per_expert"], ".1f"), f"{r['median_us']:.1f}",
                      bgg.fmt(r["weight_gbps"], ".0f"), bgg.fmt(r["weight_hbm_fraction"], ".1%"),
                      bgg.fmt(speedup, ".2f"), goal))
    hbm = f"{peaks['gbps']} GB/s" if peaks and peaks.get("gbps") else "unknown"
    return (f"cuda W4A16 per problem (weight GB/s: decode forwards, active E * (N*K/2 + scales + zeros) / "
            f"time, HBM peak {hbm}; vs bf16 = bf16 grouped GEMM median / this median; goal: >= "
            f"{GOAL_SPEEDUP:.0f}x and >= {GOAL_HBM:.0%} of HBM at <= 16 rows per expert):\n"
            + harness.table(("op", "case", "config", "active E", "rows/E", "median us", "weight GB/s", "of HBM",
                         "vs bf16", "goal"), lines, left=3))


def cpu_table(rows):
    lines = []
    for r in rows:
        t = r.get("traffic")
        if not t:
            continue
        base = bf16_row(rows, r)
        vs = t["bytes_read"] / base["traffic"]["bytes_read"] if base and base.get("traffic") else None
        ratio = t["weight_read_ratio"]
        flag = " !" if ratio is not None and r["weights"] != "bf16" and ratio > WEIGHT_READ_BOUND else ""
        lines.append((r["op"], r["label"], (r["gemm_config"] or {}).get("name", "-"), str(t["launches"]),
                      f"{t['bytes_read'] / 1e6:.3f}", f"{t['bytes_written'] / 1e6:.3f}",
                      bgg.fmt(t["amplification"], ".2f"), bgg.fmt(vs, ".3f"),
                      bgg.fmt(ratio, ".3f") + flag, bgg.fmt(t["other_read_bytes"], ".0f"),
                      f"{r['median_us'] / 1e3:.0f}"))
    return ("simt emulator traffic counters (one call per case; bytes in 32-byte sectors; read vs bf16 = "
            "bytes read / the bf16 GEMM's; weight read ratio = (read - activation re-reads) / (active "
            "experts * weight bytes per expert), decode forwards, ! above "
            f"{WEIGHT_READ_BOUND}; other bytes = bytes read - activation re-reads - weight bytes):\n"
            + harness.table(("op", "case", "config", "launches", "read MB", "written MB", "moved/min", "read vs bf16",
                         "weight read ratio", "other bytes", "emulator ms"), lines, left=3))


# --- main -----------------------------------------------------------------------------------

def measure(case, extra, args, gpu, peaks, flush):
    if case.backend == "simt" and bgg.has_observer():
        launches, wall_us = bgg.count_traffic(case)
        row = harness.summarize(case, [wall_us], peaks)
        row["traffic"] = bgg.traffic_fields(launches, extra)
        ratio = row["traffic"]["weight_read_ratio"]
        # What the ratio's excess is in bytes: reads that are neither the weights nor the
        # activation rows (metadata, bias, row_scale, repeated weight reads).
        row["traffic"]["other_read_bytes"] = (ratio - 1) * extra["weight_bytes"] if ratio is not None else None
    else:
        row = harness.summarize(case, harness.time_case(case, args, flush), peaks)
    row.update(gemm=extra["gemm"], weights=extra["weights"], gemm_config=extra["gemm_config"],
               active_experts=extra["active_experts"], rows_per_expert=extra["rows_per_expert"],
               weight_bytes=extra["weight_bytes"], weight_gbps=None, weight_hbm_fraction=None)
    if gpu and extra["gemm"] and extra["decode"] and row["median_us"] > 0:
        row["weight_gbps"] = extra["weight_bytes"] / (row["median_us"] * 1e-6) / 1e9
        if peaks and peaks.get("gbps"):
            row["weight_hbm_fraction"] = row["weight_gbps"] / peaks["gbps"]
    return row


def main():
    args = harness.parse_args(__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    peaks = harness.device_peaks()
    # The kernels (cuda on a GPU, simt on a CPU); the reference only when --backends names it.
    backends = [b for b, d in harness.backends(args)
                if d == ("cuda" if gpu else "cpu") and (b != "reference" or args.backends)]
    if gpu and "cuda" not in moe_kernels.available_backends():
        print("warning: a GPU but no CUDA kernels (moe_kernels built without them): nothing to time",
              file=sys.stderr)
    flush = torch.empty(harness.L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if gpu else None
    presets = bgg.QUICK_PRESETS if args.quick else tuple(bgg.GEMM_PRESETS)
    rows = []
    for j, name in enumerate(presets):
        for make in (gemm_cases, dequant_cases):
            for i, (case, extra) in enumerate(make(name, args, gpu, backends)):
                harness.progress(f"[{j + 1}/{len(presets)} {i + 1}] {case.op} {case.label} on {case.backend} ...")
                rows.append(measure(case, extra, args, gpu, peaks, flush))
            if gpu:
                torch.cuda.empty_cache()  # this preset's weights are gone
    harness.progress_done()
    meta = dict(skipped=harness.SKIPPED, presets={name: bgg.gemm_preset(name) for name in presets},
                formats=FORMATS, mxfp4_scale_exponents=[MXFP4_SCALES[0], MXFP4_SCALES[1] - 1],
                weight_read_bound=WEIGHT_READ_BOUND, goal=dict(speedup=GOAL_SPEEDUP, hbm_fraction=GOAL_HBM))
    # The plot: one group per problem (op without the format), one bar per weight format.
    plot_rows = [dict(r, op=r["op"].rsplit(" ", 1)[0], backend=f"{r['backend']} {r['weights']}") for r in rows]
    return bgg.report(rows, args, gpu, peaks, gpu_table(rows, peaks) if gpu else cpu_table(rows), meta, plot_rows)


if __name__ == "__main__":
    main()
