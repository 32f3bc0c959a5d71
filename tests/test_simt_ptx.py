"""The PTX primitives of csrc/kernels/common/{mma,ldmatrix,cp_async}.cuh, run through the
probe kernels of csrc/kernels/testing/testing_ptx.cuh in the emulator (and on a GPU when there is
one). The expected per-lane registers are built here from the formulas of the PTX ISA,
independently of the C++ sources:

- 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type",
- 9.7.14.5.15 "Warp-level matrix load instruction: ldmatrix",
- 9.7.9.25.3 cp.async, cp.async.commit_group, cp.async.wait_group / wait_all.
"""

import pytest
import torch

from conftest import device_of, native, needs_observer

# ---- fragment layouts of mma.m16n8k16 (.f16 / .bf16 inputs, .f32 accumulators) --------------
# groupID = %laneid >> 2, threadID_in_group = %laneid % 4; each .b32 register of A and B
# holds two 16-bit elements, the lower-indexed one (a0 before a1) in the low half.


def _i32(u32):
    """A Python int in [0, 2^32) as the int32 with the same bits."""
    return u32 - (1 << 32) if u32 >= (1 << 31) else u32


def _bits16(t):
    """Raw 16-bit patterns of a float16/bfloat16/int16 tensor, as non-negative int64."""
    if t.dtype != torch.int16:
        t = t.view(torch.int16)
    return t.to(torch.int64) & 0xFFFF


def _a_position(lane, i):
    group, tid = lane >> 2, lane % 4
    row = group if (0 <= i < 2 or 4 <= i < 6) else group + 8
    col = tid * 2 + (i & 0x1) + (0 if i < 4 else 8)
    return row, col


def _b_position(lane, i):
    group, tid = lane >> 2, lane % 4
    row = tid * 2 + (i & 0x1) + (0 if i < 2 else 8)  # k
    col = group  # n
    return row, col


def _c_position(lane, i):
    group, tid = lane >> 2, lane % 4
    row = group if i < 2 else group + 8
    col = tid * 2 + (i & 0x1)
    return row, col


def a_fragments(a):
    """A [16, 16] (row-major M x K), float16/bfloat16 -> per-lane registers [32, 4] int32."""
    bits = _bits16(a).tolist()
    regs = []
    for lane in range(32):
        elems = [bits[r][c] for r, c in (_a_position(lane, i) for i in range(8))]
        regs.append([_i32(elems[2 * j] | elems[2 * j + 1] << 16) for j in range(4)])
    return torch.tensor(regs, dtype=torch.int32)


def b_fragments(b):
    """B [16, 8] (K x N), float16/bfloat16 -> per-lane registers [32, 2] int32."""
    bits = _bits16(b).tolist()
    regs = []
    for lane in range(32):
        elems = [bits[r][c] for r, c in (_b_position(lane, i) for i in range(4))]
        regs.append([_i32(elems[2 * j] | elems[2 * j + 1] << 16) for j in range(2)])
    return torch.tensor(regs, dtype=torch.int32)


def c_fragments(c):
    """C [16, 8] float32 -> per-lane values [32, 4]."""
    return torch.stack([torch.stack([c[_c_position(lane, i)] for i in range(4)]) for lane in range(32)])


def d_from_fragments(d):
    """Per-lane D values [32, 4] -> D [16, 8]."""
    out = torch.full((16, 8), float("nan"))
    for lane in range(32):
        for i in range(4):
            out[_c_position(lane, i)] = d[lane, i]
    return out


def run_mma(backend, a, b, c):
    """D = A @ B + C for a list of tiles (one warp each) through mma_probe."""
    bf16 = a[0].dtype == torch.bfloat16
    dev = device_of(backend)
    d = native(backend).testing.mma_probe(
        torch.stack([a_fragments(x) for x in a]).to(dev),
        torch.stack([b_fragments(x) for x in b]).to(dev),
        torch.stack([c_fragments(x) for x in c]).to(dev), bf16).cpu()
    return [d_from_fragments(x) for x in d]


MMA_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", MMA_DTYPES)
def test_mma_small_integers_exact(kernel_backend, dtype):
    # Every product and partial sum is an integer below 2^24: exact in any order, so the
    # GPU and the emulator must both give the exact result.
    g = torch.Generator().manual_seed(1)
    tiles = 3
    a = [torch.randint(-8, 9, (16, 16), generator=g).to(dtype) for _ in range(tiles)]
    b = [torch.randint(-8, 9, (16, 8), generator=g).to(dtype) for _ in range(tiles)]
    c = [torch.randint(-64, 65, (16, 8), generator=g).float() for _ in range(tiles)]
    d = run_mma(kernel_backend, a, b, c)
    for x, y, z, out in zip(a, b, c, d):
        assert torch.equal(out.double(), x.double() @ y.double() + z.double())


