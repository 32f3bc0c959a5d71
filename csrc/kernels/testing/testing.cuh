#pragma once

#include "../common/launch.cuh"
#include "../common/memory.cuh"
#include "../common/reduce.cuh"
#include "testing.h"

namespace moe {
namespace testing {

__global__ void block_sum_kernel(const float* in, float* out, int64_t n) {
  float* partial = dynamic_smem<float>();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  partial[threadIdx.x] = i < n ? in[i] : 0.f;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

void launch_block_sum(const float* in, float* out, int64_t n, int block, cudaStream_t stream) {
  LaunchConfig cfg{dim3(ceil_div(n, block)), dim3(block), block * sizeof(float), stream};
  launch_kernel("block_sum_kernel", block_sum_kernel, cfg, in, out, n);
}

template <int PAD>
__global__ void transpose_kernel(const float* in, float* out, int rows, int cols) {
  // PAD = 1: a padded column, no bank conflicts on the transposed read; PAD = 0: 32-way
  // conflicts (the traffic counters' test case).
  __shared__ float tile[32][32 + PAD];
  const int c = blockIdx.x * 32 + threadIdx.x;
  for (int dy = threadIdx.y; dy < 32; dy += blockDim.y) {
    const int r = blockIdx.y * 32 + dy;
    if (r < rows && c < cols) tile[dy][threadIdx.x] = in[static_cast<int64_t>(r) * cols + c];
  }
  __syncthreads();
  const int out_c = blockIdx.y * 32 + threadIdx.x;  // a row of `in`
  for (int dy = threadIdx.y; dy < 32; dy += blockDim.y) {
    const int out_r = blockIdx.x * 32 + dy;  // a column of `in`
    if (out_r < cols && out_c < rows) out[static_cast<int64_t>(out_r) * rows + out_c] = tile[threadIdx.x][dy];
  }
}

void launch_transpose(const float* in, float* out, int rows, int cols, bool padded, cudaStream_t stream) {
  LaunchConfig cfg{dim3(ceil_div(cols, 32), ceil_div(rows, 32)), dim3(32, 8), 0, stream};
  if (padded) {
    launch_kernel("transpose_kernel", transpose_kernel<1>, cfg, in, out, rows, cols);
  } else {
    launch_kernel("transpose_kernel_unpadded", transpose_kernel<0>, cfg, in, out, rows, cols);
  }
}

__global__ void warp_scan_kernel(const int32_t* in, int32_t* scan, int32_t* votes, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  int32_t x = i < n ? in[i] : 0;
  const unsigned ballot = __ballot_sync(kFullMask, x > 0);
  const int any = __any_sync(kFullMask, x > 0);
  const int all = __all_sync(kFullMask, x > 0);
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int32_t up = __shfl_up_sync(kFullMask, x, offset);
    if (lane >= offset) x += up;
  }
  __syncwarp();
  if (i < n) scan[i] = x;
  if (lane == 0) {
    const int64_t warp = i / 32;
    votes[warp * 3 + 0] = static_cast<int32_t>(ballot);
    votes[warp * 3 + 1] = any;
    votes[warp * 3 + 2] = all;
  }
}

void launch_warp_scan(const int32_t* in, int32_t* scan, int32_t* votes, int64_t n,
                      cudaStream_t stream) {
  LaunchConfig cfg{dim3(ceil_div(n, 128)), dim3(128), 0, stream};
  launch_kernel("warp_scan_kernel", warp_scan_kernel, cfg, in, scan, votes, n);
}

__global__ void histogram_kernel(const int32_t* in, int32_t* counts, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) atomicAdd(&counts[in[i]], 1);
}

void launch_histogram(const int32_t* in, int32_t* counts, int64_t n, cudaStream_t stream) {
  LaunchConfig cfg{dim3(ceil_div(n, 256)), dim3(256), 0, stream};
  launch_kernel("histogram_kernel", histogram_kernel, cfg, in, counts, n);
}

__global__ void block_reverse_kernel(const float* in, float* out, int64_t n) {
  float* buffer = dynamic_smem<float>();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x;
  const int64_t remaining = n - base;
  const int count = remaining < blockDim.x ? static_cast<int>(remaining) : static_cast<int>(blockDim.x);
  if (static_cast<int>(threadIdx.x) < count) buffer[threadIdx.x] = in[base + threadIdx.x];
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < count) out[base + threadIdx.x] = buffer[count - 1 - threadIdx.x];
}

