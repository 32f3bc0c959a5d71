"""Expert-parallel MoE layer (ExpertParallelMoE): bytes exchanged per layer and time per phase.

    torchrun --nproc-per-node N bench/bench_ep.py [--quick] [--out DIR]   # N ranks (nccl on GPUs, else gloo)
    python bench/bench_ep.py [--quick] [--nproc N] [--out DIR]           # spawns N local ranks itself

One layer per preset (GPU: Mixtral-8x7B and Qwen3-30B-A3B at their sizes; CPU: both scaled
to H=64, I=32, E=8/16 by ``presets.scaled_config``), T tokens per rank, in both modes
(exact; capacity with ``--capacity-factor``, default 1.25), on each backend
(``harness.backends``: cuda, or simt and reference on a CPU). Per case, every rank times
``--iters`` forwards (after ``--warmup``) with the layer's phase hook on: each phase
(route, plan, dispatch, local_plan, gemm1, gemm2, combine, shared) inside an NVTX range
``ep/<phase>`` (for nsys) and timed (on a GPU with a synchronize at both ends, which
serializes the phases: the sum is an upper bound of the forward), then the
forward+backward without hooks. The table gives, per case, the slowest rank's median per
phase, the forward and forward+backward medians, and the bytes one layer's forward
exchanges (rows + float32 routing weights out, rows back, the count exchange; per rank,
the largest, and to other ranks only, summed over ranks; the backward exchanges the same
amounts in reverse); capacity mode also the assignments dropped over capacity.
Writes ``<out>/bench_ep.json``. On a CPU (gloo) the times only show the script works.
"""

import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
import moe_kernels  # noqa: E402
from moe_kernels.distributed import EP_PHASES, ExpertParallelMoE  # noqa: E402
from moe_kernels.layer import MoE, phase_hook  # noqa: E402
from moe_kernels.presets import preset_config, scaled_config  # noqa: E402

GPU_PRESETS = dict(mixtral=dict(), qwen3_moe=dict())
CPU_PRESETS = dict(mixtral=dict(num_experts=8), qwen3_moe=dict(num_experts=16))
GPU_TOKENS, GPU_QUICK_TOKENS = (128, 2048, 8192), (128,)
CPU_TOKENS, CPU_QUICK_TOKENS = (16, 64), (16,)


def ep_arguments(parser):
    parser.add_argument("--nproc", type=int, default=None,
                        help="ranks to spawn when not started by torchrun (default 2; 1 on a single GPU)")
    parser.add_argument("--capacity-factor", type=float, default=1.25)


def parse_args():
    return harness.parse_args(__doc__.splitlines()[0], extra=ep_arguments, iters=(3, 20, 5), warmup=(1, 5, 1))


class PhaseTimer:
    """The phase hook: an NVTX range and a wall-clock time per phase (synchronized on a GPU)."""

    def __init__(self, gpu):
        self.gpu, self.times = gpu, {}

    def __call__(self, name):
        timer = self

        class _Range:
            def __enter__(self):
                self.nvtx = harness.nvtx_range(f"ep/{name}")
                self.nvtx.__enter__()
                if timer.gpu:
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if timer.gpu:
                    torch.cuda.synchronize()
                timer.times[name] = timer.times.get(name, 0.0) + (time.perf_counter() - self.t0) * 1e6
                self.nvtx.__exit__(*exc)
        return _Range()


def _now(gpu):
    if gpu:
        torch.cuda.synchronize()
    return time.perf_counter()


def run_case(layer_config, tokens, mode, backend, device, args):
    """This rank's figures for one case (every rank runs it together)."""
    gpu = device != "cpu"
    torch.manual_seed(0)  # the same full layer on every rank
    full = MoE(**layer_config, device=device)
    ep = ExpertParallelMoE.from_moe(full, mode=mode, capacity_factor=args.capacity_factor)
    del full
    g = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
    x = torch.randn(tokens, ep.hidden_size, generator=g, device=device).to(torch.bfloat16)
    phases = {name: [] for name in EP_PHASES}
    forward, train = [], []
    with moe_kernels.use_backend(backend):
        for i in range(args.warmup + args.iters):
            timer = PhaseTimer(gpu)
            dist.barrier()
            t0 = _now(gpu)
            with torch.no_grad(), phase_hook(timer):
                ep(x)
            t1 = _now(gpu)
            dist.barrier()
            t2 = _now(gpu)
            xg = x.clone().requires_grad_()
            ep(xg).float().sum().backward()
            t3 = _now(gpu)
            if i >= args.warmup:
                for name in EP_PHASES:
                    phases[name].append(timer.times.get(name, 0.0))
                forward.append((t1 - t0) * 1e6)
                train.append((t3 - t2) * 1e6)
    exchange = dict(ep.last_exchange)
    return dict(phases_us={k: statistics.median(v) for k, v in phases.items()},
                forward_us=statistics.median(forward), forward_backward_us=statistics.median(train),
                exchange=exchange, dropped_per_iter=int(ep.dropped) // (2 * (args.warmup + args.iters)),
                capacity=ep.capacity(tokens))


