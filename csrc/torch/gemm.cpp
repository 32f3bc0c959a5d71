#include "../kernels/gemm/gemm.h"

#include "common.h"
#include "quant.h"

namespace moe {

namespace {

// bf16 or f16 (the tensor-core operand types).
DType mma_dtype(const at::Tensor& t, const char* arg) {
  MOE_CHECK_TYPE(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, arg,
                 "expected bfloat16 or float16, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16 ? DType::bf16 : DType::f16;
}

// cp.async copies 16 bytes at a time from the tensor's rows.
void check_aligned16(const at::Tensor& t, const char* arg) {
  MOE_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, arg,
                  "expected a 16-byte aligned data pointer");
}

// The expert row layout: offsets [E + 1] int64 (contiguous) or counts [E] int32/int64
// (masked), exactly one of them; m rows of y, S rows per expert (masked).
ExpertRowLayout check_rows_layout(const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& counts,
                                  int64_t num_experts, int64_t m, int64_t rows_per_expert, const at::Tensor& ref) {
  MOE_CHECK_VALUE(offsets.has_value() != counts.has_value(), "offsets",
                  "expected exactly one of offsets (contiguous layout) and counts (masked layout)");
  ExpertRowLayout r;
  r.m = m;
  r.rows_per_expert = rows_per_expert;
  if (offsets) {
    check_input(*offsets, "offsets", at::kLong, 1, ref);
    MOE_CHECK_VALUE(offsets->size(0) == num_experts + 1, "offsets", "expected ", num_experts + 1,
                    " entries (num_experts + 1), got shape ", offsets->sizes());
    r.offsets = offsets->data_ptr<int64_t>();
  } else {
    check_same_device(*counts, ref, "counts");
    check_device(*counts, "counts");
    MOE_CHECK_TYPE(counts->scalar_type() == at::kInt || counts->scalar_type() == at::kLong, "counts",
                   "expected int32 or int64, got ", counts->scalar_type());
    check_dim(*counts, 1, "counts");
    check_contiguous(*counts, "counts");
    MOE_CHECK_VALUE(counts->size(0) == num_experts, "counts", "expected ", num_experts,
                    " entries (num_experts), got shape ", counts->sizes());
    r.counts = counts->data_ptr();
    r.counts_int64 = counts->scalar_type() == at::kLong;
  }
  return r;
}

void check_index(const at::Tensor& t, const char* arg, int64_t size, const at::Tensor& ref) {
  check_same_device(t, ref, arg);
  check_device(t, arg);
  MOE_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, arg,
                 "expected int32 or int64, got ", t.scalar_type());
  check_dim(t, 1, arg);
  check_contiguous(t, arg);
  MOE_CHECK_VALUE(t.size(0) == size, arg, "expected ", size, " entries, got shape ", t.sizes());
}

Activation activation_of(int64_t code) {
  MOE_CHECK_VALUE(code >= 0 && code <= static_cast<int64_t>(Activation::swiglu_oai), "activation",
                  "expected an activation code in [0, 8], got ", code);
  return static_cast<Activation>(code);
}

py::dict config_dict(const GemmConfig& c) {
  py::dict d;
  d["tile_m"] = c.tile_m;
  d["tile_n"] = c.tile_n;
  d["tile_k"] = c.tile_k;
  d["warps"] = c.warps;
  d["stages"] = c.stages;
  d["split_k"] = c.split_k;
  d["grid"] = c.grid;
  d["variant"] = std::string(c.variant);
  d["tile"] = static_cast<int>(c.tile);
  return d;
}

}  // namespace

// The weight operand, checked: 16-bit w, or a 4-bit weight.
struct WeightOperand {
  int64_t num_experts = 0, n = 0, k = 0;
  const void* w = nullptr;
  bool w_kn = false;
  bool quantized = false;
  QuantWeight qw;
};

