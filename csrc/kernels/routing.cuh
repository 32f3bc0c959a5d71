// Router training and alternative routing schemes:
//   - topk_gating_backward_kernel: d(weights)/d(logits) of topk_gating, selection fixed;
//   - router_stats_kernel: tokens per expert (a block histogram in shared memory);
//   - expert_choice: each expert takes its `capacity` best tokens by softmax score;
//   - hash_gating_kernel: a fixed map from token id to k distinct experts.
#pragma once

#include "common/launch.cuh"
#include "common/memory.cuh"
#include "common/reduce.cuh"
#include "gating.h"
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

// Per-block histogram in shared memory, then one integer atomicAdd per expert and block.
// Integer addition is associative, so the counts are the same whatever the order. Expert
// counts too large for shared memory count straight into global memory.
constexpr int kStatsBlock = 256;
constexpr int kStatsSharedExperts = 12288;  // 48 KiB of int32 counters
__global__ void __launch_bounds__(kStatsBlock) router_stats_kernel(RouterStatsParams p) {
  const bool shared = p.num_experts <= kStatsSharedExperts;
  int32_t* counts = shared ? dynamic_smem<int32_t>() : p.counts;
  if (shared) {
    for (int e = threadIdx.x; e < p.num_experts; e += kStatsBlock) counts[e] = 0;
  }
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kStatsBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kStatsBlock + threadIdx.x; i < p.n; i += stride) {
    const int32_t e = p.ids[i];
    if (e >= 0 && e < p.num_experts) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  if (shared) {
    for (int e = threadIdx.x; e < p.num_experts; e += kStatsBlock) {
      if (counts[e] != 0) atomicAdd(&p.counts[e], counts[e]);
    }
  }
}

// Expert choice, pass 1: softmax max and 1/sum of each token's row (one warp per token).
template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) softmax_row_stats_kernel(ExpertChoiceParams p) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (token >= p.num_tokens) return;
  const T* row = static_cast<const T*>(p.logits) + token * p.num_experts;
  float row_max, inv_sum;
  warp_softmax_stats(row, p.num_experts, &row_max, &inv_sum);
  if (threadIdx.x % 32 == 0) {
    p.row_stats[2 * token] = row_max;
    p.row_stats[2 * token + 1] = inv_sum;
  }
}

// Expert choice, pass 2: one block per expert takes the top-capacity tokens of its column
// in rounds of a block-wide argmax over keys (probability, lower token first). Keys are
// distinct and leave in descending order, so a thread's next candidate is its best key
// below the last winner: no taken-mask, and only the winner's thread rescans its tokens.
// The column's probabilities are staged in shared memory when they fit (rescans then
// read shared memory), else recomputed from the logits.
constexpr int kChoiceBlock = 256;
constexpr int64_t kChoiceCachedTokens = 12288;  // 48 KiB of float32
template <typename T>
__global__ void __launch_bounds__(kChoiceBlock) expert_choice_kernel(ExpertChoiceParams p) {
  __shared__ uint64_t key_scratch[kChoiceBlock / 32];
  const int expert = blockIdx.x;
  const T* logits = static_cast<const T*>(p.logits);
  auto compute_prob = [&](int64_t t) {
    return expf(to_float(logits[t * p.num_experts + expert]) - p.row_stats[2 * t]) *
           p.row_stats[2 * t + 1];
  };
  const bool cached = p.num_tokens <= kChoiceCachedTokens;
  float* cache = dynamic_smem<float>();
  if (cached) {
    for (int64_t t = threadIdx.x; t < p.num_tokens; t += kChoiceBlock) cache[t] = compute_prob(t);
  }
  // Each thread reads back only the entries it wrote: no barrier needed before use.
  auto prob = [&](int64_t t) { return cached ? cache[t] : compute_prob(t); };
  auto local_best = [&](uint64_t bound) {
    uint64_t best = 0;
    for (int64_t t = threadIdx.x; t < p.num_tokens; t += kChoiceBlock) {
      const uint64_t key = selection_key(prob(t), static_cast<uint32_t>(t));
      if (key < bound && key > best) best = key;
    }
    return best;
  };
  int32_t* out_idx = p.token_idx + static_cast<int64_t>(expert) * p.capacity;
  float* out_w = p.weights + static_cast<int64_t>(expert) * p.capacity;
  const int64_t rounds = p.capacity < p.num_tokens ? p.capacity : p.num_tokens;
  uint64_t mine = local_best(~0ull);
  for (int64_t r = 0; r < rounds; ++r) {
    const uint64_t best = group_allreduce<kChoiceBlock>(mine, MaxOp{}, key_scratch);
    if (best == mine) {  // this thread owns the winner (keys are distinct)
      const int64_t t = key_index(best);
      out_idx[r] = static_cast<int32_t>(t);
      out_w[r] = prob(t);
      mine = local_best(best);
    }
  }
  for (int64_t r = rounds + threadIdx.x; r < p.capacity; r += kChoiceBlock) {
    out_idx[r] = -1;
    out_w[r] = 0.f;
  }
}

