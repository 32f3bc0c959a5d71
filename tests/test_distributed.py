"""Expert parallelism (moe_kernels.distributed.ExpertParallelMoE) on 2 and 4 gloo processes.

Each world size starts its W ranks once (tests/ep_worker.py, a file store in a tmp dir,
a timeout that kills them and fails the tests instead of hanging); the ranks run every
scenario and save their outputs and gradients; each test here checks one scenario against
the single-process layer (``MoE`` with the same weights, on the concatenation of every
rank's tokens), on the reference backend and on the emulated kernels (simt), in both
modes (exact: split sizes from one host copy of the counts; capacity: fixed buffers).

Conventions. Every rank has its own tokens (a different number on each, zero included).
The forward output and the input gradient of a rank are its rows of the single-process
ones, bit for bit (each row's GEMMs are independent of the other rows and the combine sums
a token's rows in the same order). The gradients of a rank's local experts are the slice of
the single-process gradients, bit for bit (every source's rows, in the same order). The
router and shared-expert gradients of a rank are its partial ones: their sum over the
ranks is the single-process gradient up to the float32 (router) / bf16 (shared expert)
rounding of a sum in another order.

Capacity overflow: each (source rank, expert) keeps its first C assignments in (token,
slot) order, which is the single-process layer's capacity rule applied to that rank's
tokens alone: the output of a rank is ``fused_moe(..., capacity=C)`` on its tokens, bit for
bit, and the drop counter is ``sum_e max(0, count_e - C)`` over the rank's assignments.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moe_kernels
from moe_kernels.distributed import ExpertParallelMoE
from moe_kernels.layer import MoE, fused_moe
from moe_kernels.routing import topk_gating

sys.path.insert(0, str(Path(__file__).parent))
import ep_worker  # noqa: E402

# For all the scenarios of one world size (about 10 s on 2 cores; slower under ASan).
TIMEOUT_S = float(os.environ.get("MOE_KERNELS_EP_TEST_TIMEOUT", 300))
WORLD_SIZES = (2, 4)
BACKENDS = ("reference", "simt")
MODES = ("exact", "capacity")
OFF = -1e4  # router bias that keeps an expert from being selected
ON = 1e4

BASE = dict(k=3, renormalize=True, shared_intermediate_size=32, shared_gate=True)


def _scenarios(world):
    """name -> spec for one world size (8 experts: L = 4 or 2 per rank)."""
    local = 8 // world
    tokens = [6, 3] if world == 2 else [5, 2, 4, 3]
    last_rank = range(8 - local, 8)
    specs = {}
    for backend in BACKENDS:
        for mode in MODES:
            # The same capacity on every rank (the buffers are exchanged in equal splits):
            # the most tokens of a rank times k never drops.
            extra = dict(capacity=max(tokens) * 3) if mode == "capacity" else {}
            tag = f"{backend}-{mode}"
            specs[f"random-{tag}"] = dict(config=BASE, tokens=tokens, **extra)
            # Expert 1 and every expert of the last rank get nothing: that rank receives
            # nothing, sends its tokens elsewhere.
            specs[f"skewed-{tag}"] = dict(config=BASE, tokens=tokens,
                                          router_bias={e: OFF for e in (1, *last_rank)}, **extra)
            # Every token to rank 0's experts; the first rank has no tokens at all.
            specs[f"one_rank-{tag}"] = dict(config=dict(BASE, k=2), tokens=[0] + tokens[1:],
                                            router_bias={e: ON for e in range(2)}, **extra)
        # Capacity 1 per (source, expert): most assignments dropped.
        specs[f"overflow-{backend}"] = dict(config=dict(BASE, k=2), tokens=tokens, mode="capacity",
                                            capacity=1)
    if world == 2:
        # Other layer structures, on the kernels: GPT-OSS (router and expert biases, "kn"
        # weights, clamped SwiGLU) and Llama 4 (sigmoid top-1, weight on the input).
        specs["gpt_oss-simt-exact"] = dict(config=dict(k=2, renormalize=True, expert_bias=True, w_layout="kn",
                                                       activation="swiglu_oai"), tokens=tokens)
        specs["llama4-simt-capacity"] = dict(config=dict(k=1, scoring="sigmoid", weight_on_input=True,
                                                         shared_intermediate_size=32),
                                             tokens=tokens, capacity=max(tokens))
    else:
        specs["indivisible"] = dict(config=dict(num_experts=6), tokens=tokens, mode="exact",
                                    expect_error=True)
    for name, spec in specs.items():
        spec["name"] = name
        spec.setdefault("backend", "simt" if "simt" in name else "reference")
        spec.setdefault("mode", "capacity" if "capacity" in name else "exact")
    return specs


def _run_ranks(world, tmp):
    specs = _scenarios(world)
    (tmp / "specs.json").write_text(json.dumps(list(specs.values())))
    env = dict(os.environ)
    root = str(Path(moe_kernels.__file__).resolve().parent.parent)  # the package this test imports
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    worker = str(Path(__file__).parent / "ep_worker.py")
    procs = []
    for rank in range(world):
        log = open(tmp / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, worker, "--rank", str(rank), "--world", str(world), "--store",
             str(tmp / "store"), "--specs", str(tmp / "specs.json"), "--out", str(tmp)],
            stdout=log, stderr=subprocess.STDOUT, env=env), log))
    deadline = time.monotonic() + TIMEOUT_S
    failure = None
    for proc, log in procs:
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if code != 0 and failure is None:
                failure = f"a rank exited with status {code}"
        except subprocess.TimeoutExpired:
            failure = f"the {world} ranks did not finish within {TIMEOUT_S} s"
            break
    for proc, log in procs:
        if proc.poll() is None:
            proc.kill()  # only the processes this test started
            proc.wait()
        log.close()
    if failure:
        logs = "\n".join(f"--- rank {r}:\n" + (tmp / f"rank{r}.log").read_text()[-3000:] for r in range(world))
        return specs, failure + "\n" + logs
    return specs, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(autouse=True)
def one_thread():
    """The ranks run on one thread each; so do the references (a BLAS call may split a
    reduction over threads, which changes the order of the reference backend's sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = _run_ranks(world, tmp_path_factory.mktemp(f"ep{world}"))
        return cache[world]
    return get


def _results(ranks, world, name):
    specs, results = ranks(world)
    if isinstance(results, str):
        pytest.fail(results)
    per_rank = [r[name] for r in results]
    for rank, r in enumerate(per_rank):
        if "traceback" in r:
            pytest.fail(f"rank {rank}:\n{r['traceback']}")
    return specs[name], per_rank


def _all_tokens(spec, world):
    xs, gs = zip(*(ep_worker.rank_tokens(spec, r) for r in range(world)))
    return xs, gs


def _single(layer, x, capacity=None):
    """The single-process layer (its own code path), optionally with a capacity."""
    if capacity is None:
        return layer(x)
    return fused_moe(x, layer.router_logits(x), layer.w13, layer.w2, k=layer.k, **layer.gating,
                     selection_bias=layer.selection_bias, capacity=capacity, activation=layer.activation,
                     alpha=layer.alpha, limit=layer.limit, w_layout=layer.w_layout, b13=layer.b13, b2=layer.b2,
                     weight_on_input=layer.weight_on_input, shared_w13=layer.shared_w13,
                     shared_w2=layer.shared_w2, shared_gate=layer.shared_gate)


def _check_grads(layer, per_rank):
    expert_names = {"w13", "w2", "b13", "b2"}
    for name, p in layer.named_parameters():
        if name in expert_names:
            for rank, r in enumerate(per_rank):
                start, end = r["local"]
                assert torch.equal(r["grads"][name], p.grad[start:end]), f"{name} of rank {rank}"
        else:
            total = sum(r["grads"][name].float() for r in per_rank)
            want = p.grad.float()
            tol = 1e-5 if p.dtype == torch.float32 else 2.0 ** -7
            torch.testing.assert_close(total, want, rtol=tol, atol=tol * max(want.abs().max().item(), 1e-3),
                                       msg=lambda m: f"{name}: {m}")


def _scenario_names(world, prefix):
    return [n for n in _scenarios(world) if n.startswith(prefix)]


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", ("random", "skewed", "one_rank"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_single_process(ranks, world, case, backend, mode):
    """Forward and backward on W ranks = the single-process layer on all the tokens."""
    spec, per_rank = _results(ranks, world, f"{case}-{backend}-{mode}")
    _check_against_single(spec, per_rank, world)


@pytest.mark.parametrize("name", ("gpt_oss-simt-exact", "llama4-simt-capacity"))
def test_other_layer_structures(ranks, name):
    spec, per_rank = _results(ranks, 2, name)
    _check_against_single(spec, per_rank, 2)


def _check_against_single(spec, per_rank, world):
    layer = ep_worker.build_layer(spec)
    xs, gs = _all_tokens(spec, world)
    x = torch.cat(xs).requires_grad_()
    with moe_kernels.use_backend(spec["backend"]):
        y = _single(layer, x)
        (y.float() * torch.cat(gs).float()).sum().backward()
    start = 0
    for rank, r in enumerate(per_rank):
        end = start + spec["tokens"][rank]
        assert torch.equal(r["y"], y[start:end].detach()), f"output of rank {rank}"
        assert torch.equal(r["x_grad"], x.grad[start:end]), f"input gradient of rank {rank}"
        assert r["dropped"] == 0
        start = end
    _check_grads(layer, per_rank)
    received = [r["exchange"]["rows_received"] for r in per_rank]
    if "skewed" in spec["name"] and spec["mode"] == "exact":
        assert received[-1] == 0  # the last rank's experts got nothing
    if "one_rank" in spec["name"] and spec["mode"] == "exact":
        assert received[0] == sum(spec["tokens"]) * layer.k and not any(received[1:])


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_overflow(ranks, world, backend):
    """Capacity 1 per (source, expert): the drop counter is the count by hand; the output
    is the single-process capacity rule on each rank's tokens."""
    spec, per_rank = _results(ranks, world, f"overflow-{backend}")
    layer = ep_worker.build_layer(spec)
    capacity = spec["capacity"]
    total_dropped = 0
    for rank, r in enumerate(per_rank):
        x, grad_y = ep_worker.rank_tokens(spec, rank)
        x.requires_grad_()
        logits = layer.router_logits(x)
        _, ids = topk_gating(logits, layer.k, bias=layer.selection_bias, **layer.gating)
        counts = torch.bincount(ids.reshape(-1).long(), minlength=layer.num_experts)
        dropped = int((counts - capacity).clamp(min=0).sum())
        assert r["dropped"] == dropped, f"rank {rank}: counter {r['dropped']}, by hand {dropped}"
        total_dropped += dropped
        with moe_kernels.use_backend(backend):
            y = _single(layer, x, capacity)
            (y.float() * grad_y.float()).sum().backward()
        assert torch.equal(r["y"], y.detach()), f"output of rank {rank}"
        assert torch.equal(r["x_grad"], x.grad), f"input gradient of rank {rank}"
        # Equal-split buffers: every rank sends E * C rows whatever the routing.
        assert r["exchange"]["rows_sent"] == layer.num_experts * capacity
    assert total_dropped > 0
    # The gradients summed over the ranks' single-process runs: the local expert slices
    # (now sums of per-rank gradients in another order) and the replicated parameters.
    for name, p in layer.named_parameters():
        if name in ("w13", "w2"):
            got = torch.cat([r["grads"][name].float() for r in per_rank])
            want = p.grad.float()
            torch.testing.assert_close(got, want, rtol=2.0 ** -7, atol=2.0 ** -7 * want.abs().max().item())


def test_indivisible_experts(ranks):
    spec, per_rank = _results(ranks, 4, "indivisible")
    for r in per_rank:
        assert r["error"] and "multiple" in r["error"]


# ---------------------------------------------------------------------------------------
# One process (no process group): the same module, the exchanges are local copies.

@pytest.mark.parametrize("mode", MODES)
def test_single_process_group(mode):
    torch.manual_seed(0)
    layer = MoE(64, 32, 8, 2, shared_intermediate_size=32)
    ep = ExpertParallelMoE(layer, mode=mode, capacity_factor=4)
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    with moe_kernels.use_backend("simt"):
        assert torch.equal(ep(x), layer(x))
    assert ep.last_exchange["count_bytes"] == 8 * 8


def test_bad_arguments():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="mode"):
        ExpertParallelMoE(MoE(64, 32, 8, 2), mode="padded")
    with pytest.raises(ValueError, match="expert_choice"):
        ExpertParallelMoE(MoE(64, 32, 8, 2, routing="expert_choice"))
    with pytest.raises(ValueError, match="dropless"):
        ExpertParallelMoE(MoE(64, 32, 8, 2, capacity_factor=1.0))
    with pytest.raises(TypeError, match="layer"):
        ExpertParallelMoE(42)
    ep = ExpertParallelMoE(dict(hidden_size=64, intermediate_size=32, num_experts=8, k=2))
    with pytest.raises(ValueError, match="x: expected"):
        ep(torch.randn(3, 32).to(torch.bfloat16))
