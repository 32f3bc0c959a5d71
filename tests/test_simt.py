"""The SIMT emulator's own tests: small kernels that exercise barriers, shared memory,
warp collectives and atomics, run in the emulator (and on a GPU when there is one)."""

import re

import pytest
import torch

from conftest import device_of, native, needs_observer


@pytest.mark.parametrize("n,block", [(1, 32), (1000, 128), (4096, 1024), (37, 64)])
def test_block_sum(kernel_backend, n, block):
    x = torch.randn(n, dtype=torch.float64).float()
    out = native(kernel_backend).testing.block_sum(x.to(device_of(kernel_backend)), block).cpu()
    padded = torch.nn.functional.pad(x, (0, out.numel() * block - n))
    expected = padded.view(-1, block).double().sum(1)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("rows,cols", [(1, 1), (32, 32), (45, 77), (100, 3)])
def test_transpose(kernel_backend, rows, cols):
    x = torch.randn(rows, cols)
    out = native(kernel_backend).testing.transpose(x.to(device_of(kernel_backend))).cpu()
    assert torch.equal(out, x.t())


@pytest.mark.parametrize("n", [1, 31, 32, 200])
def test_warp_scan_and_votes(kernel_backend, n):
    x = torch.randint(-3, 4, (n,), dtype=torch.int32)
    scan, votes = native(kernel_backend).testing.warp_scan(x.to(device_of(kernel_backend)))
    scan, votes = scan.cpu(), votes.cpu()
    padded = torch.nn.functional.pad(x, (0, votes.shape[0] * 32 - n)).view(-1, 32)
    assert torch.equal(scan, padded.cumsum(1).view(-1)[:n].int())
    positive = padded > 0
    bits = torch.tensor([sum(1 << i for i in range(32) if row[i]) for row in positive.tolist()],
                        dtype=torch.int64)
    assert torch.equal(votes[:, 0].to(torch.int64) & 0xFFFFFFFF, bits)
    assert torch.equal(votes[:, 1], positive.any(1).int())
    assert torch.equal(votes[:, 2], positive.all(1).int())


def test_histogram_atomics(kernel_backend):
    x = torch.randint(0, 17, (3000,), dtype=torch.int32)
    counts = native(kernel_backend).testing.histogram(x.to(device_of(kernel_backend)), 17).cpu()
    assert torch.equal(counts, torch.bincount(x, minlength=17).int())


@pytest.mark.parametrize("n,block", [(100, 64), (64, 64), (5, 256)])
def test_dynamic_shared_memory(kernel_backend, n, block):
    x = torch.randn(n)
    out = native(kernel_backend).testing.block_reverse(x.to(device_of(kernel_backend)), block).cpu()
    expected = torch.cat([chunk.flip(0) for chunk in x.split(block)])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode,message", [
    (0, r"divergent __syncthreads in kernel 'broken_kernel'.*16 of 64 threads \(48 exited"),
    (1, r"divergent __syncthreads in kernel 'broken_kernel'.*32 of 64 threads \(32 exited"),
    (2, r"divergent __syncthreads: threads wait at .*testing.cuh:\d+ and at .*testing.cuh:\d+ "
        r"\(in kernel 'broken_kernel'"),
    (3, r"deadlock in kernel 'broken_kernel'.*warp collective"),
])
def test_rule_breaking_kernels_fail_loudly(mode, message):
    # simt only: on a GPU these kernels hang or are undefined.
    with pytest.raises(RuntimeError, match=message):
        native("simt").testing.broken(mode, torch.zeros(64))


def test_schedule_order_exposes_missing_barrier(monkeypatch):
    """A race hidden by running threads in index order shows when they run in reverse."""
    monkeypatch.delenv("MOE_KERNELS_SIMT_RACECHECK", raising=False)
    results = {}
    for order in ("forward", "reverse", "shuffle"):
        monkeypatch.setenv("MOE_KERNELS_SIMT_ORDER", order)
        out = torch.zeros(64)
        native("simt").testing.broken(5, out)
        results[order] = out
    neighbours = (torch.arange(64) + 1) % 64
    # In index order thread i reads slot i+1 before thread i+1 wrote it (poisoned: NaN).
    assert torch.isnan(results["forward"][:63]).all()
    assert torch.equal(results["reverse"][:63], neighbours[:63].float())
    assert not torch.equal(results["forward"].nan_to_num(-1), results["shuffle"].nan_to_num(-1))
    monkeypatch.setenv("MOE_KERNELS_SIMT_ORDER", "sideways")
    with pytest.raises(RuntimeError, match="MOE_KERNELS_SIMT_ORDER: expected forward, reverse or shuffle"):
        native("simt").testing.broken(5, torch.zeros(64))


def test_broken_kernels_refused_on_gpu():
    import moe_kernels._backend as backend

    module = backend._native("cuda")
    if module is None:
        pytest.skip("moe_kernels._C is not built")
    with pytest.raises(ValueError, match="mode: the broken kernels run only in the emulator"):
        module.testing.broken(0, torch.zeros(64))


