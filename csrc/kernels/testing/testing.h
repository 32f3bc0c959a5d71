// Small kernels that exercise the execution model itself (barriers, shared memory, warp
// collectives, atomics). The emulator's own tests run them under simt and, where a GPU
// is present, on the GPU, so the emulator is checked against the hardware it imitates.
#pragma once

#include <array>
#include <cstdint>

#include "../common/stream.h"

namespace moe {
namespace testing {

// out[b] = sum of in[b*block .. (b+1)*block): shared-memory tree reduction.
void launch_block_sum(const float* in, float* out, int64_t n, int block, cudaStream_t stream);
// out = in^T for a [rows, cols] matrix, through a padded 32x33 shared tile (or an
// unpadded 32x32 one, with 32-way bank conflicts).
void launch_transpose(const float* in, float* out, int rows, int cols, bool padded,
                      cudaStream_t stream);
// Per-warp inclusive scan with __shfl_up_sync; also the warp's ballot/any/all of (x > 0).
void launch_warp_scan(const int32_t* in, int32_t* scan, int32_t* votes, int64_t n,
                      cudaStream_t stream);
// counts[in[i]] += 1 with atomicAdd; out[i] = in[n-1-i] within each block, via dynamic
// shared memory.
void launch_histogram(const int32_t* in, int32_t* counts, int64_t n, cudaStream_t stream);
void launch_block_reverse(const float* in, float* out, int64_t n, int block, cudaStream_t stream);
// Kernels that break the rules on purpose; the emulator must reject them.
// mode 0: __syncthreads inside `if (threadIdx.x < 16)`; 1: half the block exits before
// a __syncthreads; 2: two different __syncthreads call sites; 3: a shuffle whose mask
// misses lanes that exited; 4: a write one element past the end of `out` (64 elements),
// which AddressSanitizer must catch; 5: a shared-memory read of a neighbour's write with
// no barrier between (a race: its result depends on the order threads run); 6: a
// shared-memory write read by another lane of the warp, ordered only by a shuffle (a race
// that no resume order shows); 7: block 1 reads a global element block 0 wrote (two
// blocks); 8: a misaligned 16-byte global load; 9: a misaligned 16-byte shared load.
void launch_broken(int mode, float* out, cudaStream_t stream);
// Writes 1 KiB of static and `dynamic_bytes` of dynamic shared memory; out[0] = 255 +
// the last dynamic float's index. With opt_in false the launch skips the opt-in above
// 48 KiB (a launcher with that bug), which the emulator must refuse as the GPU does.
void launch_shared_memory(float* out, int64_t dynamic_bytes, bool opt_in,
                          const std::array<unsigned, 3>& grid, const std::array<unsigned, 3>& block,
                          cudaStream_t stream);

// ---- PTX primitives (testing_ptx.cuh): mma, ldmatrix, cp.async ---------------------------
// Each probe runs one primitive of common/{mma,ldmatrix,cp_async}.cuh and writes out what
// every lane got, for comparison with the PTX ISA's documented layouts.

// One block of `warps` warps; warp w runs one mma.m16n8k16 (bf16 or f16 inputs, fp32
// accumulators) on the per-lane fragments a_frag [warps][32][4] (b32), b_frag
// [warps][32][2] (b32), c_frag [warps][32][4] (f32) and writes D's fragments to d_frag.
void launch_mma_probe(const uint32_t* a_frag, const uint32_t* b_frag, const float* c_frag,
                      float* d_frag, int warps, bool bf16, cudaStream_t stream);
// x [rows][width] (b16, width a multiple of 8) is staged in shared memory; lane l of warp w
// supplies the address of element (lane_rows[w*32 + l], col), col a multiple of 8; one
// ldmatrix.m8n8.x{num}[.trans] per warp; out [warps][32][num] = the registers each lane got.
void launch_ldmatrix_probe(const uint16_t* x, int rows, int width, const int32_t* lane_rows,
                           int warps, int col, int num, bool trans, int32_t* out,
                           cudaStream_t stream);
// Before its copy lands, the shared slot of cp.async group g holds bytes kCpAsyncOld + g.
constexpr int kCpAsyncOld = 0xC0;
// `threads` threads each issue `groups` cp.async of 16 bytes, one per commit group, from
// src [groups][threads][16] with src_sizes [groups][threads] (0..16, zero-filled past it),
// then cp.async.wait_group `pending` (0 or 1), then cp.async.wait_all. seen
// [3][groups][threads][16]: [0] the slots right after issuing (early_reads only), [1] after
// the wait_group (the groups it covers; all groups with early_reads), [2] after wait_all.
// Entries not read are left as they were. early_reads reads copies in flight: a race,
// meaningful only in the emulator (where it shows the old contents).
void launch_cp_async_probe(const unsigned char* src, const int32_t* src_sizes, int groups,
                           int threads, int pending, bool early_reads, unsigned char* seen,
                           cudaStream_t stream);
// Misuses of the PTX primitives that the emulator must reject (out: 64 floats).
// mode 0: mma in a block of 48 threads (the second warp has 16 lanes); 1: lanes 16-31
// return before an mma; 2: ldmatrix.x4 with lane 9's row address 8 bytes off 16-byte
// alignment; 3: ldmatrix.x1 with lane 3's row address in global memory; 4: cp.async to a
// shared address 8 bytes off alignment; 5: cp.async from a global address 4 bytes off;
// 6: the thread exits with a committed cp.async group not waited for; 7: the thread
// exits after wait_group 0 with a copy that was never committed (still in flight).
void launch_ptx_broken(int mode, float* out, cudaStream_t stream);

}  // namespace testing
}  // namespace moe
