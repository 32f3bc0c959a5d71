// The tensor-core tile machinery shared by the grouped GEMM kernels: tile traits, the
// multi-stage cp.async pipeline, fragment loads (ldmatrix) and the warp's mma loop.
//
// A block computes a BM x BN tile of C = A . B (A: BM x K, B: K x BN) as WM x WN warps,
// each a WTM x WTN warp tile of MI x NI mma.m16n8k16 tiles with fp32 accumulators. The
// reduction runs in BK-deep steps; each step's A and B tiles are copied to shared memory
// by cp.async, STAGES steps ahead of the math.
//
// Shared-memory tiles are row-major with 8 elements (16 bytes) of padding per row. Each
// operand is stored in one of two orientations:
//   "outer-major" (A as [BM][BK], B as [BN][BK]): the reduction index is contiguous, the
//       layout of x and of [E, N, K] weights; ldmatrix without .trans gives the fragments;
//   "reduction-major" (A as [BK][BM], B as [BK][BN]): the outer index is contiguous, the
//       layout of [E, K, N] weights and of both operands of the weight gradient;
//       ldmatrix.trans gives the fragments.
// With the padding every row stride is an odd number of 16-byte units when the unpadded
// row is a multiple of 32 bytes (all tiles here), so the 8 rows one ldmatrix phase reads
// fall in 8 distinct groups of 4 banks: no bank conflicts.
#pragma once

#include "../common/cp_async.cuh"
#include "../common/ldmatrix.cuh"
#include "../common/memory.cuh"
#include "../common/mma.cuh"
#include "../quant/codes.cuh"

