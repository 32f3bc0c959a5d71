#include "../kernels/gating.h"

#include "common.h"
#include "ops.h"

namespace moe {

std::tuple<at::Tensor, at::Tensor> topk_gating(const at::Tensor& logits, int64_t k,
                                               bool renormalize) {
  check_device(logits, "logits");
  check_dim(logits, 2, "logits");
  check_contiguous(logits, "logits");
  const DType dtype = float_dtype(logits, "logits");
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = logits.size(1);
  MOE_CHECK_VALUE(num_experts >= 1 && num_experts <= kMaxGatingExperts, "logits",
                  "expected 1 to ", kMaxGatingExperts, " experts (columns), got ", num_experts);
  MOE_CHECK_VALUE(k >= 1 && k <= num_experts, "k", "expected 1 <= k <= num_experts (",
                  num_experts, "), got ", k);

  const c10::DeviceGuard guard(logits.device());
  at::Tensor weights = at::empty({num_tokens, k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({num_tokens, k}, logits.options().dtype(at::kInt));
  TopkGatingParams p;
  p.logits = logits.data_ptr();
  p.dtype = dtype;
  p.num_tokens = num_tokens;
  p.num_experts = static_cast<int>(num_experts);
  p.k = static_cast<int>(k);
  p.renormalize = renormalize;
  p.weights = weights.data_ptr<float>();
  p.ids = ids.data_ptr<int32_t>();
  launch_topk_gating(p, current_stream(logits));
  return {weights, ids};
}

}  // namespace moe
