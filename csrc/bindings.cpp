// The Python module: moe_kernels._C (CUDA kernels) or moe_kernels._simt (the same kernels
// in the SIMT emulator), depending on MOE_KERNELS_TARGET_*.
#include <torch/extension.h>

#include "torch/ops.h"

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

  py::module_ t = m.def_submodule("testing", "kernels that test the execution model");
  t.def("block_sum", &moe::testing::block_sum, py::arg("x"), py::arg("block"));
  t.def("transpose", &moe::testing::transpose, py::arg("x"));
  t.def("warp_scan", &moe::testing::warp_scan, py::arg("x"));
  t.def("histogram", &moe::testing::histogram, py::arg("x"), py::arg("bins"));
  t.def("block_reverse", &moe::testing::block_reverse, py::arg("x"), py::arg("block"));
  t.def("broken", &moe::testing::broken, py::arg("mode"), py::arg("out"));
  t.def("mma_probe", &moe::testing::mma_probe, py::arg("a_frag"), py::arg("b_frag"),
        py::arg("c_frag"), py::arg("bf16"));
  t.def("ldmatrix_probe", &moe::testing::ldmatrix_probe, py::arg("x"), py::arg("lane_rows"),
        py::arg("col"), py::arg("num"), py::arg("trans"));
  t.def("cp_async_probe", &moe::testing::cp_async_probe, py::arg("src"), py::arg("src_sizes"),
        py::arg("pending"), py::arg("early_reads") = false);
  t.def("ptx_broken", &moe::testing::ptx_broken, py::arg("mode"), py::arg("out"));
}
