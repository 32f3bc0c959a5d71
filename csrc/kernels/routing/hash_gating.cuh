// Hash routing: a fixed map from token id to k distinct experts.
#pragma once

#include "../common/launch.cuh"
#include "../common/memory.cuh"
#include "../common/reduce.cuh"
#include "routing.h"
#include "selection.cuh"

namespace moe {
namespace routing {

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

void launch_hash_gating(const HashGatingParams& p, cudaStream_t stream) {
  LaunchConfig cfg{dim3(ceil_div(p.num_tokens * p.k, 256)), dim3(256), 0, stream};
  launch_kernel("hash_gating_kernel", routing::hash_gating_kernel, cfg, p);
}

}  // namespace moe
