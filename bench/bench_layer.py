"""The whole MoE layer, forward and forward + backward, vs the reference and transformers' blocks.

    python bench/bench_layer.py [--quick] [--out DIR]

For each preset of moe_kernels.presets.PRESETS (--quick: harness.QUICK_PRESETS) at decode
(T = 1, 8, 64 tokens) and prefill (T = 2048, 16384; --quick leaves them out) token counts,
bfloat16, the layer ``MoE.from_preset(name)`` in eval mode (no router statistics):

- "fwd": ``y = layer(x)`` under no_grad;
- "fwd+bwd": ``y = layer(x)``, then the gradients of x and of every parameter (one
  ``torch.autograd.grad``: nothing accumulates across calls).

On a GPU the same layer runs on the cuda backend and on the PyTorch reference
(``use_backend("reference")``), and, where transformers is installed and has a block of the
preset's family, transformers' block built from a tiny-vocabulary config with the preset's
MoE sizes (its own random weights and router: the same shapes and work, not the same
numbers) with its experts backends "eager" and "grouped_mm" (``hf-eager``, ``hf-grouped_mm``);
a preset without one is left out with a printed reason. A preset whose weights (with their
gradients and the transformers copy) would not fit in half the GPU's memory runs one rank
of expert parallelism: its experts divided by the smallest power of two that fits (label
``ep=N``). Timed by the harness (CUDA events, L2 flush, median, NVTX ``op/case/backend``);
inside, each phase of the layer (route, plan, gemm1, gemm2, combine, shared) in an NVTX
range ``layer/<phase>`` through ``moe_kernels.layer.phase_hook``, so an nsys timeline shows
the breakdown. Every row records the peak memory of its calls
(``torch.cuda.max_memory_allocated``, and the part above what was allocated before). The
goals, printed per cuda case: the layer's time within 15% of the sum of its kernels' times
(torch.profiler, CUDA kernels of one call: the rest is launch overhead and host work), and
the speed-up over transformers' "grouped_mm" backend.

On a CPU (what CI runs): the simt backend (the CUDA kernels in the emulator) on the
presets scaled down (``scaled_config``: H = 64, I = 32, at most 16 experts), T in {1, 8,
64}, one call per case with the emulator's traffic counters summed per phase (moved bytes
in 32-byte sectors, the minimum: each distinct byte read once and written once, their
ratio; "backward" for the whole backward of a fwd+bwd call); and the reference backend by
wall clock. Peak memory is None on the CPU (no allocator statistics). ``--backends
simt,reference,hf-eager,hf-grouped_mm`` also times transformers' blocks on the CPU.
"""

import contextlib
import sys
import time
from collections import defaultdict

import torch

import bench_grouped_gemm as bgg
import harness
import moe_kernels
from moe_kernels import emulator
from moe_kernels.layer import PHASES, MoE, phase_hook
from moe_kernels.presets import PRESETS, preset_config, scaled_config

DECODE_TOKENS = (1, 8, 64)
PREFILL_TOKENS = (2048, 16384)
CPU_TOKENS = (1, 8, 64)
HF_BACKENDS = ("hf-eager", "hf-grouped_mm")
GOAL_OVERHEAD = 0.15  # layer time <= 1.15 x the sum of its kernels' times
GPU_MEMORY_SHARE = 0.5  # of the device's memory for one preset's weights, grads and the hf copy


# --- configurations -------------------------------------------------------------------------

def weight_bytes(config):
    """Bytes of a layer's bf16 weights (routed and shared experts, router in fp32)."""
    gated = config.get("activation", "silu_and_mul") in harness.GATED_ACTIVATIONS
    h, i, e = config["hidden_size"], config["intermediate_size"], config["num_experts"]
    s = config.get("shared_intermediate_size", 0)
    return 2 * ((3 if gated else 2) * (e * i + s) * h) + 4 * e * h


