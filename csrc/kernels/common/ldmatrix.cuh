// Warp-wide loads of 8x8 b16 matrices from shared memory into mma fragments:
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16. One wrapper per PTX instruction.
//
// PTX ISA 9.7.14.5.15 "Warp-level matrix load instruction: ldmatrix". With .x1, .x2 or
// .x4 the warp loads 1, 2 or 4 matrices of 8 rows x 8 b16 elements (16 bytes per row).
// Lanes 8m .. 8m+7 supply the row addresses of matrix m (lanes 0-7 for .x1, 0-15 for .x2,
// 0-31 for .x4; on sm_80+ the other lanes' addresses are ignored). Each row address must
// point into shared memory and be 16-byte aligned. Every lane receives one .b32 register
// per matrix: register m of lane l holds row l / 4, columns 2 * (l % 4) and 2 * (l % 4) + 1
// of matrix m (the lower column in the low 16 bits), which is exactly the A/B/C fragment
// layout of mma (row = groupID, col = 2 * threadID_in_group). With .trans each matrix is
// transposed on the way: register m of lane l holds the elements at rows 2 * (l % 4) and
// 2 * (l % 4) + 1, column l / 4, of the matrix as stored.
//
// Every lane of the warp must call the same wrapper (.sync.aligned).
#pragma once

#include "platform.cuh"

namespace moe {

#if defined(MOE_KERNELS_SIMT)
namespace detail {

// The emulated ldmatrix (csrc/simt/tensor_core.cpp, instantiated there for the six
// variants; emulator code that the memory observer does not instrument): reads the 8 * kNum
// row addresses that lanes 0 .. 8 * kNum - 1 posted, checks each (16-byte aligned, in
// shared memory) and reports its 16-byte read on behalf of the lane that supplied it, then
// gives every lane its registers per the layout above.
template <int kNum, bool kTrans>
void ldmatrix_compute(const void* const* in, void* const* out);

template <int kNum, bool kTrans>
inline void ldmatrix_emulated(const char* instruction, uint32_t* r, const void* row) {
  simt::warp_matrix_op(instruction, &row, r, &ldmatrix_compute<kNum, kTrans>);
}

}  // namespace detail
#endif

// ldmatrix.sync.aligned.m8n8.x1.shared.b16: lanes 0-7 supply the rows of one matrix.
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row) {
#if defined(MOE_KERNELS_SIMT)
  detail::ldmatrix_emulated<1, false>("ldmatrix.sync.aligned.m8n8.x1.shared.b16", r, smem_row);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(addr)
               : "memory");
#endif
}

// ldmatrix.sync.aligned.m8n8.x2.shared.b16: lanes 0-15 supply the rows of two matrices.
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
#if defined(MOE_KERNELS_SIMT)
  detail::ldmatrix_emulated<2, false>("ldmatrix.sync.aligned.m8n8.x2.shared.b16", r, smem_row);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr)
               : "memory");
#endif
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 0-31 supply the rows of four matrices.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#if defined(MOE_KERNELS_SIMT)
  detail::ldmatrix_emulated<4, false>("ldmatrix.sync.aligned.m8n8.x4.shared.b16", r, smem_row);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#endif
}

// ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16: one matrix, transposed.
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row) {
#if defined(MOE_KERNELS_SIMT)
  detail::ldmatrix_emulated<1, true>("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16", r, smem_row);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(addr)
               : "memory");
#endif
}

// ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16: two matrices, each transposed.
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
#if defined(MOE_KERNELS_SIMT)
  detail::ldmatrix_emulated<2, true>("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16", r, smem_row);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr)
               : "memory");
#endif
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: four matrices, each transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#if defined(MOE_KERNELS_SIMT)
  detail::ldmatrix_emulated<4, true>("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", r, smem_row);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#endif
}

}  // namespace moe
