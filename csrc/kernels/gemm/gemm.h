// Grouped expert GEMM: launcher interfaces (plain C++, shared by kernels and adapters).
//
// One launch multiplies every expert's rows by that expert's weight matrix:
//   y[m, :] = epilogue(x_row(m) . w[e]^T)   for the rows m of expert e,
// on tensor cores (mma.sync m16n8k16, bf16/f16 in, fp32 accumulate). Expert boundaries are
// read on the device (offsets or counts), never by the host. See grouped_gemm.cuh for the
// kernel's map.
//
// Row layouts:
//  - contiguous: rows [offsets[e], offsets[e + 1]) of y belong to expert e; x row of row m
//    is m, or gather[m] when gather is given (-1 or out of range: a zero row). Rows of y at
//    or past offsets[E] are written with zeros.
//  - masked: x and y are [E, S, *]; only the first counts[e] rows of expert e are
//    computed, the other rows of y are written with zeros.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "../common/dtype.h"
#include "../common/limits.h"
#include "../common/stream.h"
#include "../quant/quant.h"


namespace moe {

// The epilogue's activation. Gated ones halve the columns: "_and_mul" take gate = the
// first half of the N columns, up = the second half, y = act(gate) * up; swiglu_oai
// (GPT-OSS) takes gate/up interleaved (even/odd columns), gate = min(gate, limit),
// up = clamp(up, -limit, limit), y = (up + 1) * gate * sigmoid(alpha * gate).
enum class Activation : int {
  none = 0,
  relu = 1,
  gelu = 2,
  gelu_tanh = 3,
  silu = 4,
  silu_and_mul = 5,
  gelu_and_mul = 6,
  gelu_tanh_and_mul = 7,
  swiglu_oai = 8,
};

MOE_HOST_DEVICE inline bool activation_is_gated(Activation a) { return static_cast<int>(a) >= static_cast<int>(Activation::silu_and_mul); }
// Gated activations whose gate and up columns are the two halves of N (not interleaved).
MOE_HOST_DEVICE inline bool activation_splits_halves(Activation a) {
  return activation_is_gated(a) && a != Activation::swiglu_oai;
}

// The tile configurations the kernels are built for (one template instance each per dtype
// and weight layout). Names are "<tile_m>x<tile_n>".
enum class GemmTile : int {
  m128n128 = 0,  // prefill: 8 warps, warp tile 64 x 32
  m64n64 = 1,    // mid-size: 4 warps, warp tile 32 x 32
  m16n64 = 2,    // decode: 4 warps side by side along N, one m16 row block per tile
};

// What the heuristic chose (heuristics.h): printable, recorded by the benchmarks.
struct GemmConfig {
  GemmTile tile = GemmTile::m128n128;
  int tile_m = 128, tile_n = 128, tile_k = 32;
  int warps = 8, stages = 3;
  int split_k = 1;     // the reduction is never split across blocks (deterministic sums)
  int grid = 0;        // persistent blocks launched (0: not yet known)
  const char* variant = "prefill";
};

// Which rows belong to which expert, read on the device: the contiguous layout's offsets
// [E + 1] (rows [offsets[e], offsets[e + 1])), or the masked layout's counts [E] (the
// first counts[e] of expert e's S rows).
struct ExpertRowLayout {
  const int64_t* offsets = nullptr;  // contiguous layout, or null
  const void* counts = nullptr;      // masked layout: int32 or int64
  bool counts_int64 = false;
  int64_t rows_per_expert = 0;       // S (masked)
  int64_t m = 0;                     // rows of y (masked: E * S)
};

struct GroupedGemmParams {
  const void* x = nullptr;          // [x_rows, k] (masked: [E, S, k]), dtype, 16-byte aligned rows
  DType dtype = DType::bf16;        // bf16 or f16 (x, w, y)
  int64_t x_rows = 0;
  const void* w = nullptr;          // [E, n, k] ("nk") or [E, k, n] (w_kn)
  bool w_kn = false;
  // 4-bit weights (W4A16) instead of w: [E, n, k] in the layout of quant/quant.h, k a
  // multiple of 32. Dequantized in registers in the main loop, each value rounded to dtype
  // as dequantize rounds it, so the product is that of the dequantized weight.
  bool quantized = false;
  QuantWeight qw;
  int num_experts = 0;
  int64_t n = 0;                    // columns of the product (before a gated activation halves them)
  int64_t k = 0;
  ExpertRowLayout rows;
  const void* gather = nullptr;     // [m] int32 or int64 or null (contiguous layout only)
  bool gather_int64 = false;
  const float* bias = nullptr;      // [E, n] or null
  Activation activation = Activation::none;
  float alpha = 1.702f;             // swiglu_oai
  float limit = 7.f;                // swiglu_oai
  const float* row_scale = nullptr; // [m] or null: multiplies each output row (after the activation)
  void* y = nullptr;                // [m, n_out] (n_out = n / 2 for gated activations)
  // [m, n] or null: product + bias in fp32, kept for the backward. fp32 because the
  // backward must see the values the forward's activation saw: a clamp (swiglu_oai) or a
  // relu decides its gradient on them, and bf16 would move values across the bounds.
  float* pre_activation = nullptr;
  void* workspace = nullptr;        // grouped_gemm_workspace_bytes(num_experts) bytes
  int num_sms = 0;                  // multiprocessors of the device (0: ask the device)
  int arch = 0;                     // compute capability * 10 (0: ask the device)
  int forced_tile = -1;             // a GemmTile to use instead of the heuristic's choice
};

size_t grouped_gemm_workspace_bytes(int num_experts);
// Returns the configuration it launched.
GemmConfig launch_grouped_gemm(const GroupedGemmParams& params, cudaStream_t stream);

// Weight gradient, a GEMM whose reduction runs over each expert's rows:
//   out[e] = p_e^T q_e   ([p_cols, q_cols] per expert)
// with p_e, q_e the expert's rows of p [*, p_cols] and q [*, q_cols] (rows as in the
// forward's layout; p_gather / q_gather map a row to the tensor's row, -1: zero). The
// forward's dw is (p, q) = (dh, x) for [E, n, k] weights and (x, dh) for [E, k, n].
// Experts with no rows get zeros. Each output element is summed by one thread in a fixed
// order: deterministic, no atomics.
struct GroupedGemmWgradParams {
  const void* p = nullptr;
  int64_t p_rows = 0, p_cols = 0;
  const void* p_gather = nullptr;
  const void* q = nullptr;
  int64_t q_rows = 0, q_cols = 0;
  const void* q_gather = nullptr;
  bool gather_int64 = false;
  DType dtype = DType::bf16;
  int num_experts = 0;
  ExpertRowLayout rows;
  void* out = nullptr;               // [E, p_cols, q_cols], dtype
};

void launch_grouped_gemm_wgrad(const GroupedGemmWgradParams& params, cudaStream_t stream);

// Backward of the epilogue, per row m of the forward:
//   grad_pre [m, n] = d activation(pre) / d pre . (grad_y[m] * row_scale[m])
//   grad_row_scale[m] = sum_j grad_y[m, j] * activation(pre[m])[j]    (fp32, in j order)
// pre is the forward's pre_activation (fp32; zero on rows no expert covers).
struct GemmActivationBackwardParams {
  const void* grad_y = nullptr;       // [m, n_out], dtype
  const float* pre = nullptr;         // [m, n], fp32
  DType dtype = DType::bf16;
  int64_t m = 0, n = 0;
  Activation activation = Activation::none;
  float alpha = 1.702f, limit = 7.f;
  const float* row_scale = nullptr;   // [m] or null
  void* grad_pre = nullptr;           // [m, n] out, dtype
  float* grad_row_scale = nullptr;    // [m] out or null
};

void launch_gemm_activation_backward(const GemmActivationBackwardParams& params, cudaStream_t stream);

// dbias[e, j] = sum over expert e's rows m (in row order, fp32) of grad_pre[m, j].
struct GroupedColumnSumParams {
  const void* in = nullptr;          // [m, n], dtype
  DType dtype = DType::bf16;
  int64_t n = 0;
  int num_experts = 0;
  ExpertRowLayout rows;
  float* out = nullptr;              // [E, n] out
};

void launch_grouped_column_sum(const GroupedColumnSumParams& params, cudaStream_t stream);

// Backward of a gathered read: out[t] = sum of in[rows[i]] over i in
// [row_start[t], row_start[t + 1]), in that order, fp32; rows lists the rows of each token
// in increasing row order (a stable sort of gather by token).
struct SegmentRowSumParams {
  const void* in = nullptr;            // [in_rows, hidden], dtype
  DType dtype = DType::bf16;
  int64_t hidden = 0;
  const int64_t* rows = nullptr;       // [total]
  const int64_t* row_start = nullptr;  // [num_tokens + 1]
  int64_t num_tokens = 0;
  void* out = nullptr;                 // [num_tokens, hidden] out, dtype
};

void launch_segment_row_sum(const SegmentRowSumParams& params, cudaStream_t stream);

// The tile configuration the heuristic picks (heuristics.h), for Python's gemm_config.
GemmConfig choose_gemm_config(int arch, int num_sms, int64_t m, int64_t n, int64_t k,
                              int num_experts, bool masked, int64_t rows_per_expert,
                              Activation activation, bool w_kn, bool quantized);
GemmConfig gemm_tile_config(GemmTile tile, bool quantized);

}  // namespace moe
