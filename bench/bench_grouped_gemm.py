"""Grouped expert GEMM (both GEMMs of an MoE layer) vs per-expert torch.mm and torch._grouped_mm.

    python bench/bench_grouped_gemm.py [--quick] [--out DIR]

For each preset's expert shapes (GEMM_PRESETS: entries of moe_kernels.presets.PRESETS) at
T in {1, 16, 256, 4096, 16384} tokens, routed by a seeded random top-k and laid out by
``permute_plan`` (align 1, no capacity: M = T*k rows):

- gemm1: ``x [T, H]`` read in place through the plan's gather, times ``w13 [E, 2I, H]``,
  activation silu_and_mul (GPT-OSS: swiglu_oai + bias): N = 2I, K = H, y ``[M, I]``;
- gemm2: ``h [M, I]`` times ``w2 [E, H, I]``, scaled by the routing weights (row_scale;
  GPT-OSS: + bias): N = H, K = I, y ``[M, H]``;

each forward ("fwd") and forward + backward ("fwd+bwd": d input, d weights, d bias,
d row_scale; 3x the forward's FLOPs).

On a GPU: the cuda backend against two baselines in the same run, "torch.mm-loop" (one
torch.mm per expert with rows, epilogue in PyTorch; the host reads the offsets, which is
that baseline's cost) and "torch._grouped_mm" (where this torch and GPU run it: sm_90+,
bf16; left out with a note otherwise), timed by the harness (CUDA events, L2 flush,
median, NVTX ranges op/case/backend). TFLOP/s count 2*M*N*K per forward (x3 with the
backward). The decode forwards (T = 1 and 16, and any other that gemm_config gives the
decode tile) also get the weight bandwidth, active experts * N * K * 2 bytes over the
forward's time, and its fraction of the device's HBM peak (harness.DEVICE_PEAKS).
``--backends reference`` adds the fp32 PyTorch reference (left out by default: it is the
tests' oracle, not a baseline).

On a CPU: no GPU figures. The simt backend (the CUDA kernels in the emulator) runs each
case once, with the traffic counters on, on shapes scaled down (H and I divided by each
preset's cpu_div; E capped at 16 with --quick; T capped at 64: at these sizes every case
gets the decode tile). The table gives bytes read and written (32-byte sectors), the
amplification over the minimum, the wall time of the counted call and, for the decode
forwards, the weight-read ratio (bytes read - activation reads) / (active experts * N *
K * 2): 1.0 when each active expert's weights are read once and no other expert's are
(the activation rows are re-read once per n-tile and subtracted exactly, as in
tests/test_gemm.py; offsets, gather, bias and row_scale reads count as weight traffic).
``--backends simt,reference`` also times the reference by wall clock.

Every row of the JSON records ``gemm_config(...)`` of its problem (the tile configuration
the cuda kernel, or the emulated one on the CPU, launches).
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import harness
import moe_kernels
from moe_kernels import emulator
from moe_kernels.reference.gemm import epilogue as reference_epilogue

# The expert shapes (E experts, hidden H, expert intermediate I, top-k, activation, expert
# biases) come from moe_kernels.presets.PRESETS through harness.bench_preset. Per benchmark
# case: the preset, ep (its experts on one rank of ep-way expert parallelism: DeepSeek-V3's
# 256 / 8 local experts) and cpu_div, which divides H and I for the emulator so that each CPU
# case runs in about a second; they are rounded to multiples of 64, as every preset's own H
# and I are (K then has no partial k-tile, as on the GPU).
GEMM_PRESETS = {
    "mixtral": dict(preset="mixtral", cpu_div=32),
    "qwen3_moe": dict(preset="qwen3_moe", cpu_div=16),
    "qwen3_next": dict(preset="qwen3_next", cpu_div=16),
    "deepseek_v3-ep8": dict(preset="deepseek_v3", ep=8, cpu_div=32),
    "gpt_oss": dict(preset="gpt_oss", cpu_div=24),
}
QUICK_PRESETS = ("mixtral", "gpt_oss")
TOKENS = (1, 16, 256, 4096, 16384)
QUICK_TOKENS = (1, 16)
DECODE_TOKENS = (1, 16)
CPU_MAX_TOKENS = 64
CPU_QUICK_MAX_EXPERTS = 16
EMULATED_SMS = 4  # csrc/simt/simt.h kEmulatedMultiprocessors: what the simt launches see
MM_LOOP, GROUPED_MM = "torch.mm-loop", "torch._grouped_mm"
BASELINES = (MM_LOOP, GROUPED_MM)


def gemm_preset(name):
    """harness.bench_preset of a GEMM_PRESETS entry, its experts divided by its ep degree,
    with its cpu_div and ep."""
    entry = GEMM_PRESETS[name]
    p = harness.bench_preset(entry["preset"])
    if not p["gated"]:
        raise ValueError(f"{name}: gemm1 is benchmarked with a gated activation (N = 2I)")
    ep = entry.get("ep", 1)
    return dict(p, experts=p["experts"] // ep, ep=ep, cpu_div=entry["cpu_div"])


def round64(value):
    return max(64, int(round(value / 64)) * 64)


def problem_shape(name, gpu, quick):
    """(E, H, I, k) of a preset: its own on a GPU, scaled down for the emulator on a CPU."""
    p = gemm_preset(name)
    experts, hidden, inter, k = p["experts"], p["hidden"], p["inter"], p["k"]
    if not gpu:
        hidden, inter = round64(hidden / p["cpu_div"]), round64(inter / p["cpu_div"])
        if quick:
            experts = min(experts, CPU_QUICK_MAX_EXPERTS)
            k = min(k, experts)
    return experts, hidden, inter, k


def token_counts(gpu, quick):
    tokens = QUICK_TOKENS if quick else TOKENS
    return tokens if gpu else tuple(dict.fromkeys(min(t, CPU_MAX_TOKENS) for t in tokens))


def routed_plan(tokens, experts, k, device):
    """A seeded random top-k (seed = tokens; softmax weights) laid out by ``permute_plan``
    (align 1, no capacity), and the number of experts with rows. Setup only: built by the
    reference, the same layout on every backend, outside the timed calls."""
    g = torch.Generator(device=device).manual_seed(tokens)
    logits = torch.randn(tokens, experts, generator=g, device=device)
    values, ids = torch.topk(logits, k, dim=1)
    with moe_kernels.use_backend("reference"):
        plan = moe_kernels.permute_plan(ids, experts, weights=torch.softmax(values, dim=1))
    return plan, int((plan.offsets[1:] > plan.offsets[:-1]).sum())


def randn(shape, device, scale, g):
    return (torch.randn(shape, generator=g, device=device) * scale).to(torch.bfloat16)


def config_of(m, n, k, experts, activation, gpu, quantized=False):
    """gemm_config of a problem as the running backend launches it: the current GPU, or the
    emulator (MOE_KERNELS_SIMT_ARCH, default 90, and its multiprocessors)."""
    if gpu:
        return moe_kernels.gemm_config(m, n, k, experts, w_layout="nk", activation=activation,
                                       quantized=quantized)
    arch = int(os.environ.get("MOE_KERNELS_SIMT_ARCH") or 90)
    return moe_kernels.gemm_config(m, n, k, experts, w_layout="nk", activation=activation,
                                   arch=arch, num_sms=EMULATED_SMS, quantized=quantized)


# --- the calls ------------------------------------------------------------------------------

def kernel_call(x, w, offsets, gather, bias, activation, row_scale):
    return lambda: moe_kernels.grouped_gemm(x, w, offsets, gather=gather, bias=bias,
                                            activation=activation, row_scale=row_scale)


def mm_loop_call(x, w, offsets, gather, bias, activation, row_scale):
    """One torch.mm per expert with rows, bf16, the epilogue in PyTorch. The host reads the
    offsets (a sync on a GPU): that is this baseline's cost."""
    def call():
        rows = x.index_select(0, gather) if gather is not None else x
        bounds = offsets.tolist()
        outs = []
        for e in range(w.shape[0]):
            begin, end = bounds[e], bounds[e + 1]
            if end == begin:
                continue
            h = torch.mm(rows[begin:end], w[e].t())
            if bias is not None:
                h = h + bias[e]
            h = torch_epilogue(h, activation)
            if row_scale is not None:
                h = h * row_scale[begin:end, None]
            outs.append(h)
        return torch.cat(outs)
    return call


