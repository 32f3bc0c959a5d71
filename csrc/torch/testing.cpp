#include "../kernels/testing.h"

#include "common.h"
#include "ops.h"

namespace moe {
namespace testing {

at::Tensor block_sum(const at::Tensor& x, int64_t block) {
  check_input(x, "x", at::kFloat, 1);
  MOE_CHECK_VALUE(block >= 1 && block <= 1024 && (block & (block - 1)) == 0, "block",
                  "expected a power of two up to 1024, got ", block);
  const c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty({(x.numel() + block - 1) / block}, x.options());
  launch_block_sum(x.data_ptr<float>(), out.data_ptr<float>(), x.numel(), static_cast<int>(block),
                   current_stream(x));
  return out;
}

at::Tensor transpose(const at::Tensor& x, bool padded) {
  check_input(x, "x", at::kFloat, 2);
  const c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty({x.size(1), x.size(0)}, x.options());
  launch_transpose(x.data_ptr<float>(), out.data_ptr<float>(), static_cast<int>(x.size(0)),
                   static_cast<int>(x.size(1)), padded, current_stream(x));
  return out;
}

std::tuple<at::Tensor, at::Tensor> warp_scan(const at::Tensor& x) {
  check_input(x, "x", at::kInt, 1);
  const c10::DeviceGuard guard(x.device());
  at::Tensor scan = at::empty_like(x);
  // Whole blocks of 128 threads run, so every warp of them reports its votes.
  const int64_t warps = (x.numel() + 127) / 128 * 4;
  at::Tensor votes = at::empty({warps, 3}, x.options());
  launch_warp_scan(x.data_ptr<int32_t>(), scan.data_ptr<int32_t>(), votes.data_ptr<int32_t>(),
                   x.numel(), current_stream(x));
  return {scan, votes};
}

at::Tensor histogram(const at::Tensor& x, int64_t bins) {
  check_input(x, "x", at::kInt, 1);
  const c10::DeviceGuard guard(x.device());
  if (x.numel() > 0) {
    MOE_CHECK_VALUE(x.min().item<int32_t>() >= 0 && x.max().item<int32_t>() < bins, "x",
                    "values must lie in [0, bins)");
  }
  at::Tensor counts = at::zeros({bins}, x.options());
  launch_histogram(x.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), x.numel(), current_stream(x));
  return counts;
}

at::Tensor block_reverse(const at::Tensor& x, int64_t block) {
  check_input(x, "x", at::kFloat, 1);
  MOE_CHECK_VALUE(block >= 1 && block <= 1024, "block", "expected 1..1024, got ", block);
  const c10::DeviceGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  launch_block_reverse(x.data_ptr<float>(), out.data_ptr<float>(), x.numel(),
                       static_cast<int>(block), current_stream(x));
  return out;
}

at::Tensor shared_memory(int64_t dynamic_bytes, bool opt_in, std::vector<int64_t> grid,
                         std::vector<int64_t> block) {
  MOE_CHECK_VALUE(!kTargetIsCuda, "opt_in", "the launch-limit probe runs only in the emulator");
  MOE_CHECK_VALUE(dynamic_bytes >= 0 && dynamic_bytes % 4 == 0, "dynamic_bytes",
                  "expected a non-negative multiple of 4, got ", dynamic_bytes);
  MOE_CHECK_VALUE(grid.size() == 3 && block.size() == 3, "grid", "grid and block take 3 sizes");
  at::Tensor out = at::zeros({1}, at::kFloat);
  auto dims = [](const std::vector<int64_t>& v) {
    return std::array<unsigned, 3>{static_cast<unsigned>(v[0]), static_cast<unsigned>(v[1]),
                                   static_cast<unsigned>(v[2])};
  };
  launch_shared_memory(out.data_ptr<float>(), dynamic_bytes, opt_in, dims(grid), dims(block),
                       current_stream(out));
  return out;
}

void broken(int64_t mode, const at::Tensor& out) {
  MOE_CHECK_VALUE(!kTargetIsCuda, "mode", "the broken kernels run only in the emulator (on a GPU they hang)");
  check_input(out, "out", at::kFloat, 1);
  MOE_CHECK_VALUE(out.numel() >= 64, "out", "expected at least 64 elements");
  launch_broken(static_cast<int>(mode), out.data_ptr<float>(), current_stream(out));
}

}  // namespace testing
}  // namespace moe
