// The Python module: moe_kernels._C (CUDA kernels) or moe_kernels._simt (the same kernels
// in the SIMT emulator), depending on MOE_KERNELS_TARGET_*. Each op family registers its
// own functions (csrc/torch/<family>.cpp).
#include <torch/extension.h>

namespace moe {
void register_routing(pybind11::module_& m);
void register_gemm(pybind11::module_& m);
void register_permute(pybind11::module_& m);
void register_quant(pybind11::module_& m);
void register_emulator(pybind11::module_& m);  // simt only; a no-op in _C
void register_testing(pybind11::module_& m);
}  // namespace moe

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moe_kernels native ops";
#if defined(MOE_KERNELS_TARGET_CUDA)
  m.attr("target") = "cuda";
#else
  m.attr("target") = "simt";
#endif
  moe::register_routing(m);
  moe::register_permute(m);
  moe::register_gemm(m);
  moe::register_quant(m);
  moe::register_emulator(m);
  moe::register_testing(m);
}
