// Backward of topk_gating: d(weights)/d(logits) with the selection fixed.
#pragma once

#include "../common/launch.cuh"
#include "../common/memory.cuh"
#include "../common/reduce.cuh"
#include "routing.h"
#include "selection.cuh"

namespace moe {
namespace routing {

constexpr int kWarpsPerBlock = 4;

// One warp per token. Forward: s_j = score of the j-th chosen expert (softmax probability
// or sigmoid), S = sum_j s_j, w_j = c * s_j / S (renormalize) or c * s_j. Backward:
//   dL/ds_j = c * g_j                                 (no renormalize)
//   dL/ds_j = (c / S) * (g_j - sum_i g_i * s_i / S)   (renormalize)
//   sigmoid: dL/dx_e = dL/ds_e * s_e * (1 - s_e) at the chosen e, 0 elsewhere;
//   softmax: dL/dx_e = p_e * (dL/dp_e - sum_j dL/ds_j * s_j) for every e (dL/dp_e = 0
//            off the chosen experts), so the gradient is dense.
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    topk_gating_backward_kernel(TopkGatingBackwardParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (token >= p.num_tokens) return;  // whole warps leave together: no collective is split
  const int E = p.num_experts;
  const bool softmax = p.scoring == Scoring::softmax;
  const T* row = static_cast<const T*>(p.logits) + token * E;
  T* grad_row = static_cast<T*>(p.grad_logits) + token * E;
  const int32_t* ids = p.ids + token * p.k;
  const float* grad_w = p.grad_weights + token * p.k;

  float row_max = 0.f, inv_sum = 1.f;
  if (softmax) warp_softmax_stats(row, E, &row_max, &inv_sum);
  auto score = [&](float v) { return softmax ? expf(v - row_max) * inv_sum : sigmoidf(v); };
  auto chosen_id = [&](int j) {  // an id outside [0, E) is skipped (never read or written)
    const int e = ids[j];
    return e >= 0 && e < E ? e : -1;
  };

  // Sums over the chosen experts: S = sum s_j and G = sum g_j * s_j.
  float s_sum = 0.f, gs_sum = 0.f;
  for (int j = lane; j < p.k; j += 32) {
    const int e = chosen_id(j);
    if (e < 0) continue;
    const float s = score(to_float(row[e]));
    s_sum += s;
    gs_sum += grad_w[j] * s;
  }
  s_sum = warp_allreduce<32>(s_sum, SumOp{});
  gs_sum = warp_allreduce<32>(gs_sum, SumOp{});
  const float c = p.scaling_factor;
  // dL/ds_j = a * g_j + b, the same a and b for every j.
  const float a = p.renormalize ? c / s_sum : c;
  const float b = p.renormalize ? -c * gs_sum / (s_sum * s_sum) : 0.f;
  // For softmax: dot = sum_j dL/ds_j * s_j = a * G + b * S, which is exactly 0 when
  // renormalizing (the weights are then a softmax over the chosen logits alone): use the
  // exact value rather than a cancellation that leaves rounding noise off the selection.
  const float dot = p.renormalize ? 0.f : a * gs_sum;

  // The off-chosen gradient everywhere, then the chosen experts overwrite theirs.
  for (int e = lane; e < E; e += 32) {
    const float g = softmax ? -score(to_float(row[e])) * dot : 0.f;
    grad_row[e] = from_float<T>(g);
  }
  __syncwarp();  // orders this warp's stores before the overwrites below
  for (int j = lane; j < p.k; j += 32) {
    const int e = chosen_id(j);
    if (e < 0) continue;
    // An expert listed in several slots (never by topk_gating, possible in ids a caller
    // passes) gets the sum of their gradients, stored once, by its first slot: two lanes
    // never store to one element.
    float ds = 0.f;
    bool first = true;
    for (int i = 0; i < p.k && first; ++i) {
      if (ids[i] != e) continue;
      if (i < j) first = false;
      else ds += a * grad_w[i] + b;
    }
    if (!first) continue;
    const float s = score(to_float(row[e]));
    const float g = softmax ? s * (ds - dot) : ds * s * (1.f - s);
    grad_row[e] = from_float<T>(g);
  }
}

}  // namespace routing

void launch_topk_gating_backward(const TopkGatingBackwardParams& p, cudaStream_t stream) {
  LaunchConfig cfg{dim3(ceil_div(p.num_tokens, routing::kWarpsPerBlock)),
                   dim3(routing::kWarpsPerBlock * 32), 0, stream};
  MOE_DISPATCH_FLOAT_TYPES(p.dtype, T,
                           launch_kernel("topk_gating_backward_kernel",
                                         routing::topk_gating_backward_kernel<T>, cfg, p));
}

}  // namespace moe
