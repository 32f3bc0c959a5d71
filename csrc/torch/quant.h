// Checks of a 4-bit weight's tensors, shared by the quant adapter and the grouped GEMM's.
#pragma once

#include <optional>

#include "../kernels/quant/quant.h"
#include "common.h"

namespace moe {

struct CheckedQuantWeight {
  QuantWeight w;
  int64_t num_experts, n, k;
};

// codes uint8 [E, N, K / 2], scales [E, G, N] (bf16/f16 for int4, uint8 e8m0 for mxfp4),
// zeros uint8 [E, G, N] or none (int4 only); format 0 (int4) or 1 (mxfp4); group_size
// dividing K, a multiple of 32 or K itself (per-channel).
CheckedQuantWeight check_quant_weight(const at::Tensor& codes, const at::Tensor& scales,
                                      const std::optional<at::Tensor>& zeros, int64_t format, int64_t group_size);

}  // namespace moe
