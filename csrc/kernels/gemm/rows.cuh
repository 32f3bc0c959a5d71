// Which rows belong to which expert, read on the device: the contiguous layout's offsets
// or the masked layout's counts. Shared by every kernel of the gemm family.
#pragma once

#include "../common/memory.cuh"
#include "../common/reduce.cuh"
#include "gemm.h"

#include <type_traits>

namespace moe {
namespace gemm {

struct RowRange {
  int64_t begin;
  int64_t count;
};

// An int32 or int64 index (gather entries, counts) as int64.
__device__ __forceinline__ int64_t read_index(const void* base, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(base)[i] : static_cast<const int32_t*>(base)[i];
}

// Rows of y (and of x without gather). Values are clamped so that any offsets or counts
// stay inside the tensors: offsets into [0, m] and non-decreasing from offsets[e],
// counts into [0, S]. (Python checks them on the CPU; on a GPU reading them would be a
// host sync.)
struct ExpertRows : ExpertRowLayout {
  __device__ __forceinline__ RowRange of(int e) const {
    if (offsets != nullptr) {
      const int64_t begin = clamp(offsets[e], 0, m);
      return {begin, clamp(offsets[e + 1], begin, m) - begin};
    }
    return {e * rows_per_expert, clamp(read_index(counts, counts_int64, e), 0, rows_per_expert)};
  }

  // Calls fn(row) for every row of y no expert covers: rows before offsets[0] and from
  // offsets[E] on (contiguous), rows past counts[e] (masked). Work item i goes to worker
  // i % num_workers; a worker (a warp) calls fn for each of its rows.
  template <class Fn>
  __device__ __forceinline__ void for_each_uncovered_row(int64_t worker, int64_t num_workers, int num_experts,
                                                         Fn fn) const {
    if (offsets != nullptr) {
      const int64_t first = clamp(offsets[0], 0, m);
      const int64_t end = clamp(offsets[num_experts], first, m);
      const int64_t uncovered = first + (m - end);
      for (int64_t i = worker; i < uncovered; i += num_workers) fn(i < first ? i : end + (i - first));
      return;
    }
    for (int64_t row = worker; row < m; row += num_workers) {
      const int e = static_cast<int>(row / rows_per_expert);
      if (row - e * rows_per_expert >= of(e).count) fn(row);
    }
  }

  static __device__ __forceinline__ int64_t clamp(int64_t v, int64_t lo, int64_t hi) {
    return v < lo ? lo : v > hi ? hi : v;
  }
};

// The expert of m-tile `tile`: the largest e with tile_start[e] <= tile (experts with no
// tile share their start with the next one, so the largest is the one that has tiles).
__device__ __forceinline__ int find_tile_expert(const int32_t* tile_start, int num_experts, int32_t tile) {
  int lo = 0, hi = num_experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tile_start[mid] <= tile) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Two values stored as one access of twice the element size (dst is aligned to it: an even
// column of a row whose length is even).
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float a, float b) {
  if constexpr (sizeof(T) == 4) {
    uint2 bits;
    bits.x = __float_as_uint(a);
    bits.y = __float_as_uint(b);
    *reinterpret_cast<uint2*>(dst) = bits;
  } else {
    *reinterpret_cast<uint32_t*>(dst) = pack_pair<T>(a, b);
  }
}

}  // namespace gemm
}  // namespace moe
