#!/usr/bin/env bash
# On a machine with a GPU: build, run the whole test suite (cuda backend included), the
# kernel report and every benchmark, and put all results in one folder.
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
python -m moe_kernels.kernel_report --json "$OUT/kernel_report.json" > "$OUT/kernel_report.txt" || true
for script in bench/bench_*.py; do
  python "$script" --out "$OUT" 2>&1 | tee "$OUT/$(basename "$script" .py).txt"
done
echo "results in $OUT"
