"""Builds moe_kernels: `_C` (CUDA kernels, nvcc) and `_simt` (the same kernels in the SIMT
emulator, host compiler).

Environment knobs (all optional; README lists them too):
  CUDA_HOME / CUDA_PATH       the CUDA toolkit to use (else found from nvcc, see below)
  TORCH_CUDA_ARCH_LIST        e.g. "8.0;9.0+PTX"; default 8.0, 8.9, 9.0 (+10.0, 12.0 where
                              nvcc knows them) and PTX of the newest
  MAX_JOBS                    parallel compile jobs (ninja)
  MOE_KERNELS_REQUIRE_CUDA=1  fail the build when `_C` cannot be built
  MOE_KERNELS_SKIP_CUDA=1     do not build `_C` (simt + reference only)
  MOE_KERNELS_SANITIZE=address  build `_simt` with AddressSanitizer (CI); the emulator's
                              memory observer (race detector, traffic counters,
                              alignment checks) is then off: the two instrumentations
                              cannot share a translation unit
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = ["8.0", "8.9", "9.0", "10.0", "12.0"]


def _log(message):
    print(f"moe_kernels setup: {message}", file=sys.stderr, flush=True)


def _is_toolkit(path):
    return path is not None and (Path(path) / "bin" / "nvcc").exists() and (
        Path(path) / "include" / "cuda_runtime.h"
    ).exists()


def find_cuda_home():
    """The CUDA toolkit root, or None.

    Order: $CUDA_HOME, $CUDA_PATH; the parent of the `nvcc` on PATH when it is a real
    toolkit; the TOP that `nvcc --dryrun` reports (this sees through wrapper scripts such
    as a /usr/local/bin/nvcc that execs the real one); /usr/local/cuda; the newest
    /usr/local/cuda-X.Y.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            if _is_toolkit(os.environ[var]):
                return os.environ[var]
            _log(f"${var}={os.environ[var]} is not a CUDA toolkit (no bin/nvcc or include/)")
    nvcc = shutil.which("nvcc")
    if nvcc:
        parent = Path(nvcc).resolve().parent.parent
        if _is_toolkit(parent):
            return str(parent)
        try:
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True,
                                 timeout=60)
            match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
            if match and _is_toolkit(Path(match.group(1).strip()).resolve()):
                return str(Path(match.group(1).strip()).resolve())
        except (OSError, subprocess.SubprocessError):
            pass
    candidates = [Path("/usr/local/cuda")] + sorted(
        Path("/usr/local").glob("cuda-*"), key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)],
        reverse=True)
    for candidate in candidates:
        if _is_toolkit(candidate):
            return str(candidate.resolve())
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    # torch.utils.cpp_extension reads this when imported.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def nvcc_known_archs(cuda_home):
    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--list-gpu-arch"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {f"{m[:-1]}.{m[-1]}" for m in re.findall(r"compute_(\d+)", out)}


def arch_flags(cuda_home):
    """-gencode flags: SASS for each arch, PTX for the newest (or those marked +PTX)."""
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if requested:
        entries = [a for a in re.split(r"[;\s,]+", requested) if a]
    else:
        known = nvcc_known_archs(cuda_home)
        archs = [a for a in DEFAULT_ARCHS if a in known] or DEFAULT_ARCHS[:3]
        entries = archs[:-1] + [archs[-1] + "+PTX"]
    flags = []
    for entry in entries:
        ptx = entry.endswith("+PTX")
        arch = entry.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags, entries


def cuda_headers_for_simt():
    """Include dir holding cuda_bf16.h & co for the emulator build: the toolkit's, or the
    one in the nvidia-cuda-runtime wheel that CUDA builds of torch depend on."""
    if CUDA_HOME:
        return str(Path(CUDA_HOME) / "include")
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations if spec else []):
        for inc in sorted(Path(base).glob("*/include")):
            if (inc / "cuda_bf16.h").exists():
                return str(inc)
    return None


def why_no_cuda():
    if os.environ.get("MOE_KERNELS_SKIP_CUDA") == "1":
        return "MOE_KERNELS_SKIP_CUDA=1"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME to the toolkit root, e.g. /usr/local/cuda)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return None


CXX_FLAGS = ["-O2", "-std=c++20", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
# -fmad=false: nvcc would otherwise fuse a*b+c into one FMA (one rounding) where the host
# compiler rounds twice, and a one-ulp difference can flip a top-k selection between the
# GPU and the emulator. Kernels that want an FMA write fmaf(), which both compute exactly.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "-Xptxas=-v", "-fmad=false"]
# The same promise on the host: no contraction (GCC's default outside strict ISO modes).
SIMT_FLAGS = ["-ffp-contract=off", "-DMOE_KERNELS_TARGET_SIMT"]
# The kernels' translation unit only: every load and store calls the emulator's memory
# observer (csrc/simt/memory.cpp), through the compiler's thread-sanitizer hooks; no
# sanitizer runtime is linked.
SIMT_KERNEL_FLAGS = ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0",
                     "--param=tsan-distinguish-volatile=0"]
SIMT_KERNELS = "csrc/simt/kernels.cpp"


def sources(*patterns):
    files = []
    for pattern in patterns:
        files += sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))
    return files


ADAPTERS = sources("csrc/bindings.cpp", "csrc/torch/*.cpp")
LIMITS_HEADER = ROOT / "csrc" / "kernels" / "common" / "limits.h"


