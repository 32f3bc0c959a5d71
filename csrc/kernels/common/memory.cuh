// Global and shared memory access helpers: element conversion to fp32 and 16-byte
// vector loads. Kernels read through these so the emulator can observe accesses.
#pragma once

#include "platform.cuh"

namespace moe {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two values rounded to a 16-bit T, packed in one 32-bit word (the first in the low half:
// memory order, and the order of an mma fragment register's two elements).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  static_assert(sizeof(T) == 2, "two 16-bit values");
  union {
    uint32_t bits;
    T elems[2];
  } v;
  v.elems[0] = from_float<T>(lo);
  v.elems[1] = from_float<T>(hi);
  return v.bits;
}

// Number of T elements in one 16-byte vector.
template <typename T>
struct Vec16 {
  static constexpr int size = 16 / sizeof(T);
};

// Loads 16 bytes (Vec16<T>::size elements) from a 16-byte aligned address, as raw bits.
// The emulator makes it one checked 16-byte access, as on the GPU (the host compiler may
// split a plain uint4 copy into smaller ones).
template <typename T>
__device__ __forceinline__ uint4 load_vec16(const T* src) {
#if defined(MOE_KERNELS_SIMT)
  return simt::load16(src);
#else
  return *reinterpret_cast<const uint4*>(src);
#endif
}

// Stores 16 bytes to a 16-byte aligned address.
template <typename T>
__device__ __forceinline__ void store_vec16(T* dst, uint4 bits) {
#if defined(MOE_KERNELS_SIMT)
  simt::store16(dst, bits);
#else
  *reinterpret_cast<uint4*>(dst) = bits;
#endif
}

// Loads 16 bytes (Vec16<T>::size elements) from a 16-byte aligned address as fp32.
template <typename T>
__device__ __forceinline__ void load_vec16_as_float(const T* src, float* dst) {
  constexpr int N = Vec16<T>::size;
  union {
    uint4 raw;
    T elems[N];
  } v;
  v.raw = load_vec16(src);
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = to_float(v.elems[i]);
}

// Shared memory dynamically sized at launch.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#if defined(MOE_KERNELS_SIMT)
  return reinterpret_cast<T*>(simt::dynamic_shared_memory());
#else
  extern __shared__ __align__(16) unsigned char moe_dynamic_smem[];
  return reinterpret_cast<T*>(moe_dynamic_smem);
#endif
}

}  // namespace moe