namespace moe {
namespace gemm {

// MIN_BLOCKS_: blocks per multiprocessor the register allocation must allow
// (__launch_bounds__). 128x128 keeps 1: its 64 accumulators per thread need ~170 registers,
// and capping it at 128 (2 blocks) spills; an 8-warp block with 3 stages in flight is how
// such tiles run anyway. The 4-warp tiles ask for 3 or 4 blocks (12 to 16 warps).
template <int BM_, int BN_, int BK_, int WM_, int WN_, int STAGES_, int MIN_BLOCKS_>
struct TileTraits {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, STAGES = STAGES_;
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int WARPS = WM * WN;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int WTM = BM / WM;  // warp tile
  static constexpr int WTN = BN / WN;
  static constexpr int MI = WTM / 16;  // mma tiles per warp
  static constexpr int NI = WTN / 8;
  static constexpr int PAD = 8;
  static constexpr int CHUNK = 8;      // b16 elements per 16-byte copy
  static_assert(BM % WM == 0 && BN % WN == 0 && WTM % 16 == 0 && WTN % 16 == 0,
                "warp tiles are whole m16 x (2 x n8) blocks: B fragments load two n8 tiles at once");
  static_assert(BK % 16 == 0, "the reduction steps are k16");
  static_assert(BM % 16 == 0 && BN % 16 == 0 && BK % 16 == 0,
                "unpadded smem rows must be multiples of 32 bytes for conflict-free ldmatrix");
  static_assert(STAGES >= 2, "a pipeline needs at least two stages");
  // Elements of one stage's tiles, by orientation.
  static constexpr int A_OUTER = BM * (BK + PAD);  // [BM][BK]
  static constexpr int A_RED = BK * (BM + PAD);    // [BK][BM]
  static constexpr int B_OUTER = BN * (BK + PAD);  // [BN][BK]
  static constexpr int B_RED = BK * (BN + PAD);    // [BK][BN]
  template <bool A_REDUCTION_MAJOR, bool B_REDUCTION_MAJOR>
  __host__ __device__ static constexpr int stage_elems() {
    return (A_REDUCTION_MAJOR ? A_RED : A_OUTER) + (B_REDUCTION_MAJOR ? B_RED : B_OUTER);
  }
  template <bool A_REDUCTION_MAJOR, bool B_REDUCTION_MAJOR>
  __host__ __device__ static constexpr int smem_bytes() {
    return STAGES * stage_elems<A_REDUCTION_MAJOR, B_REDUCTION_MAJOR>() * 2;
  }
  // 4-bit weights (W4A16): B is [BN][BK / 2] bytes of packed codes, each row padded to an
  // odd number of 16-byte units so that the 8 rows a warp's 8-byte reads touch fall in
  // distinct banks (warp_mma_stage_q4).
  static constexpr int Q4_ROW_BYTES = (BK / 2) % 32 == 0 ? BK / 2 + 16 : BK / 2;
  static constexpr int B_Q4 = BN * Q4_ROW_BYTES / 2;  // in 16-bit elements
  // The scales (and zero points) of the groups in flight, one ring slot per group: the
  // steps in flight start at most STAGES * BK / 32 groups (groups span >= 32 of K), plus
  // the group continuing into the oldest one.
  static constexpr int SCALE_SLOTS = STAGES * (BK / 32) + 1;
  __host__ __device__ static constexpr int smem_bytes_q4() {
    return STAGES * (A_OUTER + B_Q4) * 2 + SCALE_SLOTS * BN * 3;  // + 2-byte scales, 1-byte zeros
  }
  // The epilogue stages the BM x BN output tile over the idle stages, rows padded as above
  // (store_staged_tile).
  static constexpr int OUT_STRIDE = BN + PAD;
  static_assert(BM * OUT_STRIDE <= STAGES * ((A_OUTER < A_RED ? A_OUTER : A_RED) + (B_OUTER < B_RED ? B_OUTER : B_RED)),
                "the staged output tile fits in the stages, whatever the operands' orientation");
  static_assert(BM * OUT_STRIDE <= STAGES * (A_OUTER + B_Q4), "... and with 4-bit weights");
};

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(MmaFragC& acc, const MmaFragA& a, const MmaFragB& b) {
  if constexpr (sizeof(T) == 2 && std::is_same_v<T, __nv_bfloat16>) {
    mma_m16n8k16_bf16(acc, a, b, acc);
  } else {
    mma_m16n8k16_f16(acc, a, b, acc);
  }
}

// Copies one 16-byte chunk to shared memory, or zeros when `src` is null (a row or column
// outside the matrix). The zero-fill copy still needs a valid, aligned source address:
// `fallback` (the tensor's base) is read for 0 bytes.
template <typename T>
__device__ __forceinline__ void copy_chunk(T* dst, const T* src, const T* fallback) {
  cp_async_cg_16_zfill(dst, src != nullptr ? src : fallback, src != nullptr ? 16 : 0);
}

// The same for 8 bytes (half a chunk), for rows that are only 8-byte aligned.
template <typename T>
__device__ __forceinline__ void copy_half_chunk(T* dst, const T* src, const T* fallback) {
  cp_async_ca_8_zfill(dst, src != nullptr ? src : fallback, src != nullptr ? 8 : 0);
}

// Copies a tile staged in shared memory (`rows` rows of `cols` elements, row stride
// `stride`) to global rows of `dst_stride` elements, 16 bytes per thread and instruction so
// that whole 32-byte sectors are written (the fragments' own layout gives each row 4 lanes
// x 4 bytes: half a sector per instruction). `dst` rows and `cols` must be multiples of 8
// elements for 16-byte pieces, else of 4 (8-byte pieces). Every thread of the block calls
// it, between barriers that order it after the staging writes and before any reuse.
template <int THREADS, typename T>
__device__ __forceinline__ void store_staged_tile(const T* staged, int stride, int rows, int64_t cols, T* dst,
                                                  int64_t dst_stride) {
  if (cols % 8 == 0 && dst_stride % 8 == 0) {
    const int chunks = static_cast<int>(cols / 8);
    for (int idx = threadIdx.x; idx < rows * chunks; idx += THREADS) {
      const int r = idx / chunks, c = (idx % chunks) * 8;
      store_vec16(dst + r * dst_stride + c, load_vec16(staged + r * stride + c));
    }
  } else {
    const int pieces = static_cast<int>(cols / 4);
    for (int idx = threadIdx.x; idx < rows * pieces; idx += THREADS) {
      const int r = idx / pieces, c = (idx % pieces) * 4;
      *reinterpret_cast<uint2*>(dst + r * dst_stride + c) = *reinterpret_cast<const uint2*>(staged + r * stride + c);
    }
  }
}

// The warp's accumulators: MI x NI mma tiles.
template <class Tr>
struct Accumulators {
  MmaFragC c[Tr::MI][Tr::NI];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < Tr::MI; ++i)
#pragma unroll
      for (int j = 0; j < Tr::NI; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) c[i][j].reg[r] = 0.f;
  }
};

