"""The benchmark harness shared by every bench/bench_*.py script.

A script builds a list of `Case`s (one op on one shape on one backend) and hands them to
`run`, which times each, prints a progress line and a table, and writes
``<out>/<script>.json`` and ``<out>/<script>.png``.

On a GPU: CUDA events around each call, warm-up, an L2 flush before every timed call,
median and p10/p90 spread, GB/s and TFLOP/s with the fraction of the device's peak, and
an NVTX range ``op/label/backend`` around every measured call (for nsys). On a CPU the
same scripts run the reference and simt backends (labelled as such) with wall-clock
timing, so CI smoke-tests them; those numbers say nothing about GPU speed.
"""

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from moe_kernels.presets import PRESETS, preset_config  # noqa: F401 (PRESETS: for the scripts)

# The model presets are moe_kernels.presets.PRESETS (the one table the layer, the tests and
# the benchmarks read); bench_preset maps an entry to what the op benchmarks need.
QUICK_PRESETS = ("mixtral", "deepseek_v3")
GATED_ACTIVATIONS = ("silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul", "swiglu_oai")
ROUTING_KEYS = ("scoring", "num_groups", "topk_groups", "group_scoring", "renormalize",
                "scaling_factor")


def bench_preset(name, **overrides):
    """What the op benchmarks read of preset `name` (``moe_kernels.presets.PRESETS``, with
    `overrides` of its constructor arguments applied), as a flat dict:

    - ``experts``, ``k``, ``hidden``, ``inter`` (the expert width I): the sizes;
    - ``routing``: ``topk_gating`` keyword arguments (scoring, groups, renormalize,
      scaling), only those the preset sets; ``bias``: whether the gating takes a selection
      bias (DeepSeek-V3's ``e_score_correction_bias``);
    - ``activation`` (gemm1's fused activation), ``gated``, ``expert_bias`` (biases on both
      expert projections), ``capacity_factor`` (None: dropless), ``shared_inter`` (the
      shared expert's width, 0: none).
    """
    c = preset_config(name, **overrides)
    activation = c.get("activation", "silu_and_mul")
    return dict(experts=c["num_experts"], k=c["k"], hidden=c["hidden_size"], inter=c["intermediate_size"],
                routing={key: c[key] for key in ROUTING_KEYS if key in c},
                bias=bool(c.get("selection_bias")), activation=activation,
                gated=activation in GATED_ACTIVATIONS, expert_bias=bool(c.get("expert_bias")),
                capacity_factor=c.get("capacity_factor"),
                shared_inter=c.get("shared_intermediate_size", 0))

# Peak HBM bandwidth (GB/s) and dense bf16 tensor-core throughput (TFLOP/s), from the
# vendors' data sheets; matched against torch.cuda.get_device_name() in this order.
DEVICE_PEAKS = [
    ("H200", dict(gbps=4800, bf16_tflops=989)),
    ("H100 PCIe", dict(gbps=2000, bf16_tflops=756)),
    ("H100", dict(gbps=3350, bf16_tflops=989)),
    ("B200", dict(gbps=8000, bf16_tflops=2250)),
    ("A100-SXM4-40GB", dict(gbps=1555, bf16_tflops=312)),
    ("A100", dict(gbps=2039, bf16_tflops=312)),
    ("L40S", dict(gbps=864, bf16_tflops=362)),
]
L2_FLUSH_BYTES = 256 << 20  # larger than any current L2


@dataclasses.dataclass
class Case:
    op: str
    label: str
    shape: dict
    backend: str
    fn: Callable[[], object]
    bytes_moved: Optional[int] = None  # ideal traffic: inputs read once + outputs written once
    flops: Optional[int] = None


# Reasons a case or a baseline was left out, printed once each and written to the JSON.
SKIPPED = []


def note(reason):
    """Records why something was left out (once per reason) and prints it."""
    if reason not in SKIPPED:
        SKIPPED.append(reason)
        print(reason, file=sys.stderr)


def progress(line):
    """A progress line on stderr: rewritten in place on a terminal, one line each in a log."""
    live = sys.stderr.isatty()
    print(f"\r{line:100}" if live else line, end="" if live else "\n", file=sys.stderr, flush=True)


def progress_done():
    """Clears the last in-place progress line (on a terminal)."""
    if sys.stderr.isatty():
        print("\r" + " " * 100 + "\r", end="", file=sys.stderr)


def speedup(by_key, row, backend):
    """How many times faster `row` is than the same op and label on `backend` (by_key:
    {(op, label, backend): row}), or None where that baseline did not run."""
    base = by_key.get((row["op"], row["label"], backend))
    return base["median_us"] / row["median_us"] if base and row["median_us"] else None


