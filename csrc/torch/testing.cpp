#include "../kernels/testing/testing.h"

#include "common.h"

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


// ---- PTX primitive probes (testing_ptx.cuh) ------------------------------------------------

// Fragments are per lane, [warps, 32, regs]; b16 pairs travel as raw int32 bits.
at::Tensor mma_probe(const at::Tensor& a_frag, const at::Tensor& b_frag, const at::Tensor& c_frag,
                     bool bf16) {
  check_input(a_frag, "a_frag", at::kInt, 3);
  const int64_t warps = a_frag.size(0);
  MOE_CHECK_VALUE(warps >= 1 && warps <= 32 && a_frag.size(1) == 32 && a_frag.size(2) == 4,
                  "a_frag", "expected [warps, 32, 4] with 1 <= warps <= 32, got ", a_frag.sizes());
  check_input(b_frag, "b_frag", at::kInt, 3, a_frag);
  MOE_CHECK_VALUE(b_frag.sizes() == at::IntArrayRef({warps, 32, 2}), "b_frag",
                  "expected [", warps, ", 32, 2], got ", b_frag.sizes());
  check_input(c_frag, "c_frag", at::kFloat, 3, a_frag);
  MOE_CHECK_VALUE(c_frag.sizes() == a_frag.sizes(), "c_frag", "expected ", a_frag.sizes(),
                  ", got ", c_frag.sizes());
  const c10::DeviceGuard guard(a_frag.device());
  at::Tensor d_frag = at::empty_like(c_frag);
  launch_mma_probe(reinterpret_cast<const uint32_t*>(a_frag.data_ptr<int32_t>()),
                   reinterpret_cast<const uint32_t*>(b_frag.data_ptr<int32_t>()),
                   c_frag.data_ptr<float>(), d_frag.data_ptr<float>(), static_cast<int>(warps),
                   bf16, current_stream(a_frag));
  return d_frag;
}

at::Tensor ldmatrix_probe(const at::Tensor& x, const at::Tensor& lane_rows, int64_t col,
                          int64_t num, bool trans) {
  check_input(x, "x", at::kShort, 2);
  const int64_t rows = x.size(0), width = x.size(1);
  MOE_CHECK_VALUE(rows >= 1 && width >= 8 && width % 8 == 0 && rows * width * 2 <= 48 * 1024, "x",
                  "expected [rows, width], width a multiple of 8 (16-byte rows), at most 48 KiB, "
                  "got ", x.sizes());
  check_input(lane_rows, "lane_rows", at::kInt, 2, x);
  MOE_CHECK_VALUE(lane_rows.size(0) >= 1 && lane_rows.size(0) <= 32 && lane_rows.size(1) == 32,
                  "lane_rows", "expected [warps, 32] with 1 <= warps <= 32, got ", lane_rows.sizes());
  MOE_CHECK_VALUE(lane_rows.min().item<int32_t>() >= 0 && lane_rows.max().item<int32_t>() < rows,
                  "lane_rows", "values must lie in [0, ", rows, ")");
  MOE_CHECK_VALUE(col >= 0 && col % 8 == 0 && col + 8 <= width, "col",
                  "expected a multiple of 8 with col + 8 <= ", width, ", got ", col);
  MOE_CHECK_VALUE(num == 1 || num == 2 || num == 4, "num", "expected 1, 2 or 4, got ", num);
  const c10::DeviceGuard guard(x.device());
  const int64_t warps = lane_rows.size(0);
  at::Tensor out = at::empty({warps, 32, num}, lane_rows.options());
  launch_ldmatrix_probe(reinterpret_cast<const uint16_t*>(x.data_ptr<int16_t>()),
                        static_cast<int>(rows), static_cast<int>(width),
                        lane_rows.data_ptr<int32_t>(), static_cast<int>(warps),
                        static_cast<int>(col), static_cast<int>(num), trans, out.data_ptr<int32_t>(),
                        current_stream(x));
  return out;
}

