// Fused top-k gating: launcher interface (plain C++, shared by kernels and adapters).
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/stream.h"

namespace moe {

struct TopkGatingParams {
  const void* logits = nullptr;  // [num_tokens, num_experts], dtype, contiguous
  DType dtype = DType::f32;
  int64_t num_tokens = 0;
  int num_experts = 0;
  int k = 0;
  bool renormalize = false;
  float* weights = nullptr;  // [num_tokens, k] out
  int32_t* ids = nullptr;    // [num_tokens, k] out
};

// Largest expert count the fused kernel takes.
constexpr int kMaxGatingExperts = 4096;

void launch_topk_gating(const TopkGatingParams& params, cudaStream_t stream);

}  // namespace moe