def test_mma_layout_is_not_symmetric(kernel_backend):
    # One nonzero element at a time: a transposed or shifted fragment would move it.
    a = torch.zeros(16, 16)
    a[11, 13] = 1
    b = torch.zeros(16, 8)
    b[13, 6] = 2
    c = torch.zeros(16, 8)
    c[3, 5] = 4
    (d,) = run_mma(kernel_backend, [a.bfloat16()], [b.bfloat16()], [c])
    expected = torch.zeros(16, 8)
    expected[11, 6] = 2
    expected[3, 5] = 4
    assert torch.equal(d, expected)


# Tolerance (the argument of common/mma.cuh): the products of two bf16 or two f16 values
# are exact in fp32. With S = sum_k |A[m, k] * B[k, n]| + |C[m, n]| (17 terms): the
# emulator adds them onto C in k order 0..15, each add rounded to nearest (error <=
# 16 * 2^-24 * S); the GPU's tensor cores align the significands to the largest exponent
# and truncate, in blocks, in an unspecified order: each term loses < 1 ulp (2^-23
# relative) of a partial sum <= S, plus one for the final normalization, <= 18 * 2^-23 * S.
# We allow K = 32 (margin for undocumented internals) against the float64 sum, which is
# exact to ~2^-53; a layout error is off by O(S).
MMA_K_BOUND = 32 * 2.0**-23


def mma_tolerance(a, b, c):
    return MMA_K_BOUND * (a.double().abs() @ b.double().abs() + c.double().abs())


def emulator_order(a, b, c):
    """The emulator's documented order: d = c; d += A[:, k] * B[k, :] for k = 0..15, fp32."""
    d = c.float().clone()
    for k in range(16):
        d = d + a[:, k].float()[:, None] * b[k, :].float()[None, :]  # exact products
    return d


@pytest.mark.parametrize("dtype", MMA_DTYPES)
@pytest.mark.parametrize("spread", [0, 12])
def test_mma_random_within_tolerance(kernel_backend, dtype, spread):
    # spread > 0 scales entries by 2^[-spread, spread]: sums with cancellation and
    # terms of very different magnitudes, where alignment and rounding matter.
    g = torch.Generator().manual_seed(2 + spread)
    tiles = 4

    def rand(*shape):
        x = torch.randn(*shape, generator=g)
        if spread:
            x = x * torch.exp2(torch.randint(-spread, spread + 1, shape, generator=g).float())
        return x

    limit = 60000.0 if dtype == torch.float16 else 1e30
    a = [rand(16, 16).clamp(-limit, limit).to(dtype) for _ in range(tiles)]
    b = [rand(16, 8).clamp(-limit, limit).to(dtype) for _ in range(tiles)]
    c = [rand(16, 8) for _ in range(tiles)]
    d = run_mma(kernel_backend, a, b, c)
    for x, y, z, out in zip(a, b, c, d):
        exact = x.double() @ y.double() + z.double()
        error = (out.double() - exact).abs()
        assert (error <= mma_tolerance(x, y, z)).all(), (error / mma_tolerance(x, y, z)).max()
        if kernel_backend == "simt":
            assert torch.equal(out, emulator_order(x, y, z))


# ---- ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16 --------------------------------
# Lanes 8m..8m+7 give the addresses of rows 0..7 of matrix m (lanes past 8 * num are
# ignored). Register m of lane l holds row l / 4, columns 2 * (l % 4) and 2 * (l % 4) + 1
# of matrix m (low half: the lower column); .trans delivers each matrix transposed.


