// Reductions across the threads that share one work item (a "group" of G threads:
// a power of two up to 32 inside one warp, or whole warps of one block).
#pragma once

#include "platform.cuh"

namespace moe {

constexpr unsigned kFullMask = 0xffffffffu;

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// Butterfly all-reduce over aligned groups of G lanes (G a power of two, <= 32). Every lane
// of the group ends with the same bits: each step combines the same two operands.
template <int G, typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T value, Op op) {
  static_assert(G >= 1 && G <= 32 && (G & (G - 1)) == 0, "group must be a power of two <= 32");
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) {
    value = op(value, __shfl_xor_sync(kFullMask, value, offset, G));
  }
  return value;
}

// All-reduce over a group of G threads, G a power of two; groups of more than 32 threads
// are whole warps of the block and meet in `scratch` (one slot per warp of the block).
// Every thread of the block must call it (it holds __syncthreads when G > 32).
template <int G, typename T, typename Op>
__device__ __forceinline__ T group_allreduce(T value, Op op, T* scratch) {
  if constexpr (G <= 32) {
    (void)scratch;
    return warp_allreduce<G>(value, op);
  } else {
    constexpr int kWarps = G / 32;
    value = warp_allreduce<32>(value, op);
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) scratch[warp] = value;
    __syncthreads();
    const int first = warp / kWarps * kWarps;
    T result = scratch[first];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) result = op(result, scratch[first + w]);
    __syncthreads();  // scratch is reused by the next reduction
    return result;
  }
}

// Exclusive prefix sum over the BLOCK threads of a block (every thread must call it);
// `total` receives the sum over the block. `warp_totals` holds BLOCK / 32 entries.
template <int BLOCK>
__device__ __forceinline__ int64_t block_exclusive_scan(int64_t value, int64_t* warp_totals,
                                                        int64_t* total) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  int64_t inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int64_t up = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  int64_t before = 0;
  int64_t all = 0;
#pragma unroll
  for (int w = 0; w < BLOCK / 32; ++w) {
    const int64_t t = warp_totals[w];
    before += w < warp ? t : 0;
    all += t;
  }
  __syncthreads();  // warp_totals is reused by the next scan
  *total = all;
  return before + inclusive - value;
}

}  // namespace moe
