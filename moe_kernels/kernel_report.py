"""Resource report of the built CUDA kernels, no GPU needed.

    python -m moe_kernels.kernel_report [--so PATH] [--json FILE] [--fail-on-spill]

For every kernel in ``moe_kernels._C`` and every architecture it was compiled for: registers
per thread, stack frame and local memory bytes (register spills and local arrays live
there: our kernels must have none), static shared memory, the launch bound (threads per
block), the theoretical occupancy that follows, and whether its SASS holds tensor-core
instructions. Reads the binary with ``cuobjdump``, which disassembles through ``nvdisasm``:
both come with the CUDA toolkit, or as the ``nvidia-cuda-cuobjdump`` and
``nvidia-cuda-nvdisasm`` wheels. A missing tool is named in the error (exit status 2).
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# Per-SM limits by compute capability: max resident threads, max resident blocks, shared
# memory per SM usable by blocks (bytes), register file (32-bit registers).
SM_LIMITS = {
    80: dict(threads=2048, blocks=32, smem=164 * 1024, regs=65536),
    86: dict(threads=1536, blocks=16, smem=100 * 1024, regs=65536),
    89: dict(threads=1536, blocks=24, smem=100 * 1024, regs=65536),
    90: dict(threads=2048, blocks=32, smem=228 * 1024, regs=65536),
    100: dict(threads=2048, blocks=32, smem=228 * 1024, regs=65536),
    120: dict(threads=1536, blocks=32, smem=100 * 1024, regs=65536),
}
# Tensor-core opcodes across generations (mma.sync -> HMMA/IMMA, wgmma -> *GMMA,
# tcgen05 -> UTC*MMA, fp8/fp4 -> QMMA/OMMA).
TENSOR_CORE_SASS = re.compile(r"\b(HMMA|IMMA|DMMA|BMMA|HGMMA|IGMMA|QGMMA|BGMMA|QMMA|OMMA|UTC\w*MMA)\b")
# ldmatrix -> LDSM; cp.async -> LDGSTS (its waits are DEPBAR / LDGDEPBAR).
LDMATRIX_SASS = re.compile(r"\bLDSM\b")
CP_ASYNC_SASS = re.compile(r"\bLDGSTS\b")


@dataclasses.dataclass
class KernelRow:
    kernel: str
    arch: str
    registers: int
    stack_bytes: int
    local_bytes: int
    static_smem_bytes: int
    max_threads: int
    occupancy: float
    tensor_cores: bool
    ldmatrix: bool = False
    cp_async: bool = False

    @property
    def mma_pipeline(self):
        """Tensor cores fed by ldmatrix from cp.async copies: what every GEMM kernel must show."""
        return self.tensor_cores and self.ldmatrix and self.cp_async

    @property
    def uses_local_memory(self):
        return self.stack_bytes > 0 or self.local_bytes > 0


def find_cuda_tool(name):
    """Path of a CUDA binary tool: PATH, $CUDA_HOME/bin, then the nvidia-* wheels."""
    candidates = [shutil.which(name)]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", name))
    candidates.append(os.path.join("/usr/local/cuda/bin", name))
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations if spec else []):
        candidates += [str(p) for p in Path(base).glob(f"*/bin/{name}")]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(f"{name} not found: install the CUDA toolkit or "
                            f"`pip install nvidia-cuda-{name}`")


def default_extension_path():
    spec = importlib.util.find_spec("moe_kernels._C")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("moe_kernels._C is not built")
    return spec.origin


def _run(tool, *args, env=None):
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True, env=env).stdout


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def parse_resource_usage(text):
    """{(arch, mangled): dict(REG=.., STACK=.., SHARED=.., LOCAL=..)} from `cuobjdump -res-usage`."""
    usage, arch, function = {}, None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+\w*)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function and "REG:" in line:
            usage[(arch, function)] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            function = None
    return usage


def parse_max_threads(elf_text):
    """{mangled: max threads per block} from the EIATTR_MAX_THREADS of `cuobjdump -elf`."""
    bounds, function, attribute = {}, None, None
    for line in elf_text.splitlines():
        if m := re.match(r"^\.nv\.info\.(\S+)", line):
            function = m.group(1)
        elif m := re.match(r"\s*Attribute:\s*(\S+)", line):
            attribute = m.group(1)
        elif function and attribute == "EIATTR_MAX_THREADS" and (m := re.match(r"\s*Value:\s*(.+)", line)):
            bounds[function] = math.prod(int(v, 16) for v in m.group(1).split())
            attribute = None
    return bounds


def parse_tensor_core_use(sass_text):
    """{(arch, mangled): True if its SASS holds a tensor-core instruction}."""
    return parse_sass_use(sass_text, TENSOR_CORE_SASS)


def parse_sass_use(sass_text, pattern):
    """{(arch, mangled): True if its SASS holds an instruction matching `pattern`}."""
    result, arch, function = {}, None, None
    for line in sass_text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+\w*)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            function = m.group(1)
            result[(arch, function)] = False
        elif function and pattern.search(line):
            result[(arch, function)] = True
    return result


def occupancy(arch, registers, static_smem, threads):
    """Theoretical occupancy (active warps / max warps) of blocks of `threads` threads."""
    cc = int(re.match(r"sm_(\d+)", arch).group(1))
    limits = SM_LIMITS.get(cc) or SM_LIMITS[max(k for k in SM_LIMITS if k <= cc)]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256  # allocated per warp in 256s
    by_regs = limits["regs"] // (regs_per_warp * warps)
    by_smem = limits["smem"] // (static_smem + 1024) if static_smem else limits["blocks"]
    by_threads = limits["threads"] // (warps * 32)
    blocks = min(by_regs, by_smem, by_threads, limits["blocks"])
    return blocks * warps * 32 / limits["threads"]


def kernel_report(so_path=None):
    # Both tools are looked up first, so a missing one is named before anything runs:
    # cuobjdump -sass runs nvdisasm (from PATH; the wheels put them in separate folders).
    cuobjdump = find_cuda_tool("cuobjdump")
    nvdisasm = find_cuda_tool("nvdisasm")
    so_path = so_path or default_extension_path()
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(nvdisasm), os.environ.get("PATH", "")]))
    usage = parse_resource_usage(_run(cuobjdump, "-res-usage", so_path))
    sass = _run(cuobjdump, "-sass", so_path, env=env)
    tensor_cores = parse_tensor_core_use(sass)
    ldmatrix = parse_sass_use(sass, LDMATRIX_SASS)
    cp_async = parse_sass_use(sass, CP_ASYNC_SASS)
    archs = sorted({arch for arch, _ in usage})
    bounds = {arch: parse_max_threads(_run(cuobjdump, "-elf", "-arch", arch, so_path)) for arch in archs}
    names = _demangle(sorted({fn for _, fn in usage}))
    rows = []
    arch_number = lambda arch: int(re.sub(r"\D", "", arch))  # noqa: E731
    for (arch, fn), u in sorted(usage.items(), key=lambda kv: (names[kv[0][1]], arch_number(kv[0][0]))):
        threads = bounds[arch].get(fn, 1024)
        rows.append(KernelRow(
            kernel=names[fn], arch=arch, registers=u.get("REG", 0), stack_bytes=u.get("STACK", 0),
            local_bytes=u.get("LOCAL", 0), static_smem_bytes=u.get("SHARED", 0), max_threads=threads,
            occupancy=occupancy(arch, u.get("REG", 0), u.get("SHARED", 0), threads),
            tensor_cores=tensor_cores.get((arch, fn), False), ldmatrix=ldmatrix.get((arch, fn), False),
            cp_async=cp_async.get((arch, fn), False)))
    return rows


def format_table(rows):
    header = ("kernel", "arch", "regs", "stack", "local", "smem", "threads", "occupancy", "HMMA", "LDSM",
              "LDGSTS")
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    lines = [(r.kernel, r.arch, r.registers, r.stack_bytes, r.local_bytes, r.static_smem_bytes,
              r.max_threads, f"{r.occupancy:.0%}", yes(r.tensor_cores), yes(r.ldmatrix), yes(r.cp_async))
             for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt("-" * w for w in widths)] + [fmt(line) for line in lines])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--so", help="path of the _C extension (default: the installed one)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--fail-on-spill", action="store_true",
                        help="exit 1 if any kernel uses stack or local memory (spills)")
    parser.add_argument("--require-mma", metavar="REGEX",
                        help="exit 1 unless every kernel whose name matches REGEX has tensor-core "
                             "(HMMA), ldmatrix (LDSM) and cp.async (LDGSTS) instructions on every arch")
    args = parser.parse_args(argv)
    try:
        rows = kernel_report(args.so)
    except FileNotFoundError as exc:
        print(f"kernel_report: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    spilling = [r for r in rows if r.uses_local_memory]
    print(f"\n{len(rows)} kernel/arch rows, {len({r.kernel for r in rows})} kernels, "
          f"{len(spilling)} using local memory (spills)")
    for r in spilling:
        print(f"SPILL: {r.kernel} on {r.arch}: stack {r.stack_bytes} B, local {r.local_bytes} B")
    if not rows:
        print("no kernels found in the binary", file=sys.stderr)
        return 1
    missing_mma = []
    if args.require_mma:
        matching = [r for r in rows if re.search(args.require_mma, r.kernel)]
        missing_mma = [r for r in matching if not r.mma_pipeline]
        print(f"{len(matching)} kernel/arch rows match {args.require_mma!r}; "
              f"{len(matching) - len(missing_mma)} have HMMA + LDSM + LDGSTS")
        for r in missing_mma:
            print(f"NO MMA PIPELINE: {r.kernel} on {r.arch}: HMMA {r.tensor_cores}, LDSM {r.ldmatrix}, "
                  f"LDGSTS {r.cp_async}")
        if not matching:
            print(f"no kernel matches {args.require_mma!r}", file=sys.stderr)
            return 1
    return 1 if (args.fail_on_spill and spilling) or missing_mma else 0


if __name__ == "__main__":
    sys.exit(main())
