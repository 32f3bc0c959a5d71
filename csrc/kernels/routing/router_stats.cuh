// router_stats: assignments per expert (a block histogram in shared memory).
#pragma once

#include "../common/launch.cuh"
#include "../common/memory.cuh"
#include "../common/reduce.cuh"
#include "routing.h"
#include "selection.cuh"

namespace moe {
namespace routing {

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

}  // namespace routing

void launch_router_stats(const RouterStatsParams& p, cudaStream_t stream) {
  // Enough blocks to fill a GPU, few enough that the per-block flush stays small.
  const long long blocks = std::min<long long>(ceil_div(p.n, routing::kStatsBlock), 1024);
  const size_t smem = p.num_experts <= routing::kStatsSharedExperts ? p.num_experts * sizeof(int32_t) : 0;
  LaunchConfig cfg{dim3(static_cast<unsigned>(blocks)), dim3(routing::kStatsBlock), smem, stream};
  launch_kernel("router_stats_kernel", routing::router_stats_kernel, cfg, p);
}

}  // namespace moe