at::Tensor cp_async_probe(const at::Tensor& src, const at::Tensor& src_sizes, int64_t pending,
                          bool early_reads) {
  MOE_CHECK_VALUE(!(early_reads && kTargetIsCuda), "early_reads",
                  "reading cp.async destinations in flight is a race; only the emulator defines it");
  check_input(src, "src", at::kByte, 3);
  const int64_t groups = src.size(0), threads = src.size(1);
  MOE_CHECK_VALUE(groups >= 1 && groups <= 8 && threads >= 1 && threads <= 1024 &&
                      src.size(2) == 16 && groups * threads * 16 <= 48 * 1024,
                  "src", "expected [groups <= 8, threads <= 1024, 16] within 48 KiB, got ",
                  src.sizes());
  check_input(src_sizes, "src_sizes", at::kInt, 2, src);
  MOE_CHECK_VALUE(src_sizes.sizes() == at::IntArrayRef({groups, threads}), "src_sizes",
                  "expected [", groups, ", ", threads, "], got ", src_sizes.sizes());
  MOE_CHECK_VALUE(src_sizes.min().item<int32_t>() >= 0 && src_sizes.max().item<int32_t>() <= 16,
                  "src_sizes", "values must lie in [0, 16]");
  MOE_CHECK_VALUE(pending == 0 || pending == 1, "pending", "expected 0 or 1, got ", pending);
  const c10::DeviceGuard guard(src.device());
  at::Tensor seen = at::zeros({3, groups, threads, 16}, src.options());
  launch_cp_async_probe(src.data_ptr<uint8_t>(), src_sizes.data_ptr<int32_t>(),
                        static_cast<int>(groups), static_cast<int>(threads),
                        static_cast<int>(pending), early_reads, seen.data_ptr<uint8_t>(),
                        current_stream(src));
  return seen;
}

void ptx_broken(int64_t mode, const at::Tensor& out) {
  MOE_CHECK_VALUE(!kTargetIsCuda, "mode",
                  "the broken PTX kernels run only in the emulator (on a GPU they are undefined)");
  check_input(out, "out", at::kFloat, 1);
  MOE_CHECK_VALUE(out.numel() >= 64, "out", "expected at least 64 elements");
  MOE_CHECK_VALUE(mode >= 0 && mode <= 7, "mode", "expected 0..7, got ", mode);
  launch_ptx_broken(static_cast<int>(mode), out.data_ptr<float>(), current_stream(out));
}

}  // namespace testing
// Kernels that test the execution model, in the submodule `testing`.
void register_testing(pybind11::module_& parent) {
  pybind11::module_ m = parent.def_submodule("testing", "kernels that test the execution model");
  m.def("block_sum", &testing::block_sum, py::arg("x"), py::arg("block"));
  m.def("transpose", &testing::transpose, py::arg("x"), py::arg("padded") = true);
  m.def("warp_scan", &testing::warp_scan, py::arg("x"));
  m.def("histogram", &testing::histogram, py::arg("x"), py::arg("bins"));
  m.def("block_reverse", &testing::block_reverse, py::arg("x"), py::arg("block"));
  m.def("broken", &testing::broken, py::arg("mode"), py::arg("out"));
  m.def("shared_memory", &testing::shared_memory, py::arg("dynamic_bytes"), py::arg("opt_in") = true,
        py::arg("grid") = std::vector<int64_t>{1, 1, 1}, py::arg("block") = std::vector<int64_t>{64, 1, 1});
  m.def("mma_probe", &testing::mma_probe, py::arg("a_frag"), py::arg("b_frag"),
        py::arg("c_frag"), py::arg("bf16"));
  m.def("ldmatrix_probe", &testing::ldmatrix_probe, py::arg("x"), py::arg("lane_rows"),
        py::arg("col"), py::arg("num"), py::arg("trans"));
  m.def("cp_async_probe", &testing::cp_async_probe, py::arg("src"), py::arg("src_sizes"),
        py::arg("pending"), py::arg("early_reads") = false);
  m.def("ptx_broken", &testing::ptx_broken, py::arg("mode"), py::arg("out"));
}

}  // namespace moe