// y = epilogue(x . w^T) per expert; also the product + bias when save_pre (for the backward).
std::tuple<at::Tensor, std::optional<at::Tensor>> grouped_gemm_checked(
    const at::Tensor& x, const WeightOperand& weight, const std::optional<at::Tensor>& offsets,
    const std::optional<at::Tensor>& counts, const std::optional<at::Tensor>& gather,
    const std::optional<at::Tensor>& bias, int64_t activation_code, double alpha, double limit,
    const std::optional<at::Tensor>& row_scale, bool save_pre, int64_t forced_tile) {
  const DType dtype = mma_dtype(x, "x");
  check_contiguous(x, "x");
  check_aligned16(x, "x");
  const int64_t E = weight.num_experts, n = weight.n, k = weight.k;
  const Activation activation = activation_of(activation_code);
  const bool masked = counts.has_value();
  int64_t m, x_rows, S = 0;
  if (masked) {
    MOE_CHECK_VALUE(x.dim() == 3 && x.size(0) == E && x.size(2) == k, "x", "expected [", E, ", S, ", k,
                    "] for the masked layout, got shape ", x.sizes());
    MOE_CHECK_VALUE(!gather.has_value(), "gather", "applies to the contiguous layout only");
    S = x.size(1);
    m = E * S;
    x_rows = m;
  } else {
    check_dim(x, 2, "x");
    MOE_CHECK_VALUE(x.size(1) == k, "x", "expected ", k, " columns (K of w), got shape ", x.sizes());
    x_rows = x.size(0);
    m = gather ? gather->size(0) : x_rows;
    if (gather) check_index(*gather, "gather", m, x);
  }
  MOE_CHECK_VALUE(m < (int64_t{1} << 31), "x", "expected fewer than 2^31 rows, got ", m);
  const ExpertRowLayout rows = check_rows_layout(offsets, counts, E, m, S, x);
  if (bias) {
    check_input(*bias, "bias", at::kFloat, 2, x);
    MOE_CHECK_VALUE(bias->size(0) == E && bias->size(1) == n, "bias", "expected shape [", E, ", ", n,
                    "], got ", bias->sizes());
  }
  if (row_scale) {
    check_input(*row_scale, "row_scale", at::kFloat, 1, x);
    MOE_CHECK_VALUE(row_scale->size(0) == m, "row_scale", "expected ", m, " entries (rows of y), got shape ",
                    row_scale->sizes());
  }
  MOE_CHECK_VALUE(forced_tile >= -1 && forced_tile <= static_cast<int64_t>(GemmTile::m16n64), "config",
                  "unknown tile ", forced_tile);

  const c10::DeviceGuard guard(x.device());
  const int64_t n_out = activation_is_gated(activation) ? n / 2 : n;
  at::Tensor y = masked ? at::empty({E, S, n_out}, x.options()) : at::empty({m, n_out}, x.options());
  std::optional<at::Tensor> pre;
  const auto f32 = x.options().dtype(at::kFloat);
  if (save_pre) pre = masked ? at::empty({E, S, n}, f32) : at::empty({m, n}, f32);
  at::Tensor workspace = at::empty({static_cast<int64_t>(grouped_gemm_workspace_bytes(static_cast<int>(E)))},
                                   x.options().dtype(at::kByte));
  GroupedGemmParams p;
  p.x = x.data_ptr();
  p.dtype = dtype;
  p.x_rows = x_rows;
  p.w = weight.w;
  p.w_kn = weight.w_kn;
  p.quantized = weight.quantized;
  p.qw = weight.qw;
  p.num_experts = static_cast<int>(E);
  p.n = n;
  p.k = k;
  p.rows = rows;
  p.gather = gather ? gather->data_ptr() : nullptr;
  p.gather_int64 = gather && gather->scalar_type() == at::kLong;
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  p.activation = activation;
  p.alpha = static_cast<float>(alpha);
  p.limit = static_cast<float>(limit);
  p.row_scale = row_scale ? row_scale->data_ptr<float>() : nullptr;
  p.y = y.data_ptr();
  p.pre_activation = pre ? pre->data_ptr<float>() : nullptr;
  p.workspace = workspace.data_ptr();
  p.forced_tile = static_cast<int>(forced_tile);
  launch_grouped_gemm(p, current_stream(x));
  return {y, pre};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> grouped_gemm(
    const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& offsets,
    const std::optional<at::Tensor>& counts, const std::optional<at::Tensor>& gather, bool w_kn,
    const std::optional<at::Tensor>& bias, int64_t activation_code, double alpha, double limit,
    const std::optional<at::Tensor>& row_scale, bool save_pre, int64_t forced_tile) {
  check_device(x, "x");
  mma_dtype(x, "x");
  check_input(w, "w", x.scalar_type(), 3, x);
  check_aligned16(w, "w");
  WeightOperand weight;
  weight.num_experts = w.size(0);
  weight.n = w_kn ? w.size(2) : w.size(1);
  weight.k = w_kn ? w.size(1) : w.size(2);
  MOE_CHECK_VALUE(weight.num_experts >= 1 && weight.num_experts <= kMaxExperts, "w", "expected 1 to ", kMaxExperts,
                  " experts, got shape ", w.sizes());
  MOE_CHECK_VALUE(weight.n % 8 == 0 && weight.k % 8 == 0 && weight.n > 0 && weight.k > 0, "w",
                  "expected N and K positive multiples of 8, got shape ", w.sizes());
  weight.w = w.data_ptr();
  weight.w_kn = w_kn;
  return grouped_gemm_checked(x, weight, offsets, counts, gather, bias, activation_code, alpha, limit, row_scale,
                              save_pre, forced_tile);
}

// The same with a 4-bit weight (codes [E, N, K / 2], scales and zeros [E, G, N]).
std::tuple<at::Tensor, std::optional<at::Tensor>> grouped_gemm_q4(
    const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
    int64_t format, int64_t group_size, const std::optional<at::Tensor>& offsets,
    const std::optional<at::Tensor>& counts, const std::optional<at::Tensor>& gather,
    const std::optional<at::Tensor>& bias, int64_t activation_code, double alpha, double limit,
    const std::optional<at::Tensor>& row_scale, bool save_pre, int64_t forced_tile) {
  check_device(x, "x");
  mma_dtype(x, "x");
  check_same_device(codes, x, "codes");
  const CheckedQuantWeight q = check_quant_weight(codes, scales, zeros, format, group_size);
  MOE_CHECK_VALUE(q.num_experts <= kMaxExperts, "codes", "expected 1 to ", kMaxExperts, " experts, got shape ",
                  codes.sizes());
  MOE_CHECK_VALUE(q.n % 8 == 0 && q.k % 32 == 0, "codes", "expected N a multiple of 8 and K of 32, got N = ", q.n,
                  ", K = ", q.k);
  MOE_CHECK_VALUE(group_size >= 32, "group_size", "expected at least 32, got ", group_size);
  WeightOperand weight;
  weight.num_experts = q.num_experts;
  weight.n = q.n;
  weight.k = q.k;
  weight.quantized = true;
  weight.qw = q.w;
  return grouped_gemm_checked(x, weight, offsets, counts, gather, bias, activation_code, alpha, limit, row_scale,
                              save_pre, forced_tile);
}

// out[e] = p_e^T q_e over expert e's rows (the weight gradient).
at::Tensor grouped_gemm_wgrad(const at::Tensor& pm, const std::optional<at::Tensor>& p_gather,
                              const at::Tensor& qm, const std::optional<at::Tensor>& q_gather,
                              int64_t num_experts, const std::optional<at::Tensor>& offsets,
                              const std::optional<at::Tensor>& counts, int64_t rows_per_expert, int64_t m) {
  check_device(pm, "p");
  const DType dtype = mma_dtype(pm, "p");
  check_dim(pm, 2, "p");
  check_contiguous(pm, "p");
  check_aligned16(pm, "p");
  check_input(qm, "q", pm.scalar_type(), 2, pm);
  check_aligned16(qm, "q");
  MOE_CHECK_VALUE(num_experts >= 1 && num_experts <= kMaxExperts, "num_experts", "expected 1 to ",
                  kMaxExperts, ", got ", num_experts);
  MOE_CHECK_VALUE(pm.size(1) % 8 == 0 && qm.size(1) % 8 == 0, "p", "expected columns that are multiples of 8, got ",
                  pm.sizes(), " and ", qm.sizes());
  const ExpertRowLayout rows = check_rows_layout(offsets, counts, num_experts, m, rows_per_expert, pm);
  MOE_CHECK_VALUE(m >= 0 && (counts.has_value() ? m == num_experts * rows_per_expert : true), "m",
                  "expected E * S rows for the masked layout, got ", m);
  if (p_gather) check_index(*p_gather, "p_gather", m, pm);
  if (q_gather) check_index(*q_gather, "q_gather", m, pm);
  MOE_CHECK_VALUE(p_gather || pm.size(0) == m, "p", "expected ", m, " rows, got shape ", pm.sizes());
  MOE_CHECK_VALUE(q_gather || qm.size(0) == m, "q", "expected ", m, " rows, got shape ", qm.sizes());
  MOE_CHECK_VALUE(!(p_gather && q_gather) || p_gather->scalar_type() == q_gather->scalar_type(), "q_gather",
                  "expected the dtype of p_gather");

  const c10::DeviceGuard guard(pm.device());
  at::Tensor out = at::empty({num_experts, pm.size(1), qm.size(1)}, pm.options());
  GroupedGemmWgradParams p;
  p.p = pm.data_ptr();
  p.p_rows = pm.size(0);
  p.p_cols = pm.size(1);
  p.p_gather = p_gather ? p_gather->data_ptr() : nullptr;
  p.q = qm.data_ptr();
  p.q_rows = qm.size(0);
  p.q_cols = qm.size(1);
  p.q_gather = q_gather ? q_gather->data_ptr() : nullptr;
  const at::Tensor* any_gather = p_gather ? &*p_gather : q_gather ? &*q_gather : nullptr;
  p.gather_int64 = any_gather != nullptr && any_gather->scalar_type() == at::kLong;
  p.dtype = dtype;
  p.num_experts = static_cast<int>(num_experts);
  p.rows = rows;
  p.out = out.data_ptr();
  launch_grouped_gemm_wgrad(p, current_stream(pm));
  return out;
}

// Gradient of the epilogue: (grad_pre, grad_row_scale).
std::tuple<at::Tensor, std::optional<at::Tensor>> gemm_activation_backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& pre, int64_t n, int64_t activation_code,
    double alpha, double limit, const std::optional<at::Tensor>& row_scale, bool need_grad_row_scale) {
  check_device(grad_y, "grad_y");
  const DType dtype = mma_dtype(grad_y, "grad_y");
  check_dim(grad_y, 2, "grad_y");
  check_contiguous(grad_y, "grad_y");
  const Activation activation = activation_of(activation_code);
  const int64_t m = grad_y.size(0);
  const int64_t n_out = activation_is_gated(activation) ? n / 2 : n;
  MOE_CHECK_VALUE(n > 0 && n % 2 == 0 && grad_y.size(1) == n_out, "grad_y", "expected ", n_out,
                  " columns, got shape ", grad_y.sizes());
  const bool needs_pre = activation != Activation::none || need_grad_row_scale;
  MOE_CHECK_VALUE(pre.has_value() || !needs_pre, "pre", "the activation's gradient needs the pre-activation");
  if (pre) {
    check_input(*pre, "pre", at::kFloat, 2, grad_y);
    MOE_CHECK_VALUE(pre->size(0) == m && pre->size(1) == n, "pre", "expected shape [", m, ", ", n, "], got ",
                    pre->sizes());
  }
  if (row_scale) {
    check_input(*row_scale, "row_scale", at::kFloat, 1, grad_y);
    MOE_CHECK_VALUE(row_scale->size(0) == m, "row_scale", "expected ", m, " entries, got shape ", row_scale->sizes());
  }
  const c10::DeviceGuard guard(grad_y.device());
  at::Tensor grad_pre = at::empty({m, n}, grad_y.options());
  std::optional<at::Tensor> grad_row_scale;
  if (need_grad_row_scale) grad_row_scale = at::empty({m}, grad_y.options().dtype(at::kFloat));
  GemmActivationBackwardParams p;
  p.grad_y = grad_y.data_ptr();
  p.pre = pre ? pre->data_ptr<float>() : nullptr;
  p.dtype = dtype;
  p.m = m;
  p.n = n;
  p.activation = activation;
  p.alpha = static_cast<float>(alpha);
  p.limit = static_cast<float>(limit);
  p.row_scale = row_scale ? row_scale->data_ptr<float>() : nullptr;
  p.grad_pre = grad_pre.data_ptr();
  p.grad_row_scale = grad_row_scale ? grad_row_scale->data_ptr<float>() : nullptr;
  launch_gemm_activation_backward(p, current_stream(grad_y));
  return {grad_pre, grad_row_scale};
}

