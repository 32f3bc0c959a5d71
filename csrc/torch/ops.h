// Host adapters: validate, allocate, fill a params struct, launch. Bound in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace moe {

std::tuple<at::Tensor, at::Tensor> topk_gating(const at::Tensor& logits, int64_t k,
                                               bool renormalize, const std::string& scoring,
                                               const std::optional<at::Tensor>& bias,
                                               int64_t num_groups, int64_t topk_groups,
                                               const std::string& group_scoring,
                                               double scaling_factor);
at::Tensor topk_gating_backward(const at::Tensor& grad_weights, const at::Tensor& logits,
                                const at::Tensor& ids, const std::string& scoring,
                                bool renormalize, double scaling_factor);
at::Tensor router_stats(const at::Tensor& ids, int64_t num_experts);
std::tuple<at::Tensor, at::Tensor> expert_choice_gating(const at::Tensor& logits,
                                                        int64_t capacity);
std::tuple<at::Tensor, at::Tensor> hash_gating(const at::Tensor& token_ids, int64_t num_experts,
                                               int64_t k);
int64_t hash_multiplier(int64_t num_experts);

// Token permutation; capacity -1 means dropless. Returns (x_perm, row_map, offsets,
// num_rows, weights_perm or None).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> permute(
    const at::Tensor& x, const at::Tensor& ids, const std::optional<at::Tensor>& weights,
    int64_t num_experts, int64_t capacity, int64_t align, bool drop_by_weight,
    int64_t expert_begin, int64_t expert_end);
at::Tensor unpermute(const at::Tensor& y_perm, const at::Tensor& row_map,
                     const std::optional<at::Tensor>& weights);
// (grad_y_perm, grad_weights), each computed only when asked for.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> unpermute_backward(
    const at::Tensor& grad_y, const at::Tensor& y_perm, const at::Tensor& row_map,
    const std::optional<at::Tensor>& weights, bool need_grad_y_perm, bool need_grad_weights);

namespace testing {
at::Tensor block_sum(const at::Tensor& x, int64_t block);
at::Tensor transpose(const at::Tensor& x, bool padded);
std::tuple<at::Tensor, at::Tensor> warp_scan(const at::Tensor& x);
at::Tensor histogram(const at::Tensor& x, int64_t bins);
at::Tensor block_reverse(const at::Tensor& x, int64_t block);
void broken(int64_t mode, const at::Tensor& out);
at::Tensor shared_memory(int64_t dynamic_bytes, bool opt_in, std::vector<int64_t> grid,
                         std::vector<int64_t> block);
}  // namespace testing

// PTX primitive probes (testing_ptx.cuh).
namespace testing {
at::Tensor mma_probe(const at::Tensor& a_frag, const at::Tensor& b_frag, const at::Tensor& c_frag,
                     bool bf16);
at::Tensor ldmatrix_probe(const at::Tensor& x, const at::Tensor& lane_rows, int64_t col,
                          int64_t num, bool trans);
at::Tensor cp_async_probe(const at::Tensor& src, const at::Tensor& src_sizes, int64_t pending,
                          bool early_reads);
void ptx_broken(int64_t mode, const at::Tensor& out);
}  // namespace testing

}  // namespace moe
