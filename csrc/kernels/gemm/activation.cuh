// The epilogue activations of the grouped GEMM and their derivatives, in fp32.
// Formulas (the reference, moe_kernels/reference/gemm.py, writes the same ones in PyTorch):
//   relu(v) = max(v, 0)
//   gelu(v) = v / 2 * (1 + erf(v / sqrt(2)))
//   gelu_tanh(v) = v / 2 * (1 + tanh(sqrt(2 / pi) * (v + 0.044715 v^3)))
//   silu(v) = v * sigmoid(v)
//   <act>_and_mul(gate, up) = act(gate) * up
//   swiglu_oai(gate, up) = (u + 1) * g * sigmoid(alpha * g), g = min(gate, limit),
//                          u = clamp(up, -limit, limit)   (GPT-OSS)
// The clamps pass the gradient where the input lies inside the bounds, ends included
// (torch.clamp's rule).
#pragma once

#include "../common/platform.cuh"
#include "gemm.h"

namespace moe {
namespace gemm {

constexpr float kSqrtHalf = 0.70710678118654752f;     // 1 / sqrt(2)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1 / sqrt(2 pi)
constexpr float kGeluTanhCubic = 0.044715f;

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

// The elementwise activation of a non-gated epilogue (and the gate function of a gated one).
__device__ __forceinline__ float activate(Activation a, float v) {
  switch (a) {
    case Activation::relu: return v > 0.f ? v : 0.f;
    case Activation::gelu:
    case Activation::gelu_and_mul: return 0.5f * v * (1.f + erff(v * kSqrtHalf));
    case Activation::gelu_tanh:
    case Activation::gelu_tanh_and_mul:
      return 0.5f * v * (1.f + tanhf(kSqrt2OverPi * (v + kGeluTanhCubic * v * v * v)));
    case Activation::silu:
    case Activation::silu_and_mul: return v * sigmoid(v);
    default: return v;
  }
}

// d activate(v) / dv.
__device__ __forceinline__ float activate_grad(Activation a, float v) {
  switch (a) {
    case Activation::relu: return v > 0.f ? 1.f : 0.f;
    case Activation::gelu:
    case Activation::gelu_and_mul:
      return 0.5f * (1.f + erff(v * kSqrtHalf)) + v * kInvSqrt2Pi * expf(-0.5f * v * v);
    case Activation::gelu_tanh:
    case Activation::gelu_tanh_and_mul: {
      const float th = tanhf(kSqrt2OverPi * (v + kGeluTanhCubic * v * v * v));
      return 0.5f * (1.f + th) +
             0.5f * v * (1.f - th * th) * kSqrt2OverPi * (1.f + 3.f * kGeluTanhCubic * v * v);
    }
    case Activation::silu:
    case Activation::silu_and_mul: {
      const float s = sigmoid(v);
      return s * (1.f + v * (1.f - s));
    }
    default: return 1.f;
  }
}

__device__ __forceinline__ float gated_activate(Activation a, float gate, float up) {
  return activate(a, gate) * up;
}

__device__ __forceinline__ float swiglu_oai(float gate, float up, float alpha, float limit) {
  const float g = gate < limit ? gate : limit;
  const float u = up < -limit ? -limit : up > limit ? limit : up;
  return (u + 1.f) * g * sigmoid(alpha * g);
}

// Gradients of swiglu_oai with respect to gate and up, for an upstream gradient dy.
__device__ __forceinline__ void swiglu_oai_grad(float gate, float up, float alpha, float limit, float dy,
                                                float& d_gate, float& d_up) {
  const float g = gate < limit ? gate : limit;
  const float u = up < -limit ? -limit : up > limit ? limit : up;
  const float s = sigmoid(alpha * g);
  const float dg = (u + 1.f) * (s + alpha * g * s * (1.f - s));
  d_gate = gate <= limit ? dy * dg : 0.f;
  d_up = (up >= -limit && up <= limit) ? dy * g * s : 0.f;
}

}  // namespace gemm
}  // namespace moe
