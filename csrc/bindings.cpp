// The Python module: moe_kernels._C (CUDA kernels) or moe_kernels._simt (the same kernels
// in the SIMT emulator), depending on MOE_KERNELS_TARGET_*.
#include <torch/extension.h>

#include "torch/ops.h"

#if !defined(MOE_KERNELS_TARGET_CUDA)
#include "simt/traffic.h"

// The emulator's traffic counters as a list of dicts, one per launch.
static py::list traffic_end() {
  py::list rows;
  for (const simt::TrafficRow& r : simt::traffic_end()) {
    py::dict row;
    row["kernel"] = r.kernel;
    row["grid"] = py::make_tuple(r.grid[0], r.grid[1], r.grid[2]);
    row["block"] = py::make_tuple(r.block[0], r.block[1], r.block[2]);
    row["global_instructions"] = r.global_instructions;
    row["global_bytes_read"] = r.global_bytes_read;
    row["global_bytes_written"] = r.global_bytes_written;
    row["sectors_read"] = r.sectors_read;
    row["sectors_written"] = r.sectors_written;
    row["unique_bytes_read"] = r.unique_bytes_read;
    row["unique_bytes_written"] = r.unique_bytes_written;
    row["shared_instructions"] = r.shared_instructions;
    row["shared_wavefronts"] = r.shared_wavefronts;
    row["shared_ideal_wavefronts"] = r.shared_ideal_wavefronts;
    row["max_bank_conflict_ways"] = r.max_bank_conflict_ways;
    rows.append(row);
  }
  return rows;
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moe_kernels native ops";
#if defined(MOE_KERNELS_TARGET_CUDA)
  m.attr("target") = "cuda";
#else
  m.attr("target") = "simt";
#endif
  m.def("topk_gating", &moe::topk_gating, "Fused top-k gating", py::arg("logits"), py::arg("k"),
        py::arg("renormalize"), py::arg("scoring") = "softmax", py::arg("bias") = py::none(),
        py::arg("num_groups") = 1, py::arg("topk_groups") = -1,
        py::arg("group_scoring") = "top2_sum", py::arg("scaling_factor") = 1.0);
  m.def("topk_gating_backward", &moe::topk_gating_backward,
        "Gradient of topk_gating's weights with respect to the logits", py::arg("grad_weights"),
        py::arg("logits"), py::arg("ids"), py::arg("scoring"), py::arg("renormalize"),
        py::arg("scaling_factor"));
  m.def("router_stats", &moe::router_stats, "Assignments per expert", py::arg("ids"),
        py::arg("num_experts"));
  m.def("expert_choice_gating", &moe::expert_choice_gating, "Expert-choice routing",
        py::arg("logits"), py::arg("capacity"));
  m.def("hash_gating", &moe::hash_gating, "Hash routing", py::arg("token_ids"),
        py::arg("num_experts"), py::arg("k"));
  m.def("hash_multiplier", &moe::hash_multiplier, "The expert permutation of hash_gating",
        py::arg("num_experts"));
  m.def("permute", &moe::permute, "Token permutation into expert-contiguous rows", py::arg("x"),
        py::arg("ids"), py::arg("weights"), py::arg("num_experts"), py::arg("capacity"),
        py::arg("align"), py::arg("drop_by_weight"), py::arg("expert_begin"),
        py::arg("expert_end"));
  m.def("unpermute", &moe::unpermute, "Weighted sum of each token's permuted rows",
        py::arg("y_perm"), py::arg("row_map"), py::arg("weights"));
  m.def("unpermute_backward", &moe::unpermute_backward, "Gradients of unpermute",
        py::arg("grad_y"), py::arg("y_perm"), py::arg("row_map"), py::arg("weights"),
        py::arg("need_grad_y_perm"), py::arg("need_grad_weights"));

#if !defined(MOE_KERNELS_TARGET_CUDA)
  m.def("traffic_begin", &simt::traffic_begin, "Count the memory traffic of every launch from now on");
  m.def("traffic_end", &traffic_end, "Stop counting; one dict per launch since traffic_begin");
  m.def("static_shared_bytes", &simt::static_shared_bytes_of_symbol,
        "Static shared memory of a kernel (mangled name), as the emulator counts it",
        py::arg("mangled_name"));
#endif

  py::module_ t = m.def_submodule("testing", "kernels that test the execution model");
  t.def("block_sum", &moe::testing::block_sum, py::arg("x"), py::arg("block"));
  t.def("transpose", &moe::testing::transpose, py::arg("x"), py::arg("padded") = true);
  t.def("warp_scan", &moe::testing::warp_scan, py::arg("x"));
  t.def("histogram", &moe::testing::histogram, py::arg("x"), py::arg("bins"));
  t.def("block_reverse", &moe::testing::block_reverse, py::arg("x"), py::arg("block"));
  t.def("broken", &moe::testing::broken, py::arg("mode"), py::arg("out"));
  t.def("shared_memory", &moe::testing::shared_memory, py::arg("dynamic_bytes"), py::arg("opt_in") = true,
        py::arg("grid") = std::vector<int64_t>{1, 1, 1}, py::arg("block") = std::vector<int64_t>{64, 1, 1});
  t.def("mma_probe", &moe::testing::mma_probe, py::arg("a_frag"), py::arg("b_frag"),
        py::arg("c_frag"), py::arg("bf16"));
  t.def("ldmatrix_probe", &moe::testing::ldmatrix_probe, py::arg("x"), py::arg("lane_rows"),
        py::arg("col"), py::arg("num"), py::arg("trans"));
  t.def("cp_async_probe", &moe::testing::cp_async_probe, py::arg("src"), py::arg("src_sizes"),
        py::arg("pending"), py::arg("early_reads") = false);
  t.def("ptx_broken", &moe::testing::ptx_broken, py::arg("mode"), py::arg("out"));
}