def grouped_mm_call(x, w, offsets, gather, bias, activation, row_scale):
    """torch._grouped_mm on [M, K] x [E, K, N] (w read in place, transposed view) with the
    int32 cumulative row ends; bias, activation and row scale in PyTorch."""
    offs = offsets[1:].to(torch.int32)
    w_kn = w.transpose(1, 2)
    expert_of_row = None
    if bias is not None:  # routing metadata, built once outside the timed call
        m = gather.shape[0] if gather is not None else x.shape[0]
        expert_of_row = torch.searchsorted(offsets[1:], torch.arange(m, device=x.device), right=True)

    def call():
        rows = x.index_select(0, gather) if gather is not None else x
        h = torch._grouped_mm(rows, w_kn, offs=offs)
        if bias is not None:
            h = h + bias.index_select(0, expert_of_row)
        h = torch_epilogue(h, activation)
        if row_scale is not None:
            h = h * row_scale[:, None]
        return h
    return call


def torch_epilogue(h, activation):
    if activation == "silu_and_mul":
        half = h.shape[-1] // 2
        return F.silu(h[..., :half]) * h[..., half:]
    return reference_epilogue(h, activation, 1.702, 7.0).to(h.dtype)


def forward_only(make, inputs):
    fn = make(**inputs)

    def call():
        with torch.no_grad():
            return fn()
    return call


