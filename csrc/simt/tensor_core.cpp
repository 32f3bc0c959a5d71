// The emulated warp-wide matrix instructions: mma.sync m16n8k16 and ldmatrix m8n8. Their
// wrappers and the layouts, with the PTX ISA sections, are in csrc/kernels/common/mma.cuh and
// ldmatrix.cuh; these are the `compute` functions the wrappers hand to
// simt::warp_matrix_op. They live here, outside the kernels' translation unit, because
// they are emulator code: the memory observer must not see their loads and stores as the
// running lane's (ldmatrix reports its row reads itself, attributed to the right lanes).
#include "simt.h"

#include "../kernels/common/ldmatrix.cuh"
#include "../kernels/common/mma.cuh"

namespace moe {
namespace detail {
namespace {

float bf16_bits_to_float(uint32_t bits) {
  __nv_bfloat16_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  return __bfloat162float(__nv_bfloat16(raw));
}

float f16_bits_to_float(uint32_t bits) {
  __half_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  return __half2float(__half(raw));
}

// Element i of a fragment whose registers hold two 16-bit elements each, lower index in
// the low half (PTX: "Elements (low to high)").
uint32_t b16_element(const uint32_t* regs, int i) { return regs[i / 2] >> (16 * (i % 2)) & 0xFFFFu; }

// mma.m16n8k16 with fp32 accumulators (PTX ISA 9.7.14.5.8; layouts in mma.cuh).
template <bool kBf16>
void mma_m16n8k16_compute(const void* const* in, void* const* out) {
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const MmaOperands& op = *static_cast<const MmaOperands*>(in[lane]);
    const int group = lane >> 2, tid = lane % 4;  // groupID, threadID_in_group
    for (int i = 0; i < 8; ++i) {                  // a0 .. a7
      const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
      const int col = 2 * tid + (i & 1) + (i >= 4 ? 8 : 0);
      const uint32_t bits = b16_element(op.a.reg, i);
      A[row][col] = kBf16 ? bf16_bits_to_float(bits) : f16_bits_to_float(bits);
    }
    for (int i = 0; i < 4; ++i) {  // b0 .. b3
      const int k = 2 * tid + (i & 1) + (i >= 2 ? 8 : 0);
      const uint32_t bits = b16_element(op.b.reg, i);
      B[k][group] = kBf16 ? bf16_bits_to_float(bits) : f16_bits_to_float(bits);
    }
    for (int i = 0; i < 4; ++i) C[i < 2 ? group : group + 8][2 * tid + (i & 1)] = op.c.reg[i];
  }
  for (int lane = 0; lane < 32; ++lane) {
    MmaFragC& d = *static_cast<MmaFragC*>(out[lane]);
    const int group = lane >> 2, tid = lane % 4;
    for (int i = 0; i < 4; ++i) {  // d0 .. d3
      const int m = i < 2 ? group : group + 8, n = 2 * tid + (i & 1);
      // The documented order: onto C, k = 0..15, each product exact, each add rounded.
      float acc = C[m][n];
      for (int k = 0; k < 16; ++k) acc = acc + A[m][k] * B[k][n];
      d.reg[i] = acc;
    }
  }
}

}  // namespace

void mma_m16n8k16_compute_bf16(const void* const* in, void* const* out) {
  mma_m16n8k16_compute<true>(in, out);
}

void mma_m16n8k16_compute_f16(const void* const* in, void* const* out) {
  mma_m16n8k16_compute<false>(in, out);
}

// ldmatrix.m8n8.x{kNum}[.trans].b16 (PTX ISA 9.7.14.5.15; layout in ldmatrix.cuh). Lane
// 8m + r posted the address of row r of matrix m; the other lanes' addresses are ignored.
template <int kNum, bool kTrans>
void ldmatrix_compute(const void* const* in, void* const* out) {
  uint16_t mat[kNum][8][8];
  for (int m = 0; m < kNum; ++m) {
    for (int r = 0; r < 8; ++r) {
      const int lane = 8 * m + r;
      const unsigned char* row = *static_cast<const unsigned char* const*>(in[lane]);
      if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {  // name the lane in the message
        const std::string what = "ldmatrix row address of lane " + std::to_string(lane);
        simt::check_alignment(row, 16, what.c_str());
      }
      if (!simt::is_shared_memory(row) || !simt::is_shared_memory(row + 15)) {
        simt::fail("ldmatrix: the row address of lane " + std::to_string(lane) +
                   " is not in shared memory");
      }
      simt::observe(row, 16, simt::Access::read, lane);
      std::memcpy(mat[m][r], row, 16);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t* regs = static_cast<uint32_t*>(out[lane]);
    const int row = lane / 4, col = 2 * (lane % 4);
    for (int m = 0; m < kNum; ++m) {
      // .trans: the element at (row, col) of the transposed matrix is mat[col][row].
      const uint32_t lo = kTrans ? mat[m][col][row] : mat[m][row][col];
      const uint32_t hi = kTrans ? mat[m][col + 1][row] : mat[m][row][col + 1];
      regs[m] = lo | hi << 16;
    }
  }
}

template void ldmatrix_compute<1, false>(const void* const*, void* const*);
template void ldmatrix_compute<2, false>(const void* const*, void* const*);
template void ldmatrix_compute<4, false>(const void* const*, void* const*);
template void ldmatrix_compute<1, true>(const void* const*, void* const*);
template void ldmatrix_compute<2, true>(const void* const*, void* const*);
template void ldmatrix_compute<4, true>(const void* const*, void* const*);

}  // namespace detail
}  // namespace moe
