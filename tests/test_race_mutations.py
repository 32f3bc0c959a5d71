"""Barrier mutation test: deleting any one __syncthreads or __syncwarp from our kernels must
make the race detector fail a small workload that runs every kernel, in every resume order.

A barrier whose deletion nobody notices is either unneeded (delete it) or guards a case no
test runs (add one). MOE_KERNELS_SIMT_SKIP_BARRIER=file:line makes the emulator treat one
barrier call site as a no-op, so no rebuild is needed per mutant.
"""

import pathlib
import re

import pytest
import torch

import moe_kernels
from conftest import needs_observer

KERNELS = pathlib.Path(__file__).resolve().parent.parent / "csrc" / "kernels"
# The kernels the package ships (testing/ holds the emulator's own probes).
SOURCES = sorted(str(p.relative_to(KERNELS)) for family in ("routing", "permute", "gemm", "quant")
                 for p in (KERNELS / family).glob("*.cuh")) + ["common/reduce.cuh"]
BARRIER = re.compile(r"^\s*[^/]*\b(__syncthreads|__syncwarp)\s*\(")


def barrier_sites():
    sites = []
    for name in SOURCES:
        for number, line in enumerate((KERNELS / name).read_text().splitlines(), start=1):
            if BARRIER.match(line):
                sites.append(f"kernels/{name}:{number}")
    return sites


def workload():
    """Every shipped kernel on small shapes, through the public API on the emulator."""
    g = torch.Generator().manual_seed(0)
    with moe_kernels.use_backend("simt"):
        # Gating: plain softmax, and group-limited sigmoid with a bias (shared memory).
        logits = torch.randn(6, 40, generator=g, requires_grad=True)
        w, ids = moe_kernels.topk_gating(logits, 6, renormalize=False)
        (w * torch.randn(w.shape, generator=g)).sum().backward()  # backward kernel
        sig_logits = torch.randn(5, 32, generator=g, requires_grad=True)
        sw, _ = moe_kernels.topk_gating(sig_logits, 4, scoring="sigmoid",
                                        bias=torch.randn(32, generator=g), num_groups=4,
                                        topk_groups=2, renormalize=True)
        sw.sum().backward()  # the renormalized backward
        moe_kernels.router_stats(ids, 40)
        moe_kernels.expert_choice_gating(torch.randn(40, 4, generator=g), 3)
        # More than one 32x32 tile of probabilities each way (the tile is reused).
        moe_kernels.expert_choice_gating(torch.randn(33, 40, generator=g), 3)
        # Permutation: one tile, several tiles, and a capacity with drop by weight.
        x = torch.randn(6, 24, generator=g)
        r = moe_kernels.permute(x, ids, 40, weights=w.detach())
        y_perm = r.x.detach().clone().requires_grad_(True)
        weights = w.detach().clone().requires_grad_(True)
        moe_kernels.unpermute(y_perm, r.row_map, weights).sum().backward()
        big_ids = torch.randint(0, 7, (700, 2), generator=g, dtype=torch.int32)
        big_w = torch.rand(700, 2, generator=g)
        big_x = torch.randn(700, 8, generator=g)
        moe_kernels.permute(big_x, big_ids, 7)
        moe_kernels.permute(big_x, big_ids, 7, capacity=90, drop_policy="weight", weights=big_w)
        # A capacity above every count: the select keeps all without a radix pass.
        moe_kernels.permute(big_x, big_ids, 7, capacity=1000, drop_policy="weight", weights=big_w)
        # An expert range: the offsets kernel's threads then read counts other threads wrote.
        moe_kernels.permute(big_x, big_ids, 7, expert_range=(2, 7))
        # 3 tiles x 2800 experts: the offsets work on slices (the slice kernel).
        moe_kernels.permute_plan(torch.randint(0, 2800, (700, 3), generator=g, dtype=torch.int32), 2800)
        # Grouped GEMM, forward and backward: each persistent block runs several tiles (the
        # emulated device has 4 multiprocessors, so 8 blocks), the activation backward several
        # rows per block, and the schedule more than one round of 1024 experts.
        # 10 and 16 tiles on 8 blocks:
        xg = torch.randn(40, 136, generator=g).to(torch.bfloat16).requires_grad_(True)
        wg = (torch.randn(3, 272, 136, generator=g) / 8).to(torch.bfloat16).requires_grad_(True)
        offsets = torch.tensor([0, 12, 12, 37])
        scale = torch.rand(40, generator=g).requires_grad_(True)
        yg = moe_kernels.grouped_gemm(xg, wg, offsets, activation="silu_and_mul", row_scale=scale,
                                      config="64x64")
        yg.float().sum().backward()
        moe_kernels.grouped_gemm(xg.detach()[:6], wg.detach()[:, :256].contiguous().repeat(1, 2, 1),
                                 torch.tensor([0, 1, 1, 6]), config="16x64")
        # 4-bit weights: dequantize with more tiles than blocks (33 on 32), quantize, and the
        # W4A16 GEMM (the ring of group slots; 10 tiles on 8 blocks, and the decode tile).
        codes = torch.randint(0, 256, (1, 1056, 32), generator=g, dtype=torch.uint8)
        scales = (torch.rand(1, 2, 1056, generator=g) / 8).to(torch.bfloat16)
        moe_kernels.quant.dequantize(moe_kernels.quant.QuantizedWeight("int4", codes, scales, group_size=32))
        moe_kernels.quant.quantize_int4(torch.randn(8, 64, generator=g), 32, symmetric=False)
        qw = moe_kernels.quant.QuantizedWeight(
            "int4", torch.randint(0, 256, (3, 272, 128), generator=g, dtype=torch.uint8),
            (torch.rand(3, 8, 272, generator=g) / 8).to(torch.bfloat16),
            torch.randint(0, 16, (3, 8, 272), generator=g, dtype=torch.uint8), group_size=32)
        xq = torch.randn(40, 256, generator=g).to(torch.bfloat16)
        moe_kernels.grouped_gemm(xq, qw, offsets, activation="silu_and_mul", config="64x64")
        moe_kernels.grouped_gemm(xq[:6], qw, torch.tensor([0, 1, 1, 6]), config="16x64")
        many = 1100
        moe_kernels.grouped_gemm(torch.randn(3, 8, generator=g).to(torch.bfloat16),
                                 torch.randn(many, 8, 8, generator=g).to(torch.bfloat16),
                                 torch.tensor([0] * (many - 1) + [2, 3]))


def test_workload_is_race_free(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_SIMT_RACECHECK", "1")
    monkeypatch.delenv("MOE_KERNELS_SIMT_SKIP_BARRIER", raising=False)
    workload()


def test_every_barrier_site_is_found():
    sites = barrier_sites()
    assert len(sites) >= 20
    assert any(s.startswith("kernels/common/reduce.cuh") for s in sites)


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
def test_deleting_any_barrier_is_caught(monkeypatch, order):
    needs_observer()
    monkeypatch.setenv("MOE_KERNELS_SIMT_RACECHECK", "1")
    monkeypatch.setenv("MOE_KERNELS_SIMT_ORDER", order)
    missed = []
    for site in barrier_sites():
        monkeypatch.setenv("MOE_KERNELS_SIMT_SKIP_BARRIER", site)
        try:
            workload()
        except RuntimeError as error:
            # The race detector, or the emulator seeing the mutant go wrong otherwise (a
            # divergent barrier): either way the suite fails. Most are races.
            assert "race detector" in str(error) or "__syncthreads" in str(error), str(error)
            continue
        missed.append(site)
    assert not missed, f"deleting these barriers goes unnoticed: {missed}"
