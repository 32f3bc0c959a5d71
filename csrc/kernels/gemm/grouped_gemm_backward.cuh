// Backward of the grouped GEMM, besides the input gradient (which is grouped_gemm_kernel
// with the other weight layout):
//  - grouped_gemm_wgrad_kernel: out[e] = p_e^T q_e, a GEMM whose reduction runs over the
//    expert's rows; persistent over the (expert, BM x BN output tile) space; both operands
//    are read row by row ([BK][BM] and [BK][BN] tiles, ldmatrix.trans). One block owns an
//    output tile and sums all of the expert's rows itself: no split, no atomics, the same
//    bits every run.
//  - gemm_activation_backward_kernel: the epilogue's gradient, one block per row.
//  - grouped_column_sum_kernel: dbias, one thread per (expert, column), rows in order.
//  - segment_row_sum_kernel: the gradient through gather, one block per token, its rows
//    in increasing order.
#pragma once

#include "../common/launch.cuh"
#include "activation.cuh"
#include "gemm.h"
#include "rows.cuh"
#include "tile.cuh"

namespace moe {
namespace gemm {

using WgradTile = TileTraits<64, 64, 32, 2, 2, 4, 4>;

// Copies reduction rows [first, first + BK) of one operand, columns [col0, col0 + WIDTH) of
// its `cols`, into a [BK][WIDTH + PAD] stage tile; source_row(local) is the operand row of
// the expert's local row (null: a zero row).
template <class Tr, int WIDTH, typename T, class SourceRow>
__device__ __forceinline__ void copy_row_block(T* dst, const T* base, int64_t cols, int64_t col0, int64_t first,
                                               SourceRow source_row) {
  constexpr int CPR = WIDTH / Tr::CHUNK;
  constexpr int COPIES = Tr::BK * CPR / Tr::THREADS;
  static_assert(COPIES * Tr::THREADS == Tr::BK * CPR, "tile copies split evenly over the threads");
#pragma unroll
  for (int c = 0; c < COPIES; ++c) {
    const int idx = threadIdx.x + c * Tr::THREADS;
    const int r = idx / CPR, col = (idx % CPR) * Tr::CHUNK;
    const T* src = col0 + col < cols ? source_row(first + r) : nullptr;
    copy_chunk(dst + r * (WIDTH + Tr::PAD) + col, src != nullptr ? src + col0 + col : nullptr, base);
  }
}

template <typename T, class Tr>
__global__ void __launch_bounds__(Tr::THREADS, Tr::MIN_BLOCKS) grouped_gemm_wgrad_kernel(GroupedGemmWgradParams p) {
  T* smem = dynamic_smem<T>();
  const ExpertRows rows{p.rows};
  const T* pm = static_cast<const T*>(p.p);
  const T* qm = static_cast<const T*>(p.q);
  const int64_t p_tiles = (p.p_cols + Tr::BM - 1) / Tr::BM;
  const int64_t q_tiles = (p.q_cols + Tr::BN - 1) / Tr::BN;
  const int64_t per_expert = p_tiles * q_tiles;
  const int64_t total = per_expert * p.num_experts;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / Tr::WN, warp_n = warp % Tr::WN;

  for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
    const int e = static_cast<int>(t / per_expert);
    const int64_t p0 = (t % per_expert) / q_tiles * Tr::BM;
    const int64_t q0 = (t % per_expert) % q_tiles * Tr::BN;
    const RowRange range = rows.of(e);
    const int num_steps = static_cast<int>((range.count + Tr::BK - 1) / Tr::BK);

    // Step s reads rows range.begin + s * BK + r (r < BK) of both operands: tile row r.
    auto source_row = [&](const T* base, const void* gather, int64_t base_rows, int64_t cols,
                          int64_t local) -> const T* {
      if (local >= range.count) return nullptr;
      const int64_t row = range.begin + local;
      const int64_t src = gather != nullptr ? read_index(gather, p.gather_int64, row) : row;
      return src >= 0 && src < base_rows ? base + src * cols : nullptr;
    };
    auto load_stage = [&](T* sa, T* sb, int step) {
      const int64_t first = static_cast<int64_t>(step) * Tr::BK;
      copy_row_block<Tr, Tr::BM>(sa, pm, p.p_cols, p0, first,
                                 [&](int64_t local) { return source_row(pm, p.p_gather, p.p_rows, p.p_cols, local); });
      copy_row_block<Tr, Tr::BN>(sb, qm, p.q_cols, q0, first,
                                 [&](int64_t local) { return source_row(qm, p.q_gather, p.q_rows, p.q_cols, local); });
    };

    Accumulators<Tr> acc;
    acc.zero();
    pipelined_mma<Tr, T, true, true>(acc, smem, num_steps, warp_m, warp_n, load_stage);

    // Staged through shared memory over the idle stages (16-byte stores; see tile.cuh).
    constexpr int OUT_STRIDE = Tr::OUT_STRIDE;
    T* staged = smem;
    const int g = lane / 4, t4 = lane % 4;
    __syncthreads();  // every warp has finished reading the stages
#pragma unroll
    for (int i = 0; i < Tr::MI; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = warp_m * Tr::WTM + i * 16 + g + 8 * h;
#pragma unroll
        for (int j = 0; j < Tr::NI; ++j) {
          store_pair(staged + r * OUT_STRIDE + warp_n * Tr::WTN + j * 8 + 2 * t4, acc.c[i][j].reg[2 * h],
                     acc.c[i][j].reg[2 * h + 1]);
        }
      }
    }
    __syncthreads();  // the staged tile is complete
    const int64_t rows_left = p.p_cols - p0, cols_left = p.q_cols - q0;
    store_staged_tile<Tr::THREADS>(staged, OUT_STRIDE, rows_left < Tr::BM ? static_cast<int>(rows_left) : Tr::BM,
                                   cols_left < Tr::BN ? cols_left : Tr::BN,
                                   static_cast<T*>(p.out) + static_cast<int64_t>(e) * p.p_cols * p.q_cols +
                                       p0 * p.q_cols + q0,
                                   p.q_cols);
    __syncthreads();  // the next tile's prologue overwrites the stages
  }
}

