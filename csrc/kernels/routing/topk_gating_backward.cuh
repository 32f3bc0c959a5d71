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
// Softmax without renormalize reads the row twice (statistics, then the dense gradient);
// rows of at most this many bytes keep the first read in shared memory for the second:
// 32 KiB a block of 4 warps at E = 4096 bf16, still 3 blocks (12 warps, 25%) on 100 KiB
// sm_86/sm_89/sm_120 multiprocessors. Longer rows (fp32 above 2048) read twice.
constexpr int kStagedRowBytes = 8192;


// One warp per token. Forward: s_j = score of the j-th chosen expert, w_j = c * s_j
// (no renormalize) or c * r_j with r_j = s_j / sum_i s_i (renormalize). Backward:
//   no renormalize: dL/ds_j = c * g_j, and
//     sigmoid / sqrtsoftplus: dL/dx_e = dL/ds_e * s'(x_e) at the chosen e, 0 elsewhere;
//     softmax: dL/dx_e = p_e * (dL/dp_e - sum_j dL/ds_j * s_j) for every e (dL/dp_e = 0
//              off the chosen experts), so the gradient is dense;
//   renormalize: r is a softmax of the log scores l_j = log s_j over the chosen experts
//     (softmax: l = x up to a constant, so the gradient is 0 off the selection), so
//     dL/dx_e = c * r_e * (g_e - sum_j g_j r_j) * l'(x_e). r comes from the log scores as
//     in the forward, and nothing divides by sum_i s_i: finite where every s_j underflows.
//     l' = 1 (softmax), 1 - sigmoid(x) (sigmoid), sigmoid(x) / (2 softplus(x))
//     (sqrtsoftplus).
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    topk_gating_backward_kernel(TopkGatingBackwardParams p, bool stage_row) {
  const int lane = threadIdx.x % 32;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (token >= p.num_tokens) return;  // whole warps leave together: no collective is split
  const int E = p.num_experts;
  const bool softmax = p.scoring == Scoring::softmax;
  const bool sigmoid = p.scoring == Scoring::sigmoid;
  const T* row = static_cast<const T*>(p.logits) + token * E;
  T* grad_row = static_cast<T*>(p.grad_logits) + token * E;
  const int32_t* ids = p.ids + token * p.k;
  const float* grad_w = p.grad_weights + token * p.k;
  const float c = p.scaling_factor;

  // Slot j (its expert id, -1 outside [0, E) (never read or written), its weight's
  // gradient and its logit) is loaded by lane j % 32 alone; lanes share slots by shuffles.
  // Lanes hold slots 0..31 throughout; slots past 32 are reloaded where needed.
  struct Slot {
    int e = -1;
    float gw = 0.f, x = 0.f;
  };
  auto load_slot = [&](int j) {
    Slot s;
    if (j < p.k) {
      const int e = ids[j];
      if (e >= 0 && e < E) {
        s.e = e;
        s.gw = grad_w[j];
        s.x = to_float(row[e]);
      }
    }
    return s;
  };
  const Slot first_slot = load_slot(lane);
  auto slot = [&](int j) { return j == lane ? first_slot : load_slot(j); };

  // Per-token constants of the chosen entries' gradient (see the comment above).
  float m = -INFINITY, sum = 1.f, G = 0.f;  // renormalize
  float row_max = 0.f, inv_sum = 1.f, dot = 0.f;  // softmax without renormalize
  T* staged = nullptr;                            // softmax without renormalize
  auto log_score = [&](float v) {
    return softmax ? v : sigmoid ? log_sigmoidf(v) : 0.5f * log_softplusf(v);
  };
  auto score = [&](float v) { return expf(v - row_max) * inv_sum; };  // softmax only
  if (p.renormalize) {
    // r_j = exp(l_j - m) / sum_i exp(l_i - m) (m: the largest chosen l) and G = sum g_j r_j.
    for (int j = lane; j < p.k; j += 32) {
      const Slot s = slot(j);
      if (s.e >= 0) m = fmaxf(m, log_score(s.x));
    }
    m = warp_allreduce<32>(m, MaxOp{});
    float u_sum = 0.f, g_sum = 0.f;
    for (int j = lane; j < p.k; j += 32) {
      const Slot s = slot(j);
      if (s.e < 0) continue;
      const float u = expf(log_score(s.x) - m);
      u_sum += u;
      g_sum += s.gw * u;
    }
    sum = warp_allreduce<32>(u_sum, SumOp{});
    G = warp_allreduce<32>(g_sum, SumOp{}) / sum;
  } else if (softmax) {
    // The staged row is private to each lane (lane e % 32 writes element e and alone reads
    // it back below): no barrier. Read twice from global memory, the row was a third of
    // the bytes moved again (1.51x the minimum at E = 4096).
    staged = stage_row ? dynamic_smem<T>() + (threadIdx.x / 32) * E : nullptr;
    warp_softmax_stats(row, E, &row_max, &inv_sum, staged);
    // dot = sum_j dL/ds_j * s_j = c * sum_j g_j s_j.
    for (int j = lane; j < p.k; j += 32) {
      const Slot s = slot(j);
      if (s.e >= 0) dot += s.gw * score(s.x);
    }
    dot = c * warp_allreduce<32>(dot, SumOp{});
  }

  // The gradient row, written once: each lane finds whether its element is chosen by
  // scanning the slots (shuffled from their lanes; the loops are uniform over the warp).
  // An expert listed in several slots (never by topk_gating, possible in ids a caller
  // passes) gets the sum over its slots, in slot order.
  for (int base = 0; base < E; base += 32) {
    const int e = base + lane;
    bool chosen = false;
    float dg = 0.f, x = 0.f;
    for (int b = 0; b < p.k; b += 32) {
      const Slot s = b == 0 ? first_slot : load_slot(b + lane);
      const int n = p.k - b < 32 ? p.k - b : 32;
      int src = -1;
      for (int i = 0; i < n; ++i) {
        const int id = __shfl_sync(kFullMask, s.e, i);
        const float gw = __shfl_sync(kFullMask, s.gw, i);
        if (id != e) continue;
        if (!chosen && src < 0) src = i;
        dg += p.renormalize ? gw - G : c * gw;
      }
      const float src_x = __shfl_sync(kFullMask, s.x, src < 0 ? 0 : src);
      if (src >= 0) {
        x = src_x;
        chosen = true;
      }
    }
    if (e >= E) continue;
    float g = 0.f;
    if (p.renormalize) {
      if (chosen) {
        const float r = expf(log_score(x) - m) / sum;
        const float dl = softmax ? 1.f
                         : sigmoid ? sigmoidf(-x)
                                   : (x < -15.f ? 0.5f : 0.5f * sigmoidf(x) / softplusf(x));
        g = c * r * dg * dl;
      }
    } else if (softmax) {
      const float sc = score(to_float(staged != nullptr ? staged[e] : row[e]));
      g = chosen ? sc * (dg - dot) : -sc * dot;
    } else if (chosen) {
      if (sigmoid) {
        const float sg = sigmoidf(x);
        g = dg * sg * (1.f - sg);
      } else {
        g = dg * sqrtsoftplus_gradf(x);
      }
    }
    grad_row[e] = from_float<T>(g);
  }
}

}  // namespace routing

namespace routing {
template <typename T>
void launch_backward_typed(const TopkGatingBackwardParams& p, cudaStream_t stream) {
  const size_t row_bytes = sizeof(T) * static_cast<size_t>(p.num_experts);
  const bool stage_row = p.scoring == Scoring::softmax && !p.renormalize && row_bytes <= kStagedRowBytes;
  LaunchConfig cfg{dim3(ceil_div(p.num_tokens, kWarpsPerBlock)), dim3(kWarpsPerBlock * 32),
                   stage_row ? kWarpsPerBlock * row_bytes : 0, stream};
  launch_kernel("topk_gating_backward_kernel", topk_gating_backward_kernel<T>, cfg, p, stage_row);
}
}  // namespace routing

void launch_topk_gating_backward(const TopkGatingBackwardParams& p, cudaStream_t stream) {
  MOE_DISPATCH_FLOAT_TYPES(p.dtype, T, routing::launch_backward_typed<T>(p, stream));
}

}  // namespace moe
