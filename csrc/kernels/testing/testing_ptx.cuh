// Probe kernels for the PTX primitives of common/mma.cuh, common/ldmatrix.cuh and
// common/cp_async.cuh: each exercises one primitive alone and writes out exactly what the
// lanes got, so tests compare it with the layouts the PTX ISA documents (computed on the
// host, independently of these sources), in the emulator and on a GPU.
#pragma once

#include "../common/cp_async.cuh"
#include "../common/launch.cuh"
#include "../common/ldmatrix.cuh"
#include "../common/memory.cuh"
#include "../common/mma.cuh"
#include "testing.h"

namespace moe {
namespace testing {

// One m16n8k16 mma per warp, on fragments given per lane: d = a * b + c, accumulated in
// place (d aliases c, as in a GEMM main loop).
__global__ void mma_probe_kernel(const uint32_t* a_frag, const uint32_t* b_frag,
                                 const float* c_frag, float* d_frag, int bf16) {
  const int t = threadIdx.x;  // (warp, lane) flattened
  MmaFragA a;
  MmaFragB b;
  MmaFragC acc;
#pragma unroll
  for (int i = 0; i < 4; ++i) a.reg[i] = a_frag[t * 4 + i];
#pragma unroll
  for (int i = 0; i < 2; ++i) b.reg[i] = b_frag[t * 2 + i];
#pragma unroll
  for (int i = 0; i < 4; ++i) acc.reg[i] = c_frag[t * 4 + i];
  if (bf16) {
    mma_m16n8k16_bf16(acc, a, b, acc);
  } else {
    mma_m16n8k16_f16(acc, a, b, acc);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) d_frag[t * 4 + i] = acc.reg[i];
}

void launch_mma_probe(const uint32_t* a_frag, const uint32_t* b_frag, const float* c_frag,
                      float* d_frag, int warps, bool bf16, cudaStream_t stream) {
  LaunchConfig cfg{dim3(1), dim3(32 * warps), 0, stream};
  launch_kernel("mma_probe_kernel", mma_probe_kernel, cfg, a_frag, b_frag, c_frag, d_frag,
                bf16 ? 1 : 0);
}

// Stages x [rows, width] (b16) in shared memory; lane l of warp w supplies the address of
// row lane_rows[w * 32 + l], column `col`; one ldmatrix per warp; out[w][l][0..num) are the
// registers lane l got.
__global__ void ldmatrix_probe_kernel(const uint16_t* x, int rows, int width,
                                      const int32_t* lane_rows, int col, int num, int trans,
                                      int32_t* out) {
  uint16_t* tile = dynamic_smem<uint16_t>();
  for (int i = threadIdx.x; i < rows * width; i += blockDim.x) tile[i] = x[i];
  __syncthreads();
  const int t = threadIdx.x;
  const uint16_t* row = tile + lane_rows[t] * width + col;
  uint32_t r1[1], r2[2], r4[4];
  switch (num * 2 + (trans ? 1 : 0)) {  // uniform across the warp, as .aligned requires
    case 2: ldmatrix_x1(r1, row); out[t] = static_cast<int32_t>(r1[0]); break;
    case 3: ldmatrix_x1_trans(r1, row); out[t] = static_cast<int32_t>(r1[0]); break;
    case 4:
      ldmatrix_x2(r2, row);
      for (int i = 0; i < 2; ++i) out[t * 2 + i] = static_cast<int32_t>(r2[i]);
      break;
    case 5:
      ldmatrix_x2_trans(r2, row);
      for (int i = 0; i < 2; ++i) out[t * 2 + i] = static_cast<int32_t>(r2[i]);
      break;
    case 8:
      ldmatrix_x4(r4, row);
      for (int i = 0; i < 4; ++i) out[t * 4 + i] = static_cast<int32_t>(r4[i]);
      break;
    case 9:
      ldmatrix_x4_trans(r4, row);
      for (int i = 0; i < 4; ++i) out[t * 4 + i] = static_cast<int32_t>(r4[i]);
      break;
    default: break;
  }
}

void launch_ldmatrix_probe(const uint16_t* x, int rows, int width, const int32_t* lane_rows,
                           int warps, int col, int num, bool trans, int32_t* out,
                           cudaStream_t stream) {
  LaunchConfig cfg{dim3(1), dim3(32 * warps), static_cast<size_t>(rows) * width * sizeof(uint16_t),
                   stream};
  launch_kernel("ldmatrix_probe_kernel", ldmatrix_probe_kernel, cfg, x, rows, width, lane_rows,
                col, num, trans ? 1 : 0, out);
}

namespace detail {
// 16 bytes from one 16-byte aligned address to another (shared <-> global).
__device__ __forceinline__ void copy16(unsigned char* dst, const unsigned char* src) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}
}  // namespace detail

// Thread t issues, for each group g < groups, one 16-byte cp.async from
// src[g][t] to its shared slot (g, t), reading src_sizes[g][t] bytes (the zero-fill form
// when below 16, and on odd threads also at 16); even groups use .ca, odd groups .cg; each
// group is committed. Before issuing, each slot of group g holds the bytes kCpAsyncOld + g.
// seen[0] (only with early_reads): every slot, read right after the commits (in flight);
// seen[1]: after cp.async.wait_group kPending, the slots of the groups that wait covers
// (g < groups - kPending), and with early_reads also the others; seen[2]: every slot after
// cp.async.wait_all. Slots are only read by the thread that issued their copy.
template <int kPending>
__global__ void cp_async_probe_kernel(const unsigned char* src, const int32_t* src_sizes,
                                      int groups, int early_reads, unsigned char* seen) {
  unsigned char* smem = dynamic_smem<unsigned char>();
  const int threads = blockDim.x, t = threadIdx.x;
  const int64_t slots = static_cast<int64_t>(groups) * threads;
  for (int g = 0; g < groups; ++g) {
    uint4 old;
    old.x = old.y = old.z = old.w = static_cast<unsigned>(kCpAsyncOld + g) * 0x01010101u;
    *reinterpret_cast<uint4*>(smem + (static_cast<int64_t>(g) * threads + t) * 16) = old;
  }
  for (int g = 0; g < groups; ++g) {
    const int64_t slot = static_cast<int64_t>(g) * threads + t;
    unsigned char* dst = smem + slot * 16;
    const unsigned char* from = src + slot * 16;
    const int size = src_sizes[slot];
    const bool full = size == 16 && t % 2 == 0;
    if (g % 2 == 0) {
      if (full) cp_async_ca_16(dst, from); else cp_async_ca_16_zfill(dst, from, size);
    } else {
      if (full) cp_async_cg_16(dst, from); else cp_async_cg_16_zfill(dst, from, size);
    }
    cp_async_commit_group();
  }
  if (early_reads) {
    for (int g = 0; g < groups; ++g) {
      const int64_t slot = static_cast<int64_t>(g) * threads + t;
      detail::copy16(seen + slot * 16, smem + slot * 16);
    }
  }
  cp_async_wait_group<kPending>();
  for (int g = 0; g < groups; ++g) {
    if (g >= groups - kPending && !early_reads) continue;  // possibly still in flight
    const int64_t slot = static_cast<int64_t>(g) * threads + t;
    detail::copy16(seen + (slots + slot) * 16, smem + slot * 16);
  }
  cp_async_wait_all();
  for (int g = 0; g < groups; ++g) {
    const int64_t slot = static_cast<int64_t>(g) * threads + t;
    detail::copy16(seen + (2 * slots + slot) * 16, smem + slot * 16);
  }
}

void launch_cp_async_probe(const unsigned char* src, const int32_t* src_sizes, int groups,
                           int threads, int pending, bool early_reads, unsigned char* seen,
                           cudaStream_t stream) {
  LaunchConfig cfg{dim3(1), dim3(threads), static_cast<size_t>(groups) * threads * 16, stream};
  if (pending == 0) {
    launch_kernel("cp_async_probe_kernel<0>", cp_async_probe_kernel<0>, cfg, src, src_sizes,
                  groups, early_reads ? 1 : 0, seen);
  } else if (pending == 1) {
    launch_kernel("cp_async_probe_kernel<1>", cp_async_probe_kernel<1>, cfg, src, src_sizes,
                  groups, early_reads ? 1 : 0, seen);
  } else {
    throw std::invalid_argument("launch_cp_async_probe: pending must be 0 or 1");
  }
}

// Misuses of the primitives that the emulator must reject (see testing.h).
__global__ void ptx_broken_kernel(int mode, float* out) {
  unsigned char* smem = dynamic_smem<unsigned char>();
  const int t = threadIdx.x, lane = t % 32;
  for (int i = t; i < 1024 / 4; i += blockDim.x) reinterpret_cast<float*>(smem)[i] = 0.f;
  __syncthreads();
  if (mode == 0 || mode == 1) {  // mma in a partial warp / with lanes that returned
    if (mode == 1 && lane >= 16) return;
    MmaFragA a{};
    MmaFragB b{};
    MmaFragC c{};
    mma_m16n8k16_bf16(c, a, b, c);
    out[t] = c.reg[0];
  } else if (mode == 2) {  // lane 9 supplies a row address 8 bytes off alignment
    uint32_t r[4];
    ldmatrix_x4(r, smem + 16 * lane + (lane == 9 ? 8 : 0));
    out[t] = static_cast<float>(r[0]);
  } else if (mode == 3) {  // lane 3 supplies a global-memory address
    uint32_t r[1];
    const void* row = lane == 3 ? static_cast<const void*>(out) : smem + 16 * lane;
    ldmatrix_x1(r, row);
    out[t] = static_cast<float>(r[0]);
  } else if (mode == 4) {  // shared destination 8 bytes off alignment
    cp_async_cg_16(smem + 16 * t + 8, out);
    cp_async_wait_all();
  } else if (mode == 5) {  // global source 4 bytes off alignment
    cp_async_ca_16(smem + 16 * t, reinterpret_cast<const unsigned char*>(out) + 4);
    cp_async_wait_all();
  } else if (mode == 6) {  // a committed group nobody waits for
    cp_async_cg_16(smem + 16 * t, out + 4 * (t % 16));
    cp_async_commit_group();
  } else if (mode == 7) {  // wait_group 0 does not cover copies that were never committed
    cp_async_cg_16_zfill(smem + 16 * t, out + 4 * (t % 16), 8);
    cp_async_wait_group<0>();
  }
}

void launch_ptx_broken(int mode, float* out, cudaStream_t stream) {
  LaunchConfig cfg{dim3(1), dim3(mode == 0 ? 48 : 32), 1024, stream};
  launch_kernel("ptx_broken_kernel", ptx_broken_kernel, cfg, mode, out);
}

}  // namespace testing
}  // namespace moe
