// Host adapters: validate, allocate, fill a params struct, launch. Bound in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace moe {

std::tuple<at::Tensor, at::Tensor> topk_gating(const at::Tensor& logits, int64_t k,
                                               bool renormalize);

namespace testing {
at::Tensor block_sum(const at::Tensor& x, int64_t block);
at::Tensor transpose(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor> warp_scan(const at::Tensor& x);
at::Tensor histogram(const at::Tensor& x, int64_t bins);
at::Tensor block_reverse(const at::Tensor& x, int64_t block);
void broken(int64_t mode, const at::Tensor& out);
}  // namespace testing

}  // namespace moe