def ldmatrix_expected(x, lane_rows, col, num, trans):
    bits = _bits16(x)
    out = []
    for w in range(lane_rows.shape[0]):
        mats = []
        for m in range(num):
            mat = torch.stack([bits[int(lane_rows[w, 8 * m + r]), col:col + 8] for r in range(8)])
            mats.append(mat.t() if trans else mat)
        lanes = []
        for lane in range(32):
            row, c = lane // 4, 2 * (lane % 4)
            lanes.append([_i32(int(mats[m][row, c]) | int(mats[m][row, c + 1]) << 16)
                          for m in range(num)])
        out.append(lanes)
    return torch.tensor(out, dtype=torch.int32)


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("col", [0, 16])
def test_ldmatrix(kernel_backend, num, trans, col):
    g = torch.Generator().manual_seed(10 * num + int(trans) + col)
    rows, width, warps = 40, 24, 2
    x = torch.randint(-2**15, 2**15, (rows, width), dtype=torch.int16, generator=g)
    # Any row for any lane, also for the lanes whose addresses ldmatrix ignores (if one
    # were used, its random row would show up).
    lane_rows = torch.randint(0, rows, (warps, 32), dtype=torch.int32, generator=g)
    dev = device_of(kernel_backend)
    out = native(kernel_backend).testing.ldmatrix_probe(x.to(dev), lane_rows.to(dev), col, num,
                                                        trans).cpu()
    assert out.shape == (warps, 32, num)
    assert torch.equal(out, ldmatrix_expected(x, lane_rows, col, num, trans))


