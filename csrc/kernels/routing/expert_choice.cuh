// Expert-choice routing: each expert takes its `capacity` best tokens by softmax score.
#pragma once

#include "../common/launch.cuh"
#include "../common/memory.cuh"
#include "../common/reduce.cuh"
#include "routing.h"
#include "selection.cuh"

namespace moe {
namespace routing {

// Expert choice, pass 1: the softmax probabilities, written transposed ([E, T]) so that
// pass 2 reads each expert's column contiguously. A block takes a tile of 32 tokens:
// softmax max and 1/sum per token (one warp per token, one read of the row), then 32x32
// tiles of probabilities through shared memory, read along the tokens' rows and written
// along the experts' columns (both coalesced). The logits are read twice in all.
constexpr int kProbTile = 32;                        // tokens (and experts) per tile
constexpr int kProbWarps = 8;                        // warps per block
constexpr int kProbRowsPerWarp = kProbTile / kProbWarps;

template <typename T>
__global__ void __launch_bounds__(kProbWarps * 32) expert_choice_probs_kernel(ExpertChoiceParams p) {
  __shared__ float row_max[kProbTile];
  __shared__ float row_inv_sum[kProbTile];
  __shared__ float tile[kProbTile][kProbTile + 1];  // +1: column reads hit 32 banks
  const T* logits = static_cast<const T*>(p.logits);
  const int64_t T0 = static_cast<int64_t>(blockIdx.x) * kProbTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = warp; i < kProbTile; i += kProbWarps) {
    const int64_t t = T0 + i;
    if (t < p.num_tokens) {  // warp-uniform
      float mx, inv;
      warp_softmax_stats(logits + t * p.num_experts, p.num_experts, &mx, &inv);
      if (lane == 0) {
        row_max[i] = mx;
        row_inv_sum[i] = inv;
      }
    }
  }
  __syncthreads();
  for (int e0 = 0; e0 < p.num_experts; e0 += kProbTile) {
#pragma unroll
    for (int r = 0; r < kProbRowsPerWarp; ++r) {  // rows: tokens, lanes: experts
      const int i = warp + r * kProbWarps;
      const int64_t t = T0 + i;
      const int e = e0 + lane;
      if (t < p.num_tokens && e < p.num_experts) {
        tile[i][lane] = expf(to_float(logits[t * p.num_experts + e]) - row_max[i]) * row_inv_sum[i];
      }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kProbRowsPerWarp; ++r) {  // rows: experts, lanes: tokens
      const int j = warp + r * kProbWarps;
      const int e = e0 + j;
      const int64_t t = T0 + lane;
      if (t < p.num_tokens && e < p.num_experts) p.probs[e * p.num_tokens + t] = tile[lane][j];
    }
    __syncthreads();  // the tile is refilled next
  }
}

// Expert choice, pass 2: one block per expert takes the top-capacity tokens of its column
// in rounds of a block-wide argmax over keys (probability, lower token first). Keys are
// distinct and leave in descending order, so a thread's next candidate is its best key
// below the last winner: no taken-mask, and only the winner's thread rescans its tokens.
// The column is staged in shared memory when it fits (rescans then read shared memory),
// else rescans read it again from global memory (contiguous, coalesced).
constexpr int kChoiceBlock = 256;
constexpr int64_t kChoiceCachedTokens = 12288;  // 48 KiB of float32
__global__ void __launch_bounds__(kChoiceBlock) expert_choice_kernel(ExpertChoiceParams p) {
  __shared__ uint64_t key_scratch[kChoiceBlock / 32];
  const int expert = blockIdx.x;
  const float* column = p.probs + static_cast<int64_t>(expert) * p.num_tokens;
  const bool cached = p.num_tokens <= kChoiceCachedTokens;
  float* cache = dynamic_smem<float>();
  if (cached) {
    for (int64_t t = threadIdx.x; t < p.num_tokens; t += kChoiceBlock) cache[t] = column[t];
  }
  // Each thread reads back only the entries it wrote: no barrier needed before use.
  auto prob = [&](int64_t t) { return cached ? cache[t] : column[t]; };
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
    LaunchConfig probs{dim3(ceil_div(p.num_tokens, routing::kProbTile)),
                       dim3(routing::kProbWarps * 32), 0, stream};
    launch_kernel("expert_choice_probs_kernel", routing::expert_choice_probs_kernel<T>, probs, p);
  });
  const size_t cache = p.num_tokens <= routing::kChoiceCachedTokens ? p.num_tokens * sizeof(float) : 0;
  LaunchConfig choice{dim3(p.capacity > 0 ? p.num_experts : 0), dim3(routing::kChoiceBlock),
                      cache, stream};
  launch_kernel("expert_choice_kernel", routing::expert_choice_kernel, choice, p);
}

}  // namespace moe
