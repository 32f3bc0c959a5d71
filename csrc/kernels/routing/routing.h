// Routing kernels: launcher interfaces (plain C++, shared by kernels and adapters).
#pragma once

#include <cstdint>

#include "../common/dtype.h"
#include "../common/limits.h"
#include "../common/stream.h"

namespace moe {

// sqrtsoftplus: sqrt(softplus(x)) (Transformer Engine).
enum class Scoring : int { softmax = 0, sigmoid = 1, sqrtsoftplus = 2 };

struct TopkGatingParams {
  const void* logits = nullptr;  // [num_tokens, num_experts], dtype, contiguous
  DType dtype = DType::f32;
  int64_t num_tokens = 0;
  int num_experts = 0;
  int k = 0;
  Scoring scoring = Scoring::softmax;
  const float* bias = nullptr;  // [num_experts] or null: added to the scores for selection only
  int num_groups = 1;           // divides num_experts
  int topk_groups = 1;          // groups that stay eligible, <= num_groups
  int group_topn = 2;           // group score: sum of its group_topn largest values, <= E / num_groups
  bool renormalize = false;
  float scaling_factor = 1.f;
  float* weights = nullptr;  // [num_tokens, k] out
  int32_t* ids = nullptr;    // [num_tokens, k] out
};

// Gradient of topk_gating's weights with respect to the logits (selection is constant).
struct TopkGatingBackwardParams {
  const void* logits = nullptr;         // [num_tokens, num_experts], dtype
  DType dtype = DType::f32;
  const int32_t* ids = nullptr;         // [num_tokens, k], distinct per row
  const float* grad_weights = nullptr;  // [num_tokens, k]
  int64_t num_tokens = 0;
  int num_experts = 0;
  int k = 0;
  Scoring scoring = Scoring::softmax;
  bool renormalize = false;
  float scaling_factor = 1.f;
  void* grad_logits = nullptr;  // [num_tokens, num_experts] out, dtype
};

struct RouterStatsParams {
  const void* ids = nullptr;  // [n] expert ids, int32 or int64; ids outside [0, num_experts) are not counted
  bool ids_are_64bit = false;
  int64_t n = 0;
  int num_experts = 0;
  int32_t* counts = nullptr;  // [num_experts] out (zeroed by the launcher's caller)
};

struct ExpertChoiceParams {
  const void* logits = nullptr;  // [num_tokens, num_experts], dtype
  DType dtype = DType::f32;
  int64_t num_tokens = 0;
  int num_experts = 0;
  int64_t capacity = 0;
  float* probs = nullptr;  // [num_experts, num_tokens] scratch: softmax probabilities, transposed
  int32_t* token_idx = nullptr;  // [num_experts, capacity] out, -1 past num_tokens
  float* weights = nullptr;      // [num_experts, capacity] out, 0 past num_tokens
};

struct HashGatingParams {
  const void* token_ids = nullptr;  // [num_tokens], int32 or int64
  bool ids_are_64bit = false;
  int64_t num_tokens = 0;
  int num_experts = 0;
  int k = 0;
  int multiplier = 1;  // the expert permutation x -> multiplier * x mod num_experts
  float* weights = nullptr;  // [num_tokens, k] out
  int32_t* ids = nullptr;    // [num_tokens, k] out
};


void launch_topk_gating(const TopkGatingParams& params, cudaStream_t stream);
void launch_topk_gating_backward(const TopkGatingBackwardParams& params, cudaStream_t stream);
void launch_router_stats(const RouterStatsParams& params, cudaStream_t stream);
void launch_expert_choice_gating(const ExpertChoiceParams& params, cudaStream_t stream);
void launch_hash_gating(const HashGatingParams& params, cudaStream_t stream);

}  // namespace moe
