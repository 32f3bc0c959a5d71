// Fused top-k gating: score, select and normalize in one pass over the logits.
//
// A token is handled by a group of TPT threads (a power of two: lanes of one warp, or
// whole warps of a block). Each thread holds NCHUNK 16-byte chunks of the token's row in
// registers; chunk c of the row belongs to thread c % TPT, so every load instruction of a
// group reads consecutive 16-byte chunks (coalesced). Padding slots past E never win.
//
// Selection is k rounds of a group-wide argmax over 64-bit keys
//   key = order_preserving_bits(score) << 32 | ~expert
// so that one max() picks the larger score and, on a tie, the lower expert index. Only
// the thread that owned the winner rescans its slots, so a round costs one reduction.
// The winning slot remembers its rank; at the end each owner writes its own winners.
#pragma once

#include "common/launch.cuh"
#include "common/memory.cuh"
#include "common/reduce.cuh"
#include "gating.h"

namespace moe {
namespace gating {

// Maps a float to an unsigned int whose unsigned order is the float order. NaN ranks as
// -inf (documented: a NaN logit is never chosen ahead of a number); -0 equals +0.
__device__ __forceinline__ uint32_t ordered_bits(float x) {
  if (x != x) x = -INFINITY;
  if (x == 0.f) x = 0.f;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint64_t selection_key(float score, int expert) {
  return (static_cast<uint64_t>(ordered_bits(score)) << 32) | (0xffffffffu - static_cast<uint32_t>(expert));
}

__device__ __forceinline__ int key_expert(uint64_t key) {
  return static_cast<int>(0xffffffffu - static_cast<uint32_t>(key));
}

template <int TPT>
__host__ __device__ constexpr int block_threads() {
  return TPT > 128 ? TPT : 128;
}

template <typename T, int TPT, int NCHUNK>
__global__ void __launch_bounds__(block_threads<TPT>())
    topk_gating_kernel(TopkGatingParams p, bool vector_loads) {
  constexpr int CHUNK = Vec16<T>::size;
  constexpr int VPT = CHUNK * NCHUNK;
  constexpr int BLOCK = block_threads<TPT>();
  constexpr int WARPS = BLOCK / 32;
  static_assert(VPT <= 32, "the slot bit mask holds 32 slots");
  __shared__ uint64_t key_scratch[WARPS];
  __shared__ float sum_scratch[WARPS];

  const int E = p.num_experts;
  const int g = threadIdx.x % TPT;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * (BLOCK / TPT) + threadIdx.x / TPT;
  // Threads past the last token still take part in the group collectives.
  const bool valid = token < p.num_tokens;
  const T* row = static_cast<const T*>(p.logits) + (valid ? token : 0) * static_cast<int64_t>(E);

  auto slot_expert = [&](int s) { return ((s / CHUNK) * TPT + g) * CHUNK + s % CHUNK; };

  float x[VPT];
#pragma unroll
  for (int j = 0; j < NCHUNK; ++j) {
    const int base = (j * TPT + g) * CHUNK;
    if (valid && vector_loads && base + CHUNK <= E) {
      load_vec16_as_float(row + base, &x[j * CHUNK]);
    } else {
#pragma unroll
      for (int i = 0; i < CHUNK; ++i) {
        x[j * CHUNK + i] = (valid && base + i < E) ? to_float(row[base + i]) : -INFINITY;
      }
    }
  }

  // Softmax statistics over the whole row.
  float row_max = -INFINITY;
#pragma unroll
  for (int s = 0; s < VPT; ++s) row_max = fmaxf(row_max, x[s]);
  row_max = group_allreduce<TPT>(row_max, MaxOp{}, sum_scratch);
  float exp_sum = 0.f;
#pragma unroll
  for (int s = 0; s < VPT; ++s) {
    if (slot_expert(s) < E) exp_sum += expf(x[s] - row_max);
  }
  exp_sum = group_allreduce<TPT>(exp_sum, SumOp{}, sum_scratch);

  // Top-k rounds. Selection uses the logits (softmax is monotonic in them).
  auto local_best = [&](uint32_t taken) {
    uint64_t best = 0;  // below every real key
#pragma unroll
    for (int s = 0; s < VPT; ++s) {
      const int e = slot_expert(s);
      if (e < E && !((taken >> s) & 1u)) {
        const uint64_t key = selection_key(x[s], e);
        best = key > best ? key : best;
      }
    }
    return best;
  };
  uint32_t taken = 0;
  int rank[VPT];
#pragma unroll
  for (int s = 0; s < VPT; ++s) rank[s] = -1;
  uint64_t mine = local_best(taken);
  for (int r = 0; r < p.k; ++r) {
    const uint64_t best = group_allreduce<TPT>(mine, MaxOp{}, key_scratch);
    if (best == mine) {  // this thread owns the winner
      const int winner = key_expert(best);
#pragma unroll
      for (int s = 0; s < VPT; ++s) {
        if (slot_expert(s) == winner) {
          taken |= 1u << s;
          rank[s] = r;
        }
      }
      mine = local_best(taken);
    }
  }

  // Weights: softmax probabilities of the winners, optionally renormalized over them.
  float scale = 1.f / exp_sum;
  if (p.renormalize) {
    float chosen_sum = 0.f;
#pragma unroll
    for (int s = 0; s < VPT; ++s) {
      if ((taken >> s) & 1u) chosen_sum += expf(x[s] - row_max);
    }
    chosen_sum = group_allreduce<TPT>(chosen_sum, SumOp{}, sum_scratch);
    // A NaN anywhere in the row (exp_sum NaN) makes every weight NaN, renormalized or not.
    scale = exp_sum == exp_sum ? 1.f / chosen_sum : exp_sum;
  }
  if (!valid) return;
  float* weights = p.weights + token * p.k;
  int32_t* ids = p.ids + token * p.k;
#pragma unroll
  for (int s = 0; s < VPT; ++s) {
    if ((taken >> s) & 1u) {
      weights[rank[s]] = expf(x[s] - row_max) * scale;
      ids[rank[s]] = slot_expert(s);
    }
  }
}

template <typename T, int TPT, int NCHUNK>
void launch_config(const TopkGatingParams& p, cudaStream_t stream) {
  constexpr int BLOCK = block_threads<TPT>();
  const bool vector_loads = reinterpret_cast<uintptr_t>(p.logits) % 16 == 0 &&
                            (p.num_experts * sizeof(T)) % 16 == 0;
  LaunchConfig cfg{dim3(ceil_div(p.num_tokens, BLOCK / TPT)), dim3(BLOCK), 0, stream};
  launch_kernel("topk_gating_kernel", topk_gating_kernel<T, TPT, NCHUNK>, cfg, p, vector_loads);
}

// Picks the smallest group that covers the row: one chunk per thread for rows of at most
// 32 chunks (several tokens per warp when small), else four chunks per thread.
template <typename T>
void launch_typed(const TopkGatingParams& p, cudaStream_t stream) {
  constexpr int CHUNK = Vec16<T>::size;
  const int chunks = (p.num_experts + CHUNK - 1) / CHUNK;
  if (chunks <= 32) {
    if (chunks <= 1) return launch_config<T, 1, 1>(p, stream);
    if (chunks <= 2) return launch_config<T, 2, 1>(p, stream);
    if (chunks <= 4) return launch_config<T, 4, 1>(p, stream);
    if (chunks <= 8) return launch_config<T, 8, 1>(p, stream);
    if (chunks <= 16) return launch_config<T, 16, 1>(p, stream);
    return launch_config<T, 32, 1>(p, stream);
  }
  const int threads = (chunks + 3) / 4;
  if (threads <= 16) return launch_config<T, 16, 4>(p, stream);
  if (threads <= 32) return launch_config<T, 32, 4>(p, stream);
  if (threads <= 64) return launch_config<T, 64, 4>(p, stream);
  if (threads <= 128) return launch_config<T, 128, 4>(p, stream);
  if (threads <= 256) return launch_config<T, 256, 4>(p, stream);
  throw std::invalid_argument("topk_gating: num_experts above the supported maximum");
}

}  // namespace gating

void launch_topk_gating(const TopkGatingParams& p, cudaStream_t stream) {
  if (p.num_experts < 1 || p.num_experts > kMaxGatingExperts) {
    throw std::invalid_argument("topk_gating: num_experts must be in [1, 4096]");
  }
  if (p.k < 1 || p.k > p.num_experts) throw std::invalid_argument("topk_gating: k must be in [1, num_experts]");
  MOE_DISPATCH_FLOAT_TYPES(p.dtype, T, gating::launch_typed<T>(p, stream));
}

}  // namespace moe
