// Small kernels that exercise the execution model itself (barriers, shared memory, warp
// collectives, atomics). The emulator's own tests run them under simt and, where a GPU
// is present, on the GPU, so the emulator is checked against the hardware it imitates.
#pragma once

#include <array>
#include <cstdint>

#include "common/stream.h"

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

}  // namespace testing
}  // namespace moe
