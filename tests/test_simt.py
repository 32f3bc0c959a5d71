"""The SIMT emulator's own tests: small kernels that exercise barriers, shared memory,
warp collectives and atomics, run in the emulator (and on a GPU when there is one)."""

import pytest
import torch

from conftest import device_of, native


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
