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

// Rows of the outputs (the static bound M): row indices then fit in int32.
constexpr int64_t kMaxRows = (int64_t{1} << 31) - 1;

struct Plan {
  at::Tensor row_map, offsets, gather, num_rows;
  std::optional<at::Tensor> weights;
};

// The index stage (permute_plan): checks its arguments, allocates and launches.
Plan run_permute_plan(const at::Tensor& ids, const std::optional<at::Tensor>& weights,
                      int64_t num_experts, int64_t capacity, int64_t align, bool drop_by_weight,
                      int64_t expert_begin, int64_t expert_end,
                      const std::optional<at::Tensor>& expert_map) {
  check_device(ids, "ids");
  MOE_CHECK_TYPE(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, "ids",
                 "expected dtype int32 or int64, got ", ids.scalar_type());
  check_dim(ids, 2, "ids");
  check_contiguous(ids, "ids");
  const int64_t T = ids.size(0);
  const int64_t k = ids.size(1);
  MOE_CHECK_VALUE(k >= 1, "ids", "expected at least one column (k >= 1), got shape ", ids.sizes());
  MOE_CHECK_VALUE(T * k < (int64_t{1} << 31), "ids", "expected fewer than 2^31 entries, got ", T * k);
  MOE_CHECK_VALUE(num_experts >= 1 && num_experts <= kMaxExperts, "num_experts",
                  "expected 1 to ", kMaxExperts, ", got ", num_experts);
  MOE_CHECK_VALUE(capacity >= -1 && capacity <= kMaxRows, "capacity",
                  "expected -1 (dropless) or 0 <= capacity < 2^31, got ", capacity);
  MOE_CHECK_VALUE(align >= 1 && align <= kMaxAlign, "align",
                  "expected 1 <= align <= ", kMaxAlign, ", got ", align);
  MOE_CHECK_VALUE(0 <= expert_begin && expert_begin < expert_end && expert_end <= num_experts,
                  "expert_range", "expected 0 <= start < end <= num_experts (", num_experts,
                  "), got (", expert_begin, ", ", expert_end, ")");
  if (weights) check_pair_weights(*weights, ids, "weights");
  if (expert_map) {
    // Its entries are not read here (on a GPU that would be a host sync): the kernels
    // treat any value safely.
    check_input(*expert_map, "expert_map", at::kInt, 1, ids);
    MOE_CHECK_VALUE(expert_map->size(0) == num_experts, "expert_map", "expected ", num_experts,
                    " entries (num_experts), got shape ", expert_map->sizes());
  }
  MOE_CHECK_VALUE(!(drop_by_weight && capacity >= 0 && !weights), "weights",
                  "drop_policy 'weight' needs the routing weights");
  // The static bound of the contract, from E even with an expert_range: known without the ids.
  const int64_t M = capacity < 0 ? T * k + num_experts * (align - 1)
                                  : num_experts * round_up_host(capacity, align);
  MOE_CHECK_VALUE(M <= kMaxRows, capacity < 0 ? "align" : "capacity",
                  "the outputs would have ", M, " rows (", capacity < 0
                      ? "T*k + num_experts * (align - 1)" : "num_experts * round_up(capacity, align)",
                  "); expected at most 2^31 - 1");

  const c10::DeviceGuard guard(ids.device());
  const auto i64 = ids.options().dtype(at::kLong);
  Plan plan;
  plan.row_map = at::empty({T, k}, i64);
  plan.offsets = at::empty({num_experts + 1}, i64);
  plan.gather = at::full({M}, -1, i64);  // the index stage writes the rows that hold a token
  plan.num_rows = at::empty({1}, i64);
  if (weights) plan.weights = at::zeros({M}, weights->options());
  const size_t workspace_bytes =
      permute_index_workspace_bytes(T, static_cast<int>(k), static_cast<int>(num_experts), drop_by_weight && capacity >= 0);
  at::Tensor workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, ids.options().dtype(at::kByte));

  PermuteIndexParams p;
  p.ids = ids.data_ptr();
  p.ids_int64 = ids.scalar_type() == at::kLong;
  p.weights = weights ? weights->data_ptr<float>() : nullptr;
  p.num_tokens = T;
  p.k = static_cast<int>(k);
  p.num_experts = static_cast<int>(num_experts);
  p.expert_begin = static_cast<int>(expert_begin);
  p.expert_end = static_cast<int>(expert_end);
  p.expert_map = expert_map ? expert_map->data_ptr<int32_t>() : nullptr;
  p.capacity = capacity;
  p.align = align;
  p.drop_by_weight = drop_by_weight;
  p.row_map = plan.row_map.data_ptr<int64_t>();
  p.offsets = plan.offsets.data_ptr<int64_t>();
  p.num_rows = plan.num_rows.data_ptr<int64_t>();
  p.gather = plan.gather.data_ptr<int64_t>();
  p.weights_out = plan.weights ? plan.weights->data_ptr<float>() : nullptr;
  p.workspace = workspace.data_ptr();
  launch_permute_index(p, current_stream(ids));
  return plan;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> permute_plan(
    const at::Tensor& ids, const std::optional<at::Tensor>& weights, int64_t num_experts,
    int64_t capacity, int64_t align, bool drop_by_weight, int64_t expert_begin, int64_t expert_end,
    const std::optional<at::Tensor>& expert_map) {
  Plan plan = run_permute_plan(ids, weights, num_experts, capacity, align, drop_by_weight,
                               expert_begin, expert_end, expert_map);
  return {plan.row_map, plan.offsets, plan.gather, plan.num_rows, plan.weights};
}