def read_limits():
    """The op limits of csrc/kernels/common/limits.h (`constexpr int64_t kMaxName = expr;`),
    as {"MAX_NAME": value}: the Python checks use the numbers the kernels are built with."""
    limits = {}
    for name, expr in re.findall(r"^constexpr int64_t k(\w+) = ([0-9<> ]+);", LIMITS_HEADER.read_text(), re.M):
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()
        limits[snake] = int(eval(expr, {"__builtins__": {}}))  # digits, spaces and << only
    if not limits:
        raise RuntimeError(f"moe_kernels: no limits found in {LIMITS_HEADER}")
    return limits


def make_extensions():
    extensions = []
    build_info = {"cuda_built": False, "cuda_reason": "", "archs": [], "simt_sanitize": "",
                  "simt_observer": not os.environ.get("MOE_KERNELS_SANITIZE"),
                  "limits": read_limits()}

    simt_include = cuda_headers_for_simt()
    if simt_include is None:
        raise RuntimeError("moe_kernels: the emulator build needs cuda_bf16.h/cuda_fp16.h: "
                           "install the CUDA toolkit or the nvidia-cuda-runtime wheel")
    simt_flags = list(CXX_FLAGS) + SIMT_FLAGS
    simt_link = []
    sanitize = os.environ.get("MOE_KERNELS_SANITIZE", "")
    if sanitize:
        simt_flags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-O1", "-g"]
        simt_link += [f"-fsanitize={sanitize}"]
        build_info["simt_sanitize"] = sanitize
    extensions.append(CppExtension(
        "moe_kernels._simt",
        ADAPTERS + sources("csrc/simt/*.cpp"),
        include_dirs=[simt_include],
        extra_compile_args={"cxx": simt_flags},
        extra_link_args=simt_link,
    ))

    reason = why_no_cuda()
    if reason is None:
        gencode, archs = arch_flags(CUDA_HOME)
        extensions.append(CUDAExtension(
            "moe_kernels._C",
            ADAPTERS + sources("csrc/kernels/*/*.cu"),
            extra_compile_args={
                "cxx": list(CXX_FLAGS) + ["-DMOE_KERNELS_TARGET_CUDA"],
                "nvcc": NVCC_FLAGS + gencode,
            },
        ))
        build_info.update(cuda_built=True, archs=archs)
        _log(f"building _C with {CUDA_HOME} for {', '.join(archs)}")
    else:
        if os.environ.get("MOE_KERNELS_REQUIRE_CUDA") == "1":
            raise RuntimeError(f"moe_kernels: MOE_KERNELS_REQUIRE_CUDA=1 but _C cannot be built: {reason}")
        build_info["cuda_reason"] = reason
        _log("*" * 72)
        _log(f"the CUDA kernels (_C) are NOT built: {reason}.")
        _log("Only the simt emulator and the PyTorch reference will be available.")
        _log("*" * 72)

    (ROOT / "moe_kernels" / "_build_info.py").write_text(
        "# Written by setup.py at build time.\n" +
        "".join(f"{key} = {value!r}\n" for key, value in build_info.items()))
    return extensions


def compile_simt_kernels(ext, build_temp):
    """Compiles the kernels' translation unit of `_simt` on its own, with the memory
    observer's instrumentation (SIMT_KERNEL_FLAGS), and links it in as an object: setuptools
    gives every source of an extension the same flags."""
    sanitizing = bool(os.environ.get("MOE_KERNELS_SANITIZE"))
    flags = ext.extra_compile_args["cxx"] + ([] if sanitizing else SIMT_KERNEL_FLAGS)
    obj = Path(build_temp) / "simt_kernels.o"
    obj.parent.mkdir(parents=True, exist_ok=True)
    newest_source = max(p.stat().st_mtime for p in (ROOT / "csrc").rglob("*") if p.is_file())
    ext.sources = [s for s in ext.sources if s != SIMT_KERNELS]
    ext.extra_objects = [str(obj)]
    stamp = obj.with_suffix(".flags")
    if obj.exists() and obj.stat().st_mtime > newest_source and stamp.exists() and \
            stamp.read_text() == " ".join(flags):
        return  # up to date (an in-place rebuild)
    cxx = os.environ.get("CXX", "c++")
    command = [cxx, "-fPIC", "-g", *flags, *(f"-I{d}" for d in ext.include_dirs),
               "-c", str(ROOT / SIMT_KERNELS), "-o", str(obj)]
    _log("compiling the emulated kernels: " + " ".join(command))
    subprocess.run(command, check=True)
    stamp.write_text(" ".join(flags))


class Build(BuildExtension):
    """Gives each extension its own object directory: _C and _simt compile the same adapter
    sources with different defines, and setuptools would otherwise share the objects."""

    def build_extension(self, ext):
        shared_temp = self.build_temp
        self.build_temp = os.path.join(shared_temp, ext.name.replace(".", "_"))
        try:
            if ext.name == "moe_kernels._simt":
                compile_simt_kernels(ext, self.build_temp)
            super().build_extension(ext)
        finally:
            self.build_temp = shared_temp


setup(
    name="moe_kernels",
    version="0.1.0",
    description="Fused CUDA kernels for Mixture-of-Experts layers, with a SIMT emulator",
    packages=find_packages(include=["moe_kernels", "moe_kernels.*"]),
    ext_modules=make_extensions(),
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch", "numpy"],
    extras_require={"bench": ["matplotlib", "nvtx"], "quant": ["safetensors"], "hf": ["transformers"],
                    "test": ["pytest", "safetensors", "compressed-tensors", "transformers"]},
)
