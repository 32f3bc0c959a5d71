// Tensor-core matrix multiply-accumulate: mma.sync.aligned.m16n8k16.row.col with fp32
// accumulators, bf16 x bf16 or f16 x f16 inputs. One wrapper per PTX instruction.
//
// PTX ISA "Warp-level Matrix Instructions: mma" (the instruction) and 9.7.14.5.8 "Matrix
// Fragments for mma.m16n8k16 with floating point type" (the layouts; PTX ISA 9.x numbering).
// A warp computes D (16x8) = A (16x16, row-major) * B (16x8, column-major) + C. Each lane
// holds a fragment; with groupID = lane >> 2 and threadID_in_group = lane % 4 (g and t):
//
//   A: 4 x .b32, each two b16 elements (the lower-indexed one in the low 16 bits), a0..a7:
//        row = g      for a0, a1, a4, a5;   g + 8 for a2, a3, a6, a7
//        col = 2t + (i & 1)  for i < 4;     2t + (i & 1) + 8 for i >= 4
//      so reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..], reg3 = A[g+8][2t+8..]
//   B: 2 x .b32, b0..b3:  row (k) = 2t + (i & 1) (+ 8 for i >= 2),  col (n) = g
//      so reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]  (a column of B is a row of B^T,
//      which is why a "col" B is stored n-major, [n][k], in memory)
//   C, D: 4 x .f32, c0..c3:  row = g for c0, c1;  g + 8 for c2, c3;  col = 2t + (i & 1)
//
// Numerics of the emulator: every product a*b is exact in fp32 (8 x 8 significand bits for
// bf16, 11 x 11 for f16: at most 22 bits, unless the product leaves fp32's range); then
//   d = c;  for k = 0..15: d = d + A[m][k] * B[k][n]   (in k order, each add rounded to
// nearest even in fp32). Because the product is exact, a compiler contracting this into an
// fma gives the same bits.
// The GPU does not round each add as IEEE does: its tensor cores add the exact products in
// blocks, with the significands aligned to the largest exponent and truncated, then add C,
// in an order and grouping the ISA does not specify. Write S = sum_k |A[m][k] * B[k][n]| +
// |C[m][n]| (17 terms). Each of the 17 terms can lose less than one unit in the last place
// of a partial sum of magnitude <= S when it is aligned (truncation: 2^-23 relative, twice
// the 2^-24 of round-to-nearest), and the final normalization loses at most one more, so
//   |d - exact| <= 18 * 2^-23 * S
// for any order and grouping, truncating or rounding; the emulator's 16 rounded adds stay
// within 16 * 2^-24 * S (recursive summation). The tests use K * 2^-23 * S with K = 32 (a
// margin for internals the ISA does not document; a wrong layout misses by orders of
// magnitude more) against a float64 reference, and check the emulator bit for bit against
// the order above. Inputs whose partial sums are all exact in fp32 (small integers) give
// exact, equal results on both.
#pragma once

#include "platform.cuh"

namespace moe {

// Per-lane fragments of mma.m16n8k16 (layouts above).
struct MmaFragA {
  uint32_t reg[4];  // 8 bf16/f16 elements of A
};
struct MmaFragB {
  uint32_t reg[2];  // 4 bf16/f16 elements of B
};
struct MmaFragC {
  float reg[4];  // 4 fp32 elements of C or D
};

#if defined(MOE_KERNELS_SIMT)
namespace detail {

struct MmaOperands {
  MmaFragA a;
  MmaFragB b;
  MmaFragC c;
};

// The emulated instruction (csrc/simt/tensor_core.cpp, emulator code that the memory
// observer does not instrument): decodes all 32 lanes' fragments per the layout above,
// computes D in the documented order and writes every lane's D fragment. It runs once per
// warp, on the fiber of the last lane to arrive at simt::warp_matrix_op.
void mma_m16n8k16_compute_bf16(const void* const* in, void* const* out);
void mma_m16n8k16_compute_f16(const void* const* in, void* const* out);

}  // namespace detail
#endif

// d = a * b + c, bf16 inputs (PTX mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32).
// Every lane of the warp must call it (.aligned); `d` may be `c`.
__device__ __forceinline__ void mma_m16n8k16_bf16(MmaFragC& d, const MmaFragA& a,
                                                  const MmaFragB& b, const MmaFragC& c) {
#if defined(MOE_KERNELS_SIMT)
  const detail::MmaOperands in{a, b, c};
  MmaFragC result;
  simt::warp_matrix_op("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", &in, &result,
                       &detail::mma_m16n8k16_compute_bf16);
  d = result;
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d.reg[0]), "=f"(d.reg[1]), "=f"(d.reg[2]), "=f"(d.reg[3])
      : "r"(a.reg[0]), "r"(a.reg[1]), "r"(a.reg[2]), "r"(a.reg[3]), "r"(b.reg[0]), "r"(b.reg[1]),
        "f"(c.reg[0]), "f"(c.reg[1]), "f"(c.reg[2]), "f"(c.reg[3]));
#endif
}

// d = a * b + c, f16 inputs (PTX mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32).
// Every lane of the warp must call it (.aligned); `d` may be `c`.
__device__ __forceinline__ void mma_m16n8k16_f16(MmaFragC& d, const MmaFragA& a,
                                                 const MmaFragB& b, const MmaFragC& c) {
#if defined(MOE_KERNELS_SIMT)
  const detail::MmaOperands in{a, b, c};
  MmaFragC result;
  simt::warp_matrix_op("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", &in, &result,
                       &detail::mma_m16n8k16_compute_f16);
  d = result;
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d.reg[0]), "=f"(d.reg[1]), "=f"(d.reg[2]), "=f"(d.reg[3])
      : "r"(a.reg[0]), "r"(a.reg[1]), "r"(a.reg[2]), "r"(a.reg[3]), "r"(b.reg[0]), "r"(b.reg[1]),
        "f"(c.reg[0]), "f"(c.reg[1]), "f"(c.reg[2]), "f"(c.reg[3]));
#endif
}

}  // namespace moe