void launch_block_reverse(const float* in, float* out, int64_t n, int block, cudaStream_t stream) {
  LaunchConfig cfg{dim3(ceil_div(n, block)), dim3(block), block * sizeof(float), stream};
  launch_kernel("block_reverse_kernel", block_reverse_kernel, cfg, in, out, n);
}

__global__ void broken_kernel(int mode, float* out) {
  if (mode == 0) {
    if (threadIdx.x < 16) __syncthreads();
  } else if (mode == 1) {
    if (threadIdx.x >= 32) return;
    __syncthreads();
  } else if (mode == 2) {
    if (threadIdx.x < 32) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (mode == 3) {
    if (threadIdx.x % 2) return;
    out[threadIdx.x] = __shfl_xor_sync(kFullMask, 1.f, 2);
  } else if (mode == 4) {
    out[threadIdx.x + 1] = 1.f;  // thread 63 writes one past the end
    return;
  } else if (mode == 5) {
    float* buffer = dynamic_smem<float>();
    buffer[threadIdx.x] = static_cast<float>(threadIdx.x);
    // Missing __syncthreads: the neighbour may not have written yet.
    out[threadIdx.x] = buffer[(threadIdx.x + 1) % 64];
    return;
  } else if (mode == 6) {
    // Lane 1 reads what lane 0 wrote, "ordered" only by a shuffle: no memory ordering. The
    // emulator runs it correctly in every resume order (the shuffle is a rendezvous).
    float* buffer = dynamic_smem<float>();
    if (threadIdx.x == 0) buffer[0] = 42.f;
    const float token = __shfl_sync(kFullMask, static_cast<float>(threadIdx.x), 0);
    out[threadIdx.x] = threadIdx.x == 1 ? buffer[0] : token;
    return;
  } else if (mode == 7) {
    // Two blocks: block 1 reads what block 0 wrote (blocks run in no defined order).
    if (threadIdx.x == 0) {
      if (blockIdx.x == 0) out[0] = 1.f;
      else out[1] = out[0];
    }
    return;
  } else if (mode == 8) {
    // A 16-byte load from an address 4 bytes past a 16-byte boundary (global memory).
    const uint4 v = load_vec16(out + 1);
    out[threadIdx.x] = static_cast<float>(v.x);
    return;
  } else if (mode == 9) {
    // The same in shared memory.
    float* buffer = dynamic_smem<float>();
    const uint4 v = load_vec16(buffer + 2);
    out[threadIdx.x] = static_cast<float>(v.x);
    return;
  }
  out[threadIdx.x] = 1.f;
}

void launch_broken(int mode, float* out, cudaStream_t stream) {
  LaunchConfig cfg{dim3(mode == 7 ? 2 : 1), dim3(64), 64 * sizeof(float), stream};
  launch_kernel("broken_kernel", broken_kernel, cfg, mode, out);
}

__global__ void shared_memory_kernel(float* out, int dynamic_floats) {
  __shared__ float fixed[256];  // 1 KiB of static shared memory
  float* dynamic = dynamic_smem<float>();
  for (int i = threadIdx.x; i < 256; i += blockDim.x) fixed[i] = static_cast<float>(i);
  for (int i = threadIdx.x; i < dynamic_floats; i += blockDim.x) dynamic[i] = static_cast<float>(i);
  __syncthreads();
  if (threadIdx.x == 0) out[0] = fixed[255] + (dynamic_floats > 0 ? dynamic[dynamic_floats - 1] : 0.f);
}

void launch_shared_memory(float* out, int64_t dynamic_bytes, bool opt_in,
                          const std::array<unsigned, 3>& grid, const std::array<unsigned, 3>& block,
                          cudaStream_t stream) {
  LaunchConfig cfg{dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]),
                   static_cast<size_t>(dynamic_bytes), stream};
  cfg.opt_in_shared = opt_in;
  launch_kernel("shared_memory_kernel", shared_memory_kernel, cfg, out,
                static_cast<int>(dynamic_bytes / sizeof(float)));
}

}  // namespace testing
}  // namespace moe

// The PTX primitive probes (mma, ldmatrix, cp.async).
#include "testing_ptx.cuh"
