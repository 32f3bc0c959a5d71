// Fused top-k gating: score, (bias,) group-limit, select, normalize, scale in one pass over
// the logits.
//
// A token is handled by a group of TPT threads (a power of two: lanes of one warp, or
// whole warps of a block). Each thread holds NCHUNK 16-byte chunks of the token's row in
// registers; chunk c of the row belongs to thread c % TPT, so every load instruction of a
// group reads consecutive 16-byte chunks (coalesced). Padding slots past E never win.
//
// Selection values: without a bias, the logits themselves (every scoring is monotonic, and comparing logits is exact where the scores could round to equal values);
// with a bias, score + bias (the score is the softmax probability or the sigmoid). The
// block reads the bias from global memory once into shared memory (it is the same for
// every token: per token group it would be read again for every token).
//
// Group-limited routing (num_groups > 1) stages score + bias of the block's tokens in
// shared memory (no global workspace): one thread per group reduces it to the group
// score (the sum of its group_topn largest values), then topk_groups rounds of a group-wide argmax keep the best groups eligible.
//
// Top-k selection is k rounds of a group-wide argmax over 64-bit keys (selection.cuh) so
// that one max() picks the larger value and, on a tie, the lower expert index. Only the
// thread that owned the winner rescans its slots, so a round costs one reduction. The
// winning slot remembers its rank; at the end each owner puts its winners at their ranks
// in shared memory, and the block stores its tokens' weights and ids in order (coalesced).
//
// Shared memory (GatingSmem): [bias: E] [group values: tokens x (E + groups)] [weights:
// tokens x k] [ids: tokens x k], the first two only when used.
#pragma once

#include "../common/launch.cuh"
#include "../common/memory.cuh"
#include "../common/reduce.cuh"
#include "routing.h"
#include "selection.cuh"