constexpr int kRowThreads = 256;

// Deterministic block sum (a fixed tree): every thread calls it; the result is in thread 0.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_allreduce<32>(v, SumOp{});
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kRowThreads / 32; ++w) total += scratch[w];
  }
  __syncthreads();  // scratch is reused by the next row
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) gemm_activation_backward_kernel(GemmActivationBackwardParams p) {
  __shared__ float scratch[kRowThreads / 32];
  const T* gy = static_cast<const T*>(p.grad_y);
  const float* pre = p.pre;
  T* gp = static_cast<T*>(p.grad_pre);
  const bool gated = activation_is_gated(p.activation);
  const bool halves = activation_splits_halves(p.activation);
  const int64_t n_out = gated ? p.n / 2 : p.n;
  for (int64_t row = blockIdx.x; row < p.m; row += gridDim.x) {
    const float scale = p.row_scale != nullptr ? p.row_scale[row] : 1.f;
    float dot = 0.f;  // sum_j grad_y * activation(pre): d row_scale
    for (int64_t j = threadIdx.x; j < n_out; j += kRowThreads) {
      const float dy = to_float(gy[row * n_out + j]);
      const float d = dy * scale;
      if (!gated) {
        const float v = pre != nullptr ? pre[row * p.n + j] : 0.f;
        if (p.grad_row_scale != nullptr) dot += dy * activate(p.activation, v);
        gp[row * p.n + j] = from_float<T>(p.activation == Activation::none ? d : d * activate_grad(p.activation, v));
        continue;
      }
      const int64_t gate_col = halves ? j : 2 * j;
      const int64_t up_col = halves ? j + p.n / 2 : 2 * j + 1;
      const float gate = pre[row * p.n + gate_col];
      const float up = pre[row * p.n + up_col];
      float d_gate, d_up, out;
      if (halves) {
        const float act = activate(p.activation, gate);
        out = act * up;
        d_gate = d * up * activate_grad(p.activation, gate);
        d_up = d * act;
      } else {
        out = swiglu_oai(gate, up, p.alpha, p.limit);
        swiglu_oai_grad(gate, up, p.alpha, p.limit, d, d_gate, d_up);
      }
      if (p.grad_row_scale != nullptr) dot += dy * out;
      gp[row * p.n + gate_col] = from_float<T>(d_gate);
      gp[row * p.n + up_col] = from_float<T>(d_up);
    }
    if (p.grad_row_scale != nullptr) {
      const float total = block_sum(dot, scratch);
      if (threadIdx.x == 0) p.grad_row_scale[row] = total;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) grouped_column_sum_kernel(GroupedColumnSumParams p) {
  const ExpertRows rows{p.rows};
  const T* in = static_cast<const T*>(p.in);
  const int e = blockIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x;
  if (col >= p.n) return;
  const RowRange range = rows.of(e);
  float sum = 0.f;
  for (int64_t r = range.begin; r < range.begin + range.count; ++r) sum += to_float(in[r * p.n + col]);
  p.out[static_cast<int64_t>(e) * p.n + col] = sum;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) segment_row_sum_kernel(SegmentRowSumParams p) {
  const T* in = static_cast<const T*>(p.in);
  T* out = static_cast<T*>(p.out);
  for (int64_t t = blockIdx.x; t < p.num_tokens; t += gridDim.x) {
    const int64_t begin = p.row_start[t], end = p.row_start[t + 1];
    for (int64_t j = threadIdx.x; j < p.hidden; j += kRowThreads) {
      float sum = 0.f;
      for (int64_t i = begin; i < end; ++i) sum += to_float(in[p.rows[i] * p.hidden + j]);
      out[t * p.hidden + j] = from_float<T>(sum);
    }
  }
}

// Blocks of a grid-stride loop over `items` rows: at most 8 per multiprocessor (a full
// device of 256-thread blocks); more rows are looped over.
inline unsigned row_grid(int64_t items) {
  const int64_t cap = int64_t{8} * current_device_properties().num_sms;
  return static_cast<unsigned>(items < cap ? (items > 0 ? items : 1) : cap);
}

}  // namespace gemm

void launch_grouped_gemm_wgrad(const GroupedGemmWgradParams& p, cudaStream_t stream) {
  using Tr = gemm::WgradTile;
  if (p.p_cols % 8 != 0 || p.q_cols % 8 != 0) throw std::invalid_argument("grouped_gemm_wgrad: columns must be multiples of 8");
  const int64_t tiles = (p.p_cols + Tr::BM - 1) / Tr::BM * ((p.q_cols + Tr::BN - 1) / Tr::BN) * p.num_experts;
  const DeviceProperties device = current_device_properties();
  const int grid = gemm::persistent_grid(device.num_sms, tiles);
  constexpr size_t smem = Tr::template smem_bytes<true, true>();
  LaunchConfig cfg{dim3(grid), dim3(Tr::THREADS), smem, stream};
  if (p.dtype == DType::bf16) {
    launch_kernel("grouped_gemm_wgrad_kernel", gemm::grouped_gemm_wgrad_kernel<__nv_bfloat16, Tr>, cfg, p);
  } else {
    launch_kernel("grouped_gemm_wgrad_kernel", gemm::grouped_gemm_wgrad_kernel<__half, Tr>, cfg, p);
  }
}

void launch_gemm_activation_backward(const GemmActivationBackwardParams& p, cudaStream_t stream) {
  LaunchConfig cfg{dim3(gemm::row_grid(p.m)), dim3(gemm::kRowThreads), 0, stream};
  if (p.m == 0) return;
  if (p.dtype == DType::bf16) {
    launch_kernel("gemm_activation_backward_kernel", gemm::gemm_activation_backward_kernel<__nv_bfloat16>, cfg, p);
  } else {
    launch_kernel("gemm_activation_backward_kernel", gemm::gemm_activation_backward_kernel<__half>, cfg, p);
  }
}

void launch_grouped_column_sum(const GroupedColumnSumParams& p, cudaStream_t stream) {
  LaunchConfig cfg{dim3(ceil_div(p.n, gemm::kRowThreads), p.num_experts), dim3(gemm::kRowThreads), 0, stream};
  if (p.dtype == DType::bf16) {
    launch_kernel("grouped_column_sum_kernel", gemm::grouped_column_sum_kernel<__nv_bfloat16>, cfg, p);
  } else {
    launch_kernel("grouped_column_sum_kernel", gemm::grouped_column_sum_kernel<__half>, cfg, p);
  }
}

void launch_segment_row_sum(const SegmentRowSumParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return;
  LaunchConfig cfg{dim3(gemm::row_grid(p.num_tokens)), dim3(gemm::kRowThreads), 0, stream};
  if (p.dtype == DType::bf16) {
    launch_kernel("segment_row_sum_kernel", gemm::segment_row_sum_kernel<__nv_bfloat16>, cfg, p);
  } else {
    launch_kernel("segment_row_sum_kernel", gemm::segment_row_sum_kernel<__half>, cfg, p);
  }
}

}  // namespace moe