// Per-expert column sums of in [m, n] (the bias gradient), float32 [E, n].
at::Tensor grouped_column_sum(const at::Tensor& in, int64_t num_experts, const std::optional<at::Tensor>& offsets,
                              const std::optional<at::Tensor>& counts, int64_t rows_per_expert) {
  check_device(in, "in");
  const DType dtype = mma_dtype(in, "in");
  check_dim(in, 2, "in");
  check_contiguous(in, "in");
  MOE_CHECK_VALUE(num_experts >= 1 && num_experts <= kMaxExperts, "num_experts", "expected 1 to ",
                  kMaxExperts, ", got ", num_experts);
  const ExpertRowLayout rows = check_rows_layout(offsets, counts, num_experts, in.size(0), rows_per_expert, in);
  MOE_CHECK_VALUE(!counts.has_value() || in.size(0) == num_experts * rows_per_expert, "in",
                  "expected E * S rows for the masked layout, got shape ", in.sizes());
  const c10::DeviceGuard guard(in.device());
  at::Tensor out = at::empty({num_experts, in.size(1)}, in.options().dtype(at::kFloat));
  GroupedColumnSumParams p;
  p.in = in.data_ptr();
  p.dtype = dtype;
  p.n = in.size(1);
  p.num_experts = static_cast<int>(num_experts);
  p.rows = rows;
  p.out = out.data_ptr<float>();
  launch_grouped_column_sum(p, current_stream(in));
  return out;
}

