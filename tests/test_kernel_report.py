"""The kernel resource report: parsers on known text, and the built _C when present."""

import re
import shutil

import pytest

from moe_kernels import kernel_report as kr

RES_USAGE = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _Z3fooPf:
  REG:40 STACK:0 SHARED:96 LOCAL:0 CONSTANT[0]:409 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z3barPf:
  REG:255 STACK:24 SHARED:0 LOCAL:8 CONSTANT[0]:409 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
 Function _Z3fooPf:
  REG:38 STACK:0 SHARED:1120 LOCAL:0 CONSTANT[0]:409 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

ELF = """
.nv.info._Z3fooPf
\t<0x11>
\tAttribute:\tEIATTR_MAX_THREADS
\tFormat:\tEIFMT_SVAL
\tValue:\t0x100 0x1 0x1
\t<0x12>
\tAttribute:\tEIATTR_EXIT_INSTR_OFFSETS
\tValue:\t0xab30
.nv.info._Z3barPf
\tAttribute:\tEIATTR_MAX_THREADS
\tFormat:\tEIFMT_SVAL
\tValue:\t0x20 0x2 0x1
"""

SASS = """
\tarch = sm_90
\t\tFunction : _Z3fooPf
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
\t\tFunction : _Z3barPf
        /*0000*/                   FFMA R1, R2, R3, R4 ;
"""


def test_parse_resource_usage():
    usage = kr.parse_resource_usage(RES_USAGE)
    assert usage[("sm_80", "_Z3fooPf")] == dict(REG=40, STACK=0, SHARED=96, LOCAL=0, TEXTURE=0,
                                                  SURFACE=0, SAMPLER=0)
    assert usage[("sm_80", "_Z3barPf")]["STACK"] == 24 and usage[("sm_80", "_Z3barPf")]["LOCAL"] == 8
    assert usage[("sm_90", "_Z3fooPf")]["REG"] == 38
    assert len(usage) == 3


def test_parse_max_threads():
    assert kr.parse_max_threads(ELF) == {"_Z3fooPf": 256, "_Z3barPf": 64}


def test_parse_sass_use():
    sass = SASS + "        /*0020*/                   LDSM.16.M88.4 R4, [R2] ;\n"
    assert kr.parse_sass_use(sass, kr.LDMATRIX_SASS) == {("sm_90", "_Z3fooPf"): False, ("sm_90", "_Z3barPf"): True}
    assert not any(kr.parse_sass_use(sass, kr.CP_ASYNC_SASS).values())


def test_parse_tensor_core_use():
    assert kr.parse_tensor_core_use(SASS) == {("sm_90", "_Z3fooPf"): True, ("sm_90", "_Z3barPf"): False}


@pytest.mark.parametrize("arch,regs,smem,threads,expected", [
    ("sm_90", 32, 0, 128, 1.0),        # 16 blocks fit by registers and by threads
    ("sm_90", 128, 0, 256, 0.25),      # 4096 registers a warp: 2 blocks of 8 warps
    ("sm_89", 36, 0, 128, 1.0),        # 1536 threads per SM: 12 blocks
    ("sm_80", 16, 100 * 1024, 128, 1 / 16),  # one block fits by shared memory
])
def test_occupancy(arch, regs, smem, threads, expected):
    assert kr.occupancy(arch, regs, smem, threads) == pytest.approx(expected)


def test_built_extension_report():
    """_C holds SASS for sm_80 and sm_90 with the gating kernel, none using local memory."""
    from moe_kernels import _build_info

    if not _build_info.cuda_built:
        pytest.skip(f"moe_kernels._C not built: {_build_info.cuda_reason}")
    try:
        rows = kr.kernel_report()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    gating_archs = {r.arch for r in rows if "topk_gating_kernel" in r.kernel}
    assert {"sm_80", "sm_90"} <= gating_archs
    assert not [r for r in rows if r.uses_local_memory]
    gemm = [r for r in rows if re.search(r"grouped_gemm(_wgrad)?_kernel<", r.kernel)]
    assert gemm and all(r.mma_pipeline for r in gemm), [r for r in gemm if not r.mma_pipeline]
    assert all(0 < r.occupancy <= 1 for r in rows)
    assert shutil.which("c++filt") is None or all("(" in r.kernel for r in rows)


def test_emulator_static_shared_memory_matches_nvcc():
    """The emulator's launch limits count each kernel's static shared memory from its own
    build's symbols; nvcc's figure for the same kernel must agree."""
    from moe_kernels import _build_info
    from moe_kernels import _simt

    if not _build_info.cuda_built:
        pytest.skip(f"moe_kernels._C not built: {_build_info.cuda_reason}")
    try:
        usage = kr.parse_resource_usage(kr._run(kr.find_cuda_tool("cuobjdump"), "-res-usage",
                                                kr.default_extension_path()))
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    # cuobjdump's SHARED holds the 1 KiB that sm_8x/sm_9x reserve for the system in every
    # block that uses shared memory (a kernel with none, as quantize_int4's, shows 0); the
    # 48 KiB / opt-in limits are on what the kernel declares.
    reserved = 1024
    sm90 = {fn: max(u.get("SHARED", 0) - reserved, 0) for (arch, fn), u in usage.items() if arch == "sm_90"}
    assert sm90, "no sm_90 kernels in _C"
    mismatches = {fn: (nvcc, _simt.static_shared_bytes(fn)) for fn, nvcc in sm90.items()
                  if _simt.static_shared_bytes(fn) != nvcc}
    assert not mismatches, mismatches
    assert any(shared > 0 for shared in sm90.values())


def test_missing_nvdisasm_is_named(monkeypatch, capsys):
    """cuobjdump without nvdisasm (only the cuobjdump wheel installed): a message naming what
    to install and exit status 2, not a traceback from inside cuobjdump."""
    real = kr.find_cuda_tool

    def without_nvdisasm(name):
        if name == "nvdisasm":
            raise FileNotFoundError("nvdisasm not found: install the CUDA toolkit or "
                                    "`pip install nvidia-cuda-nvdisasm`")
        return real(name)

    monkeypatch.setattr(kr, "find_cuda_tool", without_nvdisasm)
    try:
        real("cuobjdump")
    except FileNotFoundError:
        pytest.skip("cuobjdump itself is not installed")
    assert kr.main(["--so", "/nonexistent/_C.so"]) == 2
    assert "pip install nvidia-cuda-nvdisasm" in capsys.readouterr().err
