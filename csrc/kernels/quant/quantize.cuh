// Round-to-nearest int4 quantization (quant.h has the formulas): one warp per (row, group).
// The lanes read the group's values in pairs (one code byte each: a warp writes 32
// contiguous bytes), reduce the range across the warp, and lane 0 writes the scale and
// zero point. Groups of up to 32 * 2 * kCachedPairs values stay in registers between the
// range and the codes; longer ones (per-channel) are read twice.
#pragma once

#include "../common/launch.cuh"
#include "../common/reduce.cuh"
#include "codes.cuh"

namespace moe {
namespace quant {

constexpr int kQuantizeThreads = 256;
constexpr int kCachedPairs = 4;

struct MinOp {
  template <typename U>
  __device__ __forceinline__ U operator()(U a, U b) const { return a < b ? a : b; }
};

// `s` rounded to S, upward: the nearest S, or the next one up when that is below s
// (positive finite s). The largest magnitude of a group then maps to at most 7.5 (15).
template <typename S>
__device__ __forceinline__ S round_scale_up(float s) {
  S r = from_float<S>(s);
  if (to_float(r) < s) {
    union {
      S value;
      uint16_t bits;
    } u;
    u.value = r;
    ++u.bits;  // positive values: the next representable one
    r = u.value;
  }
  return r;
}

template <typename T, typename S>
__global__ void __launch_bounds__(kQuantizeThreads) quantize_int4_kernel(QuantizeInt4Params p) {
  const int64_t group = p.group_size;
  const int64_t groups = p.k / group;
  const int64_t rows = static_cast<int64_t>(p.num_experts) * p.n;
  const int64_t items = rows * groups;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kQuantizeThreads / 32);
  const T* w = static_cast<const T*>(p.w);
  for (int64_t item = blockIdx.x * int64_t{kQuantizeThreads / 32} + threadIdx.x / 32; item < items; item += warps) {
    const int64_t row = item / groups, g = item % groups;
    const T* src = w + row * p.k + g * group;
    // Pairs i = 2 lane + 64 c: the first kCachedPairs kept in registers (compile-time
    // indices, so the array stays in registers), the rest read again below.
    float cached[kCachedPairs][2];
    float lo = 0.f, hi = 0.f;  // the range includes 0 (asymmetric); amax = max(-lo, hi)
    auto widen = [&](float v0, float v1) {
      lo = fminf(lo, fminf(v0, v1));
      hi = fmaxf(hi, fmaxf(v0, v1));
    };
#pragma unroll
    for (int c = 0; c < kCachedPairs; ++c) {
      const int64_t i = 2 * lane + 64 * c;
      cached[c][0] = cached[c][1] = 0.f;
      if (i < group) {
        cached[c][0] = to_float(src[i]), cached[c][1] = to_float(src[i + 1]);
        widen(cached[c][0], cached[c][1]);
      }
    }
    for (int64_t i = 2 * lane + 64 * kCachedPairs; i < group; i += 64) widen(to_float(src[i]), to_float(src[i + 1]));
    lo = warp_allreduce<32>(lo, MinOp{});
    hi = warp_allreduce<32>(hi, MaxOp{});
    float range = p.symmetric ? fmaxf(-lo, hi) / 7.5f : (hi - lo) / 15.f;
    if (range == 0.f) range = 1.f;
    const S scale = round_scale_up<S>(range);
    const float s = to_float(scale);
    const float zero = p.symmetric ? 8.f : fminf(fmaxf(rintf(-lo / s), 0.f), 15.f);
    const int64_t e = row / p.n, n = row % p.n;
    const int64_t at = (e * groups + g) * p.n + n;
    if (lane == 0) {
      static_cast<S*>(p.scales)[at] = scale;
      if (!p.symmetric) p.zeros[at] = static_cast<uint8_t>(zero);
    }
    // Symmetric: clamp(rint(v / s), -8, 7) + 8 = clamp(rint(v / s) + 8, 0, 15).
    auto code = [&](float v) { return static_cast<uint32_t>(fminf(fmaxf(rintf(v / s) + zero, 0.f), 15.f)); };
    uint8_t* dst = p.codes + row * (p.k / 2) + g * group / 2;
#pragma unroll
    for (int c = 0; c < kCachedPairs; ++c) {
      const int64_t i = 2 * lane + 64 * c;
      if (i < group) dst[i / 2] = static_cast<uint8_t>(code(cached[c][0]) | (code(cached[c][1]) << 4));
    }
    for (int64_t i = 2 * lane + 64 * kCachedPairs; i < group; i += 64) {
      dst[i / 2] = static_cast<uint8_t>(code(to_float(src[i])) | (code(to_float(src[i + 1])) << 4));
    }
  }
}

}  // namespace quant

void launch_quantize_int4(const QuantizeInt4Params& p, cudaStream_t stream) {
  if (p.num_experts < 1 || p.n < 1 || p.k < 2 || p.k % 2 != 0 || p.group_size < 2 || p.group_size % 2 != 0 ||
      p.k % p.group_size != 0) {
    throw std::invalid_argument("quantize_int4: bad shape or group size");
  }
  if (p.scale_dtype == DType::f32) throw std::invalid_argument("quantize_int4: scales are bf16 or f16");
  const int64_t items = p.num_experts * p.n * (p.k / p.group_size);
  const DeviceProperties device = current_device_properties();
  const int64_t blocks = std::min<int64_t>((items + 7) / 8, int64_t{8} * std::max(device.num_sms, 1));
  LaunchConfig cfg{dim3(static_cast<unsigned>(blocks)), dim3(quant::kQuantizeThreads), 0, stream};
  MOE_DISPATCH_FLOAT_TYPES(p.dtype, T, {
    if (p.scale_dtype == DType::bf16) {
      launch_kernel("quantize_int4_kernel", quant::quantize_int4_kernel<T, __nv_bfloat16>, cfg, p);
    } else {
      launch_kernel("quantize_int4_kernel", quant::quantize_int4_kernel<T, __half>, cfg, p);
    }
  });
}

}  // namespace moe
