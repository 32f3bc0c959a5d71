// router_stats: assignments per expert (a block histogram in shared memory).
#pragma once

#include "../common/launch.cuh"
#include "../common/memory.cuh"
#include "../common/reduce.cuh"
#include "routing.h"
#include "selection.cuh"

namespace moe {
namespace routing {

constexpr int kStatsBlock = 256;
constexpr int kStatsSharedExperts = 12288;  // 48 KiB of int32 counters

// The id of entry i, widened to int64 so that an int64 id outside [0, num_experts) is
// never truncated into range. The branch is uniform across the grid.
__device__ __forceinline__ int64_t load_expert_id(const RouterStatsParams& p, int64_t i) {
  return p.ids_are_64bit ? static_cast<const int64_t*>(p.ids)[i]
                         : static_cast<const int32_t*>(p.ids)[i];
}

// Per-block histogram in shared memory, then one integer atomicAdd per expert and block.
// Integer addition is associative, so the counts are the same whatever the order. The
// counters are addressed through the shared-memory symbol itself (not a pointer that may
// be shared or global), so the atomics compile to shared-memory atomics (ATOMS), not
// generic ones.
__global__ void __launch_bounds__(kStatsBlock) router_stats_shared_kernel(RouterStatsParams p) {
  int32_t* counts = dynamic_smem<int32_t>();
  for (int e = threadIdx.x; e < p.num_experts; e += kStatsBlock) counts[e] = 0;
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kStatsBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kStatsBlock + threadIdx.x; i < p.n; i += stride) {
    const int64_t e = load_expert_id(p, i);
    if (e >= 0 && e < p.num_experts) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  if (gridDim.x == 1) {
    // The only block holds the final counts: it stores all of them, in order (whole
    // sectors, plain stores over the caller's zeros). Atomics of the nonzero counts alone
    // touched one scattered sector per few counts where ids are sparse (E = 4096, 512 ids:
    // about 400 sectors of 512 for some 1.9 KB of nonzero counts).
    for (int e = threadIdx.x; e < p.num_experts; e += kStatsBlock) p.counts[e] = counts[e];
  } else {
    for (int e = threadIdx.x; e < p.num_experts; e += kStatsBlock) {
      if (counts[e] != 0) atomicAdd(&p.counts[e], counts[e]);
    }
  }
}

// Expert counts too large for shared memory count straight into global memory.
__global__ void __launch_bounds__(kStatsBlock) router_stats_global_kernel(RouterStatsParams p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kStatsBlock;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kStatsBlock + threadIdx.x; i < p.n; i += stride) {
    const int64_t e = load_expert_id(p, i);
    if (e >= 0 && e < p.num_experts) atomicAdd(&p.counts[e], 1);
  }
}

}  // namespace routing

void launch_router_stats(const RouterStatsParams& p, cudaStream_t stream) {
  // Enough blocks to fill a GPU, few enough that the per-block flush stays small: every
  // block flushes up to E counts, so a block counts at least 4 * E ids (the flush at most a
  // quarter of the id bytes) and at least 4 per thread. One block per 256 ids made two
  // blocks flush the same experts for 512 ids (64 tokens, k = 8).
  const long long ids_per_block = std::max<long long>(4LL * routing::kStatsBlock, 4LL * p.num_experts);
  const long long blocks = std::min<long long>(ceil_div(p.n, ids_per_block), 1024);
  if (p.num_experts <= routing::kStatsSharedExperts) {
    LaunchConfig cfg{dim3(static_cast<unsigned>(blocks)), dim3(routing::kStatsBlock),
                     p.num_experts * sizeof(int32_t), stream};
    launch_kernel("router_stats_shared_kernel", routing::router_stats_shared_kernel, cfg, p);
  } else {
    LaunchConfig cfg{dim3(static_cast<unsigned>(blocks)), dim3(routing::kStatsBlock), 0, stream};
    launch_kernel("router_stats_global_kernel", routing::router_stats_global_kernel, cfg, p);
  }
}

}  // namespace moe