def layer_config(name, gpu):
    """(constructor arguments, expert-parallel degree) of preset `name` for this run: the
    model's sizes on a GPU (its experts divided by a power of two when the weights would not
    fit), scaled_config on a CPU."""
    if not gpu:
        return scaled_config(name), 1
    config = preset_config(name)
    budget = GPU_MEMORY_SHARE * torch.cuda.get_device_properties(0).total_memory
    ep = 1
    # Our weights + their gradients + the transformers copy + its gradients.
    while 4 * weight_bytes(dict(config, num_experts=config["num_experts"] // ep)) > budget \
            and config["num_experts"] // ep > 1:
        ep *= 2
    if ep > 1:
        # scaled_config keeps the routing structure (groups dividing E, k fitting) at the
        # model's own sizes and shared width.
        config = scaled_config(name, hidden_size=config["hidden_size"],
                               intermediate_size=config["intermediate_size"],
                               num_experts=config["num_experts"] // ep,
                               shared_intermediate_size=config.get("shared_intermediate_size", 0))
    return config, ep


def token_counts(gpu, quick):
    if not gpu:
        return CPU_TOKENS
    return DECODE_TOKENS if quick else DECODE_TOKENS + PREFILL_TOKENS


# --- transformers' blocks -------------------------------------------------------------------

def hf_block(name, config, implementation, dtype, device):
    """transformers' MoE block of preset `name`'s family with `config`'s sizes and its
    experts backend `implementation` ("eager" or "grouped_mm"), or a reason string."""
    try:
        import transformers as tf
    except ImportError:
        return "transformers is not installed"
    h, i, e, k = (config["hidden_size"], config["intermediate_size"], config["num_experts"], config["k"])
    shared = config.get("shared_intermediate_size", 0)
    common = dict(vocab_size=32, hidden_size=h, num_hidden_layers=1, num_attention_heads=1,
                  num_key_value_heads=1)
    groups = dict(n_group=config.get("num_groups", 1), topk_group=config.get("topk_groups") or 1,
                  routed_scaling_factor=config.get("scaling_factor", 1.0),
                  n_shared_experts=max(1, shared // i) if shared else 0)
    builders = {
        "mixtral": lambda: (tf.MixtralConfig(**common, intermediate_size=i, num_local_experts=e,
                                             num_experts_per_tok=k),
                            "mixtral", "MixtralSparseMoeBlock"),
        "qwen2_moe": lambda: (tf.Qwen2MoeConfig(**common, moe_intermediate_size=i, num_experts=e,
                                                num_experts_per_tok=k, shared_expert_intermediate_size=shared,
                                                norm_topk_prob=config.get("renormalize", False)),
                              "qwen2_moe", "Qwen2MoeSparseMoeBlock"),
        "qwen3_moe": lambda: (tf.Qwen3MoeConfig(**common, moe_intermediate_size=i, num_experts=e,
                                                num_experts_per_tok=k, norm_topk_prob=True),
                              "qwen3_moe", "Qwen3MoeSparseMoeBlock"),
        "qwen3_next": lambda: (tf.Qwen3NextConfig(**common, moe_intermediate_size=i, num_experts=e,
                                                  num_experts_per_tok=k, norm_topk_prob=True,
                                                  shared_expert_intermediate_size=shared),
                               "qwen3_next", "Qwen3NextSparseMoeBlock"),
        "deepseek_v2": lambda: (tf.DeepseekV2Config(**common, moe_intermediate_size=i, n_routed_experts=e,
                                                    num_experts_per_tok=k, topk_method="group_limited_greedy",
                                                    **groups),
                                "deepseek_v2", "DeepseekV2Moe"),
        "deepseek_v3": lambda: (tf.DeepseekV3Config(**common, moe_intermediate_size=i, n_routed_experts=e,
                                                    num_experts_per_tok=k, norm_topk_prob=True, **groups),
                                "deepseek_v3", "DeepseekV3MoE"),
        "gpt_oss": lambda: (tf.GptOssConfig(**common, intermediate_size=i, num_local_experts=e,
                                            num_experts_per_tok=k),
                            "gpt_oss", "GptOssMLP"),
        "llama4": lambda: (tf.Llama4TextConfig(**common, intermediate_size=i, intermediate_size_mlp=shared,
                                               num_local_experts=e, num_experts_per_tok=k),
                           "llama4", "Llama4TextMoe"),
        "olmoe": lambda: (tf.OlmoeConfig(**common, intermediate_size=i, num_experts=e, num_experts_per_tok=k,
                                         norm_topk_prob=config.get("renormalize", False)),
                          "olmoe", "OlmoeSparseMoeBlock"),
        "switch": lambda: (tf.SwitchTransformersConfig(vocab_size=32, d_model=h, d_ff=i, num_experts=e,
                                                       num_layers=1, num_heads=1, expert_capacity=1 << 30),
                           "switch_transformers", "SwitchTransformersSparseMLP"),
    }
    builders["kimi_k2"] = builders["deepseek_v3"]  # DeepSeek-V3's block, one group
    if name not in builders:
        return f"transformers has no MoE block of the {name} family"
    try:
        import importlib

        hf_config, module, cls = builders[name]()
        hf_config._experts_implementation = implementation
        block_cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)
        with torch.device(device):
            block = block_cls(hf_config).to(dtype)
    except Exception as exc:  # noqa: BLE001 (any failure: the baseline is left out)
        return f"cannot build transformers' {name} block: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    switchable = any(hasattr(m, "is_concatenated") for m in block.modules())
    if implementation != "eager" and not switchable:
        return f"transformers' {cls} has no experts-backend switch (eager only)"
    with torch.no_grad():
        for p in block.parameters():  # transformers leaves some weights uninitialized (torch.empty)
            p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.02)
    return block.eval()


def hf_output(out):
    return out[0] if isinstance(out, tuple) else out


# --- the calls ------------------------------------------------------------------------------

def phase_ranges(name):
    return harness.nvtx_range(f"layer/{name}")


def layer_call(layer, x, grad_y, backward):
    """The timed call: the layer forward (and backward), each phase in an NVTX range."""
    params = [p for p in layer.parameters() if p.requires_grad]
    if not backward:
        def call():
            with torch.no_grad(), phase_hook(phase_ranges):
                return layer(x)
        return call
    xg = x.detach().requires_grad_(True)

    def call():
        with phase_hook(phase_ranges):
            y = layer(xg)
        with phase_ranges("backward"):
            return torch.autograd.grad(y, [xg] + params, grad_y)
    return call


def hf_call(block, x, grad_y, backward):
    x3 = x.reshape(1, *x.shape)
    params = [p for p in block.parameters() if p.requires_grad]
    if not backward:
        def call():
            with torch.no_grad():
                return hf_output(block(x3))
        return call
    xg = x3.detach().requires_grad_(True)

    def call():
        y = hf_output(block(xg))  # [1, T, H], or [T, H] (Llama 4)
        return torch.autograd.grad(y, [xg] + params, grad_y.reshape(y.shape), allow_unused=True)
    return call


# --- measuring ------------------------------------------------------------------------------

def count_phases(case, layer, x, grad_y, backward):
    """One emulated call with the traffic counters on, summed per phase; the wall time."""
    per_phase = defaultdict(list)

    @contextlib.contextmanager
    def hook(name):
        with phase_ranges(name), emulator.traffic() as launches:
            yield
        per_phase[name].extend(launches)

    params = [p for p in layer.parameters() if p.requires_grad]
    xg = x.detach().requires_grad_(backward)
    with moe_kernels.use_backend(case.backend), harness.nvtx_range(f"{case.op}/{case.label}/{case.backend}"):
        t0 = time.perf_counter()
        with torch.set_grad_enabled(backward), phase_hook(hook):
            y = layer(xg)
        if backward:
            with hook("backward"):
                torch.autograd.grad(y, [xg] + params, grad_y)
        wall_us = (time.perf_counter() - t0) * 1e6
    phases = {}
    for name in PHASES + ("backward",):
        if name not in per_phase:
            continue
        launches = per_phase[name]
        moved = sum(r["moved_bytes"] for r in launches)
        minimum = sum(r["min_bytes"] for r in launches)
        phases[name] = dict(launches=len(launches), moved_bytes=moved, min_bytes=minimum,
                            ratio=moved / minimum if minimum else None,
                            kernels=sorted({r["kernel"] for r in launches}))
    moved = sum(p["moved_bytes"] for p in phases.values())
    minimum = sum(p["min_bytes"] for p in phases.values())
    total = dict(launches=sum(p["launches"] for p in phases.values()), moved_bytes=moved, min_bytes=minimum,
                 ratio=moved / minimum if minimum else None)
    return dict(phases=phases, total=total), wall_us


def time_plain(case, args, flush):
    """A call outside moe_kernels' backends (transformers): bench_grouped_gemm's
    time_baseline on a GPU, wall clock on a CPU."""
    if flush is not None:
        return bgg.time_baseline(case, args, flush)
    times = []
    for _ in range(args.warmup):
        case.fn()
    for _ in range(args.iters):
        with harness.nvtx_range(f"{case.op}/{case.label}/{case.backend}"):
            t0 = time.perf_counter()
            case.fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return times


def baseline_runs(case, gpu):
    """Whether a transformers baseline runs here (one untimed call); prints why not once."""
    try:
        case.fn()
        if gpu:
            torch.cuda.synchronize()
        return True
    except Exception as exc:  # noqa: BLE001 (any failure: the baseline is left out)
        harness.note(f"{case.backend} left out for {case.label.split(' ')[0]} {case.op}: {type(exc).__name__}: "
             f"{str(exc).splitlines()[0][:120]}")
        return False


def kernel_time_us(case):
    """Sum of the CUDA kernels' device times of one call (torch.profiler), or None."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with moe_kernels.use_backend(case.backend):
            case.fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                case.fn()
                torch.cuda.synchronize()
        # Device-side events (kernels, memsets, copies): their durations in microseconds.
        total = sum(event.device_time_total for event in prof.events()
                    if str(event.device_type).endswith("CUDA") and not event.is_async)
        return total or None
    except Exception as exc:  # noqa: BLE001
        harness.note(f"kernel times left out: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        return None


def measure(case, extra, args, gpu, peaks, flush):
    """One row: the harness's figures plus peak memory (GPU), the kernel-time sum (cuda) or
    the per-phase traffic (simt)."""
    row = None
    before = None
    if gpu:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    if case.backend == "simt" and bgg.has_observer():
        traffic, wall_us = count_phases(case, extra["layer"], extra["x"], extra["grad_y"], extra["backward"])
        row = harness.summarize(case, [wall_us], peaks)
        row["traffic"] = traffic
    elif case.backend in HF_BACKENDS:
        if not baseline_runs(case, gpu):
            return None
        row = harness.summarize(case, time_plain(case, args, flush), peaks)
    else:
        row = harness.summarize(case, harness.time_case(case, args, flush), peaks)
    row.update(config=extra["config"], ep=extra["ep"], peak_bytes=None, peak_extra_bytes=None,
               kernel_us=None)
    if gpu:
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
        row["peak_extra_bytes"] = row["peak_bytes"] - before
        if case.backend == "cuda":
            row["kernel_us"] = kernel_time_us(case)
    return row


# --- cases ----------------------------------------------------------------------------------

def preset_cases(name, args, gpu, backends, hf_backends):
    """Yields (Case, extra) for one preset: the layer on each backend, then transformers'
    blocks. Modules and tensors are built here and freed with the preset's cases."""
    device = "cuda" if gpu else "cpu"
    config, ep = layer_config(name, gpu)
    torch.manual_seed(0)
    layer = MoE(**config, device=device).eval()
    hidden = config["hidden_size"]
    blocks = {}
    for backend in hf_backends:
        block = hf_block(name, config, backend.split("-", 1)[1], torch.bfloat16, device)
        if isinstance(block, str):
            harness.note(f"{backend} left out for {name}: {block}")
        else:
            blocks[backend] = block
    for tokens in token_counts(gpu, args.quick):
        g = torch.Generator(device=device).manual_seed(tokens)
        x = torch.randn(tokens, hidden, generator=g, device=device).to(torch.bfloat16)
        grad_y = torch.randn(tokens, hidden, generator=g, device=device).to(torch.bfloat16)
        label = f"{name} T={tokens}" + (f" ep={ep}" if ep > 1 else "") + (
            "" if gpu else f" [E={config['num_experts']} k={config['k']} H={hidden} I={config['intermediate_size']}]")
        shape = dict(T=tokens, E=config["num_experts"], k=config["k"], H=hidden, I=config["intermediate_size"],
                     shared=config.get("shared_intermediate_size", 0), ep=ep, scaled_for_cpu=not gpu,
                     phase="decode" if tokens in DECODE_TOKENS else "prefill")
        for direction in ("fwd", "fwd+bwd"):
            backward = direction == "fwd+bwd"
            extra = dict(config=config, ep=ep, layer=layer, x=x, grad_y=grad_y, backward=backward)
            for backend in backends:
                yield harness.Case(op=f"layer {direction}", label=label, shape=shape, backend=backend,
                                   fn=layer_call(layer, x, grad_y, backward)), extra
            for backend, block in blocks.items():
                yield harness.Case(op=f"layer {direction}", label=label, shape=shape, backend=backend,
                                   fn=hf_call(block, x, grad_y, backward)), extra


# --- tables ---------------------------------------------------------------------------------

def gpu_table(rows):
    by_key = {(r["op"], r["label"], r["backend"]): r for r in rows}
    lines = []
    for r in rows:
        if r["backend"] != "cuda":
            continue
        ratio = lambda b: harness.speedup(by_key, r, b)  # noqa: E731
        over = r["median_us"] / r["kernel_us"] - 1 if r["kernel_us"] else None
        goal = "-" if over is None else ("met" if over <= GOAL_OVERHEAD else "missed")
        peak = r["peak_extra_bytes"]
        lines.append((r["op"], r["label"], f"{r['median_us']:.1f}", bgg.fmt(r["kernel_us"], ".1f"),
                      bgg.fmt(over, "+.1%"), goal, bgg.fmt(ratio("hf-grouped_mm"), ".2f"),
                      bgg.fmt(ratio("hf-eager"), ".2f"), bgg.fmt(ratio("reference"), ".2f"),
                      bgg.fmt(None if peak is None else peak / 2**20, ".1f")))
    met = sum(line[5] == "met" for line in lines)
    judged = sum(line[5] != "-" for line in lines)
    return (f"goal (layer within {GOAL_OVERHEAD:.0%} of its kernels' sum): met in {met} of {judged} cuda cases\n"
            f"cuda layer per case (kernels = sum of its CUDA kernels' times, one profiled call; overhead = "
            f"layer / kernels - 1, goal <= {GOAL_OVERHEAD:.0%}; vs X = X median / cuda median; peak MiB = "
            f"max_memory_allocated above the memory held before the case):\n"
            + harness.table(("op", "case", "layer us", "kernels us", "overhead", "goal", "vs hf-grouped_mm",
                         "vs hf-eager", "vs reference", "peak MiB"), lines, left=2))


def cpu_table(rows):
    """Per simt case and phase: launches, moved and minimum bytes, their ratio. A fwd+bwd
    case repeats its fwd case's phases (the same forward): it lists the backward and the
    total only."""
    lines = []
    for r in rows:
        t = r.get("traffic")
        if not t:
            continue
        names = [p for p in t["phases"] if r["op"] == "layer fwd" or p == "backward"]
        for phase in names + ["total"]:
            p = t["total"] if phase == "total" else t["phases"][phase]
            lines.append((r["op"], r["label"], phase, str(p["launches"]), f"{p['moved_bytes'] / 1e3:.1f}",
                          f"{p['min_bytes'] / 1e3:.1f}", bgg.fmt(p["ratio"], ".2f"),
                          f"{r['median_us'] / 1e3:.0f}" if phase == "total" else ""))
    return ("simt emulator traffic counters per phase (one call per case; moved = 32-byte sectors read "
            "and written, min = each distinct byte read once and written once):\n"
            + harness.table(("op", "case", "phase", "launches", "moved KB", "min KB", "moved/min", "emulator ms"),
                        lines, left=3))


# --- main -----------------------------------------------------------------------------------

def main():
    args = harness.parse_args(__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    peaks = harness.device_peaks()
    device = "cuda" if gpu else "cpu"
    backends = [b for b, d in harness.backends(args) if d == device]
    wanted = args.backends.split(",") if args.backends else None
    # transformers' blocks: on a GPU by default, on a CPU only when --backends names them.
    hf_backends = [b for b in HF_BACKENDS if (wanted is None and gpu) or (wanted and b in wanted)]
    if gpu and "cuda" not in moe_kernels.available_backends():
        print("warning: a GPU but no CUDA kernels (moe_kernels built without them): reference and "
              "transformers only", file=sys.stderr)
    flush = torch.empty(harness.L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if gpu else None
    presets = harness.QUICK_PRESETS if args.quick else tuple(PRESETS)
    rows = []
    configs = {}
    for j, name in enumerate(presets):
        for i, (case, extra) in enumerate(preset_cases(name, args, gpu, backends, hf_backends)):
            configs[name] = dict(extra["config"], ep=extra["ep"])
            harness.progress(f"[{j + 1}/{len(presets)} {i + 1}] {case.op} {case.label} on {case.backend} ...")
            row = measure(case, extra, args, gpu, peaks, flush)
            if row is not None:
                rows.append(row)
        if gpu:
            torch.cuda.empty_cache()  # this preset's weights are gone
    harness.progress_done()
    for r in rows:  # dtypes are not JSON
        r["config"] = {key: str(v) if isinstance(v, torch.dtype) else v for key, v in r["config"].items()}
    meta = dict(skipped=harness.SKIPPED, presets=configs, phases=list(PHASES) + ["backward"],
                goal=dict(overhead=GOAL_OVERHEAD), hf_backends=hf_backends)
    return bgg.report(rows, args, gpu, peaks, gpu_table(rows) if gpu else cpu_table(rows), meta)


if __name__ == "__main__":
    main()
