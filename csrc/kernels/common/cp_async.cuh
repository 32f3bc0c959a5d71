// Asynchronous global -> shared copies (Ampere's LDGSTS): cp.async.{ca,cg}.shared.global of
// 16 bytes and cp.async.ca of 8 (optionally zero-filled past src-size), cp.async.commit_group,
// cp.async.wait_group N and cp.async.wait_all. One wrapper per PTX instruction; all need
// sm_80 or newer (every architecture we build for).
//
// PTX ISA, "Data Movement and Conversion Instructions: Asynchronous copy" (anchor
// data-movement-and-conversion-instructions-asynchronous-copy; its section number moves
// between ISA versions), non-bulk copies: cp.async, cp.async.commit_group,
// cp.async.wait_group / cp.async.wait_all.
//
// Semantics the wrappers rely on:
//  - a copy is per thread and asynchronous: the destination may be written at any time
//    until a wait that covers it; reading or writing it before then is a race;
//  - the copies a thread issued since its previous commit_group form one group;
//  - wait_group N returns once at most the N most recent committed groups of this thread
//    are pending (all older ones landed); copies not yet committed are not waited for;
//  - wait_all waits for every copy of the thread, committed or not (commit + wait_group 0);
//  - the waits order the copies only for the issuing thread: other threads of the block
//    see the data after a __syncthreads that follows the wait;
//  - src-size (0..16): only the first src-size bytes are read from global memory, the rest
//    of the 16 destination bytes are zero-filled (src-size 0 reads nothing: predicated
//    tails keep a valid, aligned source address and pass 0);
//  - both addresses must be 16-byte aligned; .cg (cache in L2 only) exists only for 16
//    bytes, .ca (cache at all levels) also for 4 (not wrapped here) and 8.
//
// In the emulator (simt::async_copy) a copy lands at the wait that covers its group, never
// earlier, so code that reads the destination too early reads the old contents there; a
// thread that exits with copies in flight is an error.
#pragma once

#include "platform.cuh"

namespace moe {

#if !defined(MOE_KERNELS_SIMT)
namespace detail {
__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
}  // namespace detail
#endif

// cp.async.ca.shared.global [dst], [src], 16: 16 bytes, cached at all levels.
__device__ __forceinline__ void cp_async_ca_16(void* smem_dst, const void* gmem_src) {
#if defined(MOE_KERNELS_SIMT)
  simt::async_copy(smem_dst, gmem_src, 16, 16);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n"
               :
               : "r"(detail::shared_address(smem_dst)), "l"(__cvta_generic_to_global(gmem_src))
               : "memory");
#endif
}

// cp.async.cg.shared.global [dst], [src], 16: 16 bytes, cached in L2 only.
__device__ __forceinline__ void cp_async_cg_16(void* smem_dst, const void* gmem_src) {
#if defined(MOE_KERNELS_SIMT)
  simt::async_copy(smem_dst, gmem_src, 16, 16);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
               :
               : "r"(detail::shared_address(smem_dst)), "l"(__cvta_generic_to_global(gmem_src))
               : "memory");
#endif
}

// cp.async.ca.shared.global [dst], [src], 16, src_size: reads src_size (0..16) bytes and
// zero-fills the rest of the 16.
__device__ __forceinline__ void cp_async_ca_16_zfill(void* smem_dst, const void* gmem_src,
                                                     int src_size) {
#if defined(MOE_KERNELS_SIMT)
  simt::async_copy(smem_dst, gmem_src, 16, src_size);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n"
               :
               : "r"(detail::shared_address(smem_dst)), "l"(__cvta_generic_to_global(gmem_src)),
                 "r"(src_size)
               : "memory");
#endif
}

// cp.async.cg.shared.global [dst], [src], 16, src_size: as above, cached in L2 only.
__device__ __forceinline__ void cp_async_cg_16_zfill(void* smem_dst, const void* gmem_src,
                                                     int src_size) {
#if defined(MOE_KERNELS_SIMT)
  simt::async_copy(smem_dst, gmem_src, 16, src_size);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :
               : "r"(detail::shared_address(smem_dst)), "l"(__cvta_generic_to_global(gmem_src)),
                 "r"(src_size)
               : "memory");
#endif
}

// cp.async.ca.shared.global [dst], [src], 8, src_size: 8 bytes (both addresses 8-byte
// aligned; .cg has no 8-byte form), reads src_size (0..8) and zero-fills the rest.
__device__ __forceinline__ void cp_async_ca_8_zfill(void* smem_dst, const void* gmem_src, int src_size) {
#if defined(MOE_KERNELS_SIMT)
  simt::async_copy(smem_dst, gmem_src, 8, src_size);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n"
               :
               : "r"(detail::shared_address(smem_dst)), "l"(__cvta_generic_to_global(gmem_src)),
                 "r"(src_size)
               : "memory");
#endif
}

// cp.async.commit_group: closes the group of this thread's copies issued since the last one.
__device__ __forceinline__ void cp_async_commit_group() {
#if defined(MOE_KERNELS_SIMT)
  simt::async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// cp.async.wait_group N: waits until at most the N most recent committed groups are
// pending. N is an immediate in PTX, hence a template parameter.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  static_assert(N >= 0, "cp.async.wait_group N needs N >= 0");
#if defined(MOE_KERNELS_SIMT)
  simt::async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// cp.async.wait_all: waits for every copy this thread issued, committed or not.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(MOE_KERNELS_SIMT)
  simt::async_wait_all();
#else
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

}  // namespace moe