def forward_backward(make, inputs, grad_names, grad_y):
    """y = f(inputs), then the gradients of every differentiable input (one backward)."""
    inputs = {name: (t.detach().requires_grad_(True) if name in grad_names and t is not None else t)
              for name, t in inputs.items()}
    fn = make(**inputs)
    wrt = [inputs[name] for name in grad_names if inputs[name] is not None]
    return lambda: torch.autograd.grad(fn(), wrt, grad_y)


# --- cases ----------------------------------------------------------------------------------

def preset_cases(name, args, gpu, pairs):
    """Yields (Case, extra) for one preset: extra holds what goes into the JSON row beyond
    the harness's fields. Tensors are built here, per preset, and freed with its cases."""
    p = gemm_preset(name)
    experts, hidden, inter, k = problem_shape(name, gpu, args.quick)
    device = "cuda" if gpu else "cpu"
    activation = p.get("activation", "silu_and_mul")
    g = torch.Generator(device=device).manual_seed(1)
    w13 = randn((experts, 2 * inter, hidden), device, hidden ** -0.5, g)
    w2 = randn((experts, hidden, inter), device, inter ** -0.5, g)
    b13 = randn((experts, 2 * inter), device, 0.1, g) if p["expert_bias"] else None
    b2 = randn((experts, hidden), device, 0.1, g) if p["expert_bias"] else None
    for tokens in token_counts(gpu, args.quick):
        plan, active = routed_plan(tokens, experts, k, device)
        m = tokens * k
        offsets, gather = plan.offsets, plan.gather
        row_scale = plan.weights.detach()
        x = randn((tokens, hidden), device, 1.0, g)
        h = randn((m, inter), device, 1.0, g)
        label = f"{name} T={tokens}" + ("" if gpu else f" [E={experts} H={hidden} I={inter}]")
        gemms = (
            ("gemm1", dict(x=x, w=w13, offsets=offsets, gather=gather, bias=b13, activation=activation,
                           row_scale=None), ("x", "w", "bias"), (m, inter)),
            ("gemm2", dict(x=h, w=w2, offsets=offsets, gather=None, bias=b2, activation=None,
                           row_scale=row_scale), ("x", "w", "bias", "row_scale"), (m, hidden)),
        )
        for gemm, inputs, grad_names, y_shape in gemms:
            n, kk = inputs["w"].shape[1], inputs["w"].shape[2]
            act = inputs["activation"]
            config = config_of(m, n, kk, experts, act, gpu)
            grad_y = randn(y_shape, device, 1.0, g)
            shape = dict(T=tokens, E=experts, k=k, M=m, N=n, K=kk, H=hidden, I=inter, activation=act,
                         bias=inputs["bias"] is not None, row_scale=inputs["row_scale"] is not None,
                         scaled_for_cpu=not gpu)
            for direction in ("fwd", "fwd+bwd"):
                backward = direction == "fwd+bwd"
                extra = dict(gemm_config=config._asdict(), active_experts=active,
                             weight_bytes=active * n * kk * 2,
                             decode=tokens in DECODE_TOKENS or config.variant == "decode",
                             n_out=n // 2 if act else n, tile_n=config.tile_n, gated=act is not None,
                             backward=backward, x_bytes=m * kk * 2)
                for backend in [b for b, _ in pairs] + (list(BASELINES) if gpu else []):
                    if args.backends and backend not in args.backends.split(","):
                        continue
                    make = {MM_LOOP: mm_loop_call, GROUPED_MM: grouped_mm_call}.get(backend, kernel_call)
                    fn = (forward_backward(make, inputs, grad_names, grad_y) if backward
                          else forward_only(make, inputs))
                    yield harness.Case(op=f"{gemm} {direction}", label=label, shape=shape, backend=backend,
                                       fn=fn, flops=2 * m * n * kk * (3 if backward else 1) if gpu else None), extra