def bench(args):
    rank, world = dist.get_rank(), dist.get_world_size()
    gpu = torch.cuda.is_available() and dist.get_backend() == "nccl"
    pairs = harness.backends(args)
    if not gpu:
        pairs = [(b, d) for b, d in pairs if d == "cpu"]
    presets = (GPU_PRESETS if gpu else CPU_PRESETS)
    if args.quick:
        presets = dict(list(presets.items())[:1])
    token_counts = (GPU_QUICK_TOKENS if args.quick else GPU_TOKENS) if gpu else \
        (CPU_QUICK_TOKENS if args.quick else CPU_TOKENS)
    rows = []
    for backend, device in pairs:
        for name, overrides in presets.items():
            config = (preset_config(name, **overrides) if gpu else scaled_config(name, **overrides))
            if config["num_experts"] % world:
                if rank == 0:
                    print(f"skipping {name}: {config['num_experts']} experts on {world} ranks", file=sys.stderr)
                continue
            for tokens in token_counts:
                for mode in ("exact", "capacity"):
                    if rank == 0:
                        print(f"{name} T={tokens}/rank {mode} on {backend} ...", file=sys.stderr, flush=True)
                    mine = run_case(config, tokens, mode, backend, device, args)
                    every = [None] * world
                    dist.all_gather_object(every, mine)
                    rows.append(_row(name, config, tokens, mode, backend, world, every))
    return rows


def _row(name, config, tokens, mode, backend, world, every):
    ex = [r["exchange"] for r in every]
    layer_bytes = [e["count_bytes"] + e["dispatch_bytes"] + e["combine_bytes"] for e in ex]
    remote = sum(e["dispatch_bytes_remote"] + e["combine_bytes_remote"] for e in ex)
    return dict(
        preset=name, mode=mode, backend=backend, world_size=world, tokens_per_rank=tokens,
        shape=dict(H=config["hidden_size"], I=config["intermediate_size"], E=config["num_experts"],
                   k=config["k"]),
        capacity=every[0]["capacity"],
        phases_us={p: max(r["phases_us"][p] for r in every) for p in EP_PHASES},
        forward_us=max(r["forward_us"] for r in every),
        forward_backward_us=max(r["forward_backward_us"] for r in every),
        bytes_per_layer_per_rank=layer_bytes, bytes_per_layer_max_rank=max(layer_bytes),
        bytes_per_layer_remote_total=remote,
        rows_sent=[e["rows_sent"] for e in ex], rows_received=[e["rows_received"] for e in ex],
        dropped_per_layer=[r["dropped_per_iter"] for r in every])


def report(rows, args, device):
    header = ("case", "mode", "backend") + EP_PHASES + ("fwd us", "fwd+bwd us", "bytes/rank", "remote bytes",
                                                         "dropped")
    lines = [(f"{r['preset']} W={r['world_size']} T={r['tokens_per_rank']}", r["mode"], r["backend"],
              *(f"{r['phases_us'][p]:.0f}" for p in EP_PHASES), f"{r['forward_us']:.0f}",
              f"{r['forward_backward_us']:.0f}", str(r["bytes_per_layer_max_rank"]),
              str(r["bytes_per_layer_remote_total"]),
              "-" if r["mode"] == "exact" else str(sum(r["dropped_per_layer"]))) for r in rows]
    print(f"bench_ep on {device}\n" + harness.table(header, lines, left=len(header)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(script="bench_ep", device=device, torch=torch.__version__, quick=args.quick, iters=args.iters,
                warmup=args.warmup, capacity_factor=args.capacity_factor,
                world_size=rows[0]["world_size"] if rows else None,
                note="phase times: the slowest rank's median, forward only, phases synchronized; "
                     "bytes: one layer's forward (the backward sends the same amounts in reverse)")
    (out / "bench_ep.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out / 'bench_ep.json'}")


def worker(rank, world, init_method, args):
    """One rank: join the group, run every case, rank 0 reports."""
    gpu = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if gpu else "gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        rows = bench(args)
        if rank == 0:
            device = torch.cuda.get_device_name() if gpu else "CPU (gloo; timings only show the script works)"
            report(rows, args, f"{world} x {device}")
    finally:
        dist.destroy_process_group()


def main():
    args = parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", args)
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = args.nproc or (min(2, gpus) if gpus else 2)
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/store"
        torch.multiprocessing.spawn(worker, args=(world, init, args), nprocs=world, join=True)


if __name__ == "__main__":
    main()
