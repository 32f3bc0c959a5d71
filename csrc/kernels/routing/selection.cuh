// Selection keys shared by the routing kernels: one 64-bit max() picks the larger score
// and, on a tie, the lower index.
#pragma once

#include "../common/platform.cuh"
#include "../common/reduce.cuh"

namespace moe {

// Maps a float to an unsigned int whose unsigned order is the float order. NaN ranks as
// -inf (documented: a NaN score is never chosen ahead of a number); -0 equals +0.
__device__ __forceinline__ uint32_t ordered_bits(float x) {
  if (x != x) x = -INFINITY;
  if (x == 0.f) x = 0.f;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// key = ordered_bits(score) << 32 | ~index: larger score first, then lower index. Every
// real key is > 0 (ordered_bits(-inf) > 0), so 0 means "nothing".
__device__ __forceinline__ uint64_t selection_key_from_bits(uint32_t bits, uint32_t index) {
  return (static_cast<uint64_t>(bits) << 32) | (0xffffffffu - index);
}
__device__ __forceinline__ uint64_t selection_key(float score, uint32_t index) {
  return selection_key_from_bits(ordered_bits(score), index);
}

__device__ __forceinline__ uint32_t key_index(uint64_t key) {
  return 0xffffffffu - static_cast<uint32_t>(key);
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

namespace routing {

// Softmax statistics of a row of E logits, computed by one warp: its max and
// 1 / sum(exp(x - max)). Every lane gets the same bits.
template <typename T>
__device__ __forceinline__ void warp_softmax_stats(const T* row, int E, float* row_max,
                                                   float* inv_sum) {
  const int lane = threadIdx.x % 32;
  float m = -INFINITY;
  for (int e = lane; e < E; e += 32) m = fmaxf(m, to_float(row[e]));
  m = warp_allreduce<32>(m, MaxOp{});
  float sum = 0.f;
  for (int e = lane; e < E; e += 32) sum += expf(to_float(row[e]) - m);
  *row_max = m;
  *inv_sum = 1.f / warp_allreduce<32>(sum, SumOp{});
}

}  // namespace routing

}  // namespace moe
