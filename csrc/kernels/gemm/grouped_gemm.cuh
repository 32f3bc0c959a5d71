// Grouped expert GEMM on tensor cores (forward, and the input gradient, which is the same
// product with the other weight layout).
//
// Map of the algorithm:
//  1. schedule (grouped_gemm_schedule_kernel, one block): from offsets or counts, the
//     number of BM-row tiles of each expert, ceil(rows_e / BM), and their exclusive prefix
//     tile_start[0..E] in a workspace. Experts with no rows get no tile, so their weights
//     are never read. Nothing goes back to the host.
//  2. main kernel (grouped_gemm_kernel), persistent: block b takes tiles b, b + grid, ...
//     of the (m-tile, n-tile) space, tile_start[E] * n_tiles of them. An m-tile's expert is
//     found by binary search in tile_start; its rows are [row0, row0 + BM) of that expert,
//     the last tile predicated (rows past the expert's end are neither read nor written),
//     never padded and never straddling two experts.
//     - A (activations) is read row by row: x row m, gather[m], or expert e's row of the
//       masked [E, S, K] x; rows outside are zero-filled by cp.async.
//     - B (expert e's weights) is read [BN][BK] from [E, N, K] or [BK][BN] from [E, K, N]
//       (then ldmatrix.trans). With a gated activation whose gate and up are the two
//       halves of N, B's tile rows are arranged so that each warp holds matching gate and
//       up columns: the first half of a warp's n8 tiles are gate columns, the second half
//       the up columns of the same outputs.
//     - epilogue from registers: + bias, (pre-activation saved for the backward),
//       activation, * row_scale, convert, store. Nothing unactivated reaches global
//       memory unless the backward asked for it.
//  3. the same blocks then write zeros to the rows of y no expert covers (rows past
//     offsets[E]; masked: rows past counts[e]).
#pragma once

#include <stdexcept>
#include <type_traits>

#include "../common/launch.cuh"
#include "activation.cuh"
#include "gemm.h"
#include "heuristics.h"
#include "rows.cuh"
#include "tile.cuh"

