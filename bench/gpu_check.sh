#!/usr/bin/env bash
# On a machine with a GPU: build, run the whole test suite (cuda backend included), the
# demo, the kernel report and every benchmark (bench_layer.py, the whole layer, included),
# an nsys timeline of the layer's phases when nsys is installed, and put all results in one
# folder.
#   bash bench/gpu_check.sh [OUT_DIR]        (default bench/results/gpu-<date>)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.cuda.get_device_name())" | tee "$OUT/device.txt"
if ! python -c "import moe_kernels._C" 2>/dev/null; then
  MOE_KERNELS_REQUIRE_CUDA=1 pip install --no-build-isolation -v . > "$OUT/build.log" 2>&1
fi
pytest tests -q -rs 2>&1 | tee "$OUT/tests.txt"
python -m moe_kernels.demo 2>&1 | tee "$OUT/demo.txt" || true  # a mismatch shows in demo.txt
python -m moe_kernels.kernel_report --json "$OUT/kernel_report.json" > "$OUT/kernel_report.txt" || true
for script in bench/bench_*.py; do
  python "$script" --out "$OUT" 2>&1 | tee "$OUT/$(basename "$script" .py).txt"
done
# The layer's per-phase NVTX ranges (layer/route, layer/plan, layer/gemm1, ...) on a timeline.
if command -v nsys > /dev/null; then
  nsys profile --trace=cuda,nvtx --force-overwrite true -o "$OUT/bench_layer" \
    python bench/bench_layer.py --quick --iters 5 --warmup 2 --out "$OUT/nsys" > "$OUT/nsys_bench_layer.txt" 2>&1 || true
  nsys stats --report nvtx_sum "$OUT/bench_layer.nsys-rep" >> "$OUT/nsys_bench_layer.txt" 2>&1 || true
fi
echo "results in $OUT"
