#include "../kernels/permute/permute.h"

#include "common.h"

namespace moe {

namespace {

int64_t round_up_host(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

void check_pair_weights(const at::Tensor& w, const at::Tensor& row_map_or_ids, const char* arg) {
  check_input(w, arg, at::kFloat, 2, row_map_or_ids);
  MOE_CHECK_VALUE(w.sizes() == row_map_or_ids.sizes(), arg, "expected shape ",
                  row_map_or_ids.sizes(), ", got ", w.sizes());
}

void check_rows(const at::Tensor& t, const char* arg) {
  check_device(t, arg);
  check_dim(t, 2, arg);
  check_contiguous(t, arg);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> permute(
    const at::Tensor& x, const at::Tensor& ids, const std::optional<at::Tensor>& weights,
    int64_t num_experts, int64_t capacity, int64_t align, bool drop_by_weight,
    int64_t expert_begin, int64_t expert_end) {
  check_rows(x, "x");
  const DType dtype = float_dtype(x, "x");
  check_input(ids, "ids", at::kInt, 2, x);
  MOE_CHECK_VALUE(ids.size(0) == x.size(0), "ids", "expected ", x.size(0),
                  " rows (one per token of x), got shape ", ids.sizes());
  const int64_t T = ids.size(0);
  const int64_t k = ids.size(1);
  MOE_CHECK_VALUE(k >= 1, "ids", "expected at least one column (k >= 1), got shape ", ids.sizes());
  MOE_CHECK_VALUE(T * k < (int64_t{1} << 31), "ids", "expected fewer than 2^31 entries, got ", T * k);
  MOE_CHECK_VALUE(num_experts >= 1 && num_experts <= kMaxExperts, "num_experts",
                  "expected 1 to ", kMaxExperts, ", got ", num_experts);
  MOE_CHECK_VALUE(capacity >= -1 && capacity < (int64_t{1} << 31), "capacity",
                  "expected -1 (dropless) or 0 <= capacity < 2^31, got ", capacity);
  MOE_CHECK_VALUE(align >= 1 && align <= (int64_t{1} << 20), "align",
                  "expected 1 <= align <= 2^20, got ", align);
  MOE_CHECK_VALUE(0 <= expert_begin && expert_begin < expert_end && expert_end <= num_experts,
                  "expert_range", "expected 0 <= start < end <= num_experts (", num_experts,
                  "), got (", expert_begin, ", ", expert_end, ")");
  if (weights) check_pair_weights(*weights, ids, "weights");
  MOE_CHECK_VALUE(!(drop_by_weight && capacity >= 0 && !weights), "weights",
                  "drop_policy 'weight' needs the routing weights");

  const c10::DeviceGuard guard(x.device());
  const int64_t H = x.size(1);
  // The static bound of the contract, from E even with an expert_range: known without the ids.
  const int64_t M = capacity < 0 ? T * k + num_experts * (align - 1)
                                  : num_experts * round_up_host(capacity, align);
  const auto i64 = ids.options().dtype(at::kLong);
  at::Tensor x_perm = at::empty({M, H}, x.options());
  at::Tensor row_map = at::empty({T, k}, i64);
  at::Tensor offsets = at::empty({num_experts + 1}, i64);
  at::Tensor num_rows = at::empty({1}, i64);
  at::Tensor seg_fill = at::empty({num_experts}, i64);
  std::optional<at::Tensor> weights_out;
  if (weights) weights_out = at::zeros({M}, weights->options());
  const size_t workspace_bytes =
      permute_index_workspace_bytes(T, static_cast<int>(k), static_cast<int>(num_experts));
  at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, ids.options().dtype(at::kByte));

  PermuteIndexParams p;
  p.ids = ids.data_ptr<int32_t>();
  p.weights = weights ? weights->data_ptr<float>() : nullptr;
  p.num_tokens = T;
  p.k = static_cast<int>(k);
  p.num_experts = static_cast<int>(num_experts);
  p.expert_begin = static_cast<int>(expert_begin);
  p.expert_end = static_cast<int>(expert_end);
  p.capacity = capacity;
  p.align = align;
  p.drop_by_weight = drop_by_weight;
  p.row_map = row_map.data_ptr<int64_t>();
  p.offsets = offsets.data_ptr<int64_t>();
  p.num_rows = num_rows.data_ptr<int64_t>();
  p.seg_fill = seg_fill.data_ptr<int64_t>();
  p.weights_out = weights_out ? weights_out->data_ptr<float>() : nullptr;
  p.workspace = workspace.data_ptr();
  const cudaStream_t stream = current_stream(x);
  launch_permute_index(p, stream);

  ScatterRowsParams s;
  s.x = x.data_ptr();
  s.dtype = dtype;
  s.num_tokens = T;
  s.hidden = H;
  s.k = static_cast<int>(k);
  s.row_map = p.row_map;
  s.out = x_perm.data_ptr();
  s.num_out_rows = M;
  s.offsets = p.offsets;
  s.seg_fill = p.seg_fill;
  s.num_experts = p.num_experts;
  // Dropless: a segment pads fewer than align rows; capacity: up to its whole slot.
  s.max_padding = capacity < 0 ? align - 1 : round_up_host(capacity, align);
  launch_scatter_rows(s, stream);
  return {x_perm, row_map, offsets, num_rows, weights_out};
}

at::Tensor unpermute(const at::Tensor& y_perm, const at::Tensor& row_map,
                     const std::optional<at::Tensor>& weights) {
  check_rows(y_perm, "y_perm");
  const DType dtype = float_dtype(y_perm, "y_perm");
  check_input(row_map, "row_map", at::kLong, 2, y_perm);
  if (weights) check_pair_weights(*weights, row_map, "weights");

  const c10::DeviceGuard guard(y_perm.device());
  const int64_t T = row_map.size(0);
  at::Tensor y = at::empty({T, y_perm.size(1)}, y_perm.options());
  GatherRowsParams p;
  p.in = y_perm.data_ptr();
  p.dtype = dtype;
  p.num_in_rows = y_perm.size(0);
  p.hidden = y_perm.size(1);
  p.num_tokens = T;
  p.k = static_cast<int>(row_map.size(1));
  p.row_map = row_map.data_ptr<int64_t>();
  p.weights = weights ? weights->data_ptr<float>() : nullptr;
  p.out = y.data_ptr();
  launch_gather_rows(p, current_stream(y_perm));
  return y;
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> unpermute_backward(
    const at::Tensor& grad_y, const at::Tensor& y_perm, const at::Tensor& row_map,
    const std::optional<at::Tensor>& weights, bool need_grad_y_perm, bool need_grad_weights) {
  check_rows(y_perm, "y_perm");
  const DType dtype = float_dtype(y_perm, "y_perm");
  check_rows(grad_y, "grad_y");
  check_same_device(grad_y, y_perm, "grad_y");
  check_dtype(grad_y, y_perm.scalar_type(), "grad_y");
  check_input(row_map, "row_map", at::kLong, 2, y_perm);
  MOE_CHECK_VALUE(grad_y.size(0) == row_map.size(0) && grad_y.size(1) == y_perm.size(1), "grad_y",
                  "expected shape [", row_map.size(0), ", ", y_perm.size(1), "], got ", grad_y.sizes());
  if (weights) check_pair_weights(*weights, row_map, "weights");
  MOE_CHECK_VALUE(!need_grad_weights || weights.has_value(), "weights",
                  "the weight gradient needs the weights");

  const c10::DeviceGuard guard(y_perm.device());
  const cudaStream_t stream = current_stream(y_perm);
  const int64_t T = row_map.size(0);
  const int k = static_cast<int>(row_map.size(1));
  std::optional<at::Tensor> grad_y_perm, grad_weights;
  if (need_grad_y_perm) {
    // Rows no assignment reads get zero gradient.
    grad_y_perm = at::zeros(y_perm.sizes(), y_perm.options());
    ScatterRowsParams s;
    s.x = grad_y.data_ptr();
    s.dtype = dtype;
    s.num_tokens = T;
    s.hidden = y_perm.size(1);
    s.k = k;
    s.row_map = row_map.data_ptr<int64_t>();
    s.scale = weights ? weights->data_ptr<float>() : nullptr;
    s.out = grad_y_perm->data_ptr();
    s.num_out_rows = y_perm.size(0);
    launch_scatter_rows(s, stream);
  }
  if (need_grad_weights) {
    grad_weights = at::empty({T, k}, weights->options());
    RowDotParams d;
    d.a = grad_y.data_ptr();
    d.b = y_perm.data_ptr();
    d.dtype = dtype;
    d.num_tokens = T;
    d.num_b_rows = y_perm.size(0);
    d.hidden = y_perm.size(1);
    d.k = k;
    d.row_map = row_map.data_ptr<int64_t>();
    d.out = grad_weights->data_ptr<float>();
    launch_row_dot(d, stream);
  }
  return {grad_y_perm, grad_weights};
}

void register_permute(pybind11::module_& m) {
  m.def("permute", &permute, "Token permutation into expert-contiguous rows", py::arg("x"),
        py::arg("ids"), py::arg("weights"), py::arg("num_experts"), py::arg("capacity"),
        py::arg("align"), py::arg("drop_by_weight"), py::arg("expert_begin"),
        py::arg("expert_end"));
  m.def("unpermute", &unpermute, "Weighted sum of each token's permuted rows",
        py::arg("y_perm"), py::arg("row_map"), py::arg("weights"));
  m.def("unpermute_backward", &unpermute_backward, "Gradients of unpermute",
        py::arg("grad_y"), py::arg("y_perm"), py::arg("row_map"), py::arg("weights"),
        py::arg("need_grad_y_perm"), py::arg("need_grad_weights"));
}

}  // namespace moe