namespace moe {
namespace gemm {

// The built configurations (heuristics.h tile_config has the same numbers).
using TileM128N128 = TileTraits<128, 128, 32, 2, 4, 3, 1>;
using TileM64N64 = TileTraits<64, 64, 32, 2, 2, 4, 3>;
using TileM16N64 = TileTraits<16, 64, 64, 1, 4, 4, 4>;
// With 4-bit weights (heuristics.h: every tile 64 deep).
using TileM128N128Q4 = TileTraits<128, 128, 64, 2, 4, 3, 1>;
using TileM64N64Q4 = TileTraits<64, 64, 64, 2, 2, 4, 3>;

constexpr int kScheduleThreads = 1024;

// tile_start[e] = sum over e' < e of ceil(rows_e' / tile_m), e = 0..E (one block).
__global__ void __launch_bounds__(kScheduleThreads)
    grouped_gemm_schedule_kernel(ExpertRows rows, int num_experts, int tile_m, int32_t* tile_start) {
  __shared__ int64_t warp_totals[kScheduleThreads / 32];
  // Rounds of kScheduleThreads experts: a block-wide exclusive scan each, plus the tiles of
  // the rounds before (every thread gets the round's total from the scan).
  int64_t before = 0;
  for (int base = 0; base <= num_experts; base += kScheduleThreads) {
    const int e = base + threadIdx.x;
    const int64_t tiles = e < num_experts ? (rows.of(e).count + tile_m - 1) / tile_m : 0;
    int64_t round_tiles;
    const int64_t exclusive = block_exclusive_scan<kScheduleThreads>(tiles, warp_totals, &round_tiles);
    if (e <= num_experts) tile_start[e] = static_cast<int32_t>(before + exclusive);
    before += round_tiles;
  }
}

// Which pre-activation column (row of w) sits at local column `n_local` of n-tile `n_tile`,
// and whether it exists. Plain and interleaved tiles take BN consecutive columns; a tile
// of a halves-gated activation takes BN / 2 outputs: each warp's first WTN / 2 columns are
// gate columns (of N's first half), the next WTN / 2 the up columns of the same outputs.
template <class Tr>
__device__ __forceinline__ int64_t weight_row(int n_local, int64_t n_tile, int64_t n, bool halves,
                                              bool& valid) {
  if (!halves) {
    const int64_t col = n_tile * Tr::BN + n_local;
    valid = col < n;
    return col;
  }
  const int within = n_local % Tr::WTN;
  const int64_t out = n_tile * (Tr::BN / 2) + (n_local / Tr::WTN) * (Tr::WTN / 2) + within % (Tr::WTN / 2);
  valid = out < n / 2;
  return out + (within >= Tr::WTN / 2 ? n / 2 : 0);
}

// The weight operand: [E, N, K] or [E, K, N] 16-bit values, or 4-bit codes ([E, N, K / 2],
// with group-major scales and zero points: quant/quant.h).
enum class WeightKind { nk, kn, q4 };

template <typename T, class Tr, WeightKind WK>
__global__ void __launch_bounds__(Tr::THREADS, Tr::MIN_BLOCKS) grouped_gemm_kernel(GroupedGemmParams p) {
  constexpr bool W_KN = WK == WeightKind::kn;
  constexpr bool Q4 = WK == WeightKind::q4;
  T* smem = dynamic_smem<T>();
  const int32_t* tile_start = static_cast<const int32_t*>(p.workspace);
  const ExpertRows rows{p.rows};
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const int E = p.num_experts;
  const bool gated = activation_is_gated(p.activation);
  const bool halves = activation_splits_halves(p.activation);
  const int64_t n_out = gated ? p.n / 2 : p.n;
  // Output columns per tile: BN, or BN / 2 when two pre-activation columns make one.
  const int out_per_tile = gated ? Tr::BN / 2 : Tr::BN;
  const int64_t n_tiles = (n_out + out_per_tile - 1) / out_per_tile;
  // The schedule's tile count, read by one thread (as each tile's lookup below).
  __shared__ int64_t scheduled_m_tiles;
  if (threadIdx.x == 0) scheduled_m_tiles = tile_start[E];
  __syncthreads();
  const int64_t total = static_cast<int64_t>(scheduled_m_tiles) * n_tiles;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / Tr::WN, warp_n = warp % Tr::WN;
  const int num_steps = static_cast<int>((p.k + Tr::BK - 1) / Tr::BK);
  // [E, K, N] weights with gate | up halves: when N / 2 is not a multiple of 8 the up half's
  // columns start 8 bytes off a 16-byte boundary (and a chunk may straddle N / 2's end), so
  // its rows are copied 8 bytes at a time.
  const bool split_up_half = W_KN && halves && p.n % 16 != 0;
  constexpr int CPR_K = Tr::BK / Tr::CHUNK;  // chunks per row of an outer-major tile
  constexpr int CPR_N = Tr::BN / Tr::CHUNK;  // chunks per row of a [BK][BN] tile
  constexpr int A_COPIES = Tr::BM * CPR_K / Tr::THREADS;
  constexpr int B_COPIES = (W_KN ? Tr::BK * CPR_N : Tr::BN * CPR_K) / Tr::THREADS;
  static_assert(A_COPIES * Tr::THREADS == Tr::BM * CPR_K, "A tile copies split evenly over the threads");
  static_assert(B_COPIES * Tr::THREADS == (W_KN ? Tr::BK * CPR_N : Tr::BN * CPR_K),
                "B tile copies split evenly over the threads");
  // 4-bit weights: 16-byte chunks of codes (32 of K), CPR_Q per row of the [BN][BK / 2] tile;
  // the scales of a group: BN / 8 pieces of 8 outputs (16 bytes of bf16/f16 scales, 8 of
  // e8m0), copied by the first BN / 8 threads, zero points (8 bytes a piece) by the next.
  constexpr int CPR_Q = Tr::BK / 32;
  constexpr int Q_COPIES = (Tr::BN * CPR_Q + Tr::THREADS - 1) / Tr::THREADS;
  static_assert(!Q4 || (Tr::BK % 32 == 0 && Tr::BN / 4 <= Tr::THREADS), "4-bit tiles");
  uint8_t* ring_scales = reinterpret_cast<uint8_t*>(smem + Tr::STAGES * (Tr::A_OUTER + Tr::B_Q4));
  uint8_t* ring_zeros = ring_scales + Tr::SCALE_SLOTS * Tr::BN * 2;
  const QuantWeight& qw = p.qw;
  const int64_t q_groups = Q4 ? p.k / qw.group_size : 0;
  const int scale_size = Q4 ? scale_bytes(qw.scale_type) : 0;
  // A piece of 8 outputs' scales is 8 consecutive outputs of w (the gated-halves
  // arrangement keeps runs of WTN / 2 >= 8) unless the up half starts inside one.
  const bool whole_pieces = !halves || (p.n / 2) % 8 == 0;

  for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
    const int32_t m_tile = static_cast<int32_t>(t / n_tiles);
    const int64_t n_tile = t % n_tiles;
    // The tile's expert and rows, looked up by one thread and shared: a lookup by every
    // thread costs each warp about 8 loads of the schedule and offsets per tile, as much
    // as the 4-bit weights of a decode tile's k-step. (The barriers of the previous tile, or
    // the one above, separate this write from the reads of the last one.)
    __shared__ int64_t tile_info[3];  // expert, first row, rows
    if (threadIdx.x == 0) {
      const int expert = find_tile_expert(tile_start, E, m_tile);
      const RowRange range = rows.of(expert);
      const int64_t first = range.begin + static_cast<int64_t>(m_tile - tile_start[expert]) * Tr::BM;
      const int64_t left = range.begin + range.count - first;
      tile_info[0] = expert;
      tile_info[1] = first;
      tile_info[2] = left < Tr::BM ? left : Tr::BM;
    }
    __syncthreads();  // ... and the previous tile's last reads of the stages are done
    // Clamped into range (they are in range): a value read before thread 0 wrote it, were
    // the barrier above missing, must show as the race it is, not as a wild address.
    const int e = static_cast<int>(ExpertRows::clamp(tile_info[0], 0, E - 1));
    const int64_t row0 = ExpertRows::clamp(tile_info[1], 0, p.rows.m);
    const int tile_rows = static_cast<int>(ExpertRows::clamp(tile_info[2], 0, Tr::BM));
    const T* w_e = Q4 ? nullptr : w + static_cast<int64_t>(e) * p.n * p.k;

    // Each thread's A rows and B rows (or columns) are fixed for the whole tile.
    const T* a_src[A_COPIES];
    int a_chunk[A_COPIES];
#pragma unroll
    for (int c = 0; c < A_COPIES; ++c) {
      const int idx = threadIdx.x + c * Tr::THREADS;
      const int r = idx / CPR_K;
      a_chunk[c] = idx % CPR_K;
      a_src[c] = nullptr;
      if (r < tile_rows) {
        const int64_t x_row = p.gather != nullptr ? read_index(p.gather, p.gather_int64, row0 + r) : row0 + r;
        if (x_row >= 0 && x_row < p.x_rows) a_src[c] = x + x_row * p.k;
      }
    }
    // [BK][BN] tiles: a thread copies the same 8 columns in each of its rows (THREADS is a
    // multiple of the chunks per row), so one pointer serves all its copies.
    // [BN][BK] tiles: each copy is its own w row (rows follow the gated-halves arrangement).
    constexpr int B_POINTERS = W_KN ? 1 : B_COPIES;
    static_assert(!W_KN || Tr::THREADS % CPR_N == 0, "one column chunk per thread");
    const T* b_src[B_POINTERS];
    int b_chunk[B_POINTERS];
#pragma unroll
    for (int c = 0; c < B_POINTERS; ++c) {
      const int idx = threadIdx.x + c * Tr::THREADS;
      bool valid = false;
      if constexpr (Q4) {
        b_src[c] = nullptr, b_chunk[c] = 0;
        continue;
      }
      if constexpr (W_KN) {
        const int64_t n_col = weight_row<Tr>((idx % CPR_N) * Tr::CHUNK, n_tile, p.n, halves, valid);
        b_src[c] = valid ? w_e + n_col : nullptr;
        b_chunk[c] = idx % CPR_N;
      } else {  // a chunk is 8 k of one w row
        b_chunk[c] = idx % CPR_K;
        const int64_t n_row = weight_row<Tr>(idx / CPR_K, n_tile, p.n, halves, valid);
        b_src[c] = valid ? w_e + n_row * p.k : nullptr;
      }
    }

    // 4-bit weights: each thread's code rows, and its piece of the scales (or zero points).
    const uint8_t* q_src[Q_COPIES];
#pragma unroll
    for (int c = 0; c < Q_COPIES; ++c) {
      const int idx = threadIdx.x + c * Tr::THREADS;
      bool valid = false;
      const int64_t n_row = Q4 && idx < Tr::BN * CPR_Q ? weight_row<Tr>(idx / CPR_Q, n_tile, p.n, halves, valid) : 0;
      q_src[c] = valid ? qw.codes + (static_cast<int64_t>(e) * p.n + n_row) * (p.k / 2) : nullptr;
    }
    const bool copies_scales = Q4 && threadIdx.x < Tr::BN / 4 && (threadIdx.x < Tr::BN / 8 || qw.zeros != nullptr);
    const bool copies_zeros = threadIdx.x >= Tr::BN / 8;
    const int piece = threadIdx.x % (Tr::BN / 8) * 8;  // first local output of the piece
    bool piece_valid = false;
    const int64_t piece_col = copies_scales ? weight_row<Tr>(piece, n_tile, p.n, halves, piece_valid) : 0;
    // Copies group g's piece into ring slot g % SCALE_SLOTS.
    auto load_group = [&](int g) {
      const int slot = g % Tr::SCALE_SLOTS;
      const int64_t at = (static_cast<int64_t>(e) * q_groups + g) * p.n;  // the group's first output
      const int size = copies_zeros ? 1 : scale_size;
      const uint8_t* src = copies_zeros ? qw.zeros + at : static_cast<const uint8_t*>(qw.scales) + at * size;
      uint8_t* dst = (copies_zeros ? ring_zeros : ring_scales) + (slot * Tr::BN + piece) * size;
      if (whole_pieces) {
        const uint8_t* piece_src = piece_valid ? src + piece_col * size : nullptr;
        if (size == 2) {
          copy_chunk(dst, piece_src, src);
        } else {
          copy_half_chunk(dst, piece_src, src);
        }
      } else {  // the piece straddles the gate and up halves: one output at a time
        for (int i = 0; i < 8; ++i) {
          bool valid;
          const int64_t col = weight_row<Tr>(piece + i, n_tile, p.n, halves, valid);
          for (int b = 0; b < size; ++b) dst[i * size + b] = valid ? src[col * size + b] : 0;
        }
      }
    };

    auto load_stage = [&](T* sa, T* sb, int step) {
      const int64_t k0 = static_cast<int64_t>(step) * Tr::BK;
#pragma unroll
      for (int c = 0; c < A_COPIES; ++c) {
        const int idx = threadIdx.x + c * Tr::THREADS;
        const int64_t kc = k0 + a_chunk[c] * Tr::CHUNK;
        copy_chunk(sa + (idx / CPR_K) * (Tr::BK + Tr::PAD) + a_chunk[c] * Tr::CHUNK,
                   a_src[c] != nullptr && kc < p.k ? a_src[c] + kc : nullptr, x);
      }
      if constexpr (Q4) {
        uint8_t* sq = reinterpret_cast<uint8_t*>(sb);
#pragma unroll
        for (int c = 0; c < Q_COPIES; ++c) {
          const int idx = threadIdx.x + c * Tr::THREADS;
          if (Q_COPIES * Tr::THREADS > Tr::BN * CPR_Q && idx >= Tr::BN * CPR_Q) break;
          const int64_t kc = k0 + (idx % CPR_Q) * 32;
          copy_chunk(sq + (idx / CPR_Q) * Tr::Q4_ROW_BYTES + (idx % CPR_Q) * 16,
                     q_src[c] != nullptr && kc < p.k ? q_src[c] + kc / 2 : nullptr, qw.codes);
        }
        // The groups that start in this step.
        if (copies_scales) {
          const int group = static_cast<int>(qw.group_size), k_begin = static_cast<int>(k0);
          for (int g = (k_begin + group - 1) / group; g * group < k_begin + Tr::BK && g * group < p.k; ++g) {
            load_group(g);
          }
        }
      } else {  // 16-bit weights
#pragma unroll
        for (int c = 0; c < B_COPIES; ++c) {
          if constexpr (W_KN) {
            const int kr_local = threadIdx.x / CPR_N + c * (Tr::THREADS / CPR_N);
            const int64_t kr = k0 + kr_local;
            T* dst = sb + kr_local * (Tr::BN + Tr::PAD) + b_chunk[0] * Tr::CHUNK;
            const T* src = b_src[0] != nullptr && kr < p.k ? b_src[0] + kr * p.n : nullptr;
            if (split_up_half) {
              // The upper half exists unless the chunk straddles the end of N / 2 (recomputed
              // here rather than kept in a register for the whole tile).
              bool high_valid;
              weight_row<Tr>(b_chunk[0] * Tr::CHUNK + Tr::CHUNK / 2, n_tile, p.n, halves, high_valid);
              copy_half_chunk(dst, src, w);
              copy_half_chunk(dst + Tr::CHUNK / 2, src != nullptr && high_valid ? src + Tr::CHUNK / 2 : nullptr, w);
            } else {
              copy_chunk(dst, src, w);
            }
          } else {
            const int idx = threadIdx.x + c * Tr::THREADS;
            const int64_t kc = k0 + b_chunk[c] * Tr::CHUNK;
            copy_chunk(sb + (idx / CPR_K) * (Tr::BK + Tr::PAD) + b_chunk[c] * Tr::CHUNK,
                       b_src[c] != nullptr && kc < p.k ? b_src[c] + kc : nullptr, w);
          }
        }
      }
    };

    Accumulators<Tr> acc;
    acc.zero();
    if constexpr (Q4) {
      pipelined_mma<Tr, Tr::A_OUTER, Tr::A_OUTER + Tr::B_Q4>(
          smem, num_steps, load_stage, [&](const T* a, const T* b, int step) {
            warp_mma_stage_q4<Tr, T>(acc, a, reinterpret_cast<const uint8_t*>(b), ring_scales, ring_zeros, qw,
                                     static_cast<int64_t>(step) * Tr::BK, p.k, warp_m, warp_n);
          });
    } else {
      pipelined_mma<Tr, T, false, W_KN>(acc, smem, num_steps, warp_m, warp_n, load_stage);
    }

    // Epilogue. Lane (g, t4) holds rows g and g + 8 of each m16 tile, columns 2 t4 and
    // 2 t4 + 1 of each n8 tile (mma.cuh). The outputs go through shared memory, [BM][BN + 8]
    // over the (now idle) stages, so that y is written in 16-byte row chunks: straight from
    // the fragments four lanes would write 16 bytes of a 32-byte sector and another
    // instruction the other half. The fp32 pre-activation pairs fill whole sectors
    // (4 lanes x 8 bytes) and are stored directly.
    constexpr int OUT_STRIDE = Tr::OUT_STRIDE;
    T* staged = smem;
    const int64_t out0 = n_tile * out_per_tile;  // first output column of the tile
    const int g = lane / 4, t4 = lane % 4;
    float* pre = p.pre_activation;
    const float* bias_e = p.bias != nullptr ? p.bias + static_cast<int64_t>(e) * p.n : nullptr;
    __syncthreads();  // every warp has finished reading the stages
#pragma unroll
    for (int i = 0; i < Tr::MI; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = warp_m * Tr::WTM + i * 16 + g + 8 * h;
        if (r >= tile_rows) continue;
        const int64_t row = row0 + r;
        const float scale = p.row_scale != nullptr ? p.row_scale[row] : 1.f;
        T* staged_row = staged + r * OUT_STRIDE;
        // Pre-activation pairs (bias added, pre saved) of this row, per n8 tile.
        float v[Tr::NI][2];
        int64_t col[Tr::NI];
        bool valid[Tr::NI];
#pragma unroll
        for (int j = 0; j < Tr::NI; ++j) {
          col[j] = weight_row<Tr>(warp_n * Tr::WTN + j * 8 + 2 * t4, n_tile, p.n, halves, valid[j]);
          v[j][0] = acc.c[i][j].reg[2 * h];
          v[j][1] = acc.c[i][j].reg[2 * h + 1];
          if (!valid[j]) continue;
          if (bias_e != nullptr) {  // one 8-byte load (col is even, rows of N even)
            const float2 b = *reinterpret_cast<const float2*>(bias_e + col[j]);
            v[j][0] += b.x;
            v[j][1] += b.y;
          }
          if (pre != nullptr) store_pair(pre + row * p.n + col[j], v[j][0], v[j][1]);
        }
        if (!gated) {
#pragma unroll
          for (int j = 0; j < Tr::NI; ++j) {
            if (valid[j]) {
              store_pair(staged_row + (col[j] - out0), activate(p.activation, v[j][0]) * scale,
                         activate(p.activation, v[j][1]) * scale);
            }
          }
        } else if (!halves) {  // swiglu_oai: (gate, up) are the lane's column pair
#pragma unroll
          for (int j = 0; j < Tr::NI; ++j) {
            if (valid[j]) {
              staged_row[col[j] / 2 - out0] = from_float<T>(swiglu_oai(v[j][0], v[j][1], p.alpha, p.limit) * scale);
            }
          }
        } else {  // tile j (gate) pairs with tile j + NI / 2 (up) of the same outputs
#pragma unroll
          for (int j = 0; j < Tr::NI / 2; ++j) {
            if (valid[j]) {
              store_pair(staged_row + (col[j] - out0),
                         gated_activate(p.activation, v[j][0], v[j + Tr::NI / 2][0]) * scale,
                         gated_activate(p.activation, v[j][1], v[j + Tr::NI / 2][1]) * scale);
            }
          }
        }
      }
    }
    __syncthreads();  // the staged tile is complete
    // (A gated N = 8 mod 16 leaves n_out = 4 mod 8: 8-byte pieces then.)
    const int64_t out_cols = n_out - out0 < out_per_tile ? n_out - out0 : out_per_tile;
    store_staged_tile<Tr::THREADS>(staged, OUT_STRIDE, tile_rows, out_cols,
                                   static_cast<T*>(p.y) + row0 * n_out + out0, n_out);
    // (The next tile's first barrier, after its lookup, orders these reads of the stages
    // before its prologue overwrites them.)
  }

