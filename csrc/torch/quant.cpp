// Host adapters of the 4-bit weight kernels: dequantize and quantize_int4.
#include "quant.h"

namespace moe {

CheckedQuantWeight check_quant_weight(const at::Tensor& codes, const at::Tensor& scales,
                                      const std::optional<at::Tensor>& zeros, int64_t format, int64_t group_size) {
  check_device(codes, "codes");
  check_input(codes, "codes", at::kByte, 3);
  MOE_CHECK_VALUE(format == 0 || format == 1, "format", "expected 0 (int4) or 1 (mxfp4), got ", format);
  const bool mxfp4 = format == 1;
  const int64_t E = codes.size(0), n = codes.size(1), k = 2 * codes.size(2);
  MOE_CHECK_VALUE(E >= 1 && n >= 1 && k >= 2, "codes", "expected a non-empty [E, N, K / 2], got shape ", codes.sizes());
  MOE_CHECK_VALUE(group_size >= 1 && k % group_size == 0 && (group_size % 32 == 0 || group_size == k), "group_size",
                  "expected a multiple of 32 dividing K = ", k, ", or K itself, got ", group_size);
  MOE_CHECK_VALUE(!mxfp4 || group_size == 32, "group_size", "mxfp4 groups are 32, got ", group_size);
  check_same_device(scales, codes, "scales");
  check_contiguous(scales, "scales");
  check_dim(scales, 3, "scales");
  if (mxfp4) {
    MOE_CHECK_TYPE(scales.scalar_type() == at::kByte, "scales", "expected uint8 (e8m0) for mxfp4, got ",
                   scales.scalar_type());
  } else {
    MOE_CHECK_TYPE(scales.scalar_type() == at::kBFloat16 || scales.scalar_type() == at::kHalf, "scales",
                   "expected bfloat16 or float16, got ", scales.scalar_type());
  }
  const int64_t groups = k / group_size;
  MOE_CHECK_VALUE(scales.size(0) == E && scales.size(1) == groups && scales.size(2) == n, "scales", "expected [", E,
                  ", ", groups, ", ", n, "], got shape ", scales.sizes());
  // 16-byte pieces (the GEMM's cp.async, the dequantize kernel's code words).
  auto check_aligned = [](const at::Tensor& t, const char* arg) {
    MOE_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, arg,
                    "expected a 16-byte aligned data pointer (a fresh tensor or .clone())");
  };
  check_aligned(codes, "codes");
  check_aligned(scales, "scales");
  QuantWeight w;
  if (zeros) {
    MOE_CHECK_VALUE(!mxfp4, "zeros", "mxfp4 has no zero points");
    check_same_device(*zeros, codes, "zeros");
    check_input(*zeros, "zeros", at::kByte, 3);
    MOE_CHECK_VALUE(zeros->sizes() == scales.sizes(), "zeros", "expected the shape of scales ", scales.sizes(),
                    ", got ", zeros->sizes());
    check_aligned(*zeros, "zeros");
    w.zeros = zeros->data_ptr<uint8_t>();
  }
  w.format = mxfp4 ? QuantFormat::mxfp4 : QuantFormat::int4;
  w.codes = codes.data_ptr<uint8_t>();
  w.scales = scales.data_ptr();
  w.scale_type = mxfp4 ? ScaleType::e8m0 : scales.scalar_type() == at::kBFloat16 ? ScaleType::bf16 : ScaleType::f16;
  w.group_size = group_size;
  return {w, E, n, k};
}

namespace {

// out [E, N, K] in dtype (bf16, f16 or f32).
at::Tensor dequantize(const at::Tensor& codes, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                      int64_t format, int64_t group_size, at::ScalarType dtype) {
  const CheckedQuantWeight q = check_quant_weight(codes, scales, zeros, format, group_size);
  MOE_CHECK_TYPE(dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat, "dtype",
                 "expected bfloat16, float16 or float32, got ", dtype);
  const c10::DeviceGuard guard(codes.device());
  at::Tensor out = at::empty({q.num_experts, q.n, q.k}, codes.options().dtype(dtype));
  DequantizeParams p;
  p.w = q.w;
  p.num_experts = static_cast<int>(q.num_experts);
  p.n = q.n;
  p.k = q.k;
  p.out = out.data_ptr();
  p.out_dtype = float_dtype(out, "dtype");
  launch_dequantize(p, current_stream(codes));
  return out;
}

// (codes, scales, zeros or None) of w [E, N, K].
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> quantize_int4(const at::Tensor& w, int64_t group_size,
                                                                           bool symmetric,
                                                                           at::ScalarType scale_dtype) {
  check_device(w, "w");
  const DType dtype = float_dtype(w, "w");
  check_contiguous(w, "w");
  check_dim(w, 3, "w");
  const int64_t E = w.size(0), n = w.size(1), k = w.size(2);
  MOE_CHECK_VALUE(E >= 1 && n >= 1 && k >= 2 && k % 2 == 0, "w", "expected a non-empty [E, N, K] with K even, got shape ",
                  w.sizes());
  MOE_CHECK_VALUE(group_size >= 2 && group_size % 2 == 0 && k % group_size == 0, "group_size",
                  "expected an even divisor of K = ", k, ", got ", group_size);
  MOE_CHECK_TYPE(scale_dtype == at::kBFloat16 || scale_dtype == at::kHalf, "scale_dtype",
                 "expected bfloat16 or float16, got ", scale_dtype);
  const c10::DeviceGuard guard(w.device());
  const int64_t groups = k / group_size;
  at::Tensor codes = at::empty({E, n, k / 2}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({E, groups, n}, w.options().dtype(scale_dtype));
  std::optional<at::Tensor> zeros;
  if (!symmetric) zeros = at::empty({E, groups, n}, w.options().dtype(at::kByte));
  QuantizeInt4Params p;
  p.w = w.data_ptr();
  p.dtype = dtype;
  p.num_experts = static_cast<int>(E);
  p.n = n;
  p.k = k;
  p.group_size = group_size;
  p.symmetric = symmetric;
  p.codes = codes.data_ptr<uint8_t>();
  p.scales = scales.data_ptr();
  p.scale_dtype = scale_dtype == at::kBFloat16 ? DType::bf16 : DType::f16;
  p.zeros = zeros ? zeros->data_ptr<uint8_t>() : nullptr;
  launch_quantize_int4(p, current_stream(w));
  return {codes, scales, zeros};
}

}  // namespace

void register_quant(pybind11::module_& m) {
  m.def("dequantize", &dequantize, "A 4-bit weight's values", py::arg("codes"), py::arg("scales"), py::arg("zeros"),
        py::arg("format"), py::arg("group_size"), py::arg("dtype"));
  m.def("quantize_int4", &quantize_int4, "Round-to-nearest int4 quantization", py::arg("w"), py::arg("group_size"),
        py::arg("symmetric"), py::arg("scale_dtype"));
}

}  // namespace moe
