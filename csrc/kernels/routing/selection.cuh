// Selection keys shared by the routing kernels: one 64-bit max() picks the larger score
// and, on a tie, the lower index.
#pragma once

#include "../common/platform.cuh"
#include "../common/reduce.cuh"

namespace moe {

// Maps a float to an unsigned int whose unsigned order is the float order. NaN ranks as
// -inf (documented: a NaN score is never chosen ahead of a number); -0 equals +0.
__device__ __forceinline__ uint32_t ordered_bits(float x) {
  if (x != x) x = -INFINITY;
  if (x == 0.f) x = 0.f;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The float whose ordered_bits are `bits` (NaN comes back as -inf, -0 as +0).
__device__ __forceinline__ float ordered_bits_to_float(uint32_t bits) {
  return __uint_as_float((bits & 0x80000000u) ? (bits & 0x7fffffffu) : ~bits);
}

// key = ordered_bits(score) << 32 | ~index: larger score first, then lower index. Every
// real key is > 0 (ordered_bits(-inf) > 0), so 0 means "nothing".
__device__ __forceinline__ uint64_t selection_key_from_bits(uint32_t bits, uint32_t index) {
  return (static_cast<uint64_t>(bits) << 32) | (0xffffffffu - index);
}
__device__ __forceinline__ uint64_t selection_key(float score, uint32_t index) {
  return selection_key_from_bits(ordered_bits(score), index);
}

__device__ __forceinline__ uint32_t key_index(uint64_t key) {
  return 0xffffffffu - static_cast<uint32_t>(key);
}
__device__ __forceinline__ float key_value(uint64_t key) {
  return ordered_bits_to_float(static_cast<uint32_t>(key >> 32));
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

// The score functions and their logarithms, written as the reference writes them (torch's
// CPU formulas) so both round alike. log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)) never
// overflows; it is finite where sigmoid(x) underflows to 0 (x < -88).
__device__ __forceinline__ float log_sigmoidf(float x) {
  return fminf(x, 0.f) - log1pf(expf(-fabsf(x)));
}
// softplus(x) = log(1 + e^x): torch's threshold 20 (above it the log1p term is below half
// an ulp of x).
__device__ __forceinline__ float softplusf(float x) { return x > 20.f ? x : log1pf(expf(x)); }
// log(softplus(x)): below -15, softplus(x) = e^x (1 - e^x / 2 + ...) equals e^x to float32
// precision, so the log is x itself (and stays finite where softplus underflows, x < -103).
__device__ __forceinline__ float log_softplusf(float x) {
  return x < -15.f ? x : logf(softplusf(x));
}
// sqrt(softplus(x)) as exp(log(softplus(x)) / 2): e^(x/2) below -15, where softplus(x)
// itself would round to a denormal or 0 long before its square root does.
__device__ __forceinline__ float sqrtsoftplusf(float x) { return expf(0.5f * log_softplusf(x)); }
// d sqrtsoftplus / dx = sigmoid(x) / (2 sqrt(softplus(x))): below -15 that is e^(x/2) / 2
// (the quotient of two underflowing values otherwise).
__device__ __forceinline__ float sqrtsoftplus_gradf(float x) {
  return x < -15.f ? 0.5f * expf(0.5f * x) : sigmoidf(x) / (2.f * sqrtsoftplusf(x));
}

namespace routing {

// Softmax statistics of a row of E logits, computed by one warp: max and
// 1 / sum(exp(x - max)) in one pass over the row (online: the running sum is rescaled when
// the running max grows), so a kernel that reads the row again reads it twice in all. A
// NaN logit or an infinite max (a +inf logit, a row of only -inf) makes the sum NaN.
// Every lane gets the same bits. With `stage` (E elements), each lane also keeps the
// elements it read (e = lane mod 32) there, for a second pass of its own over them.
template <typename T>
__device__ __forceinline__ void warp_softmax_stats(const T* row, int E, float* row_max,
                                                   float* inv_sum, T* stage = nullptr) {
  const int lane = threadIdx.x % 32;
  float m = -INFINITY, sum = 0.f;
  for (int e = lane; e < E; e += 32) {
    const T raw = row[e];
    if (stage != nullptr) stage[e] = raw;
    const float v = to_float(raw);
    if (v > m) {
      sum = sum * expf(m - v) + 1.f;  // m = -inf: sum is still 0
      m = v;
    } else if (v != -INFINITY) {  // -inf adds 0 (and -inf - -inf would be NaN)
      sum += expf(v - m);
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other_m = __shfl_xor_sync(kFullMask, m, offset);
    const float other_sum = __shfl_xor_sync(kFullMask, sum, offset);
    const float new_m = fmaxf(m, other_m);
    // An empty part (sum 0, max -inf) adds nothing, also when both maxes are -inf.
    sum = (sum == 0.f ? 0.f : sum * expf(m - new_m)) +
          (other_sum == 0.f ? 0.f : other_sum * expf(other_m - new_m));
    m = new_m;
  }
  if (m == INFINITY || m == -INFINITY) sum = NAN;
  *row_max = m;
  *inv_sum = 1.f / sum;
}

}  // namespace routing

}  // namespace moe