  // Rows of y (and of the saved pre-activation) that no expert covers are zeros: one warp
  // per row.
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * Tr::WARPS;
  const int64_t first_warp = static_cast<int64_t>(blockIdx.x) * Tr::WARPS + warp;
  T* y = static_cast<T*>(p.y);
  float* pre = p.pre_activation;
  rows.for_each_uncovered_row(first_warp, warps_total, E, [&](int64_t row) {
    for (int64_t j = 2 * lane; j < n_out; j += 64) store_pair(y + row * n_out + j, 0.f, 0.f);
    if (pre != nullptr) {
      for (int64_t j = 2 * lane; j < p.n; j += 64) store_pair(pre + row * p.n + j, 0.f, 0.f);
    }
  });
}

template <typename T, class Tr, WeightKind WK>
void launch_tile(const GroupedGemmParams& p, GemmConfig& config, cudaStream_t stream) {
  const bool gated = activation_is_gated(p.activation);
  const int64_t n_out = gated ? p.n / 2 : p.n;
  const int out_per_tile = gated ? Tr::BN / 2 : Tr::BN;
  const int64_t n_tiles = (n_out + out_per_tile - 1) / out_per_tile;
  config.grid = persistent_grid(p.num_sms, max_tiles(config, p.rows.m, n_tiles, p.num_experts));
  constexpr size_t smem = WK == WeightKind::q4 ? Tr::smem_bytes_q4()
                                               : Tr::template smem_bytes<false, WK == WeightKind::kn>();
  // The heuristic (host code, no traits) sizes the same tile by its own formula: keep them one.
  if (tile_smem_bytes(config, WK == WeightKind::kn, WK == WeightKind::q4) != static_cast<int64_t>(smem)) {
    throw std::logic_error("grouped_gemm: heuristics.h tile_smem_bytes disagrees with the tile traits");
  }
  LaunchConfig cfg{dim3(config.grid), dim3(Tr::THREADS), smem, stream};
  launch_kernel("grouped_gemm_kernel", grouped_gemm_kernel<T, Tr, WK>, cfg, p);
}