def parse_args(description, argv=None, extra=None, iters=(5, 50, 10), warmup=(1, 10, 2)):
    """The flags every script takes; `extra(parser)` adds a script's own. `iters` and
    `warmup`: the defaults with --quick, on a GPU, on a CPU."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="few small shapes (CPU smoke test, CI)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"),
                        help="folder for the JSON and PNG results (default bench/results)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per case")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first")
    parser.add_argument("--backends", default=None,
                        help="comma-separated subset of the backends to time")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.name = Path(sys.argv[0]).stem
    pick = 0 if args.quick else 1 if torch.cuda.is_available() else 2
    args.iters = args.iters or iters[pick]
    args.warmup = args.warmup if args.warmup is not None else warmup[pick]
    return args


def table(header, lines, left=3):
    """A text table: the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = lambda cells: "  ".join(str(c).rjust(w) if i >= left else str(c).ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([out(header), out(["-" * w for w in widths])] + [out(line) for line in lines])


def backends(args):
    """(backend, device) pairs to time: the CUDA kernels and the reference on a GPU; the
    emulated kernels (simt) and the reference on a CPU."""
    import moe_kernels

    available = moe_kernels.available_backends()
    if "cuda" in available:
        pairs = [("cuda", "cuda"), ("reference", "cuda")]
    else:
        pairs = [("simt", "cpu")] if "simt" in available else []
        pairs.append(("reference", "cpu"))
    if args.backends:
        wanted = args.backends.split(",")
        pairs = [p for p in pairs if p[0] in wanted]
    return pairs


def device_peaks():
    """Peak figures of the current GPU, or None (CPU or an unknown GPU: raw figures only)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in DEVICE_PEAKS:
        if key in name:
            return dict(name=name, **peaks)
    return dict(name=name, gbps=None, bf16_tflops=None)


def nvtx_range(name):
    try:
        import nvtx

        return nvtx.annotate(name)
    except ImportError:
        if torch.cuda.is_available():
            return torch.cuda.nvtx.range(name)
        return contextlib.nullcontext()


def time_case(case, args, flush):
    """Per-call times in microseconds."""
    import moe_kernels

    times = []
    with moe_kernels.use_backend(case.backend):
        for _ in range(args.warmup):
            case.fn()
        gpu = flush is not None
        for _ in range(args.iters):
            if gpu:
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with nvtx_range(f"{case.op}/{case.label}/{case.backend}"):
                    start.record()
                    case.fn()
                    end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                with nvtx_range(f"{case.op}/{case.label}/{case.backend}"):
                    t0 = time.perf_counter()
                    case.fn()
                    times.append((time.perf_counter() - t0) * 1e6)
    return times


def summarize(case, times, peaks):
    times = sorted(times)
    median = statistics.median(times)
    quantile = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    row = dict(op=case.op, label=case.label, backend=case.backend, shape=case.shape,
               device=peaks["name"] if peaks else "cpu", median_us=median,
               p10_us=quantile(0.1), p90_us=quantile(0.9), iters=len(times),
               gbps=None, tflops=None, peak_fraction=None)
    if case.bytes_moved and median > 0:
        row["gbps"] = case.bytes_moved / (median * 1e-6) / 1e9
        if peaks and peaks.get("gbps"):
            row["peak_fraction"] = row["gbps"] / peaks["gbps"]
    if case.flops and median > 0:
        row["tflops"] = case.flops / (median * 1e-6) / 1e12
        if peaks and peaks.get("bf16_tflops"):
            row["peak_fraction"] = row["tflops"] / peaks["bf16_tflops"]
    return row


def format_table(rows):
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    header = ("op", "case", "backend", "median us", "p10-p90 us", "GB/s", "TFLOP/s", "of peak")
    lines = [(r["op"], r["label"], r["backend"], fmt(r["median_us"], ".1f"),
              f"{r['p10_us']:.1f}-{r['p90_us']:.1f}", fmt(r["gbps"], ".1f"), fmt(r["tflops"], ".2f"),
              fmt(r["peak_fraction"], ".1%")) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    out = lambda cells: "  ".join(str(c).rjust(w) if i >= 3 else str(c).ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([out(header), out(["-" * w for w in widths])] + [out(line) for line in lines])


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(f"{r['op']} {r['label']}" for r in rows))
    backends_seen = list(dict.fromkeys(r["backend"] for r in rows))
    has_peak = any(r["peak_fraction"] is not None for r in rows)
    fig, axes = plt.subplots(2 if has_peak else 1, 1, figsize=(max(8, 0.45 * len(labels) + 3), 8 if has_peak else 4.5),
                             squeeze=False)
    width = 0.8 / max(1, len(backends_seen))
    for metric, ax, ylabel in (("median_us", axes[0][0], "median time (us, log)"),
                               ("peak_fraction", axes[-1][0] if has_peak else None, "fraction of peak")):
        if ax is None:
            continue
        for i, backend in enumerate(backends_seen):
            values = {f"{r['op']} {r['label']}": r[metric] for r in rows if r["backend"] == backend}
            xs = [j + i * width for j, label in enumerate(labels) if values.get(label) is not None]
            ys = [values[label] for label in labels if values.get(label) is not None]
            ax.bar(xs, ys, width, label=backend)
        ax.set_ylabel(ylabel)
        if metric == "median_us":
            ax.set_yscale("log")
        ax.set_xticks([j + width * (len(backends_seen) - 1) / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=8)
    axes[0][0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cases, args):
    """Time every case; print the table; write <out>/<name>.json and .png. Returns rows."""
    peaks = device_peaks()
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if peaks else None
    rows = []
    for i, case in enumerate(cases):
        progress(f"[{i + 1}/{len(cases)}] {case.op} {case.label} on {case.backend} ...")
        rows.append(summarize(case, time_case(case, args, flush), peaks))
    progress_done()
    device = peaks["name"] if peaks else "CPU (reference and simt timings; no GPU figures)"
    print(f"{args.name} on {device}\n{format_table(rows)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(script=args.name, device=device, torch=torch.__version__, quick=args.quick,
                iters=args.iters, warmup=args.warmup, peaks=peaks)
    (out / f"{args.name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    plot(rows, out / f"{args.name}.png", f"{args.name} on {device}")
    print(f"wrote {out / (args.name + '.json')} and .png")
    return rows
