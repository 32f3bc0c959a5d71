// Expert-choice routing: each expert takes its `capacity` best tokens by softmax score.
#pragma once

#include "../common/launch.cuh"
#include "../common/memory.cuh"
#include "../common/reduce.cuh"
#include "routing.h"
#include "selection.cuh"

namespace moe {
namespace routing {

constexpr int kChoiceWarpsPerBlock = 4;  // softmax_row_stats_kernel: one warp per token

// Expert choice, pass 1: softmax max and 1/sum of each token's row (one warp per token).
template <typename T>
__global__ void __launch_bounds__(kChoiceWarpsPerBlock * 32) softmax_row_stats_kernel(ExpertChoiceParams p) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kChoiceWarpsPerBlock + threadIdx.x / 32;
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

}  // namespace routing

void launch_expert_choice_gating(const ExpertChoiceParams& p, cudaStream_t stream) {
  MOE_DISPATCH_FLOAT_TYPES(p.dtype, T, {
    LaunchConfig stats{dim3(ceil_div(p.num_tokens, routing::kChoiceWarpsPerBlock)),
                       dim3(routing::kChoiceWarpsPerBlock * 32), 0, stream};
    launch_kernel("softmax_row_stats_kernel", routing::softmax_row_stats_kernel<T>, stats, p);
    const size_t cache = p.num_tokens <= routing::kChoiceCachedTokens ? p.num_tokens * sizeof(float) : 0;
    LaunchConfig choice{dim3(p.capacity > 0 ? p.num_experts : 0), dim3(routing::kChoiceBlock),
                        cache, stream};
    launch_kernel("expert_choice_kernel", routing::expert_choice_kernel<T>, choice, p);
  });
}

}  // namespace moe