// The warp's A fragments of the k16 slice at `kk` of a stage's A tile.
template <class Tr, typename T, bool A_RED>
__device__ __forceinline__ void load_a_fragments(MmaFragA (&fa)[Tr::MI], const T* a, int kk, int warp_m) {
  const int lane = threadIdx.x % 32;
  const int q = lane / 8, r = lane % 8;  // the 8x8 matrix this lane addresses, and its row
#pragma unroll
  for (int i = 0; i < Tr::MI; ++i) {
    const int m0 = warp_m * Tr::WTM + i * 16;
    // Matrices 0..3 of .x4 are A's registers 0..3: (m 0-7, k 0-7), (m 8-15, k 0-7),
    // (m 0-7, k 8-15), (m 8-15, k 8-15).
    if constexpr (A_RED) {
      ldmatrix_x4_trans(fa[i].reg, a + (kk + (q / 2) * 8 + r) * (Tr::BM + Tr::PAD) + m0 + (q % 2) * 8);
    } else {
      ldmatrix_x4(fa[i].reg, a + (m0 + lane % 16) * (Tr::BK + Tr::PAD) + kk + (lane / 16) * 8);
    }
  }
}

// One BK-deep step of the warp's math on a stage in shared memory. `a` and `b` point at the
// stage's A and B tiles; (warp_m, warp_n) is the warp's position in the block tile.
template <class Tr, typename T, bool A_RED, bool B_RED>
__device__ __forceinline__ void warp_mma_stage(Accumulators<Tr>& acc, const T* a, const T* b,
                                               int warp_m, int warp_n) {
  const int lane = threadIdx.x % 32;
  const int q = lane / 8, r = lane % 8;  // the 8x8 matrix this lane addresses, and its row
#pragma unroll
  for (int kk = 0; kk < Tr::BK; kk += 16) {
    MmaFragA fa[Tr::MI];
    MmaFragB fb[Tr::NI];
    load_a_fragments<Tr, T, A_RED>(fa, a, kk, warp_m);
#pragma unroll
    for (int j = 0; j < Tr::NI; j += 2) {
      const int n0 = warp_n * Tr::WTN + j * 8;
      // Matrices 0..3: B registers 0, 1 of n8 tile j, then of tile j + 1:
      // (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
      uint32_t regs[4];
      if constexpr (B_RED) {
        ldmatrix_x4_trans(regs, b + (kk + (q % 2) * 8 + r) * (Tr::BN + Tr::PAD) + n0 + (q / 2) * 8);
      } else {
        ldmatrix_x4(regs, b + (n0 + (q / 2) * 8 + r) * (Tr::BK + Tr::PAD) + kk + (q % 2) * 8);
      }
      fb[j].reg[0] = regs[0];
      fb[j].reg[1] = regs[1];
      fb[j + 1].reg[0] = regs[2];
      fb[j + 1].reg[1] = regs[3];
    }
#pragma unroll
    for (int i = 0; i < Tr::MI; ++i)
#pragma unroll
      for (int j = 0; j < Tr::NI; ++j) mma_m16n8k16<T>(acc.c[i][j], fa[i], fb[j]);
  }
}