// Token t, slot j -> expert multiplier * ((t mod E) * k + j mod E) mod E. For k <= E the k
// slots of a token are k consecutive residues (distinct) and the multiplier is coprime to E
// (a permutation), so every run of E consecutive token ids gives each expert exactly k
// tokens.
__global__ void hash_gating_kernel(HashGatingParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.num_tokens * p.k) return;
  const int64_t t = i / p.k;
  const int j = static_cast<int>(i % p.k);
  const int64_t E = p.num_experts;
  const int64_t id = p.ids_are_64bit ? static_cast<const int64_t*>(p.token_ids)[t]
                                     : static_cast<const int32_t*>(p.token_ids)[t];
  int64_t r = id % E;
  if (r < 0) r += E;  // floor modulo for negative ids
  const int64_t slot = (r * p.k + j) % E;
  p.ids[i] = static_cast<int32_t>(slot * p.multiplier % E);
  p.weights[i] = 1.f / static_cast<float>(p.k);
}

}  // namespace routing

void launch_topk_gating_backward(const TopkGatingBackwardParams& p, cudaStream_t stream) {
  LaunchConfig cfg{dim3(ceil_div(p.num_tokens, routing::kWarpsPerBlock)),
                   dim3(routing::kWarpsPerBlock * 32), 0, stream};
  MOE_DISPATCH_FLOAT_TYPES(p.dtype, T,
                           launch_kernel("topk_gating_backward_kernel",
                                         routing::topk_gating_backward_kernel<T>, cfg, p));
}

void launch_router_stats(const RouterStatsParams& p, cudaStream_t stream) {
  // Enough blocks to fill a GPU, few enough that the per-block flush stays small.
  const long long blocks = std::min<long long>(ceil_div(p.n, routing::kStatsBlock), 1024);
  const size_t smem = p.num_experts <= routing::kStatsSharedExperts ? p.num_experts * sizeof(int32_t) : 0;
  LaunchConfig cfg{dim3(static_cast<unsigned>(blocks)), dim3(routing::kStatsBlock), smem, stream};
  launch_kernel("router_stats_kernel", routing::router_stats_kernel, cfg, p);
}

void launch_expert_choice_gating(const ExpertChoiceParams& p, cudaStream_t stream) {
  MOE_DISPATCH_FLOAT_TYPES(p.dtype, T, {
    LaunchConfig stats{dim3(ceil_div(p.num_tokens, routing::kWarpsPerBlock)),
                       dim3(routing::kWarpsPerBlock * 32), 0, stream};
    launch_kernel("softmax_row_stats_kernel", routing::softmax_row_stats_kernel<T>, stats, p);
    const size_t cache = p.num_tokens <= routing::kChoiceCachedTokens ? p.num_tokens * sizeof(float) : 0;
    LaunchConfig choice{dim3(p.capacity > 0 ? p.num_experts : 0), dim3(routing::kChoiceBlock),
                        cache, stream};
    launch_kernel("expert_choice_kernel", routing::expert_choice_kernel<T>, choice, p);
  });
}

void launch_hash_gating(const HashGatingParams& p, cudaStream_t stream) {
  LaunchConfig cfg{dim3(ceil_div(p.num_tokens * p.k, 256)), dim3(256), 0, stream};
  launch_kernel("hash_gating_kernel", routing::hash_gating_kernel, cfg, p);
}

}  // namespace moe