def test_ldmatrix_feeds_mma_fragments(kernel_backend):
    """The two documented layouts compose: ldmatrix.x4 of a row-major 16x16 A, lanes 0-7,
    8-15, 16-23, 24-31 pointing at the rows of A[0:8, 0:8], A[8:16, 0:8], A[0:8, 8:16],
    A[8:16, 8:16], gives mma's A fragment; ldmatrix.x2 of B stored n-major ([n][k], the
    "col" B) gives its B fragment, and so does ldmatrix.x2.trans of B stored k-major."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(16, 16, generator=g).bfloat16()
    b = torch.randn(16, 8, generator=g).bfloat16()  # [k][n]
    t = native(kernel_backend).testing
    dev = device_of(kernel_backend)
    lanes = torch.arange(32, dtype=torch.int32)[None].to(dev)

    def rows_for(matrix, starts):  # the 8-element row each lane points at, as a [32, 8] x
        bits = matrix.view(torch.int16)
        return torch.stack([bits[r0 + lane % 8, c0:c0 + 8]
                            for lane in range(32)
                            for r0, c0 in [starts[min(lane // 8, len(starts) - 1)]]])

    x = rows_for(a, [(0, 0), (8, 0), (0, 8), (8, 8)])
    assert torch.equal(t.ldmatrix_probe(x.to(dev), lanes, 0, 4, False).cpu()[0], a_fragments(a))
    x = rows_for(b.t().contiguous(), [(0, 0), (0, 8)])  # [n][k]: matrices k 0-7, k 8-15
    assert torch.equal(t.ldmatrix_probe(x.to(dev), lanes, 0, 2, False).cpu()[0], b_fragments(b))
    x = rows_for(b, [(0, 0), (8, 0)])  # [k][n], transposed on the way
    assert torch.equal(t.ldmatrix_probe(x.to(dev), lanes, 0, 2, True).cpu()[0], b_fragments(b))


# ---- cp.async (16 bytes, src-size zero fill), commit_group, wait_group N, wait_all -----------
CP_ASYNC_OLD = 0xC0  # kCpAsyncOld: slot (g, t) holds bytes 0xC0 + g before its copy lands


def cp_async_case(groups, threads, seed):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (groups, threads, 16), dtype=torch.uint8, generator=g)
    sizes = torch.randint(0, 17, (groups, threads), dtype=torch.int32, generator=g)
    sizes[:, 0], sizes[:, 1], sizes[:, 2], sizes[:, 3] = 0, 16, 16, 7  # each kind surely
    landed = src.clone()
    landed[torch.arange(16)[None, None, :] >= sizes[:, :, None].long()] = 0
    return src, sizes, landed


def old_contents(groups, threads):
    return (CP_ASYNC_OLD + torch.arange(groups, dtype=torch.uint8))[:, None, None].expand(
        groups, threads, 16)


@pytest.mark.parametrize("pending", [0, 1])
@pytest.mark.parametrize("threads", [64, 45])
def test_cp_async_zero_fill_and_wait_group(kernel_backend, pending, threads):
    groups = 3
    src, sizes, landed = cp_async_case(groups, threads, seed=pending * 100 + threads)
    dev = device_of(kernel_backend)
    seen = native(kernel_backend).testing.cp_async_probe(src.to(dev), sizes.to(dev), pending).cpu()
    covered = groups - pending  # wait_group N: all but the newest N groups have landed
    assert torch.equal(seen[1, :covered], landed[:covered])
    assert torch.equal(seen[2], landed)  # wait_all: everything
    # Not read: the probe leaves them as allocated (zeros).
    assert not seen[0].any() and not seen[1, covered:].any()


@pytest.mark.parametrize("pending", [0, 1])
def test_cp_async_lands_only_at_its_wait_in_the_emulator(monkeypatch, pending):
    """In the emulator a copy lands at the wait that covers its group, never earlier: reads
    before it see the old shared contents (on a GPU such a read is a race, which the race
    detector reports: see below)."""
    monkeypatch.delenv("MOE_KERNELS_SIMT_RACECHECK", raising=False)
    groups, threads = 3, 32
    src, sizes, landed = cp_async_case(groups, threads, seed=7 + pending)
    seen = native("simt").testing.cp_async_probe(src, sizes, pending, early_reads=True)
    old = old_contents(groups, threads)
    assert torch.equal(seen[0], old)  # issued and committed, none waited for
    covered = groups - pending
    assert torch.equal(seen[1, :covered], landed[:covered])
    assert torch.equal(seen[1, covered:], old[covered:])  # wait_group 1: newest not landed
    assert torch.equal(seen[2], landed)


def test_cp_async_early_reads_refused_on_gpu():
    import moe_kernels._backend as backend

    module = backend._native("cuda")
    if module is None:
        pytest.skip("moe_kernels._C is not built")
    src, sizes, _ = cp_async_case(1, 32, seed=0)
    with pytest.raises(ValueError, match="early_reads: reading cp.async destinations in flight"):
        module.testing.cp_async_probe(src, sizes, 0, early_reads=True)


def test_probe_argument_checks():
    t = native("simt").testing
    with pytest.raises(ValueError, match="col: expected a multiple of 8"):
        t.ldmatrix_probe(torch.zeros(8, 16, dtype=torch.int16), torch.zeros(1, 32, dtype=torch.int32),
                         4, 1, False)
    with pytest.raises(ValueError, match="num: expected 1, 2 or 4"):
        t.ldmatrix_probe(torch.zeros(8, 8, dtype=torch.int16), torch.zeros(1, 32, dtype=torch.int32),
                         0, 3, False)
    with pytest.raises(ValueError, match="pending: expected 0 or 1"):
        t.cp_async_probe(torch.zeros(2, 32, 16, dtype=torch.uint8),
                         torch.zeros(2, 32, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match=r"src_sizes: values must lie in \[0, 16\]"):
        t.cp_async_probe(torch.zeros(1, 32, 16, dtype=torch.uint8),
                         torch.full((1, 32), 17, dtype=torch.int32), 0)


# ---- misuse: the emulator must name the kernel and the rule (simt only) ---------------------
@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
@pytest.mark.parametrize("mode,message", [
    (0, r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32 needs all 32 lanes of the "
        r"warp \(\.aligned\), but the block has only 16 threads in this warp \(in kernel 'ptx_broken_kernel'"),
    # Lanes 16-31 return: whichever lane arrives after one of them exited reports it; if
    # lanes 0-15 all arrived first, nobody can go on (a deadlock).
    (1, r"(mma\.sync\.aligned\.m16n8k16\S* needs all 32 lanes of the warp \(\.aligned\), but lane "
        r"(1[6-9]|2\d|3[01]) has exited \(|deadlock ).*kernel 'ptx_broken_kernel'"),
    (2, r"misaligned ldmatrix row address of lane 9\b.*not a multiple of 16.*kernel 'ptx_broken_kernel'"),
    (3, r"ldmatrix: the row address of lane 3 is not in shared memory \(in kernel 'ptx_broken_kernel'"),
    (4, r"misaligned cp\.async shared destination\b.*not a multiple of 16.*kernel 'ptx_broken_kernel'"),
    (5, r"misaligned cp\.async global source\b.*not a multiple of 16.*kernel 'ptx_broken_kernel'"),
    (6, r"thread exits with 1 cp\.async copies in flight .*kernel 'ptx_broken_kernel'"),
    (7, r"thread exits with 1 cp\.async copies in flight .*kernel 'ptx_broken_kernel'"),
])
def test_ptx_misuse_fails_loudly(monkeypatch, order, mode, message):
    monkeypatch.setenv("MOE_KERNELS_SIMT_ORDER", order)
    with pytest.raises(RuntimeError, match=message):
        native("simt").testing.ptx_broken(mode, torch.zeros(64))


def test_ptx_broken_refused_on_gpu():
    import moe_kernels._backend as backend

    module = backend._native("cuda")
    if module is None:
        pytest.skip("moe_kernels._C is not built")
    with pytest.raises(ValueError, match="mode: the broken PTX kernels run only in the emulator"):
        module.testing.ptx_broken(0, torch.zeros(64))


# ---- the race detector and the traffic counters see what the primitives access ------------
ORDERS = ("forward", "reverse", "shuffle")


@pytest.mark.parametrize("order", ORDERS)
def test_race_detector_is_quiet_on_the_probes(monkeypatch, order):
    needs_observer()
    monkeypatch.setenv("MOE_KERNELS_SIMT_ORDER", order)
    monkeypatch.setenv("MOE_KERNELS_SIMT_RACECHECK", "1")
    t = native("simt").testing
    a, b, c = torch.randn(16, 16).bfloat16(), torch.randn(16, 8).bfloat16(), torch.randn(16, 8)
    (d,) = run_mma("simt", [a], [b], [c])
    assert torch.equal(d, emulator_order(a, b, c))
    x = torch.randint(-2**15, 2**15, (40, 16), dtype=torch.int16)
    lane_rows = torch.randint(0, 40, (2, 32), dtype=torch.int32)
    for num in (1, 2, 4):
        assert torch.equal(t.ldmatrix_probe(x, lane_rows, 8, num, True),
                           ldmatrix_expected(x, lane_rows, 8, num, True))
    src, sizes, landed = cp_async_case(3, 64, seed=3)  # zero fill included
    for pending in (0, 1):
        assert torch.equal(t.cp_async_probe(src, sizes, pending)[2], landed)


def test_race_detector_flags_reading_a_cp_async_destination_early(monkeypatch):
    needs_observer()
    monkeypatch.setenv("MOE_KERNELS_SIMT_RACECHECK", "1")
    src, sizes, _ = cp_async_case(2, 32, seed=4)
    with pytest.raises(RuntimeError, match=r"race detector: access to a cp\.async destination before "
                                           r"the cp\.async\.wait_group that lands it.*cp_async_probe_kernel"):
        native("simt").testing.cp_async_probe(src, sizes, 1, early_reads=True)


def test_race_detector_sees_ldmatrix_rows_as_the_lanes_reads(monkeypatch):
    """Without the __syncthreads after staging, a lane's ldmatrix row was written by other
    threads with no barrier between: reported, with ldmatrix's read attributed to a lane."""
    needs_observer()
    import pathlib

    source = (pathlib.Path(__file__).parent.parent / "csrc/kernels/testing/testing_ptx.cuh").read_text()
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if "ldmatrix_probe_kernel(" in line)
    barrier = next(i for i in range(start, len(lines)) if "__syncthreads()" in lines[i]) + 1
    monkeypatch.setenv("MOE_KERNELS_SIMT_RACECHECK", "1")
    monkeypatch.setenv("MOE_KERNELS_SIMT_SKIP_BARRIER", f"kernels/testing/testing_ptx.cuh:{barrier}")
    x = torch.zeros(32, 8, dtype=torch.int16)
    lanes = torch.arange(32, dtype=torch.int32)[None]
    with pytest.raises(RuntimeError, match=r"race detector: conflicting accesses with no barrier "
                                           r"between them on shared memory.*ldmatrix_probe_kernel"):
        native("simt").testing.ldmatrix_probe(x, lanes, 0, 4, False)