// permute = the plan + the row stage.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> permute(
    const at::Tensor& x, const at::Tensor& ids, const std::optional<at::Tensor>& weights,
    int64_t num_experts, int64_t capacity, int64_t align, bool drop_by_weight,
    int64_t expert_begin, int64_t expert_end, const std::optional<at::Tensor>& expert_map) {
  check_rows(x, "x");
  const DType dtype = float_dtype(x, "x");
  check_same_device(ids, x, "ids");
  check_dim(ids, 2, "ids");
  MOE_CHECK_VALUE(ids.size(0) == x.size(0), "ids", "expected ", x.size(0),
                  " rows (one per token of x), got shape ", ids.sizes());
  Plan plan = run_permute_plan(ids, weights, num_experts, capacity, align, drop_by_weight,
                               expert_begin, expert_end, expert_map);

  const c10::DeviceGuard guard(x.device());
  const int64_t M = plan.gather.size(0);
  at::Tensor x_perm = at::empty({M, x.size(1)}, x.options());
  ScatterRowsParams s;
  s.x = x.data_ptr();
  s.dtype = dtype;
  s.num_tokens = ids.size(0);
  s.hidden = x.size(1);
  s.k = static_cast<int>(ids.size(1));
  s.row_map = plan.row_map.data_ptr<int64_t>();
  s.out = x_perm.data_ptr();
  s.num_out_rows = M;
  s.gather = plan.gather.data_ptr<int64_t>();
  launch_scatter_rows(s, current_stream(x));
  return {x_perm, plan.row_map, plan.offsets, plan.num_rows, plan.weights};
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
        py::arg("expert_end"), py::arg("expert_map") = py::none());
  m.def("permute_plan", &permute_plan, "Row layout of permute (the index stage alone)",
        py::arg("ids"), py::arg("weights"), py::arg("num_experts"), py::arg("capacity"),
        py::arg("align"), py::arg("drop_by_weight"), py::arg("expert_begin"),
        py::arg("expert_end"), py::arg("expert_map") = py::none());
  m.def("unpermute", &unpermute, "Weighted sum of each token's permuted rows",
        py::arg("y_perm"), py::arg("row_map"), py::arg("weights"));
  m.def("unpermute_backward", &unpermute_backward, "Gradients of unpermute",
        py::arg("grad_y"), py::arg("y_perm"), py::arg("row_map"), py::arg("weights"),
        py::arg("need_grad_y_perm"), py::arg("need_grad_weights"));
}

}  // namespace moe