// One BK-deep step of the warp's math with 4-bit weights: A fragments by ldmatrix as in
// warp_mma_stage, B fragments built in registers from the codes. Lane (g, t4) of an n8
// tile needs B[k = 2 t4, 2 t4 + 1][n = g] (register 0) and the same 8 k later (register 1):
// with two codes a byte along K, that is byte t4 and byte 4 + t4 of row g's 8 bytes of the
// k16 slice, read as one 8-byte load. Each value is dequantized in fp32 (exact) and
// rounded to T once, as `dequantize` rounds it. A k16 slice lies in one group (groups
// span a multiple of 32); its scales sit in ring slot group % SCALE_SLOTS, raw bits
// (2 bytes a scale, or 1 for e8m0), zero points likewise. Slices at or past k (a last,
// partial step) are skipped.
template <class Tr, typename T>
__device__ __forceinline__ void warp_mma_stage_q4(Accumulators<Tr>& acc, const T* a, const uint8_t* codes,
                                                  const uint8_t* ring_scales, const uint8_t* ring_zeros,
                                                  const QuantWeight& qw, int64_t k0, int64_t k, int warp_m,
                                                  int warp_n) {
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;
  const bool e8m0 = qw.scale_type == ScaleType::e8m0;
#pragma unroll
  for (int kk = 0; kk < Tr::BK; kk += 16) {
    if (k0 + kk >= k) break;
    MmaFragA fa[Tr::MI];
    MmaFragB fb[Tr::NI];
    load_a_fragments<Tr, T, false>(fa, a, kk, warp_m);
    // (32-bit: K is far below 2^31, and 64-bit division is a long call in the inner loop)
    const int slot = static_cast<int>(k0 + kk) / static_cast<int>(qw.group_size) % Tr::SCALE_SLOTS;
#pragma unroll
    for (int j = 0; j < Tr::NI; ++j) {
      const int n_local = warp_n * Tr::WTN + j * 8 + g;
      const int at = slot * Tr::BN + n_local;
      const uint32_t raw = e8m0 ? ring_scales[at] : reinterpret_cast<const uint16_t*>(ring_scales)[at];
      const float scale = quant::scale_value(raw, qw.scale_type);
      const int zero = qw.zeros != nullptr ? ring_zeros[at] : 8;
      const uint2 bytes = *reinterpret_cast<const uint2*>(codes + n_local * Tr::Q4_ROW_BYTES + kk / 2);
      const uint32_t lo = (bytes.x >> (8 * t4)) & 0xffu, hi = (bytes.y >> (8 * t4)) & 0xffu;
      fb[j].reg[0] = pack_pair<T>(quant::code_value(lo & 15u, qw.format, scale, zero),
                                  quant::code_value(lo >> 4, qw.format, scale, zero));
      fb[j].reg[1] = pack_pair<T>(quant::code_value(hi & 15u, qw.format, scale, zero),
                                  quant::code_value(hi >> 4, qw.format, scale, zero));
    }
#pragma unroll
    for (int i = 0; i < Tr::MI; ++i)
#pragma unroll
      for (int j = 0; j < Tr::NI; ++j) mma_m16n8k16<T>(acc.c[i][j], fa[i], fb[j]);
  }
}

// The pipelined reduction over one stage layout (A_ELEMS elements of A, then B, per
// STAGE_ELEMS-element stage): `load_stage(stage_a, stage_b, step)` issues the cp.async
// copies of reduction step `step` into one stage (every thread its share), and
// `compute_stage(stage_a, stage_b, step)` does the warp's math on it; the copies of step
// s + STAGES - 1 are in flight while step s is computed. Every thread of the block calls
// it. Leaves no copy in flight; the caller puts a barrier between this and any later
// write to the stages (the next tile's prologue).
template <class Tr, int A_ELEMS, int STAGE_ELEMS, typename T, class LoadStage, class ComputeStage>
__device__ __forceinline__ void pipelined_mma(T* smem, int num_steps, LoadStage load_stage,
                                              ComputeStage compute_stage) {
  auto stage_a = [&](int s) { return smem + s * STAGE_ELEMS; };
  auto stage_b = [&](int s) { return smem + s * STAGE_ELEMS + A_ELEMS; };
#pragma unroll
  for (int s = 0; s < Tr::STAGES - 1; ++s) {
    if (s < num_steps) load_stage(stage_a(s), stage_b(s), s);
    cp_async_commit_group();  // empty groups keep the count uniform
  }
  for (int step = 0; step < num_steps; ++step) {
    cp_async_wait_group<Tr::STAGES - 2>();  // this step's copies (of this thread) landed
    __syncthreads();                        // ... and everyone's; the stage refilled below
                                            // was last read in the previous step
    const int next = step + Tr::STAGES - 1;
    if (next < num_steps) load_stage(stage_a(next % Tr::STAGES), stage_b(next % Tr::STAGES), next);
    cp_async_commit_group();
    const int s = step % Tr::STAGES;
    compute_stage(stage_a(s), stage_b(s), step);
  }
  cp_async_wait_all();
}

// The same with both operands 16-bit tiles in the given orientations (ldmatrix fragments).
template <class Tr, typename T, bool A_RED, bool B_RED, class LoadStage>
__device__ __forceinline__ void pipelined_mma(Accumulators<Tr>& acc, T* smem, int num_steps,
                                              int warp_m, int warp_n, LoadStage load_stage) {
  constexpr int A_ELEMS = A_RED ? Tr::A_RED : Tr::A_OUTER;
  pipelined_mma<Tr, A_ELEMS, Tr::template stage_elems<A_RED, B_RED>()>(
      smem, num_steps, load_stage, [&](const T* a, const T* b, int) {
        warp_mma_stage<Tr, T, A_RED, B_RED>(acc, a, b, warp_m, warp_n);
      });
}

}  // namespace gemm
}  // namespace moe
