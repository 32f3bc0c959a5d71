// 4-bit weights: the layout every kernel reads, and the launchers of the standalone
// kernels (plain C++, shared by kernels and adapters).
//
// A weight of logical shape [E, N, K] (N outputs, K inputs) is stored as
//   codes  uint8 [E, N, K / 2]: byte j of a row holds element 2j in its low nibble and
//          element 2j + 1 in its high nibble;
//   scales [E, G, N], group-major (G = K / group_size groups along K; one for per-channel):
//          bf16 or f16 for int4, e8m0 (uint8, 2^(s - 127), 255 = NaN) for mxfp4;
//   zeros  uint8 [E, G, N] or null (int4 only; null: the symmetric zero point 8).
// Values: int4 (code - zero) * scale; mxfp4 e2m1(code) * scale, e2m1 being OCP's 4-bit
// float (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6). Each value is
// computed in fp32, where the product is exact, and rounded once to the output type.
// Scales are group-major so that the GEMM reads one group's scales for a tile of
// consecutive outputs as whole 16-byte pieces.
#pragma once

#include <cstdint>

#include "../common/dtype.h"
#include "../common/stream.h"

namespace moe {

enum class QuantFormat : int { int4 = 0, mxfp4 = 1 };
enum class ScaleType : int { bf16 = 0, f16 = 1, e8m0 = 2 };

MOE_HOST_DEVICE inline int scale_bytes(ScaleType t) { return t == ScaleType::e8m0 ? 1 : 2; }

struct QuantWeight {
  QuantFormat format = QuantFormat::int4;
  const uint8_t* codes = nullptr;  // [E, N, K / 2]
  const void* scales = nullptr;    // [E, G, N]
  ScaleType scale_type = ScaleType::bf16;
  const uint8_t* zeros = nullptr;  // [E, G, N] or null
  int64_t group_size = 0;          // > 0; K for per-channel
};

// out [E, N, K] = the weight's values, in out_dtype (bf16, f16 or f32).
struct DequantizeParams {
  QuantWeight w;
  int num_experts = 0;
  int64_t n = 0, k = 0;  // k even
  void* out = nullptr;
  DType out_dtype = DType::bf16;
};

void launch_dequantize(const DequantizeParams& params, cudaStream_t stream);

// Round-to-nearest int4 quantization of w [E * N, K] (rows e * N + n), per group of
// group_size along K (K for per-channel), into codes, scales (scale_dtype) and zeros:
//  symmetric:  s = amax / 7.5, q = clamp(rint(w / s), -8, 7) + 8 (zero point 8);
//  asymmetric: lo = min(min w, 0), hi = max(max w, 0), s = (hi - lo) / 15,
//              z = clamp(rint(-lo / s), 0, 15), q = clamp(rint(w / s) + z, 0, 15).
// s is computed in fp32 (1 when the group's range is 0) and rounded up to scale_dtype, so
// the largest magnitude still rounds to a code: |value - w| <= s / 2.
struct QuantizeInt4Params {
  const void* w = nullptr;
  DType dtype = DType::bf16;
  int num_experts = 0;
  int64_t n = 0, k = 0;
  int64_t group_size = 0;
  bool symmetric = true;
  uint8_t* codes = nullptr;   // [E, N, K / 2] out
  void* scales = nullptr;     // [E, G, N] out
  DType scale_dtype = DType::bf16;  // bf16 or f16
  uint8_t* zeros = nullptr;   // [E, G, N] out (asymmetric)
};

void launch_quantize_int4(const QuantizeInt4Params& params, cudaStream_t stream);

}  // namespace moe