// out[t] = sum of in[rows[i]], i in [row_start[t], row_start[t + 1]) (the gradient through
// gather). rows and row_start come from a stable sort of gather (Python).
at::Tensor segment_row_sum(const at::Tensor& in, const at::Tensor& rows, const at::Tensor& row_start) {
  check_device(in, "in");
  const DType dtype = mma_dtype(in, "in");
  check_dim(in, 2, "in");
  check_contiguous(in, "in");
  check_input(rows, "rows", at::kLong, 1, in);
  check_input(row_start, "row_start", at::kLong, 1, in);
  MOE_CHECK_VALUE(row_start.size(0) >= 1, "row_start", "expected num_tokens + 1 entries");
  const c10::DeviceGuard guard(in.device());
  const int64_t T = row_start.size(0) - 1;
  at::Tensor out = at::empty({T, in.size(1)}, in.options());
  SegmentRowSumParams p;
  p.in = in.data_ptr();
  p.dtype = dtype;
  p.hidden = in.size(1);
  p.rows = rows.data_ptr<int64_t>();
  p.row_start = row_start.data_ptr<int64_t>();
  p.num_tokens = T;
  p.out = out.data_ptr();
  launch_segment_row_sum(p, current_stream(in));
  return out;
}

py::dict gemm_config(int64_t arch, int64_t num_sms, int64_t m, int64_t n, int64_t k, int64_t num_experts,
                     bool masked, int64_t rows_per_expert, int64_t activation_code, bool w_kn,
                     bool quantized, int64_t forced_tile) {
  const Activation activation = activation_of(activation_code);
  MOE_CHECK_VALUE(forced_tile >= -1 && forced_tile <= static_cast<int64_t>(GemmTile::m16n64), "config",
                  "unknown tile ", forced_tile);
  const GemmConfig c = forced_tile >= 0 ? gemm_tile_config(static_cast<GemmTile>(forced_tile), quantized)
                                        : choose_gemm_config(static_cast<int>(arch), static_cast<int>(num_sms), m, n, k,
                                                             static_cast<int>(num_experts), masked, rows_per_expert,
                                                             activation, w_kn, quantized);
  return config_dict(c);
}