def test_traffic_counts_one_ldmatrix_per_warp_with_its_bank_conflicts():
    """ldmatrix's rows are reported per lane (simt::observe with the lane), so the traffic
    counters see one warp-wide shared instruction: 4 phases of 8 lanes x 16 bytes. Rows 16
    bytes apart are conflict-free (1 wavefront per phase); rows 128 bytes apart put the 8
    rows of a phase on the same 4 banks (8 wavefronts per phase)."""
    needs_observer()
    simt = native("simt")
    x = torch.zeros(256, 8, dtype=torch.int16)  # 4 KiB, staged with 2-byte stores
    rows = {"contiguous": torch.arange(32, dtype=torch.int32)[None],
            "stride128": (8 * torch.arange(32, dtype=torch.int32))[None]}
    counts = {}
    for name, lane_rows in rows.items():
        simt.traffic_begin()
        simt.testing.ldmatrix_probe(x, lane_rows, 0, 4, False)
        (row,) = simt.traffic_end()
        counts[name] = row
    staging = 256 * 8 // 32  # 2-byte stores, one per element, 64 warp instructions
    for name, wavefronts, ways in (("contiguous", 4, 1), ("stride128", 32, 8)):
        row = counts[name]
        assert row["kernel"] == "ldmatrix_probe_kernel"
        assert row["shared_instructions"] == staging + 1, row
        assert row["shared_wavefronts"] == staging + wavefronts, row
        assert row["shared_ideal_wavefronts"] == staging + 4, row
        assert row["max_bank_conflict_ways"] == ways, row