namespace moe {
namespace routing {

// 256 threads (or one group of TPT, past 256): 8 tokens of a warp-wide group per block.
// Every block reads the [E] float bias once (see the staging below), which for a
// bf16 row is twice the bytes of the token's logits: 4 tokens per block made the bias
// half as many bytes again as the logits, 8 make it a quarter.
template <int TPT>
__host__ __device__ constexpr int block_threads() {
  return TPT > 256 ? TPT : 256;
}

__host__ __device__ inline int round_up4(int n) { return (n + 3) / 4 * 4; }

// Floats of shared memory per token for group-limited routing: the token's score + bias
// per expert, then one score per group; rounded up to 4 so every token's values start
// 16-byte aligned (they are stored 16 bytes at a time).
__host__ __device__ inline int group_smem_floats(int num_experts, int num_groups) {
  return round_up4(num_experts + num_groups);
}

// Dynamic shared memory, in 4-byte words, every part 16-byte aligned: the bias (if any),
// the group-limited values of the block's tokens (if num_groups > 1), then the block's
// outputs (weights, then ids: tokens * k each) staged for one coalesced store.
struct GatingSmem {
  int bias, groups, weights, ids, total;
  __host__ __device__ GatingSmem(const TopkGatingParams& p, int tokens) {
    bias = 0;
    groups = p.bias != nullptr ? round_up4(p.num_experts) : 0;
    weights = groups + (p.num_groups > 1 ? tokens * group_smem_floats(p.num_experts, p.num_groups) : 0);
    ids = weights + tokens * p.k;
    total = ids + tokens * p.k;
  }
};

// The launch bound asks for two blocks of 256 threads per multiprocessor: at most 128
// registers, 16 warps (25% occupancy on sm_80/sm_90, 33% on sm_120). Without a
// minimum, ptxas picked a register count of its own (80 or 96) and spilled to reach it.
template <typename T, int TPT, int NCHUNK>
__global__ void __launch_bounds__(block_threads<TPT>(), 512 / block_threads<TPT>())
    topk_gating_kernel(TopkGatingParams p, bool vector_loads) {
  constexpr int CHUNK = Vec16<T>::size;
  constexpr int VPT = CHUNK * NCHUNK;
  constexpr int BLOCK = block_threads<TPT>();
  constexpr int WARPS = BLOCK / 32;
  static_assert(VPT <= 32, "the slot bit masks hold 32 slots");
  __shared__ uint64_t key_scratch[WARPS];
  __shared__ float sum_scratch[WARPS];

  constexpr int TOKENS = BLOCK / TPT;
  const int E = p.num_experts;
  const bool softmax = p.scoring == Scoring::softmax;
  const int g = threadIdx.x % TPT;
  const int local_token = threadIdx.x / TPT;
  const int64_t first_token = static_cast<int64_t>(blockIdx.x) * TOKENS;
  const int64_t token = first_token + local_token;
  const GatingSmem layout(p, TOKENS);
  float* smem = dynamic_smem<float>();
  // Threads past the last token still take part in the group collectives.
  const bool valid = token < p.num_tokens;
  const T* row = static_cast<const T*>(p.logits) + (valid ? token : 0) * static_cast<int64_t>(E);

  auto slot_expert = [&](int s) { return ((s / CHUNK) * TPT + g) * CHUNK + s % CHUNK; };

  // The row stays in registers in its own type (half types: two per register); x(s) is
  // slot s as float32. Padding slots hold -inf.
  union Chunk {
    uint4 raw;
    T elems[CHUNK];
  };
  Chunk chunk[NCHUNK];
#pragma unroll
  for (int j = 0; j < NCHUNK; ++j) {
    const int base = (j * TPT + g) * CHUNK;
    if (valid && vector_loads && base + CHUNK <= E) {
      chunk[j].raw = load_vec16(row + base);
    } else {
#pragma unroll
      for (int i = 0; i < CHUNK; ++i) {
        chunk[j].elems[i] = (valid && base + i < E) ? row[base + i] : from_float<T>(-INFINITY);
      }
    }
  }
  auto x = [&](int s) { return to_float(chunk[s / CHUNK].elems[s % CHUNK]); };
  // Slots that can never be chosen: padding past E, then experts of dropped groups.
  uint32_t excluded = 0;
#pragma unroll
  for (int s = 0; s < VPT; ++s) excluded |= (slot_expert(s) >= E ? 1u : 0u) << s;

  // Softmax statistics over the whole row; for sigmoid only whether the row has a NaN.
  // Either way a NaN anywhere in the row makes every weight of the token NaN.
  float row_max = 0.f, inv_sum = 1.f;
  bool poisoned;
  if (softmax) {
    row_max = -INFINITY;
#pragma unroll
    for (int s = 0; s < VPT; ++s) row_max = fmaxf(row_max, x(s));
    row_max = group_allreduce<TPT>(row_max, MaxOp{}, sum_scratch);
    float exp_sum = 0.f;
#pragma unroll
    for (int s = 0; s < VPT; ++s) {
      if (!((excluded >> s) & 1u)) exp_sum += expf(x(s) - row_max);
    }
    exp_sum = group_allreduce<TPT>(exp_sum, SumOp{}, sum_scratch);
    poisoned = exp_sum != exp_sum;
    inv_sum = 1.f / exp_sum;
  } else {
    float nan_seen = 0.f;
#pragma unroll
    for (int s = 0; s < VPT; ++s) nan_seen = x(s) != x(s) ? 1.f : nan_seen;
    poisoned = group_allreduce<TPT>(nan_seen, MaxOp{}, sum_scratch) > 0.f;
  }
  // expf differs between targets: the GPU's is within 2 ulp of exp (CUDA programming guide,
  // single-precision functions), the emulator's is the host library's (correctly rounded in
  // glibc). Everything else rounds the same on both (no FMA contraction; see setup.py), so
  // the two can pick different experts only where scores are a few ulp apart; equal inputs
  // still tie, and ties go to the lower index everywhere.
  const bool sigmoid = p.scoring == Scoring::sigmoid;
  auto score = [&](float v) {
    return softmax ? expf(v - row_max) * inv_sum : sigmoid ? sigmoidf(v) : sqrtsoftplusf(v);
  };
  // log(score) up to a constant of the token (softmax: the logit): renormalized weights
  // are a softmax of these over the chosen experts.
  auto log_score = [&](float v) {
    return softmax ? v : sigmoid ? log_sigmoidf(v) : 0.5f * log_softplusf(v);
  };

  // Selection values (see the header comment).
  float sel[VPT];
#pragma unroll
  for (int s = 0; s < VPT; ++s) sel[s] = x(s);
  if (p.bias != nullptr) {  // uniform over the block: the barrier is safe here
    // The block reads the bias from global memory once, 16 bytes per thread in order
    // (whole sectors), into shared memory; every token group then reads its chunks there.
    // Read straight from global memory, each group re-read all E floats, and the two
    // 16-byte halves of a thread's 32-byte chunk (half types) were two instructions each
    // using half of every sector: 2 KB moved per token for a 1 KB bias (4.5x the minimum
    // on DeepSeek-V3, whose bf16 logits are 512 bytes a token).
    float* bias = smem + layout.bias;
    if (reinterpret_cast<uintptr_t>(p.bias) % 16 == 0 && E % 4 == 0) {
      for (int q = threadIdx.x; q < E / 4; q += BLOCK) store_vec16(bias + 4 * q, load_vec16(p.bias + 4 * q));
    } else {
      for (int e = threadIdx.x; e < E; e += BLOCK) bias[e] = p.bias[e];
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < NCHUNK; ++j) {
      const int base = (j * TPT + g) * CHUNK;
      float b[CHUNK];
      if (E % 4 == 0 && base + CHUNK <= E) {
        // 16-byte reads; for 8-float chunks the two halves in the order of the group
        // stores below (threads 32 bytes apart: g and g + 4 would share banks).
        if constexpr (CHUNK == 8) {
          const bool flip = (g >> 2) & 1;
          float read1[4], read2[4];  // selects, not an index into b (local memory)
          load_vec16_as_float(bias + base + (flip ? 4 : 0), read1);
          load_vec16_as_float(bias + base + (flip ? 0 : 4), read2);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            b[i] = flip ? read2[i] : read1[i];
            b[4 + i] = flip ? read1[i] : read2[i];
          }
        } else {
#pragma unroll
          for (int q = 0; q < CHUNK; q += 4) load_vec16_as_float(bias + base + q, &b[q]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) b[i] = base + i < E ? bias[base + i] : 0.f;
      }
#pragma unroll
      for (int i = 0; i < CHUNK; ++i) {
        const int s = j * CHUNK + i;
        if (base + i < E) sel[s] = score(x(s)) + b[i];
      }
    }
  }

  if (p.num_groups > 1) {  // uniform over the block: barriers are safe here
    const int group_size = E / p.num_groups;
    float* token_values = smem + layout.groups + local_token * group_smem_floats(E, p.num_groups);
    float* group_scores = token_values + E;
    // Each thread stores its chunks' values 16 bytes at a time: a phase of 8 threads then
    // covers all 32 banks (one float per thread per store would hit banks g * CHUNK: 8-way
    // conflicts for the 8-float chunks of half types). Threads of 8-float chunks are 32
    // bytes apart, so g and g + 4 would still share banks: they store their two halves in
    // opposite orders.
#pragma unroll
    for (int j = 0; j < NCHUNK; ++j) {
      const int base = (j * TPT + g) * CHUNK;
      float v[CHUNK];
#pragma unroll
      for (int i = 0; i < CHUNK; ++i) {
        const int s = j * CHUNK + i;
        v[i] = p.bias != nullptr ? sel[s] : score(x(s));
      }
      if (base + CHUNK <= E) {
        uint4 part[CHUNK / 4];
#pragma unroll
        for (int h = 0; h < CHUNK / 4; ++h) {
          part[h] = make_uint4(__float_as_uint(v[4 * h]), __float_as_uint(v[4 * h + 1]),
                               __float_as_uint(v[4 * h + 2]), __float_as_uint(v[4 * h + 3]));
        }
        if constexpr (CHUNK == 8) {
          const bool flip = (g >> 2) & 1;
          store_vec16(token_values + base + (flip ? 4 : 0), flip ? part[1] : part[0]);
          store_vec16(token_values + base + (flip ? 0 : 4), flip ? part[0] : part[1]);
        } else {
          store_vec16(token_values + base, part[0]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < CHUNK; ++i) {
          if (base + i < E) token_values[base + i] = v[i];
        }
      }
    }
    __syncthreads();
    for (int n = g; n < p.num_groups; n += TPT) {
      const float* v = token_values + n * group_size;
      // The sum of the group_topn largest values, largest first (NaN counts as -inf):
      // round r finds the largest key below round r-1's (keys are distinct, so equal
      // values are each counted). Threads scan their groups from staggered starts:
      // group_size is often a multiple of 32, and same-offset reads would all hit one
      // shared-memory bank; the largest key does not depend on the order.
      float sum = 0.f;
      uint64_t below = ~0ull;
      for (int r = 0; r < p.group_topn; ++r) {
        uint64_t best = 0;
        int i = n % group_size;
        for (int count = 0; count < group_size; ++count, i = i + 1 == group_size ? 0 : i + 1) {
          const uint64_t key = selection_key(v[i], i);
          if (key < below && key > best) best = key;
        }
        below = best;
        sum += key_value(best);  // from the key (NaN -> -inf): no second, scattered read
      }
      group_scores[n] = sum;
    }
    __syncthreads();
    // Keys are distinct and chosen in descending order, so after round r every later
    // winner is below `bound`: no taken-mask needed. The last bound is the cut-off.
    uint64_t bound = ~0ull;
    for (int r = 0; r < p.topk_groups; ++r) {
      uint64_t mine = 0;
      for (int n = g; n < p.num_groups; n += TPT) {
        const uint64_t key = selection_key(group_scores[n], n);
        if (key < bound && key > mine) mine = key;
      }
      bound = group_allreduce<TPT>(mine, MaxOp{}, key_scratch);
    }
#pragma unroll
    for (int s = 0; s < VPT; ++s) {
      const int e = slot_expert(s);
      if (e < E) {
        const int n = e / group_size;
        if (selection_key(group_scores[n], n) < bound) excluded |= 1u << s;
      }
    }
  }

  // Top-k rounds (k <= eligible experts, checked by the launcher's callers).
  // slot_bits[s] holds the ordered bits of sel[s] (converted once, not every round) until
  // slot s is chosen, then its rank: a chosen slot is blocked from every later round, so
  // its value is never read again, and one register per slot holds both (a separate rank
  // array kept VPT more registers live across the rounds).
  uint32_t slot_bits[VPT];
#pragma unroll
  for (int s = 0; s < VPT; ++s) slot_bits[s] = ordered_bits(sel[s]);
  // A thread's slots run in increasing expert order, so a strict 32-bit compare of the
  // ordered bits finds its best value at the lowest index; only that one becomes a key.
  auto local_best = [&](uint32_t blocked) {
    uint32_t best_bits = 0;  // below every real value (ordered_bits(-inf) > 0)
    int best_expert = 0;
#pragma unroll
    for (int s = 0; s < VPT; ++s) {
      const uint32_t bits = slot_bits[s];
      if (!((blocked >> s) & 1u) && bits > best_bits) {
        best_bits = bits;
        best_expert = slot_expert(s);
      }
    }
    return best_bits == 0 ? uint64_t{0} : selection_key_from_bits(best_bits, best_expert);
  };
  uint32_t chosen = 0;
  uint64_t mine = local_best(excluded);
  for (int r = 0; r < p.k; ++r) {
    const uint64_t best = group_allreduce<TPT>(mine, MaxOp{}, key_scratch);
    if (best == mine) {  // this thread owns the winner
      const int winner = static_cast<int>(key_index(best));
#pragma unroll
      for (int s = 0; s < VPT; ++s) {
        if (slot_expert(s) == winner) {
          chosen |= 1u << s;
          slot_bits[s] = static_cast<uint32_t>(r);  // from here on: the rank
        }
      }
      mine = local_best(excluded | chosen);
    }
  }

  // Weights: the unbiased scores of the winners, optionally renormalized over them, then
  // scaled. Renormalized: s_j / sum_i s_i = exp(l_j - m) / sum_i exp(l_i - m) with l the
  // log scores and m their largest over the winners: finite where every chosen score
  // underflows to 0 (sigmoid of logits below -88), where s_j / sum_i s_i would be 0 / 0.
  float shift = 0.f, divisor = 1.f;
  if (p.renormalize) {
    float chosen_max = -INFINITY;
#pragma unroll
    for (int s = 0; s < VPT; ++s) {
      if ((chosen >> s) & 1u) chosen_max = fmaxf(chosen_max, log_score(x(s)));
    }
    shift = group_allreduce<TPT>(chosen_max, MaxOp{}, sum_scratch);
    float chosen_sum = 0.f;
#pragma unroll
    for (int s = 0; s < VPT; ++s) {
      if ((chosen >> s) & 1u) chosen_sum += expf(log_score(x(s)) - shift);
    }
    divisor = group_allreduce<TPT>(chosen_sum, SumOp{}, sum_scratch);
  }
  // Each owner puts its winners at their ranks in shared memory, then the block stores
  // its tokens' [tokens, k] outputs in order. Stored from the owners' registers, each
  // unrolled slot was one instruction writing a scattered few ranks: up to VPT sectors
  // per token and output for the k * 4 bytes of one.
  float* staged_weights = smem + layout.weights + local_token * p.k;
  int32_t* staged_ids = reinterpret_cast<int32_t*>(smem + layout.ids) + local_token * p.k;
  // Tokens past the end stage nothing (nothing reads their rows). Staging them too made
  // ptxas fail register allocation for half types at TPT = 4 on sm_80/sm_90.
  if (valid) {
#pragma unroll
    for (int s = 0; s < VPT; ++s) {
      if ((chosen >> s) & 1u) {
        const float w = p.renormalize ? expf(log_score(x(s)) - shift) / divisor : score(x(s));
        const int rank = static_cast<int>(slot_bits[s]);
        staged_weights[rank] = poisoned ? NAN : w * p.scaling_factor;
        staged_ids[rank] = slot_expert(s);
      }
    }
  }
  __syncthreads();
  const int64_t tokens_here = p.num_tokens - first_token < TOKENS ? p.num_tokens - first_token : TOKENS;
  const int count = static_cast<int>(tokens_here) * p.k;
  float* weights = p.weights + first_token * p.k;
  int32_t* ids = p.ids + first_token * p.k;
  const float* block_weights = smem + layout.weights;
  const int32_t* block_ids = reinterpret_cast<const int32_t*>(smem + layout.ids);
  for (int i = threadIdx.x; i < count; i += BLOCK) {
    weights[i] = block_weights[i];
    ids[i] = block_ids[i];
  }
}

template <typename T, int TPT, int NCHUNK>
void launch_config(const TopkGatingParams& p, cudaStream_t stream) {
  constexpr int BLOCK = block_threads<TPT>();
  const bool vector_loads = reinterpret_cast<uintptr_t>(p.logits) % 16 == 0 &&
                            (p.num_experts * sizeof(T)) % 16 == 0;
  const size_t smem = sizeof(float) * GatingSmem(p, BLOCK / TPT).total;
  LaunchConfig cfg{dim3(ceil_div(p.num_tokens, BLOCK / TPT)), dim3(BLOCK), smem, stream};
  launch_kernel("topk_gating_kernel", topk_gating_kernel<T, TPT, NCHUNK>, cfg, p, vector_loads);
}

// Picks the smallest group that covers the row: one chunk per thread for rows of at most
// 32 chunks (several tokens per warp when small), else 16 slots per thread (four float
// chunks or two half-type chunks). More slots per thread would hold more of the row,
// selection values and ranks in registers: 32 slots took 139-171 registers (12.5-19%
// occupancy), 16 stay near 100 (>= 25% at 256 threads).
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
  constexpr int NCHUNK = 16 / CHUNK;
  const int threads = (chunks + NCHUNK - 1) / NCHUNK;
  if constexpr (NCHUNK >= 3) {  // half types have at least 17 threads here
    if (threads <= 16) return launch_config<T, 16, NCHUNK>(p, stream);
  }
  if (threads <= 32) return launch_config<T, 32, NCHUNK>(p, stream);
  if (threads <= 64) return launch_config<T, 64, NCHUNK>(p, stream);
  if (threads <= 128) return launch_config<T, 128, NCHUNK>(p, stream);
  if (threads <= 256) return launch_config<T, 256, NCHUNK>(p, stream);
  throw std::invalid_argument("topk_gating: num_experts above the supported maximum");
}

}  // namespace routing

void launch_topk_gating(const TopkGatingParams& p, cudaStream_t stream) {
  if (p.num_experts < 1 || p.num_experts > kMaxExperts) {
    throw std::invalid_argument("topk_gating: num_experts must be in [1, 4096]");
  }
  if (p.num_groups < 1 || p.num_experts % p.num_groups != 0 || p.topk_groups < 1 ||
      p.topk_groups > p.num_groups || p.group_topn < 1 ||
      p.group_topn > p.num_experts / p.num_groups) {
    throw std::invalid_argument("topk_gating: bad num_groups / topk_groups / group_topn");
  }
  const int eligible = p.topk_groups * (p.num_experts / p.num_groups);
  if (p.k < 1 || p.k > eligible) throw std::invalid_argument("topk_gating: k must be in [1, eligible experts]");
  MOE_DISPATCH_FLOAT_TYPES(p.dtype, T, routing::launch_typed<T>(p, stream));
}

}  // namespace moe