# --- measuring ------------------------------------------------------------------------------

def time_baseline(case, args, flush):
    """harness.time_case for a call outside moe_kernels (no backend to select): the same
    warm-up, L2 flush, CUDA events and NVTX range op/case/backend."""
    times = []
    for _ in range(args.warmup):
        case.fn()
    for _ in range(args.iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with harness.nvtx_range(f"{case.op}/{case.label}/{case.backend}"):
            start.record()
            case.fn()
            end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return times


def baseline_runs(case):
    """Whether a baseline runs on this GPU/torch (torch._grouped_mm needs sm_90+ or a recent
    fallback); prints why not once per reason."""
    try:
        case.fn()
        torch.cuda.synchronize()
        return True
    except Exception as exc:  # noqa: BLE001 (any failure: the baseline is left out)
        harness.note(f"{case.backend} left out: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return False


def count_traffic(case):
    """One emulated call with the traffic counters on: the per-launch rows and the wall time."""
    import time

    with moe_kernels.use_backend(case.backend), harness.nvtx_range(f"{case.op}/{case.label}/{case.backend}"):
        with emulator.traffic() as launches:
            t0 = time.perf_counter()
            case.fn()
            wall_us = (time.perf_counter() - t0) * 1e6
    return launches, wall_us


def has_observer():
    """Whether this _simt build counts traffic (the AddressSanitizer build has no memory
    observer: then the simt cases are only timed, by wall clock)."""
    try:
        from moe_kernels import _build_info
    except ImportError:
        return True
    if getattr(_build_info, "simt_observer", True):
        return True
    harness.note("simt traffic counters left out: this _simt build has no memory observer")
    return False


def traffic_fields(launches, extra):
    read = sum(r["sectors_read"] for r in launches) * emulator.SECTOR_BYTES
    written = sum(r["sectors_written"] for r in launches) * emulator.SECTOR_BYTES
    minimum = sum(r["min_bytes"] for r in launches)
    fields = dict(launches=len(launches), bytes_read=read, bytes_written=written, moved_bytes=read + written,
                  min_bytes=minimum, amplification=(read + written) / minimum if minimum else None,
                  weight_read_ratio=None,
                  kernels=[dict(kernel=r["kernel"], grid=r["grid"], moved_bytes=r["moved_bytes"],
                                min_bytes=r["min_bytes"]) for r in launches])
    if extra["decode"] and not extra["backward"] and extra["weight_bytes"]:
        # The activation rows are read once per n-tile (gated: tile_n / 2 outputs per tile).
        per_tile = extra["tile_n"] // 2 if extra["gated"] else extra["tile_n"]
        n_tiles = -(-extra["n_out"] // per_tile)
        fields["weight_read_ratio"] = (read - n_tiles * extra["x_bytes"]) / extra["weight_bytes"]
    return fields


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def gpu_table(rows, peaks):
    """Per problem: the kernel's configuration, decode weight bandwidth, speed-ups."""
    by_key = {(r["op"], r["label"], r["backend"]): r for r in rows}
    lines = []
    for r in rows:
        if r["backend"] != "cuda":
            continue
        lines.append((r["op"], r["label"], r["gemm_config"]["name"], str(r["active_experts"]),
                      fmt(r["weight_gbps"], ".0f"), fmt(r["weight_hbm_fraction"], ".1%"),
                      fmt(harness.speedup(by_key, r, MM_LOOP), ".2f"),
                      fmt(harness.speedup(by_key, r, GROUPED_MM), ".2f")))
    hbm = f"{peaks['gbps']} GB/s" if peaks and peaks.get("gbps") else "unknown"
    return (f"cuda kernel per problem (weight GB/s: decode forwards, HBM peak {hbm}; speed-up = "
            f"baseline median / cuda median):\n"
            + harness.table(("op", "case", "config", "active E", "weight GB/s", "of HBM", "vs mm-loop",
                     "vs grouped_mm"), lines, left=3))


def cpu_table(rows):
    lines = [(r["op"], r["label"], r["gemm_config"]["name"], str(r["traffic"]["launches"]),
              f"{r['traffic']['bytes_read'] / 1e6:.3f}", f"{r['traffic']['bytes_written'] / 1e6:.3f}",
              fmt(r["traffic"]["amplification"], ".2f"), fmt(r["traffic"]["weight_read_ratio"], ".3f"),
              f"{r['median_us'] / 1e3:.0f}")
             for r in rows if r.get("traffic")]
    return ("simt emulator traffic counters (one call per case; bytes in 32-byte sectors; weight "
            "read ratio = (read - activation re-reads) / (active experts * N * K * 2), decode "
            "forwards):\n" + harness.table(("op", "case", "config", "launches", "read MB", "written MB",
                                    "moved/min", "weight read ratio", "emulator ms"), lines, left=3))


def main():
    args = harness.parse_args(__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    peaks = harness.device_peaks()
    # The kernels (cuda on a GPU, simt on a CPU); the fp32 reference only when --backends
    # names it (it is the tests' oracle, and its CPU wall-clock says nothing).
    pairs = [(b, d) for b, d in harness.backends(args)
             if d == ("cuda" if gpu else "cpu") and (b != "reference" or args.backends)]
    if gpu and "cuda" not in moe_kernels.available_backends():
        print("warning: a GPU but no CUDA kernels (moe_kernels built without them): baselines only",
              file=sys.stderr)
    flush = torch.empty(harness.L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if gpu else None
    presets = QUICK_PRESETS if args.quick else tuple(GEMM_PRESETS)
    rows = []
    for j, name in enumerate(presets):
        for i, (case, extra) in enumerate(preset_cases(name, args, gpu, pairs)):
            harness.progress(f"[{j + 1}/{len(presets)} {i + 1}] {case.op} {case.label} on {case.backend} ...")
            row = None
            if case.backend == "simt" and not has_observer():
                row = harness.summarize(case, harness.time_case(case, args, flush), peaks)  # wall clock
            elif case.backend == "simt":
                launches, wall_us = count_traffic(case)
                row = harness.summarize(case, [wall_us], peaks)
                row["traffic"] = traffic_fields(launches, extra)
            elif case.backend in BASELINES:
                if baseline_runs(case):
                    row = harness.summarize(case, time_baseline(case, args, flush), peaks)
            else:
                row = harness.summarize(case, harness.time_case(case, args, flush), peaks)
            if row is None:
                continue
            row.update(gemm_config=extra["gemm_config"], active_experts=extra["active_experts"],
                       weight_bytes=extra["weight_bytes"], weight_gbps=None, weight_hbm_fraction=None)
            if gpu and extra["decode"] and not extra["backward"] and row["median_us"] > 0:
                row["weight_gbps"] = extra["weight_bytes"] / (row["median_us"] * 1e-6) / 1e9
                if peaks and peaks.get("gbps"):
                    row["weight_hbm_fraction"] = row["weight_gbps"] / peaks["gbps"]
            rows.append(row)
        if gpu:
            torch.cuda.empty_cache()  # this preset's weights are gone
    harness.progress_done()
    return report(rows, args, gpu, peaks, gpu_table(rows, peaks) if gpu else cpu_table(rows),
                  dict(skipped=harness.SKIPPED, presets={name: gemm_preset(name) for name in presets}))


def report(rows, args, gpu, peaks, table_text, meta_extra, plot_rows=None):
    """Prints the rows (the harness table and `table_text`: the GPU figures, or the CPU
    traffic counters), writes <out>/<name>.json (meta + rows) and .png; returns rows."""
    device = peaks["name"] if gpu else "CPU (simt emulator on scaled-down shapes; no GPU figures)"
    if gpu:
        print(f"{args.name} on {device}\n{harness.format_table(rows)}\n\n{table_text}")
    else:
        print(f"{args.name} on {device}")
        if any(r.get("traffic") for r in rows):
            print(table_text)
        timed = [r for r in rows if not r.get("traffic")]
        if timed:
            print(f"wall-clock on the CPU (no GPU figures):\n{harness.format_table(timed)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(script=args.name, device=device, torch=torch.__version__, quick=args.quick,
                iters=args.iters, warmup=args.warmup, peaks=peaks, **meta_extra,
                simt_calls_per_case=None if gpu else 1)
    (out / f"{args.name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    harness.plot(plot_rows or rows, out / f"{args.name}.png",
                 f"{args.name} on {device if gpu else 'CPU (emulator)'}")
    print(f"wrote {out / (args.name + '.json')} and .png")
    return rows


if __name__ == "__main__":
    main()