template <typename T, class Tr>
void launch_layout(const GroupedGemmParams& p, GemmConfig& config, cudaStream_t stream) {
  static_assert(sizeof(T) == 2, "tensor-core operands are 16-bit");
  if (p.w_kn) {
    launch_tile<T, Tr, WeightKind::kn>(p, config, stream);
  } else {
    launch_tile<T, Tr, WeightKind::nk>(p, config, stream);
  }
}

template <typename T>
void launch_typed(const GroupedGemmParams& p, GemmConfig& config, cudaStream_t stream) {
  if (p.quantized) {
    switch (config.tile) {
      case GemmTile::m128n128: return launch_tile<T, TileM128N128Q4, WeightKind::q4>(p, config, stream);
      case GemmTile::m64n64: return launch_tile<T, TileM64N64Q4, WeightKind::q4>(p, config, stream);
      case GemmTile::m16n64: return launch_tile<T, TileM16N64, WeightKind::q4>(p, config, stream);
    }
  }
  switch (config.tile) {
    case GemmTile::m128n128: return launch_layout<T, TileM128N128>(p, config, stream);
    case GemmTile::m64n64: return launch_layout<T, TileM64N64>(p, config, stream);
    case GemmTile::m16n64: return launch_layout<T, TileM16N64>(p, config, stream);
  }
}

}  // namespace gemm

