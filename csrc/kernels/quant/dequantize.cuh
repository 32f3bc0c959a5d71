// Standalone dequantization: out [E, N, K] = the 4-bit weight's values (quant.h).
//
// Bandwidth-bound: every code byte and every scale (and zero point) is read once, every
// output written once, all in whole 32-byte sectors. A block takes a tile of 32 rows x
// 32 * V columns (V = the outputs of one 16-byte store: 8 for bf16/f16, 4 for fp32):
//  1. the tile's scales (and zeros) are staged in shared memory: a warp reads 32
//     consecutive outputs' scales of one group, contiguous in the group-major layout;
//  2. a warp takes one row at a time, lane l the V values at column k0 + V l: V / 2 code
//     bytes read (the warp: 16 V contiguous bytes), V values written as one 16-byte store
//     (the warp: 512 contiguous bytes). V values never straddle a group (group sizes are
//     multiples of 32, or K).
// K not a multiple of V (per-channel weights only) takes a per-element path at the row's end.
#pragma once

#include "../common/launch.cuh"
#include "codes.cuh"

namespace moe {
namespace quant {

constexpr int kDequantThreads = 256;
constexpr int kDequantRows = 32;
// Groups one tile's columns can touch: 32 V / 32 + 1 (a group boundary inside the tile).
constexpr int kDequantMaxGroups = 9;

template <typename T>
__global__ void __launch_bounds__(kDequantThreads, 4) dequantize_kernel(DequantizeParams p) {
  constexpr int V = 16 / sizeof(T);
  constexpr int TILE_K = 32 * V;
  static_assert(TILE_K / 32 + 1 <= kDequantMaxGroups, "staged groups");
  // [row][group], 9 groups per row: an odd stride, so the lanes of a warp (one row, up to
  // 8 groups; or 32 rows, one group) hit distinct banks.
  __shared__ float tile_scale[kDequantRows][kDequantMaxGroups];
  __shared__ int tile_zero[kDequantRows][kDequantMaxGroups];
  const QuantWeight& w = p.w;
  const int64_t groups = p.k / w.group_size;
  const int64_t row_tiles = (p.n + kDequantRows - 1) / kDequantRows;
  const int64_t k_tiles = (p.k + TILE_K - 1) / TILE_K;
  const int64_t tiles = static_cast<int64_t>(p.num_experts) * row_tiles * k_tiles;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row_bytes = p.k / 2;
  T* out = static_cast<T*>(p.out);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t e = tile / (row_tiles * k_tiles);
    const int64_t n0 = (tile / k_tiles) % row_tiles * kDequantRows;
    const int64_t k0 = tile % k_tiles * TILE_K;
    const int64_t k_end = k0 + TILE_K < p.k ? k0 + TILE_K : p.k;
    const int64_t g0 = k0 / w.group_size;
    const int num_groups = static_cast<int>((k_end - 1) / w.group_size - g0 + 1);
    __syncthreads();  // the previous tile's readers are done with the staged scales
    for (int i = threadIdx.x; i < num_groups * kDequantRows; i += kDequantThreads) {
      const int g = i / kDequantRows, r = i % kDequantRows;
      const int64_t n = n0 + r;
      if (n >= p.n) continue;
      const int64_t at = (e * groups + g0 + g) * p.n + n;
      tile_scale[r][g] = load_scale(w.scales, w.scale_type, at);
      tile_zero[r][g] = w.zeros != nullptr ? w.zeros[at] : 8;
    }
    __syncthreads();
    for (int r = warp; r < kDequantRows; r += kDequantThreads / 32) {
      const int64_t n = n0 + r;
      const int64_t col = k0 + static_cast<int64_t>(lane) * V;
      if (n >= p.n || col >= p.k) continue;
      const int g = static_cast<int>(col / w.group_size - g0);
      const float scale = tile_scale[r][g];
      const int zero = tile_zero[r][g];
      const uint8_t* codes = w.codes + (e * p.n + n) * row_bytes + col / 2;
      T* dst = out + (e * p.n + n) * p.k + col;
      if (col + V <= p.k && p.k % V == 0) {
        // V / 2 code bytes as one aligned load (row_bytes is a multiple of V / 2 here).
        uint32_t bits;
        if constexpr (V == 8) {
          bits = *reinterpret_cast<const uint32_t*>(codes);
        } else {
          bits = *reinterpret_cast<const uint16_t*>(codes);
        }
        auto value = [&](int j) { return code_value((bits >> (4 * j)) & 15u, w.format, scale, zero); };
        uint32_t words[4];  // the 16 bytes, built in registers
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if constexpr (V == 8) {
            words[i] = pack_pair<T>(value(2 * i), value(2 * i + 1));
          } else {
            words[i] = __float_as_uint(value(i));
          }
        }
        uint4 raw;
        raw.x = words[0], raw.y = words[1], raw.z = words[2], raw.w = words[3];
        store_vec16(dst, raw);
      } else {
        for (int j = 0; j < V && col + j < p.k; ++j) {
          const uint32_t byte = codes[j / 2];
          dst[j] = from_float<T>(code_value((byte >> (4 * (j % 2))) & 15u, w.format, scale, zero));
        }
      }
    }
  }
}

}  // namespace quant

void launch_dequantize(const DequantizeParams& p, cudaStream_t stream) {
  if (p.num_experts < 1 || p.n < 1 || p.k < 2 || p.k % 2 != 0 || p.w.group_size < 1 || p.k % p.w.group_size != 0 ||
      (p.w.group_size % 32 != 0 && p.w.group_size != p.k)) {
    throw std::invalid_argument("dequantize: bad shape or group size");
  }
  const int V = p.out_dtype == DType::f32 ? 4 : 8;
  const int64_t tiles = p.num_experts * ((p.n + quant::kDequantRows - 1) / quant::kDequantRows) *
                        ((p.k + 32 * V - 1) / (32 * V));
  const DeviceProperties device = current_device_properties();
  const int64_t blocks = std::min<int64_t>(tiles, int64_t{8} * std::max(device.num_sms, 1));
  LaunchConfig cfg{dim3(static_cast<unsigned>(blocks)), dim3(quant::kDequantThreads), 0, stream};
  MOE_DISPATCH_FLOAT_TYPES(p.out_dtype, T,
                           launch_kernel("dequantize_kernel", quant::dequantize_kernel<T>, cfg, p));
}

}  // namespace moe