def test_emulator_rejects_bad_launches():
    with pytest.raises(ValueError, match="block: expected a power of two"):
        native("simt").testing.block_sum(torch.ones(4), 3)


def test_asan_catches_out_of_bounds_write():
    """Under the AddressSanitizer build (CI), an out-of-bounds index in a kernel kills the
    process with a report; this test runs that kernel in a child process."""
    import subprocess
    import sys

    from moe_kernels import _build_info

    if _build_info.simt_sanitize != "address":
        pytest.skip("needs the AddressSanitizer build of _simt (MOE_KERNELS_SANITIZE=address)")
    code = ("import torch; from moe_kernels import _simt; "
            "_simt.testing.broken(4, torch.zeros(64))")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in child.stderr
    assert "broken_kernel" in child.stderr


# ---- Race detector, alignment, launch limits, traffic counters (emulator only) ----------

ORDERS = ("forward", "reverse", "shuffle")
TESTING_SITE = r"testing\.cuh:\d+"


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode,what", [
    (5, "conflicting accesses with no barrier between them on shared memory"),
    (6, "conflicting accesses with no barrier between them on shared memory"),
    (7, "accesses from two blocks of one launch on global memory"),
])
def test_race_detector_flags_deliberate_races(monkeypatch, order, mode, what):
    needs_observer()
    monkeypatch.setenv("MOE_KERNELS_SIMT_ORDER", order)
    monkeypatch.setenv("MOE_KERNELS_SIMT_RACECHECK", "1")
    with pytest.raises(RuntimeError) as info:
        native("simt").testing.broken(mode, torch.zeros(64))
    message = str(info.value)
    assert f"race detector: {what}" in message
    assert "kernel 'broken_kernel'" in message
    # Both accesses are named by their source line.
    assert len(re.findall(TESTING_SITE, message)) == 2, message


def test_shuffle_ordered_race_is_invisible_without_the_detector(monkeypatch):
    """Mode 6 computes the 'right' answer in every resume order: only the detector sees it."""
    monkeypatch.delenv("MOE_KERNELS_SIMT_RACECHECK", raising=False)
    for order in ORDERS:
        monkeypatch.setenv("MOE_KERNELS_SIMT_ORDER", order)
        out = torch.zeros(64)
        native("simt").testing.broken(6, out)
        assert out[1] == 42.0


@pytest.mark.parametrize("order", ORDERS)
def test_race_detector_is_quiet_on_correct_kernels(monkeypatch, order):
    needs_observer()
    monkeypatch.setenv("MOE_KERNELS_SIMT_ORDER", order)
    monkeypatch.setenv("MOE_KERNELS_SIMT_RACECHECK", "1")
    t = native("simt").testing
    x = torch.randn(300)
    assert torch.allclose(t.block_sum(x, 128), torch.nn.functional.pad(x, (0, 84)).view(3, 128).sum(1), atol=1e-4)
    m = torch.randn(45, 77)
    assert torch.equal(t.transpose(m), m.t())
    assert torch.equal(t.histogram(torch.randint(0, 5, (700,), dtype=torch.int32), 5).sum(), torch.tensor(700))
    assert torch.equal(t.block_reverse(torch.arange(100.0), 64)[:64], torch.arange(64.0).flip(0))


@pytest.mark.parametrize("mode,space", [(8, "global"), (9, "shared")])
def test_misaligned_vector_access_fails(mode, space):
    needs_observer()
    with pytest.raises(RuntimeError, match=rf"misaligned 16-byte load at {space} memory address \d+ "
                                           rf"\(not a multiple of 16; the GPU faults\).*kernel 'broken_kernel'"):
        native("simt").testing.broken(mode, torch.zeros(64))


def test_barrier_skip_knob_reintroduces_a_race(monkeypatch):
    """MOE_KERNELS_SIMT_SKIP_BARRIER (used by the mutation test) removes one barrier."""
    needs_observer()
    monkeypatch.setenv("MOE_KERNELS_SIMT_RACECHECK", "1")
    t = native("simt").testing
    t.block_reverse(torch.arange(64.0), 64)
    import pathlib
    source = (pathlib.Path(__file__).parent.parent / "csrc/kernels/testing/testing.cuh").read_text().splitlines()
    start = next(i for i, line in enumerate(source) if "block_reverse_kernel(" in line)
    line = next(i for i in range(start, len(source)) if "__syncthreads()" in source[i]) + 1
    monkeypatch.setenv("MOE_KERNELS_SIMT_SKIP_BARRIER", f"kernels/testing/testing.cuh:{line}")
    with pytest.raises(RuntimeError, match="race detector.*block_reverse_kernel"):
        t.block_reverse(torch.arange(64.0), 64)


# Shared memory: 1 KiB static in shared_memory_kernel, plus the dynamic bytes asked for.
KIB = 1024


@pytest.mark.parametrize("arch,fits,too_big", [
    ("80", 162 * KIB, 162 * KIB + 4), ("90", 226 * KIB, 226 * KIB + 4), ("120", 98 * KIB, 98 * KIB + 4)])
