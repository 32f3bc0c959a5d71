// Token permutation: launcher interface (plain C++, shared by kernels and adapters).
//
// permute runs in two stages:
//   1. index stage (launch_permute_index; alone, it is permute_plan): from ids [T, k]
//      compute row_map [T, k], offsets [E + 1], num_rows [1], gather [M] (the token of
//      each row, -1 for rows without one) and the permuted weights. Histogram + scan +
//      stable placement over fixed tiles of the (token, slot) order; no sort, no atomics
//      whose order shows in a result.
//   2. row stage (launch_scatter_rows): each token's row is read once and written to its
//      k destination rows; the rows whose gather entry is -1 are written with zeros.
// unpermute is launch_gather_rows; its weight gradient is launch_row_dot.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../common/dtype.h"
#include "../common/limits.h"
#include "../common/stream.h"

namespace moe {

// Assignments (token, slot) per tile of the index stage.
constexpr int kPermuteTile = 1024;

struct PermuteIndexParams {
  const void* ids = nullptr;        // [num_tokens, k], int32 or (ids_int64) int64
  bool ids_int64 = false;
  const float* weights = nullptr;   // [num_tokens, k] or null
  int64_t num_tokens = 0;
  int k = 1;
  int num_experts = 1;
  int expert_begin = 0;             // local experts are [expert_begin, expert_end)
  int expert_end = 1;
  // [num_experts] or null: local index of each expert, or -1 (then the range is unused).
  // Segments (offsets) follow the local index; 0..L-1 exist, L = entries in [0, E).
  const int32_t* expert_map = nullptr;
  int64_t capacity = -1;            // rows per expert; -1: dropless
  int64_t align = 1;                // segment sizes are multiples of align
  bool drop_by_weight = false;      // capacity keeps the largest weights (else earliest)
  int64_t* row_map = nullptr;       // [num_tokens, k] out: row of each assignment or -1
  int64_t* offsets = nullptr;       // [num_experts + 1] out
  int64_t* num_rows = nullptr;      // [1] out: rows that hold a token
  int64_t* gather = nullptr;        // [M] out (filled with -1 by the caller): token of each row
  float* weights_out = nullptr;     // [M] out (zero-initialised by the caller) or null
  void* workspace = nullptr;        // permute_index_workspace_bytes(...) bytes
};

// select_by_weight: capacity with drop_by_weight (the select kernel's arrays).
size_t permute_index_workspace_bytes(int64_t num_tokens, int k, int num_experts, bool select_by_weight);
void launch_permute_index(const PermuteIndexParams& params, cudaStream_t stream);

// out[row_map[t, j]] = scale[t, j] * x[t] (scale null: a copy) for every row_map entry in
// [0, num_out_rows); then, when gather is given, every row r without a token
// (gather[r] < 0: align padding, unused capacity, the tail past offsets[E]) is set to zero.
struct ScatterRowsParams {
  const void* x = nullptr;          // [num_tokens, hidden]
  DType dtype = DType::f32;
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  int k = 1;
  const int64_t* row_map = nullptr; // [num_tokens, k]
  const float* scale = nullptr;     // [num_tokens, k] or null
  void* out = nullptr;              // [num_out_rows, hidden]
  int64_t num_out_rows = 0;
  const int64_t* gather = nullptr;  // [num_out_rows] or null: no zero fill
};

void launch_scatter_rows(const ScatterRowsParams& params, cudaStream_t stream);

// y[t] = sum over j = 0..k-1 (in that order, fp32) of weights[t, j] * in[row_map[t, j]],
// skipping entries outside [0, num_in_rows); weights null: a plain sum.
struct GatherRowsParams {
  const void* in = nullptr;         // [num_in_rows, hidden]
  DType dtype = DType::f32;
  int64_t num_in_rows = 0;
  int64_t hidden = 0;
  int64_t num_tokens = 0;
  int k = 1;
  const int64_t* row_map = nullptr; // [num_tokens, k]
  const float* weights = nullptr;   // [num_tokens, k] or null
  void* out = nullptr;              // [num_tokens, hidden]
};

void launch_gather_rows(const GatherRowsParams& params, cudaStream_t stream);

// out[t, j] = dot(a[t], b[row_map[t, j]]) in fp32, 0 where row_map[t, j] is outside
// [0, num_b_rows). a and b have the same dtype.
struct RowDotParams {
  const void* a = nullptr;          // [num_tokens, hidden]
  const void* b = nullptr;          // [num_b_rows, hidden]
  DType dtype = DType::f32;
  int64_t num_tokens = 0;
  int64_t num_b_rows = 0;
  int64_t hidden = 0;
  int k = 1;
  const int64_t* row_map = nullptr; // [num_tokens, k]
  float* out = nullptr;             // [num_tokens, k]
};

void launch_row_dot(const RowDotParams& params, cudaStream_t stream);

}  // namespace moe
