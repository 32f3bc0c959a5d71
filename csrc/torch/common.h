// Shared by the host adapters: named argument checks, device and stream selection.
//
// The adapters are compiled twice: into moe_kernels._C (MOE_KERNELS_TARGET_CUDA, the
// launchers run CUDA kernels on CUDA tensors) and into moe_kernels._simt (the launchers
// run the same kernels in the emulator on CPU tensors).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/extension.h>  // pybind11 and its tensor casters: each family registers itself

#include <initializer_list>
#include <string>

#include "../kernels/common/dtype.h"
#include "../kernels/common/limits.h"
#include "../kernels/common/stream.h"

#if defined(MOE_KERNELS_TARGET_CUDA)
// c10's stream header only: ATen/cuda/CUDAContext.h drags in cuBLAS/cuSPARSE headers,
// which CUDA wheels of torch keep outside the toolkit.
#include <c10/cuda/CUDAStream.h>
#endif

namespace py = pybind11;

namespace moe {

#if defined(MOE_KERNELS_TARGET_CUDA)
constexpr const char* kTargetName = "cuda";
constexpr bool kTargetIsCuda = true;
inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
#else
constexpr const char* kTargetName = "simt";
constexpr bool kTargetIsCuda = false;
inline cudaStream_t current_stream(const at::Tensor&) { return nullptr; }
#endif

// Errors name the argument and what was expected; TORCH_CHECK_VALUE/TYPE raise Python
// ValueError/TypeError.
#define MOE_CHECK_VALUE(cond, arg, ...) TORCH_CHECK_VALUE(cond, arg, ": ", __VA_ARGS__)
#define MOE_CHECK_TYPE(cond, arg, ...) TORCH_CHECK_TYPE(cond, arg, ": ", __VA_ARGS__)

inline void check_device(const at::Tensor& t, const char* arg) {
  MOE_CHECK_VALUE(kTargetIsCuda ? t.is_cuda() : t.is_cpu(), arg, "expected a ",
                  kTargetIsCuda ? "CUDA" : "CPU", " tensor for the ", kTargetName,
                  " backend, got one on ", t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* arg) {
  MOE_CHECK_VALUE(t.device() == ref.device(), arg, "expected device ", ref.device(), ", got ",
                  t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* arg) {
  MOE_CHECK_VALUE(t.is_contiguous(), arg, "expected a contiguous tensor");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* arg) {
  MOE_CHECK_VALUE(t.dim() == dim, arg, "expected ", dim, "-D, got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* arg) {
  MOE_CHECK_TYPE(t.scalar_type() == dtype, arg, "expected dtype ", dtype, ", got ",
                 t.scalar_type());
}

// A contiguous `dim`-D tensor of `dtype` on the target's device.
inline void check_input(const at::Tensor& t, const char* arg, at::ScalarType dtype, int64_t dim) {
  check_device(t, arg);
  check_dtype(t, dtype, arg);
  check_dim(t, dim, arg);
  check_contiguous(t, arg);
}

// The same, on the device of `ref` (the op's main input, already checked).
inline void check_input(const at::Tensor& t, const char* arg, at::ScalarType dtype, int64_t dim,
                        const at::Tensor& ref) {
  check_same_device(t, ref, arg);
  check_input(t, arg, dtype, dim);
}

// float32, float16 or bfloat16, as the launchers' DType.
inline DType float_dtype(const at::Tensor& t, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default:
      MOE_CHECK_TYPE(false, arg, "expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::f32;
}

}  // namespace moe