def test_launch_shared_memory_limits_per_arch(monkeypatch, arch, fits, too_big):
    monkeypatch.setenv("MOE_KERNELS_SIMT_ARCH", arch)
    t = native("simt").testing
    assert t.shared_memory(fits).item() == 255 + fits // 4 - 1
    with pytest.raises(RuntimeError, match=rf"kernel 'shared_memory_kernel' cannot opt in to {too_big} bytes.*"
                                           rf"1024 static bytes.*sm_{arch}"):
        t.shared_memory(too_big)


def test_launch_without_opt_in_counts_static_shared_memory():
    """47 KiB dynamic + 1 KiB static is exactly 48 KiB; 4 bytes more need the opt-in. An
    opt-in lasts for the process (as cudaFuncSetAttribute does), so this runs in a fresh
    one."""
    import pathlib
    import subprocess
    import sys

    import moe_kernels

    # The child imports the same moe_kernels as this process (installed or built in place).
    package_root = str(pathlib.Path(moe_kernels.__file__).resolve().parent.parent)
    code = f"import sys; sys.path.insert(0, {package_root!r})\n" + """
import torch, moe_kernels
t = moe_kernels._backend.native_module("simt").testing
assert t.shared_memory(47 * 1024, opt_in=False).item() == 255 + 47 * 256 - 1
try:
    t.shared_memory(47 * 1024 + 4, opt_in=False)
    raise SystemExit("no error")
except RuntimeError as e:
    print(e)
assert t.shared_memory(47 * 1024 + 4, opt_in=True).item() == 255 + 47 * 256
t.shared_memory(47 * 1024 + 4, opt_in=False)  # opted in before: fine now
"""
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert re.search(r"kernel 'shared_memory_kernel' needs 1024 bytes of static \+ 48132 bytes of dynamic "
                     r"shared memory.*without the opt-in", child.stdout), child.stdout


@pytest.mark.parametrize("grid,block,message", [
    ([1, 1, 1], [1025, 1, 1], r"block \(1025,1,1\): at most 1024 threads"),
    ([1, 1, 1], [1, 1, 65], r"block \(1,1,65\).*z <= 64"),
    ([1, 65536, 1], [32, 1, 1], r"grid \(1,65536,1\): x <= 2\^31-1, y and z <= 65535"),
])
def test_launch_thread_and_grid_limits(grid, block, message):
    with pytest.raises(RuntimeError, match=rf"kernel 'shared_memory_kernel' launched with {message}"):
        native("simt").testing.shared_memory(0, grid=grid, block=block)


def test_unknown_arch_is_an_error(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_SIMT_ARCH", "75")
    with pytest.raises(RuntimeError, match="MOE_KERNELS_SIMT_ARCH: expected 80, 90 or 120, got '75'"):
        native("simt").testing.shared_memory(0)


def test_traffic_counters_transpose():
    """64x64 float transpose: every warp reads and writes 128 contiguous bytes (4 sectors)
    per instruction, so the sectors are exactly the minimum; the padded tile has no bank
    conflicts, the unpadded one 32-way conflicts on the column read."""
    needs_observer()
    from moe_kernels import emulator

    x = torch.randn(64, 64)
    t = native("simt").testing
    with emulator.traffic() as rows:
        t.transpose(x, padded=True)
        t.transpose(x, padded=False)
    padded, unpadded = rows
    assert padded["kernel"] == "transpose_kernel" and unpadded["kernel"] == "transpose_kernel_unpadded"
    for row in rows:
        assert row["grid"] == (2, 2, 1) and row["block"] == (32, 8, 1)
        assert row["global_bytes_read"] == row["global_bytes_written"] == 64 * 64 * 4
        assert row["sectors_read"] == row["sectors_written"] == 64 * 64 * 4 // 32
        assert row["unique_bytes_read"] == row["unique_bytes_written"] == 64 * 64 * 4
        assert row["amplification"] == 1.0
        # 4 blocks x 8 warps x 4 rows each: 128 global loads and 128 stores.
        assert row["global_instructions"] == 256
        assert row["shared_instructions"] == 256
    assert padded["max_bank_conflict_ways"] == 1 and padded["bank_conflict_factor"] == 1.0
    assert unpadded["max_bank_conflict_ways"] == 32
    # Stores to the tile are conflict-free (a row), the column reads take 32 wavefronts.
    assert unpadded["shared_wavefronts"] == 128 * 1 + 128 * 32


def test_traffic_counters_strided_and_atomic():
    """A histogram: 3000 int32 loads in 32-thread warps (contiguous: 4 sectors each), and
    atomics on 17 counters that every warp touches."""
    needs_observer()
    from moe_kernels import emulator

    x = torch.randint(0, 17, (3000,), dtype=torch.int32)
    with emulator.traffic() as rows:
        native("simt").testing.histogram(x, 17)
    (row,) = rows
    assert row["unique_bytes_read"] == 3000 * 4
    assert row["unique_bytes_written"] == 17 * 4
    assert row["sectors_read"] == (3000 * 4 + 31) // 32
    assert row["amplification"] > 1.0  # the counters are written once per warp, not once