void register_gemm(pybind11::module_& m) {
  m.def("grouped_gemm", &grouped_gemm, "Grouped expert GEMM with a fused epilogue", py::arg("x"), py::arg("w"),
        py::arg("offsets"), py::arg("counts"), py::arg("gather"), py::arg("w_kn"), py::arg("bias"),
        py::arg("activation"), py::arg("alpha"), py::arg("limit"), py::arg("row_scale"), py::arg("save_pre"),
        py::arg("forced_tile"));
  m.def("grouped_gemm_q4", &grouped_gemm_q4, "Grouped expert GEMM with 4-bit weights (W4A16)", py::arg("x"),
        py::arg("codes"), py::arg("scales"), py::arg("zeros"), py::arg("format"), py::arg("group_size"),
        py::arg("offsets"), py::arg("counts"), py::arg("gather"), py::arg("bias"), py::arg("activation"),
        py::arg("alpha"), py::arg("limit"), py::arg("row_scale"), py::arg("save_pre"), py::arg("forced_tile"));
  m.def("grouped_gemm_wgrad", &grouped_gemm_wgrad, "Per-expert p^T q over each expert's rows", py::arg("p"),
        py::arg("p_gather"), py::arg("q"), py::arg("q_gather"), py::arg("num_experts"), py::arg("offsets"),
        py::arg("counts"), py::arg("rows_per_expert"), py::arg("m"));
  m.def("gemm_activation_backward", &gemm_activation_backward, "Gradient of the grouped GEMM's epilogue",
        py::arg("grad_y"), py::arg("pre"), py::arg("n"), py::arg("activation"), py::arg("alpha"), py::arg("limit"),
        py::arg("row_scale"), py::arg("need_grad_row_scale"));
  m.def("grouped_column_sum", &grouped_column_sum, "Per-expert column sums (the bias gradient)", py::arg("in"),
        py::arg("num_experts"), py::arg("offsets"), py::arg("counts"), py::arg("rows_per_expert"));
  m.def("segment_row_sum", &segment_row_sum, "Sums of row segments (the gradient through gather)", py::arg("in"),
        py::arg("rows"), py::arg("row_start"));
  m.def("gemm_config", &gemm_config, "The grouped GEMM's tile configuration for a problem", py::arg("arch"),
        py::arg("num_sms"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("num_experts"), py::arg("masked"),
        py::arg("rows_per_expert"), py::arg("activation"), py::arg("w_kn"), py::arg("quantized"),
        py::arg("forced_tile"));
}

}  // namespace moe
