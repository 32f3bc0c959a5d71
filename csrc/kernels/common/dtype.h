// Element types the launchers accept, as a plain enum shared by kernels and adapters.
#pragma once

#include <stdexcept>
#include <string>

// Functions of the plain launcher headers that kernels call too.
#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__
#else
#define MOE_HOST_DEVICE
#endif

namespace moe {

enum class DType { f32, f16, bf16 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
  }
  return "?";
}

}  // namespace moe

// Runs the code after it with `T` bound to the C++ type of `dtype` (device code only:
// float, __half or __nv_bfloat16).
#define MOE_DISPATCH_FLOAT_TYPES(dtype, T, ...)                                       \
  switch (dtype) {                                                                    \
    case ::moe::DType::f32: { using T = float; __VA_ARGS__; break; }                  \
    case ::moe::DType::f16: { using T = __half; __VA_ARGS__; break; }                 \
    case ::moe::DType::bf16: { using T = __nv_bfloat16; __VA_ARGS__; break; }         \
    default: throw std::invalid_argument("moe_kernels: unsupported dtype");           \
  }