GemmConfig gemm_tile_config(GemmTile tile, bool quantized) { return gemm::tile_config(tile, quantized); }

GemmConfig choose_gemm_config(int arch, int num_sms, int64_t m, int64_t n, int64_t k,
                                     int num_experts, bool masked, int64_t rows_per_expert,
                                     Activation activation, bool w_kn, bool quantized) {
  return gemm::choose(arch, num_sms, m, n, k, num_experts, masked, rows_per_expert, activation, w_kn, quantized);
}

size_t grouped_gemm_workspace_bytes(int num_experts) {
  return (static_cast<size_t>(num_experts) + 1) * sizeof(int32_t);
}

GemmConfig launch_grouped_gemm(const GroupedGemmParams& params, cudaStream_t stream) {
  GroupedGemmParams p = params;
  if (p.num_experts < 1 || p.num_experts > kMaxExperts) {
    throw std::invalid_argument("grouped_gemm: num_experts must be in [1, 4096]");
  }
  if (p.n % 8 != 0 || p.k % 8 != 0 || p.n < 8 || p.k < 8) {
    throw std::invalid_argument("grouped_gemm: n and k must be positive multiples of 8");
  }
  if (p.dtype != DType::bf16 && p.dtype != DType::f16) throw std::invalid_argument("grouped_gemm: bf16 or f16 only");
  if (p.quantized && (p.w_kn || p.k % 32 != 0 || p.qw.group_size < 32 || p.k % p.qw.group_size != 0 ||
                      (p.qw.group_size % 32 != 0 && p.qw.group_size != p.k))) {
    throw std::invalid_argument("grouped_gemm: 4-bit weights need K a multiple of 32 and of the group size");
  }
  if (p.arch == 0 || p.num_sms == 0) {
    const DeviceProperties device = current_device_properties();
    if (p.arch == 0) p.arch = device.arch;
    if (p.num_sms == 0) p.num_sms = device.num_sms;
  }
  GemmConfig config = p.forced_tile >= 0 ? gemm::tile_config(static_cast<GemmTile>(p.forced_tile), p.quantized)
                                         : gemm::choose(p.arch, p.num_sms, p.rows.m, p.n, p.k, p.num_experts,
                                                        p.rows.offsets == nullptr, p.rows.rows_per_expert,
                                                        p.activation, p.w_kn, p.quantized);
  if (p.rows.m == 0) return config;
  const gemm::ExpertRows rows{p.rows};
  LaunchConfig schedule{dim3(1), dim3(gemm::kScheduleThreads), 0, stream};
  launch_kernel("grouped_gemm_schedule_kernel", gemm::grouped_gemm_schedule_kernel, schedule, rows,
                p.num_experts, config.tile_m, static_cast<int32_t*>(p.workspace));
  if (p.dtype == DType::bf16) {
    gemm::launch_typed<__nv_bfloat16>(p, config, stream);
  } else {
    gemm::launch_typed<__half>(p, config, stream);
  }
  return config;
}

}  // namespace moe
