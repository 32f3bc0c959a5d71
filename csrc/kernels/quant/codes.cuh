// 4-bit codes to values (the layout is in quant.h): one definition, used by the dequantize
// kernel and inside the W4A16 GEMM's main loop. Bit arithmetic, no tables, no branches
// per nibble.
#pragma once

#include "../common/memory.cuh"
#include "quant.h"

namespace moe {
namespace quant {

// A scale's raw bits (2 bytes for bf16/f16, 1 for e8m0) as fp32.
__device__ __forceinline__ float scale_value(uint32_t raw, ScaleType type) {
  if (type == ScaleType::bf16) return __uint_as_float(raw << 16);
  if (type == ScaleType::f16) return __half2float(__ushort_as_half(static_cast<unsigned short>(raw)));
  // e8m0: 2^(raw - 127) from its bit pattern; raw 0 is the fp32 subnormal 2^-127.
  if (raw == 255) return __uint_as_float(0x7fc00000u);
  return raw == 0 ? __uint_as_float(0x00400000u) : __uint_as_float(raw << 23);
}

// Reads scale i of a [.., G, N] scale tensor as fp32.
__device__ __forceinline__ float load_scale(const void* scales, ScaleType type, int64_t i) {
  if (type == ScaleType::e8m0) return scale_value(static_cast<const uint8_t*>(scales)[i], type);
  return scale_value(static_cast<const uint16_t*>(scales)[i], type);
}

// OCP e2m1 value of a 4-bit code. Its sign | exponent | mantissa bits, placed at fp32's
// sign bit and at the top of fp32's exponent and mantissa fields, make a float whose
// exponent bias is 127 instead of e2m1's 1: times 2^126 it is the value, subnormal 0.5
// included (the code's exponent 0 lands on fp32's subnormals). Exact.
__device__ __forceinline__ float e2m1_value(uint32_t code) {
  return __uint_as_float(((code & 8u) << 28) | ((code & 7u) << 22)) * 0x1p126f;
}

// The value of one code: (code - zero) * scale (int4), e2m1(code) * scale (mxfp4). The
// product is exact in fp32; the caller rounds once to its type.
__device__ __forceinline__ float code_value(uint32_t code, QuantFormat format, float scale, int zero) {
  return format == QuantFormat::int4 ? static_cast<float>(static_cast<int>(code) - zero) * scale
                                     : e2m1_value(code) * scale;
}

}  // namespace quant
}  // namespace moe
