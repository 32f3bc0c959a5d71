#include "../kernels/routing/routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>

#include "common.h"

namespace moe {

namespace {
Scoring parse_scoring(const std::string& scoring) {
  if (scoring == "softmax") return Scoring::softmax;
  if (scoring == "sigmoid") return Scoring::sigmoid;
  MOE_CHECK_VALUE(scoring == "sqrtsoftplus", "scoring",
                  "expected 'softmax', 'sigmoid' or 'sqrtsoftplus', got '", scoring, "'");
  return Scoring::sqrtsoftplus;
}

// group_scoring: "max" (n = 1), "top{n}_sum" (n >= 1, e.g. "top2_sum"); returns n.
int64_t parse_group_topn(const std::string& group_scoring) {
  if (group_scoring == "max") return 1;
  const std::string prefix = "top", suffix = "_sum";
  int64_t n = 0;
  bool ok = group_scoring.size() > prefix.size() + suffix.size() &&
            group_scoring.compare(0, prefix.size(), prefix) == 0 &&
            group_scoring.compare(group_scoring.size() - suffix.size(), suffix.size(), suffix) == 0;
  if (ok) {
    const std::string digits =
        group_scoring.substr(prefix.size(), group_scoring.size() - prefix.size() - suffix.size());
    ok = digits.size() <= 9 && digits[0] != '0';
    for (const char ch : digits) ok = ok && ch >= '0' && ch <= '9';
    if (ok) n = std::stoll(digits);
  }
  MOE_CHECK_VALUE(ok, "group_scoring", "expected 'max' or 'top{n}_sum' (n >= 1, e.g. 'top2_sum'), got '",
                  group_scoring, "'");
  return n;
}

// The kernels scale in float32: a factor beyond its range would turn every weight into inf.
void check_scaling_factor(double scaling_factor) {
  MOE_CHECK_VALUE(std::isfinite(scaling_factor) &&
                      std::fabs(scaling_factor) <= std::numeric_limits<float>::max(),
                  "scaling_factor", "expected a finite number with |scaling_factor| <= ",
                  std::numeric_limits<float>::max(), " (float32 max), got ", scaling_factor);
}

void check_logits(const at::Tensor& logits) {
  check_device(logits, "logits");
  check_dim(logits, 2, "logits");
  check_contiguous(logits, "logits");
  float_dtype(logits, "logits");
  MOE_CHECK_VALUE(logits.size(1) >= 1 && logits.size(1) <= kMaxExperts, "logits",
                  "expected 1 to ", kMaxExperts, " experts (columns), got ", logits.size(1));
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_gating(const at::Tensor& logits, int64_t k,
                                               bool renormalize, const std::string& scoring,
                                               const std::optional<at::Tensor>& bias,
                                               int64_t num_groups,
                                               std::optional<int64_t> topk_groups_arg,
                                               const std::string& group_scoring,
                                               double scaling_factor) {
  check_logits(logits);
  const DType dtype = float_dtype(logits, "logits");
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = logits.size(1);
  const Scoring scoring_kind = parse_scoring(scoring);
  const int64_t group_topn = parse_group_topn(group_scoring);
  check_scaling_factor(scaling_factor);
  if (bias.has_value()) {
    check_input(*bias, "bias", at::kFloat, 1, logits);
    MOE_CHECK_VALUE(bias->size(0) == num_experts, "bias", "expected ", num_experts,
                    " elements (one per expert), got ", bias->size(0));
  }
  MOE_CHECK_VALUE(num_groups >= 1 && num_groups <= num_experts && num_experts % num_groups == 0,
                  "num_groups", "expected a divisor of num_experts (", num_experts, "), got ",
                  num_groups);
  // Absent: every group stays eligible. A value is checked as given (no negative default).
  const int64_t topk_groups = topk_groups_arg.value_or(num_groups);
  MOE_CHECK_VALUE(topk_groups >= 1 && topk_groups <= num_groups, "topk_groups",
                  "expected 1 <= topk_groups <= num_groups (", num_groups, "), got ", topk_groups);
  const int64_t group_size = num_experts / num_groups;
  MOE_CHECK_VALUE(num_groups == 1 || group_topn <= group_size, "group_scoring", "'",
                  group_scoring, "' needs at least ", group_topn, " experts per group, got ",
                  group_size);
  MOE_CHECK_VALUE(k >= 1 && k <= num_experts, "k", "expected 1 <= k <= num_experts (",
                  num_experts, "), got ", k);
  MOE_CHECK_VALUE(k <= topk_groups * group_size, "k", "expected k <= the eligible experts ",
                  "topk_groups * num_experts / num_groups (", topk_groups * group_size, "), got ", k);

  const c10::DeviceGuard guard(logits.device());
  at::Tensor weights = at::empty({num_tokens, k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({num_tokens, k}, logits.options().dtype(at::kInt));
  TopkGatingParams p;
  p.logits = logits.data_ptr();
  p.dtype = dtype;
  p.num_tokens = num_tokens;
  p.num_experts = static_cast<int>(num_experts);
  p.k = static_cast<int>(k);
  p.scoring = scoring_kind;
  p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  p.num_groups = static_cast<int>(num_groups);
  p.topk_groups = static_cast<int>(topk_groups);
  p.group_topn = static_cast<int>(std::min(group_topn, group_size));
  p.renormalize = renormalize;
  p.scaling_factor = static_cast<float>(scaling_factor);
  p.weights = weights.data_ptr<float>();
  p.ids = ids.data_ptr<int32_t>();
  launch_topk_gating(p, current_stream(logits));
  return {weights, ids};
}

at::Tensor topk_gating_backward(const at::Tensor& grad_weights, const at::Tensor& logits,
                                const at::Tensor& ids, const std::string& scoring,
                                bool renormalize, double scaling_factor) {
  check_logits(logits);
  check_scaling_factor(scaling_factor);
  check_input(ids, "ids", at::kInt, 2, logits);
  MOE_CHECK_VALUE(ids.size(0) == logits.size(0) && ids.size(1) >= 1 &&
                      ids.size(1) <= logits.size(1),
                  "ids", "expected shape [", logits.size(0), ", k <= ", logits.size(1), "], got ",
                  ids.sizes());
  check_input(grad_weights, "grad_weights", at::kFloat, 2, logits);
  MOE_CHECK_VALUE(grad_weights.sizes() == ids.sizes(), "grad_weights", "expected shape ",
                  ids.sizes(), ", got ", grad_weights.sizes());

  const c10::DeviceGuard guard(logits.device());
  at::Tensor grad_logits = at::empty_like(logits);
  TopkGatingBackwardParams p;
  p.logits = logits.data_ptr();
  p.dtype = float_dtype(logits, "logits");
  p.ids = ids.data_ptr<int32_t>();
  p.grad_weights = grad_weights.data_ptr<float>();
  p.num_tokens = logits.size(0);
  p.num_experts = static_cast<int>(logits.size(1));
  p.k = static_cast<int>(ids.size(1));
  p.scoring = parse_scoring(scoring);
  p.renormalize = renormalize;
  p.scaling_factor = static_cast<float>(scaling_factor);
  p.grad_logits = grad_logits.data_ptr();
  launch_topk_gating_backward(p, current_stream(logits));
  return grad_logits;
}

at::Tensor router_stats(const at::Tensor& ids, int64_t num_experts) {
  check_device(ids, "ids");
  MOE_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, "ids",
                 "expected dtype int32 or int64, got ", ids.scalar_type());
  check_contiguous(ids, "ids");
  MOE_CHECK_VALUE(num_experts >= 1 && num_experts <= kMaxCountedExperts, "num_experts",
                  "expected 1 <= num_experts <= ", kMaxCountedExperts, ", got ", num_experts);
  const c10::DeviceGuard guard(ids.device());
  at::Tensor counts = at::zeros({num_experts}, ids.options().dtype(at::kInt));
  RouterStatsParams p;
  p.ids = ids.data_ptr();
  p.ids_are_64bit = ids.scalar_type() == at::kLong;
  p.n = ids.numel();
  p.num_experts = static_cast<int>(num_experts);
  p.counts = counts.data_ptr<int32_t>();
  launch_router_stats(p, current_stream(ids));
  return counts;
}

std::tuple<at::Tensor, at::Tensor> expert_choice_gating(const at::Tensor& logits,
                                                        int64_t capacity) {
  check_logits(logits);
  MOE_CHECK_VALUE(logits.size(0) < (int64_t{1} << 31), "logits", "expected fewer than 2^31 tokens");
  MOE_CHECK_VALUE(capacity >= 0 && capacity < (int64_t{1} << 31), "capacity",
                  "expected 0 <= capacity < 2^31, got ", capacity);
  const c10::DeviceGuard guard(logits.device());
  const int64_t num_tokens = logits.size(0);
  const int64_t num_experts = logits.size(1);
  at::Tensor token_idx = at::empty({num_experts, capacity}, logits.options().dtype(at::kInt));
  at::Tensor weights = at::empty({num_experts, capacity}, logits.options().dtype(at::kFloat));
  // Scratch: the probabilities transposed, 4 bytes per (token, expert).
  at::Tensor probs = at::empty({num_experts, num_tokens}, logits.options().dtype(at::kFloat));
  ExpertChoiceParams p;
  p.logits = logits.data_ptr();
  p.dtype = float_dtype(logits, "logits");
  p.num_tokens = num_tokens;
  p.num_experts = static_cast<int>(num_experts);
  p.capacity = capacity;
  p.probs = probs.data_ptr<float>();
  p.token_idx = token_idx.data_ptr<int32_t>();
  p.weights = weights.data_ptr<float>();
  launch_expert_choice_gating(p, current_stream(logits));
  return {token_idx, weights};
}

// The expert permutation of hash_gating: the smallest integer >= round(0.618034 * E) that is
// coprime to E (golden-ratio stride: consecutive slots land far apart). E = 1 gives 1.
int64_t hash_multiplier(int64_t num_experts) {
  int64_t a = std::max<int64_t>(1, static_cast<int64_t>(0.6180339887 * num_experts + 0.5));
  while (std::gcd(a, num_experts) != 1) ++a;
  return a;
}

std::tuple<at::Tensor, at::Tensor> hash_gating(const at::Tensor& token_ids, int64_t num_experts,
                                               int64_t k) {
  check_device(token_ids, "token_ids");
  check_dim(token_ids, 1, "token_ids");
  check_contiguous(token_ids, "token_ids");
  MOE_CHECK_TYPE(token_ids.scalar_type() == at::kInt || token_ids.scalar_type() == at::kLong,
                 "token_ids", "expected int32 or int64, got ", token_ids.scalar_type());
  MOE_CHECK_VALUE(num_experts >= 1 && num_experts <= kMaxCountedExperts, "num_experts",
                  "expected 1 <= num_experts <= ", kMaxCountedExperts, ", got ", num_experts);
  MOE_CHECK_VALUE(k >= 1 && k <= num_experts, "k", "expected 1 <= k <= num_experts (",
                  num_experts, "), got ", k);
  const c10::DeviceGuard guard(token_ids.device());
  const int64_t num_tokens = token_ids.size(0);
  at::Tensor weights = at::empty({num_tokens, k}, token_ids.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({num_tokens, k}, token_ids.options().dtype(at::kInt));
  HashGatingParams p;
  p.token_ids = token_ids.data_ptr();
  p.ids_are_64bit = token_ids.scalar_type() == at::kLong;
  p.num_tokens = num_tokens;
  p.num_experts = static_cast<int>(num_experts);
  p.k = static_cast<int>(k);
  p.multiplier = static_cast<int>(hash_multiplier(num_experts));
  p.weights = weights.data_ptr<float>();
  p.ids = ids.data_ptr<int32_t>();
  launch_hash_gating(p, current_stream(token_ids));
  return {weights, ids};
}


void register_routing(pybind11::module_& m) {
  m.def("topk_gating", &topk_gating, "Fused top-k gating", py::arg("logits"), py::arg("k"),
        py::arg("renormalize"), py::arg("scoring") = "softmax", py::arg("bias") = py::none(),
        py::arg("num_groups") = 1, py::arg("topk_groups") = py::none(),
        py::arg("group_scoring") = "top2_sum", py::arg("scaling_factor") = 1.0);
  m.def("topk_gating_backward", &topk_gating_backward,
        "Gradient of topk_gating's weights with respect to the logits", py::arg("grad_weights"),
        py::arg("logits"), py::arg("ids"), py::arg("scoring"), py::arg("renormalize"),
        py::arg("scaling_factor"));
  m.def("router_stats", &router_stats, "Assignments per expert", py::arg("ids"),
        py::arg("num_experts"));
  m.def("expert_choice_gating", &expert_choice_gating, "Expert-choice routing",
        py::arg("logits"), py::arg("capacity"));
  m.def("hash_gating", &hash_gating, "Hash routing", py::arg("token_ids"),
        py::arg("num_experts"), py::arg("k"));
  m.def("hash_multiplier", &hash_multiplier, "The expert permutation of hash_gating",
        py::arg("num_experts"));
}

}  // namespace moe
