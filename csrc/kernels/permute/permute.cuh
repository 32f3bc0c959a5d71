// Token permutation (permute / unpermute) kernels.
//
// Index stage, over the assignments a = t * k + j in (token, slot) order, cut into tiles
// of kPermuteTile assignments:
//   count   one block per tile: per local expert, how many of the tile's assignments
//           go to it (shared-memory integer counters: the totals do not depend on the
//           order of the increments).
//   offsets one block: per expert, its total over the tiles; a scan over the experts for
//           the segment starts, offsets and num_rows; then per expert and tile the
//           destination (row, or list position) of the tile's first assignment, so that
//           a place block reads its tile's row of those, not all E + 1 offsets. With many
//           tiles x experts it works on slices of 32 tiles instead, and the slice kernel
//           (one block per slice and 32 experts) sums the slices' tiles before it and
//           spreads each slice's destinations over its tiles after it.
//   place   one block per tile: one warp walks the tile in order, 32 assignments per
//           round; lanes going to the same expert find each other with ballots over the
//           expert's bits, so an assignment's rank inside its expert is exact (token, slot)
//           order. The tile is staged in shared memory so that the rows' gather and
//           weights are written in row order and row_map in assignment order.
//   (with a single tile, count + offsets + place run as one block in one launch: small
//   batches are latency-bound; it stages ids, weights, the per-key starts and the list of
//   assignments grouped by expert in shared memory, so each global byte moves once and
//   gather / weights_out are written in row order)
//   select  (capacity with drop_policy "weight"; a single tile does it in its one block,
//           on the list staged in shared memory) the place kernel writes the list of
//           assignments grouped by expert, each with its weight; one block per group of
//           32 experts reads the group's part of the list once (staged in shared memory
//           when it fits): per expert a radix select of the capacity-th largest weight
//           (per-warp aggregated histogram, digit found by a block scan), then one sweep
//           in list order keeps the winners in (token, slot) order, writes their gather
//           and weights in row order, and per tile and expert how many it keeps and their
//           first row; the place kernel runs again on each tile (its finish pass) and
//           writes row_map in assignment order.
// Where an assignment gets row r, the stage also writes gather[r] (its token) and the
// permuted weight: permute_plan is this stage alone.
// Products round on their own, never fused into a following add (the build's -fmad=false,
// and no contraction on the host), so the sums of unpermute and the scaled rows round
// exactly as PyTorch's separate mul and add kernels do, on the GPU and in the emulator.
// Row stage: scatter_rows reads each token's row once and writes it to its k rows, and
// zeroes the rows whose gather entry is -1; gather_rows (unpermute) reads the k rows of a token and writes the fp32 sum once.
#pragma once

#include "../common/launch.cuh"
#include "../common/memory.cuh"
#include "../common/reduce.cuh"
#include "permute.h"

#include <algorithm>

namespace moe {
namespace permute {

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

__host__ __device__ __forceinline__ int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// An entry of the list of assignments grouped by local expert: the assignment t * k + j in
// the low 32 bits, its weight's bits in the high ones. The place kernel writes both with one
// 8-byte store (where a tile's entries scatter, two 4-byte arrays took a sector each) and
// the select kernel reads both in list order.
__device__ __forceinline__ uint64_t sorted_entry(int32_t item, float weight) {
  return static_cast<uint32_t>(item) | static_cast<uint64_t>(__float_as_uint(weight)) << 32;
}
__device__ __forceinline__ int32_t entry_item(uint64_t e) { return static_cast<int32_t>(e & 0xffffffffu); }
__device__ __forceinline__ float entry_weight(uint64_t e) { return __uint_as_float(static_cast<uint32_t>(e >> 32)); }

// Workspace of the index stage, carved from one buffer (int32 counters: T * k < 2^31).
struct IndexWorkspace {
  // [num_tiles][num_local]: counts, then (offsets kernel) the destination of the tile's
  // first assignment of the key: its row, or with the weight policy its position in
  // `sorted`. Tile-major, so the count kernel's writes, the place kernel's reads (one tile
  // each) and the offsets kernel's passes (a thread per expert, the threads of a warp on
  // consecutive experts) are all coalesced.
  int32_t* tile_counts;
  // [num_tiles][num_local], drop by weight only: the select kernel's verdict per tile and
  // key, how many of the tile's assignments of the key it keeps (their first row it writes
  // in tile_counts), for the place kernel's finish pass.
  int32_t* tile_kept;
  // [num_slices][num_local], with slices only: per slice of kSliceTiles tiles its counts
  // (slice kernel), then (offsets kernel) the destination of its first assignment.
  int32_t* slice_counts;
  int32_t* counts;       // [E]: assignments of each local expert
  int32_t* list_start;   // [E]: exclusive scan of counts (start in `sorted`)
  int32_t* key_end;      // [E]: rows of the key are below it (where keys_end: rows can end)
  uint64_t* sorted;      // [T * k]: sorted_entry of the assignments grouped by local expert
  int num_tiles;
  // 0, or the slices of kSliceTiles tiles the offsets kernel works on in place of tiles:
  // when one block's pass over every tile's counts would be long, the slice kernel sums
  // each slice's tiles (one block per 32 experts and slice) before it and adds each
  // slice's destination to its tiles after it.
  int num_slices;
  size_t bytes;  // the workspace's size
};

// Tiles per slice: 8 warps of 4 tiles, held in registers by the slice kernel.
constexpr int kSliceTiles = 32;
constexpr int kSliceThreads = 256;
constexpr int kSliceTilesPerWarp = kSliceTiles / (kSliceThreads / 32);
// Counts (tiles x experts) the one offsets block reads per pass before slices take over:
// 16 a thread.
constexpr int64_t kOffsetsColumnBudget = 16 * 512;

__host__ __device__ inline int permute_num_tiles(int64_t num_assignments) {
  return static_cast<int>((num_assignments + kPermuteTile - 1) / kPermuteTile);
}

__host__ __device__ inline int permute_num_slices(int num_tiles, int num_experts) {
  const bool sliced = num_tiles > 1 && static_cast<int64_t>(num_tiles) * num_experts > kOffsetsColumnBudget;
  return sliced ? (num_tiles + kSliceTiles - 1) / kSliceTiles : 0;
}

// Carves the workspace from base (8-byte aligned; null: only sizes it, in w.bytes). The
// select's arrays (tile_kept, sorted) exist with drop by weight only.
inline IndexWorkspace index_workspace(void* base, int64_t num_assignments, int num_experts, bool select) {
  IndexWorkspace w;
  w.num_tiles = permute_num_tiles(num_assignments);
  w.num_slices = permute_num_slices(w.num_tiles, num_experts);
  int64_t used = 0;  // int32 words
  auto take = [&](int64_t words) -> int32_t* {
    int32_t* at = base != nullptr && words > 0 ? static_cast<int32_t*>(base) + used : nullptr;
    used += words;
    return at;
  };
  const int64_t per_tile = static_cast<int64_t>(num_experts) * w.num_tiles;
  w.tile_counts = take(per_tile);
  w.tile_kept = take(select ? per_tile : 0);
  w.slice_counts = take(static_cast<int64_t>(num_experts) * w.num_slices);
  w.counts = take(num_experts);
  w.list_start = take(num_experts);
  w.key_end = take(num_experts);
  used += used % 2;  // sorted is 8-byte aligned
  w.sorted = reinterpret_cast<uint64_t*>(take(select ? 2 * num_assignments : 0));
  w.bytes = static_cast<size_t>(used) * sizeof(int32_t);
  return w;
}

// Expert id of assignment a, read as int32 or int64 (torch.topk's ids need no conversion);
// an int64 id that does not fit in int32 becomes -1 (never local, like any bad id).
__device__ __forceinline__ int load_id(const PermuteIndexParams& p, int64_t a) {
  if (!p.ids_int64) return static_cast<const int32_t*>(p.ids)[a];
  const int64_t id = static_cast<const int64_t*>(p.ids)[a];
  return id >= 0 && id < p.num_experts ? static_cast<int>(id) : -1;
}

// Local experts have keys 0..num_keys-1 (the counters): e - expert_begin for the range; the
// map's local index with a map (entries outside [0, E) count as -1: never trusted).
__host__ __device__ inline int num_keys(const PermuteIndexParams& p) {
  return p.expert_map != nullptr ? p.num_experts : p.expert_end - p.expert_begin;
}

__device__ __forceinline__ int local_key(const PermuteIndexParams& p, int e) {
  if (p.expert_map == nullptr) return e >= p.expert_begin && e < p.expert_end ? e - p.expert_begin : -1;
  if (e < 0 || e >= p.num_experts) return -1;
  const int m = p.expert_map[e];
  return m >= 0 && m < p.num_experts ? m : -1;
}

// Whether a key's rows can end before its assignments do: capacity, or a map (whose
// entries past the segments are unchecked for device maps: their keys get no rows).
__host__ __device__ inline bool keys_end(const PermuteIndexParams& p) {
  return p.capacity >= 0 || p.expert_map != nullptr;
}

// Capacity with drop_policy "weight": the select decides which assignments keep rows.
__host__ __device__ inline bool selects_by_weight(const PermuteIndexParams& p) {
  return p.drop_by_weight && p.capacity >= 0;
}

// The segment (index of offsets) of a key: the range keeps experts at their global
// positions, a map orders segments by local index.
__device__ __forceinline__ int segment_of_key(const PermuteIndexParams& p, int key) {
  return p.expert_map != nullptr ? key : key + p.expert_begin;
}

// Maps a weight to an unsigned key whose order is the weights' order: NaN ranks as -inf,
// -0 equals +0 (the reference does the same with nan_to_num and a stable sort).
__device__ __forceinline__ uint32_t weight_key(float x) {
  if (x != x) x = -INFINITY;
  if (x == 0.f) x = 0.f;
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// 16-byte row chunks moved as raw bits (a permutation never converts).
template <typename T>
union Chunk16 {
  uint4 raw;
  T elems[Vec16<T>::size];
};

template <typename T>
__device__ __forceinline__ Chunk16<T> load_chunk(const T* src) {
  Chunk16<T> c;
  c.raw = load_vec16(src);
  return c;
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* dst, const Chunk16<T>& c) {
  store_vec16(dst, c.raw);
}

// ---------------------------------------------------------------------------------------
// Index stage. The pieces below are shared by the multi-tile path (count, offsets and
// place kernels) and by the one-launch path for a single tile (small batches, decode),
// where three launches would cost more than the work.
// ---------------------------------------------------------------------------------------

constexpr int kCountThreads = 256;
constexpr int kOffsetsThreads = 512;  // 1024 leaves 64 registers: sm_120 spilled
static_assert(kOffsetsColumnBudget == 16 * kOffsetsThreads, "16 counts a thread");
constexpr int kSelectThreads = 256;

// counts[l] = assignments of the tile going to local expert l. Every thread of the block
// calls it; counts must be zero and the caller syncs afterwards.
__device__ __forceinline__ void count_tile(const PermuteIndexParams& p, int32_t* counts, int tile) {
  const int64_t n = p.num_tokens * p.k;
  const int64_t begin = static_cast<int64_t>(tile) * kPermuteTile;
  const int64_t end = min(begin + kPermuteTile, n);
  for (int64_t a = begin + threadIdx.x; a < end; a += blockDim.x) {
    // Out-of-range ids are never local: they are dropped, never indexed.
    const int key = local_key(p, load_id(p, a));
    if (key >= 0) atomicAdd(&counts[key], 1);
  }
}

// From the per-key totals `counts` (shared memory): offsets and num_rows; for each local
// key, on_key(key, list_start, first_row, exists) with the key's start in the list of
// assignments grouped by key, its segment's first row and whether the segment exists.
// on_key runs on the thread that read counts[key] in the same round and on no other, so
// it may overwrite counts[key]. Returns the local assignments (block-uniform). Every
// thread of a kOffsetsThreads block calls it.
template <typename OnKey>
__device__ __forceinline__ int64_t scan_experts(const PermuteIndexParams& p, const int32_t* counts,
                                                int64_t* warp_totals, OnKey on_key) {
  // All E segments (offsets has E + 1), in rounds of one segment per thread.
  const int E = p.num_experts;
  // With a map, segments 0..L-1 exist, L = map entries in [0, E) (a permutation of 0..L-1
  // when the map is valid: checked on the host for CPU maps only).
  int64_t map_segments = 0;
  if (p.expert_map != nullptr) {
    int64_t mine = 0;
    for (int e = threadIdx.x; e < E; e += kOffsetsThreads) {
      const int m = p.expert_map[e];
      mine += m >= 0 && m < E ? 1 : 0;
    }
    block_exclusive_scan<kOffsetsThreads>(mine, warp_totals, &map_segments);
  }
  const int keys = num_keys(p);
  const bool dropless = p.capacity < 0;
  const int64_t slot_rows = dropless ? 0 : round_up(p.capacity, p.align);
  auto key_of = [&](int s) -> int { return p.expert_map != nullptr ? s : s - p.expert_begin; };
  auto count_of = [&](int s) -> int64_t {  // assignments with the segment's key
    const int key = key_of(s);
    return key >= 0 && key < keys ? counts[key] : 0;
  };
  auto exists = [&](int s) -> bool {
    return p.expert_map != nullptr ? s < map_segments : s >= p.expert_begin && s < p.expert_end;
  };
  auto rows_of = [&](int s) -> int64_t {  // segment size
    if (!exists(s)) return 0;
    return dropless ? round_up(count_of(s), p.align) : slot_rows;
  };
  // Rounds of kOffsetsThreads consecutive segments, one per thread, carrying the totals of
  // the rounds before: the threads of a warp read counts and write offsets and list_start
  // at consecutive addresses (coalesced, no bank conflicts), where a run of segments per
  // thread strided them.
  int64_t rows_before = 0, count_before = 0;
  for (int round = 0; round < E; round += kOffsetsThreads) {
    const int e = round + threadIdx.x;
    const int64_t my_rows = e < E ? rows_of(e) : 0;
    const int64_t my_count = e < E ? count_of(e) : 0;
    int64_t round_rows, round_count;
    const int64_t row = rows_before + block_exclusive_scan<kOffsetsThreads>(my_rows, warp_totals, &round_rows);
    const int64_t listed =
        count_before + block_exclusive_scan<kOffsetsThreads>(my_count, warp_totals, &round_count);
    if (e < E) {
      p.offsets[e] = row;
      if (key_of(e) >= 0 && key_of(e) < keys) on_key(key_of(e), static_cast<int32_t>(listed), row, exists(e));
    }
    rows_before += round_rows;
    count_before += round_count;
  }
  if (threadIdx.x == 0) {
    p.offsets[E] = rows_before;
    p.num_rows[0] = rows_before;  // the valid prefix of x_perm, padding included: offsets[E]
  }
  return count_before;
}

// One warp (lanes 0..31 of the block) puts the tile's n assignments at their places in
// the list of the tile's assignments grouped by key, 32 per round in (token, slot) order.
// keys[i]: key of the tile's assignment i (num_local: not local); placed[key] (shared)
// starts at the key's first list position. Lanes going to the same key find each other
// with ballots over the key's bits (a __match_any_sync), so the order inside a key is
// exact (token, slot) order.
__device__ __forceinline__ void place_warp(const int16_t* keys, int16_t* placed, int16_t* list, int n,
                                           int num_local) {
  const int lane = threadIdx.x % 32;
  const int bits = 32 - __clz(num_local);  // keys 0..num_local fit in `bits` bits
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int first = 0; first < n; first += 32) {
    const int i = first + lane;
    const int key = i < n ? keys[i] : num_local;
    unsigned peers = kFullMask;
    for (int bit = 0; bit < bits; ++bit) {
      const int mine = (key >> bit) & 1;
      const unsigned ones = __ballot_sync(kFullMask, mine);
      peers &= mine ? ones : ~ones;
    }
    const bool local = key < num_local;
    const int before = __popc(peers & lanes_below);
    const int position = local ? placed[key] + before : 0;
    __syncwarp();  // every lane has read `placed` before the leaders update it
    if (local && before == 0) placed[key] = static_cast<int16_t>(position + __popc(peers));
    __syncwarp();
    if (local) list[position] = static_cast<int16_t>(i);
  }
}

__global__ void __launch_bounds__(kCountThreads)
    permute_count_kernel(PermuteIndexParams p, IndexWorkspace w) {
  int32_t* counts = dynamic_smem<int32_t>();
  const int num_local = num_keys(p);
  for (int l = threadIdx.x; l < num_local; l += blockDim.x) counts[l] = 0;
  __syncthreads();
  count_tile(p, counts, blockIdx.x);
  __syncthreads();
  for (int l = threadIdx.x; l < num_local; l += blockDim.x) {
    w.tile_counts[static_cast<int64_t>(blockIdx.x) * num_local + l] = counts[l];
  }
}

__global__ void __launch_bounds__(kOffsetsThreads)
    permute_offsets_kernel(PermuteIndexParams p, IndexWorkspace w) {
  int32_t* counts = dynamic_smem<int32_t>();  // [num_local]
  __shared__ int64_t warp_totals[kOffsetsThreads / 32];
  const int num_local = num_keys(p);

  // The parts it sums and then turns into destinations: tiles, or slices of tiles.
  int32_t* const parts = w.num_slices > 0 ? w.slice_counts : w.tile_counts;
  const int num_parts = w.num_slices > 0 ? w.num_slices : w.num_tiles;

  // One thread per local expert (the threads of a warp on consecutive experts: coalesced):
  // its total over the parts.
  for (int l = threadIdx.x; l < num_local; l += kOffsetsThreads) {
    const int32_t* column = parts + l;
    int32_t total = 0;
    for (int part = 0; part < num_parts; ++part) total += column[static_cast<int64_t>(part) * num_local];
    counts[l] = total;
    w.counts[l] = total;
  }
  __syncthreads();
  const bool select = selects_by_weight(p);
  scan_experts(p, counts, warp_totals, [&](int key, int32_t list_start, int64_t row, bool exists) {
    w.list_start[key] = list_start;
    counts[key] = select ? list_start : static_cast<int32_t>(row);  // the key's first destination
    // Rows of kept assignments are below 2^31 (the adapters refuse larger outputs).
    const int64_t end = !exists ? row : p.capacity < 0 ? INT32_MAX : row + p.capacity;
    if (!select && keys_end(p)) w.key_end[key] = static_cast<int32_t>(end);
  });
  __syncthreads();
  // Again one thread per local expert: each part's first destination, the key's first plus
  // the counts of the parts before, in place. A destination past 2^31 - 1 (never a kept
  // row) is saturated.
  for (int l = threadIdx.x; l < num_local; l += kOffsetsThreads) {
    int32_t* column = parts + l;
    int64_t destination = counts[l];
    for (int part = 0; part < num_parts; ++part) {
      const int32_t c = column[static_cast<int64_t>(part) * num_local];
      column[static_cast<int64_t>(part) * num_local] = static_cast<int32_t>(min(destination, int64_t{INT32_MAX}));
      destination += c;
    }
  }
}

// With slices, one block per slice (x) and 32 consecutive local keys (lane j on key
// 32 y + j: each tile's row of them read and written coalesced), warp v on the slice's tiles
// 4 v .. 4 v + 3. Before the offsets kernel (add_destination false): the slice's count of
// each key, in slice_counts. After it: each tile's first destination, the slice's (from
// the offsets kernel) plus the counts of the slice's tiles before it, in tile_counts.
__global__ void __launch_bounds__(kSliceThreads)
    permute_slice_kernel(PermuteIndexParams p, IndexWorkspace w, bool add_destination) {
  __shared__ int32_t warp_sums[kSliceThreads / 32][32];
  __shared__ int32_t slice_destination[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int num_local = num_keys(p);
  const int l = blockIdx.y * 32 + lane;
  const int slice = blockIdx.x;
  const int64_t slice_index = static_cast<int64_t>(slice) * num_local + l;
  const int first_tile = slice * kSliceTiles + warp * kSliceTilesPerWarp;
  int32_t counts[kSliceTilesPerWarp];
  int32_t sum = 0;
#pragma unroll
  for (int i = 0; i < kSliceTilesPerWarp; ++i) {
    const int t = first_tile + i;
    counts[i] = l < num_local && t < w.num_tiles ? w.tile_counts[static_cast<int64_t>(t) * num_local + l] : 0;
    sum += counts[i];
  }
  warp_sums[warp][lane] = sum;
  if (add_destination && warp == 0 && l < num_local) slice_destination[lane] = w.slice_counts[slice_index];
  __syncthreads();
  int64_t before = 0, total = 0;  // this key's counts in the slice's warps before this one, and in all
#pragma unroll
  for (int v = 0; v < kSliceThreads / 32; ++v) {
    const int32_t c = warp_sums[v][lane];
    before += v < warp ? c : 0;
    total += c;
  }
  if (l >= num_local) return;
  if (!add_destination) {
    if (warp == 0) w.slice_counts[slice_index] = static_cast<int32_t>(total);
    return;
  }
  int64_t destination = slice_destination[lane] + before;
#pragma unroll
  for (int i = 0; i < kSliceTilesPerWarp; ++i) {
    const int t = first_tile + i;
    if (t < w.num_tiles) {
      w.tile_counts[static_cast<int64_t>(t) * num_local + l] = static_cast<int32_t>(min(destination, int64_t{INT32_MAX}));
    }
    destination += counts[i];
  }
}

// The place kernel, one block per tile, staged in shared memory like the one-tile kernel
// (below) so that every global access is coalesced: the tile's ids and weights are read
// once; per key, in rounds of consecutive keys (coalesced reads of the tile's row of
// tile_counts and of offsets), the tile-local list start and what turns a list position
// into a row; one warp builds the tile's list grouped by key; the block writes gather and
// weights_out in row order (or the select kernel's list), then row_map in assignment
// order. One warp placing the tile and writing rows from global offsets read one 32-byte
// sector per 8-byte offset and wrote one sector per gather / weight / row_map entry.
constexpr int kPlaceThreads = 256;

// Shared memory of the kernels that stage one tile of assignments (place, one-tile): per
// key a 32-bit and a 16-bit word whose meaning is each kernel's (it names them), and the
// next list position; per assignment its row, weight, key and list entry.
struct TileSmem {
  int32_t* key_word;   // [L]: the tile's count of the key (stage_tile), then the kernel's row base
  int32_t* row;        // [kPermuteTile]: row of each assignment, -1 if dropped
  float* weight;       // [kPermuteTile]: weights, read once and coalesced
  int16_t* key_half;   // [L]: the kernel's per-key list position
  int16_t* placed;     // [L]: next list position of the key
  int16_t* key;        // [kPermuteTile]: key of each assignment (L: not local)
  int16_t* list;       // [kPermuteTile]: the tile's assignments grouped by key
};

__host__ __device__ inline size_t tile_smem_bytes(int num_local) {
  return static_cast<size_t>(num_local) * (4 + 2 + 2) + static_cast<size_t>(kPermuteTile) * (4 + 4 + 2 + 2);
}

__device__ __forceinline__ TileSmem tile_smem(unsigned char* base, int num_local) {
  TileSmem m;
  m.key_word = reinterpret_cast<int32_t*>(base);
  m.row = m.key_word + num_local;
  m.weight = reinterpret_cast<float*>(m.row + kPermuteTile);
  m.key_half = reinterpret_cast<int16_t*>(m.weight + kPermuteTile);
  m.placed = m.key_half + num_local;
  m.key = m.placed + num_local;
  m.list = m.key + kPermuteTile;
  return m;
}

// Whether list entry i is among the top `keep` of its key's run [start, end) of the staged
// list by (weight key desc, list position asc): the order the select keeps by. Stops
// counting the entries before it at keep.
__device__ __forceinline__ bool in_top_by_weight(const TileSmem& m, int start, int end, int i, int keep) {
  const uint32_t mine = weight_key(m.weight[m.list[i]]);
  int above = 0;
  for (int j = start; j < end && above < keep; ++j) {
    const uint32_t other = weight_key(m.weight[m.list[j]]);
    above += other > mine || (other == mine && j < i) ? 1 : 0;
  }
  return above < keep;
}

// Reads the n assignments from `begin` once: each one's key (num_local: not local; ids out
// of range are never local, so never indexed), the tile's count of each key in key_word,
// and, with stage_weights, the weights. Every thread of the block calls it.
__device__ __forceinline__ void stage_tile(const PermuteIndexParams& p, const TileSmem& m, int num_local,
                                           int64_t begin, int n, bool stage_weights) {
  for (int l = threadIdx.x; l < num_local; l += blockDim.x) m.key_word[l] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int key = local_key(p, load_id(p, begin + i));
    m.key[i] = static_cast<int16_t>(key >= 0 ? key : num_local);
    if (key >= 0) atomicAdd(&m.key_word[key], 1);
    if (stage_weights) m.weight[i] = p.weights[begin + i];
  }
  __syncthreads();
}

// The finish pass of drop by weight (after the select kernel), on the staged tile and its
// list: per key, shift = the first row of the tile's kept assignments and key_half = how
// many of them the select kept. The kept ones of a key in this tile are its top kept by
// (weight key desc, list position asc): the select keeps the key's top `keep` in that order,
// and any top set of an order meets a run of it in a top set of the run. Their rows follow
// in list order. row_map is written in assignment order, every access coalesced.
__device__ __forceinline__ void finish_tile(const PermuteIndexParams& p, const TileSmem& m, int num_local,
                                            int64_t begin, int n, int listed, int64_t* warp_totals) {
  // After place_warp, placed[l] is the end of key l's run in the list, and the start of key
  // l + 1's (runs follow in key order).
  auto run_start = [&](int key) -> int { return key > 0 ? m.placed[key - 1] : 0; };
  // 1. Kept or not, per list entry: m.row[a] = 1 or 0.
  for (int i = threadIdx.x; i < listed; i += blockDim.x) {
    const int a = m.list[i];
    const int key = m.key[a];
    const int start = run_start(key), end = m.placed[key];
    const int keep = m.key_half[key];
    const bool kept = keep >= end - start || in_top_by_weight(m, start, end, i, keep);
    m.row[a] = kept ? 1 : 0;
  }
  // 2. A scan of the kept flags in list order: m.row[a] = kept entries before it in the list
  // (-1: dropped), and key_half[key] = that count at the start of the key's run. Each
  // thread reads the flags it wrote above, and writes only after the scan's barrier, when
  // every thread is done reading key_half above.
  int64_t kept_before = 0;
  for (int round = 0; round < listed; round += blockDim.x) {
    const int i = round + threadIdx.x;
    const int a = i < listed ? m.list[i] : 0;
    const int kept = i < listed ? m.row[a] : 0;
    int64_t round_total;
    const int64_t rank = kept_before + block_exclusive_scan<kPlaceThreads>(kept, warp_totals, &round_total);
    if (i < listed) {
      m.row[a] = kept ? static_cast<int32_t>(rank) : -1;
      const int key = m.key[a];
      if (i == run_start(key)) m.key_half[key] = static_cast<int16_t>(rank);
    }
    kept_before += round_total;
  }
  __syncthreads();
  for (int a = threadIdx.x; a < n; a += blockDim.x) {
    const int key = m.key[a];
    const int32_t rank = key < num_local ? m.row[a] : -1;
    p.row_map[begin + a] = rank >= 0 ? m.key_word[key] + rank - m.key_half[key] : -1;
  }
}

// mode: kPlaceRows (rows and gather; no select), kPlaceList (before the select kernel: the
// list grouped by key, in `sorted`) or kPlaceFinish (after it: row_map).
constexpr int kPlaceRows = 0, kPlaceList = 1, kPlaceFinish = 2;

__global__ void __launch_bounds__(kPlaceThreads)
    permute_place_kernel(PermuteIndexParams p, IndexWorkspace w, int mode) {
  __shared__ int64_t warp_totals[kPlaceThreads / 32];
  const int num_local = num_keys(p);
  const TileSmem m = tile_smem(dynamic_smem<unsigned char>(), num_local);
  // Per key: row = list position + shift, for list positions below limit (finish: shift is
  // the first kept row and limit the number kept).
  int32_t* const shift = m.key_word;
  int16_t* const limit = m.key_half;
  const int tile = blockIdx.x;
  const int64_t begin = static_cast<int64_t>(tile) * kPermuteTile;
  const int n = static_cast<int>(min(static_cast<int64_t>(kPermuteTile), p.num_tokens * p.k - begin));
  const bool stage_weights = p.weights_out != nullptr || mode != kPlaceRows;
  stage_tile(p, m, num_local, begin, n, stage_weights);
  // Per key: its first list position (a scan of the tile's counts), and for list position
  // i of the key, row (or position in `sorted`) = i + shift, shift = the tile's first
  // destination less the list start, kept while i < limit (capacity, and a map's missing
  // segments: none kept).
  int64_t listed = 0;
  for (int round = 0; round < num_local; round += kPlaceThreads) {
    const int l = round + threadIdx.x;
    const int count = l < num_local ? shift[l] : 0;
    int64_t round_total;
    const int64_t list_start = listed + block_exclusive_scan<kPlaceThreads>(count, warp_totals, &round_total);
    // Every key reads the tile's first destination from the offsets kernel, coalesced (and
    // its key_end where rows can end): per-tile reads of all E + 1 offsets were most of
    // this kernel's traffic beyond the minimum at 4096 experts.
    if (l < num_local) {
      const int64_t index = static_cast<int64_t>(tile) * num_local + l;
      const int64_t first = w.tile_counts[index];
      if (mode == kPlaceFinish) {
        shift[l] = static_cast<int32_t>(first);
        limit[l] = static_cast<int16_t>(w.tile_kept[index]);
      } else {
        int64_t key_limit = kPermuteTile;
        if (mode == kPlaceRows && keys_end(p)) {
          key_limit = min(max(w.key_end[l] - first + list_start, int64_t{0}), static_cast<int64_t>(kPermuteTile));
        }
        shift[l] = static_cast<int32_t>(first - list_start);
        limit[l] = static_cast<int16_t>(key_limit);
      }
      m.placed[l] = static_cast<int16_t>(list_start);
    }
    listed += round_total;
  }
  __syncthreads();  // placed, shift and limit are visible to the block after this
  if (threadIdx.x < 32) place_warp(m.key, m.placed, m.list, n, num_local);
  __syncthreads();  // the list is complete after this
  if (mode == kPlaceFinish) {
    finish_tile(p, m, num_local, begin, n, static_cast<int>(listed), warp_totals);
    return;
  }
  for (int i = threadIdx.x; i < listed; i += blockDim.x) {
    const int a = m.list[i];
    const int key = m.key[a];
    if (mode == kPlaceList) {
      w.sorted[shift[key] + i] = sorted_entry(static_cast<int32_t>(begin + a), m.weight[a]);
      continue;
    }
    const int32_t row = i < limit[key] ? shift[key] + i : -1;
    m.row[a] = row;
    if (row >= 0) {
      p.gather[row] = (begin + a) / p.k;
      if (p.weights_out != nullptr) p.weights_out[row] = m.weight[a];
    }
  }
  if (mode == kPlaceList) return;  // the finish pass writes row_map
  __syncthreads();  // every local assignment's row is in shared memory after this
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    p.row_map[begin + i] = m.key[i] < num_local ? m.row[i] : -1;
  }
}

// All of the above in one block, for a single tile (T * k <= kPermuteTile), staged in
// shared memory so that every global access is coalesced and every byte moves once:
//   1. each assignment's id is read once (its key kept in shared memory for the place
//      warp; a second read of ids from global cost as much as the first) and counted;
//   2. the expert scan writes offsets and keeps, per key, its list start and its first
//      row in shared memory (the place warp read offsets[s] from global: a 32-byte sector
//      for each 8-byte value);
//   3. one warp puts the assignments, in (token, slot) order inside their key, at their
//      places in the list of assignments grouped by key (place_warp);
//   4. the block walks that list, where consecutive entries are consecutive rows of a
//      segment: gather and the permuted weights (or, for the select kernel, the list) are
//      written in row order, where writing them in assignment order scattered 8- and
//      4-byte stores over one sector each;
//   5. the block writes row_map in assignment order.
// Rows fit in int32: the adapters refuse outputs of 2^31 rows or more.
__global__ void __launch_bounds__(kOffsetsThreads, 1)
    permute_index_one_tile_kernel(PermuteIndexParams p, IndexWorkspace w) {
  __shared__ int64_t warp_totals[kOffsetsThreads / 32];
  const int num_local = num_keys(p);
  const TileSmem m = tile_smem(dynamic_smem<unsigned char>(), num_local);
  int32_t* const start = m.key_word;      // counts, then the segment's first row (-1: no segment)
  int16_t* const list_start = m.key_half;  // start of the key in the list (<= kPermuteTile)
  const int n = static_cast<int>(p.num_tokens * p.k);  // <= kPermuteTile
  // Capacity with drop by weight: the select runs here too (below), on the staged list.
  const bool select = selects_by_weight(p);
  const bool stage_weights = p.weights_out != nullptr || select;
  stage_tile(p, m, num_local, 0, n, stage_weights);
  const int listed = static_cast<int>(scan_experts(
      p, start, warp_totals, [&](int key, int32_t key_list_start, int64_t row, bool exists) {
        list_start[key] = static_cast<int16_t>(key_list_start);
        m.placed[key] = static_cast<int16_t>(key_list_start);  // the only tile: rank 0 first
        start[key] = exists ? static_cast<int32_t>(row) : -1;
      }));
  __syncthreads();  // list_start and start are visible to the block after this

  if (threadIdx.x < 32) place_warp(m.key, m.placed, m.list, n, num_local);
  __syncthreads();  // the list is complete after this

  for (int i = threadIdx.x; i < listed; i += blockDim.x) {
    const int a = m.list[i];
    const int key = m.key[a];
    const int key_start = list_start[key];
    const int rank = i - key_start;
    const int32_t first_row = start[key];  // a key without a segment (unchecked map): dropped
    int32_t row = -1;
    if (first_row >= 0 && (p.capacity < 0 || rank < p.capacity)) row = first_row + rank;
    if (select && first_row >= 0) {
      // The expert's list is [key_start, end) in (token, slot) order; when it holds more
      // than capacity, an assignment is kept when fewer than capacity of the list rank
      // before it by weight (larger weight key, or an equal key earlier in the list: the
      // select kernel's threshold and ties). Its row then depends on the kept entries
      // before it in the list: encoded as -2 - i here, resolved after the barrier below.
      const int end = m.placed[key];  // after the place warp: the key's list end
      if (end - key_start > p.capacity) {  // then capacity < kPermuteTile: an int
        row = in_top_by_weight(m, key_start, end, i, static_cast<int>(p.capacity)) ? -2 - i : -1;
      }
    }
    m.row[a] = row;
    if (row >= 0) {
      p.gather[row] = a / p.k;
      if (p.weights_out != nullptr) p.weights_out[row] = m.weight[a];
    }
  }
  __syncthreads();  // every local assignment's row (or kept mark) is in shared memory after this
  // The row of list entry i kept by weight: the segment's next after the kept before it.
  auto kept_row = [&](int key, int i) -> int32_t {
    int32_t kept_before = 0;
    for (int j = list_start[key]; j < i; ++j) kept_before += m.row[m.list[j]] <= -2 ? 1 : 0;
    return start[key] + kept_before;
  };
  if (select) {  // gather and weights of the rows kept by weight, in list (row) order
    for (int i = threadIdx.x; i < listed; i += blockDim.x) {
      const int a = m.list[i];
      if (m.row[a] > -2) continue;
      const int32_t row = kept_row(m.key[a], i);
      p.gather[row] = a / p.k;
      if (p.weights_out != nullptr) p.weights_out[row] = m.weight[a];
    }
  }
  for (int a = threadIdx.x; a < n; a += blockDim.x) {
    const int key = m.key[a];
    int32_t row = key < num_local ? m.row[a] : -1;
    if (row <= -2) row = kept_row(key, -2 - row);
    p.row_map[a] = row;
  }
}

// The select kernel, one block per group of up to kSelectGroup consecutive local keys, whose
// lists are consecutive in `sorted`: the block reads the group's range of the list once,
// coalesced, into shared memory when it fits (else each key it selects in that fits is
// staged on its own, and a longer key is read from global memory, still in list order and
// coalesced, once per radix pass); per key with more assignments than
// it keeps, a radix select of the keep-th largest weight (per-warp aggregated histogram,
// digit found by a block scan); then one sweep over the range in list order keeps the
// winners and writes gather and weights_out; last, per tile and key, the first row of the
// tile's kept assignments and their number, for the place kernel's finish pass to write
// row_map. One block per key read each key's few bytes of metadata and list one sector
// each, gathered the weights one per sector and wrote its rows in instructions of its own
// (4-7x the minimum traffic at 256-4096 experts); writing row_map here, in list order,
// scattered it one 32-byte sector per 8-byte entry (2.0-2.4x at 256-4096 experts).
constexpr int kSelectGroup = 32;    // keys per block at most: warp 0 reads their metadata at once
constexpr int kSelectStage = 4096;  // list entries staged in shared memory (32 KiB)

// histogram[digit] += the lanes of this warp with that digit (256: none): one atomic per
// distinct digit, by its lowest lane, not one per lane (weights in (0, 1] share one or
// two top digits). Every lane of the warp calls it.
__device__ __forceinline__ void warp_count_digit(int32_t* histogram, int digit) {
  const int lane = threadIdx.x % 32;
  unsigned peers = kFullMask;
#pragma unroll
  for (int bit = 0; bit < 9; ++bit) {
    const int mine = (digit >> bit) & 1;
    const unsigned ones = __ballot_sync(kFullMask, mine);
    peers &= mine ? ones : ~ones;
  }
  if (digit < 256 && __popc(peers & ((1u << lane) - 1u)) == 0) atomicAdd(&histogram[digit], __popc(peers));
}

// A key of the select kernel's group. It keeps the weight keys above threshold and the
// first keep_equal equal to it (list order is (token, slot) order: ties keep the lower
// assignment); threshold 0 with keep_equal = its count keeps all (every weight key is
// above 0: NaN ranks as -inf).
struct SelectKey {
  int32_t begin, end;  // its entries in the group's range of the list
  int64_t segment;     // its first row
  int64_t keep;        // rows it may fill
  uint32_t threshold;
  int64_t keep_equal;
  int64_t equal_base;  // the sweep's running totals at its first entry
  int64_t kept_base;
};

__global__ void __launch_bounds__(kSelectThreads)
    permute_select_kernel(PermuteIndexParams p, IndexWorkspace w, int group_keys) {
  __shared__ SelectKey keys[kSelectGroup];
  __shared__ int64_t range[2];   // the group's entries in the list (64-bit: nvcc and the emulator then lay out the same padding)
  __shared__ int32_t histogram[256];
  __shared__ int64_t choice[2];  // digit, still to keep among keys equal to the prefix
  __shared__ int64_t warp_totals[kSelectThreads / 32];
  const int tid = threadIdx.x;
  const int first_key = blockIdx.x * group_keys;
  const int group = min(group_keys, num_keys(p) - first_key);

  if (tid < kSelectGroup) {  // warp 0, lane j on key first_key + j: coalesced reads
    int32_t begin = 0, count = 0;
    int64_t segment = 0, keep = 0;
    if (tid < group) {
      const int s = segment_of_key(p, first_key + tid);
      begin = w.list_start[first_key + tid];
      count = w.counts[first_key + tid];
      segment = p.offsets[s];
      // The segment may be smaller than capacity only for an unchecked map (size 0).
      keep = min(p.capacity, p.offsets[s + 1] - segment);
    }
    const int32_t first = __shfl_sync(kFullMask, begin, 0);
    const int32_t last = __shfl_sync(kFullMask, begin + count, group - 1);
    if (tid >= group) begin = last;  // no entries past the last key
    keys[tid] = SelectKey{begin - first, begin - first + count, segment, keep, 0u, count, 0, 0};
    if (tid == 0) {
      range[0] = first;
      range[1] = last;
    }
  }
  __syncthreads();
  const int len = static_cast<int>(range[1] - range[0]);
  // Each lane reads whole 8-byte entries: coalesced, and no bank conflict in shared memory.
  // No barrier after the staging: the radix passes read the entries after their first
  // barrier, and the sweep's thread reads only the entries it staged itself (or, unstaged,
  // global memory).
  uint64_t* entries = w.sorted + range[0];
  uint64_t* const staged = dynamic_smem<uint64_t>();
  const bool group_staged = len <= kSelectStage;  // uniform
  if (group_staged) {
    for (int i = tid; i < len; i += kSelectThreads) staged[i] = entries[i];
    entries = staged;
  }

  // Thresholds of the keys with more entries than they keep, one key at a time (the
  // loops are uniform: every bound comes from shared memory). A group too long to stage
  // stages each such key that fits on its own: its four passes then read global memory
  // once, not four times.
  for (int j = 0; j < group; ++j) {
    const int begin = keys[j].begin, end = keys[j].end;
    const int64_t keep = keys[j].keep;
    if (end - begin <= keep) continue;
    const uint64_t* source = entries;  // entry i of the key is source[i - source_begin]
    int source_begin = 0;
    if (!group_staged && end - begin <= kSelectStage) {
      // The last pass of the key before read `staged` before its final barrier.
      for (int i = begin + tid; i < end; i += kSelectThreads) staged[i - begin] = entries[i];
      source = staged;
      source_begin = begin;
    }
    uint32_t prefix = 0;
    int64_t need = keep;
    for (int shift = 24; shift >= 0; shift -= 8) {
      const uint32_t high = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
      histogram[tid] = 0;
      __syncthreads();
      for (int base = begin; base < end; base += kSelectThreads) {
        const int i = base + tid;
        const uint32_t key = i < end ? weight_key(entry_weight(source[i - source_begin])) : 0u;
        warp_count_digit(histogram, i < end && (key & high) == prefix ? static_cast<int>((key >> shift) & 255u) : 256);
      }
      __syncthreads();
      // The digit of the need-th largest key: thread t takes digit 255 - t; the scan gives
      // the count above it, and the one thread whose digit reaches `need` writes the choice
      // (need 0, i.e. keep 0: digit 255, keep none equal).
      const int digit = 255 - tid;
      const int64_t count = histogram[digit];
      int64_t total;
      const int64_t above = block_exclusive_scan<kSelectThreads>(count, warp_totals, &total);
      if ((above < need && above + count >= need) || (need == 0 && tid == 0)) {
        choice[0] = digit;
        choice[1] = need - above;
        if (shift == 0) {  // the last digit: the key's threshold, read after the barrier below
          keys[j].threshold = prefix | static_cast<uint32_t>(digit);
          keys[j].keep_equal = need - above;
        }
      }
      __syncthreads();
      // choice is rewritten in the next pass only after two more barriers.
      prefix |= static_cast<uint32_t>(choice[0]) << shift;
      need = choice[1];
    }
  }

  // The sweep, in list order: the scans of "equal to the threshold" and "kept" over the
  // whole range, less their values at the key's first entry, give ranks inside the key.
  int64_t equal_before = 0, kept_before = 0;
  for (int base = 0; base < len; base += kSelectThreads) {
    const int i = base + tid;
    const bool valid = i < len;
    int j = 0, hi = group - 1;  // the key of entry i: the first whose entries end past i
    while (j < hi) {
      const int mid = (j + hi) / 2;
      if (keys[mid].end > i) {
        hi = mid;
      } else {
        j = mid + 1;
      }
    }
    const bool first = valid && i == keys[j].begin;
    const uint64_t e = valid ? entries[i] : 0u;
    const uint32_t key = weight_key(entry_weight(e));
    const uint32_t threshold = keys[j].threshold;
    const bool equal = valid && key == threshold;
    int64_t total;
    const int64_t equal_rank = equal_before + block_exclusive_scan<kSelectThreads>(equal, warp_totals, &total);
    equal_before += total;
    if (first) keys[j].equal_base = equal_rank;
    __syncthreads();
    const bool kept = valid && (key > threshold || (equal && equal_rank - keys[j].equal_base < keys[j].keep_equal));
    const int64_t kept_rank = kept_before + block_exclusive_scan<kSelectThreads>(kept, warp_totals, &total);
    kept_before += total;
    if (first) keys[j].kept_base = kept_rank;
    __syncthreads();
    if (valid) {
      if (kept) {
        const int64_t row = keys[j].segment + kept_rank - keys[j].kept_base;
        p.gather[row] = entry_item(e) / p.k;
        if (p.weights_out != nullptr) p.weights_out[row] = entry_weight(e);
      }
      // The entry is not read again: its place now holds the kept entries of its key before it.
      entries[i] = static_cast<uint64_t>(kept_rank - keys[j].kept_base);
    }
  }

  // Per tile and key of the group, for the place kernel's finish pass (which writes row_map
  // in assignment order, where this sweep scattered it one sector per entry): the first row
  // of the tile's kept assignments of the key, in tile_counts over the tile's first list
  // position, and how many it keeps, in tile_kept. Warp v takes a run of tiles, lane j the
  // key first_key + j: each tile's row of the group's keys is read and written coalesced.
  const int lane = tid % 32, warp = tid / 32;
  const int num_local = num_keys(p);
  const int tiles_per_warp = (w.num_tiles + kSelectThreads / 32 - 1) / (kSelectThreads / 32);
  const int tile_begin = min(warp * tiles_per_warp, w.num_tiles);
  const int tile_end = min(tile_begin + tiles_per_warp, w.num_tiles);
  const bool lane_works = lane < group && tile_begin < tile_end;
  // Kept entries of the key in the tiles before tile t: the prefix at the tile's first list
  // position (a tile past the key's last entry: all it keeps).
  auto kept_before_tile = [&](int t) -> int64_t {
    const int32_t end = keys[lane].end;
    const int64_t position = t < w.num_tiles ? w.tile_counts[static_cast<int64_t>(t) * num_local + first_key + lane] - range[0] : end;
    return position < end ? static_cast<int64_t>(entries[position]) : min(static_cast<int64_t>(end - keys[lane].begin), keys[lane].keep);
  };
  __syncthreads();  // the prefixes are in place
  // The next warp's first tile is read before the barrier: that warp overwrites it after.
  const int64_t kept_at_end = lane_works ? kept_before_tile(tile_end) : 0;
  __syncthreads();
  if (lane_works) {
    int64_t before = kept_before_tile(tile_begin);
    for (int t = tile_begin; t < tile_end; ++t) {
      const int64_t after = t + 1 < tile_end ? kept_before_tile(t + 1) : kept_at_end;
      const int64_t index = static_cast<int64_t>(t) * num_local + first_key + lane;
      w.tile_counts[index] = static_cast<int32_t>(keys[lane].segment + before);
      w.tile_kept[index] = static_cast<int32_t>(after - before);
      before = after;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Row stage
// ---------------------------------------------------------------------------------------

constexpr int kRowThreads = 128;
constexpr unsigned kMaxFillBlocks = 2048;

// Threads per row: enough for one unit (16-byte chunk, or element on the scalar path)
// each, a power of two up to the block.
inline int row_group_threads(int64_t units) {
  int g = 1;
  while (g < units && g < kRowThreads) g *= 2;
  return g;
}

template <typename T>
__device__ __forceinline__ Chunk16<T> scale_chunk(Chunk16<T> c, float s) {
#pragma unroll
  for (int i = 0; i < Vec16<T>::size; ++i) c.elems[i] = from_float<T>(s * to_float(c.elems[i]));
  return c;
}

// Blocks [0, token_blocks) scatter tokens; the blocks after them zero the padding rows.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    scatter_rows_kernel(ScatterRowsParams p, int group_threads, bool vector_path,
                        unsigned token_blocks) {
  constexpr int V = Vec16<T>::size;
  const int groups = kRowThreads / group_threads;
  const int g = threadIdx.x % group_threads;
  const bool scatter = blockIdx.x < token_blocks;
  const int64_t item = static_cast<int64_t>(scatter ? blockIdx.x : blockIdx.x - token_blocks) * groups +
                       threadIdx.x / group_threads;
  const int64_t H = p.hidden;
  T* out = static_cast<T*>(p.out);

  if (scatter) {
    const int64_t t = item;
    if (t >= p.num_tokens) return;
    const T* src = static_cast<const T*>(p.x) + t * H;
    const int64_t* rows = p.row_map + t * p.k;
    const float* scale = p.scale != nullptr ? p.scale + t * p.k : nullptr;
    if (vector_path) {
      for (int64_t c = g; c < H / V; c += group_threads) {
        const Chunk16<T> v = load_chunk(src + c * V);  // read once, written k times
        for (int j = 0; j < p.k; ++j) {
          const int64_t r = __ldg(rows + j);
          if (r < 0 || r >= p.num_out_rows) continue;
          store_chunk(out + r * H + c * V, scale != nullptr ? scale_chunk(v, __ldg(scale + j)) : v);
        }
      }
    } else {
      for (int64_t i = g; i < H; i += group_threads) {
        const T v = src[i];
        for (int j = 0; j < p.k; ++j) {
          const int64_t r = __ldg(rows + j);
          if (r < 0 || r >= p.num_out_rows) continue;
          out[r * H + i] = scale != nullptr ? from_float<T>(__ldg(scale + j) * to_float(v)) : v;
        }
      }
    }
    return;
  }

  // Rows without a token (gather -1: align padding, unused capacity, the tail past
  // offsets[E]) are zero. The tail costs bandwidth when M is far above what the segments
  // use (large align, many experts, few tokens), but every output byte is then defined:
  // two runs are bitwise equal. A grid-stride loop over the rows.
  const int64_t stride = static_cast<int64_t>(gridDim.x - token_blocks) * groups;
  Chunk16<T> zero;
  zero.raw.x = zero.raw.y = zero.raw.z = zero.raw.w = 0u;
  for (int64_t r = item; r < p.num_out_rows; r += stride) {
    if (p.gather[r] >= 0) continue;  // a token's row, written by the blocks above
    T* dst = out + r * H;
    if (vector_path) {
      for (int64_t c = g; c < H / V; c += group_threads) store_chunk(dst + c * V, zero);
    } else {
      for (int64_t i = g; i < H; i += group_threads) dst[i] = from_float<T>(0.f);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    gather_rows_kernel(GatherRowsParams p, int group_threads, bool vector_path) {
  constexpr int V = Vec16<T>::size;
  const int groups = kRowThreads / group_threads;
  const int g = threadIdx.x % group_threads;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * groups + threadIdx.x / group_threads;
  if (t >= p.num_tokens) return;
  const int64_t H = p.hidden;
  const T* in = static_cast<const T*>(p.in);
  T* dst = static_cast<T*>(p.out) + t * H;
  const int64_t* rows = p.row_map + t * p.k;
  const float* weights = p.weights != nullptr ? p.weights + t * p.k : nullptr;
  if (vector_path) {
    for (int64_t c = g; c < H / V; c += group_threads) {
      float acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = 0.f;
      for (int j = 0; j < p.k; ++j) {  // fixed j order: the sum is reproducible
        const int64_t r = __ldg(rows + j);
        if (r < 0 || r >= p.num_in_rows) continue;
        float v[V];
        load_vec16_as_float(in + r * H + c * V, v);
        if (weights != nullptr) {
          const float w = __ldg(weights + j);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += w * v[i];
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += v[i];
        }
      }
      Chunk16<T> result;
#pragma unroll
      for (int i = 0; i < V; ++i) result.elems[i] = from_float<T>(acc[i]);
      store_chunk(dst + c * V, result);
    }
  } else {
    for (int64_t i = g; i < H; i += group_threads) {
      float acc = 0.f;
      for (int j = 0; j < p.k; ++j) {
        const int64_t r = __ldg(rows + j);
        if (r < 0 || r >= p.num_in_rows) continue;
        const float v = to_float(in[r * H + i]);
        acc += weights != nullptr ? __ldg(weights + j) * v : v;
      }
      dst[i] = from_float<T>(acc);
    }
  }
}

// One warp per token. The token's row of `a` is read once for up to kDotGroup of its k
// dot products (each of its chunks meets the kDotGroup rows of `b` while it is in
// registers), not once per product: the k products one after another read `a` k times
// (1.85x the minimum traffic at k = 8). The slots' rows and outputs move as one coalesced
// instruction per group (lane jj holds slot jj), not one 8-byte read and 4-byte write per
// slot. Each product still sums its own terms in the same order (chunks ascending, then
// the warp's butterfly), so the bits are those of one product at a time.
constexpr int kDotThreads = 128;
constexpr int kDotGroup = 16;  // products per pass over `a`: k <= 16 reads it once

template <typename T>
__global__ void __launch_bounds__(kDotThreads) row_dot_kernel(RowDotParams p, bool vector_path) {
  constexpr int V = Vec16<T>::size;
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (kDotThreads / 32) + threadIdx.x / 32;
  if (t >= p.num_tokens) return;  // whole warps leave together
  const int64_t H = p.hidden;
  const T* a = static_cast<const T*>(p.a) + t * H;
  const T* b_base = static_cast<const T*>(p.b);
  for (int j0 = 0; j0 < p.k; j0 += kDotGroup) {
    const int group = min(kDotGroup, p.k - j0);
    // Lane jj < group reads slot j0 + jj's row; the others hold -1 (invalid).
    const int64_t my_row = lane < group ? __ldg(p.row_map + t * p.k + j0 + lane) : int64_t{-1};
    int64_t rows[kDotGroup];
    float dot[kDotGroup];
#pragma unroll
    for (int jj = 0; jj < kDotGroup; ++jj) {
      rows[jj] = __shfl_sync(kFullMask, my_row, jj);
      dot[jj] = 0.f;
    }
    if (vector_path) {
      for (int64_t c = lane; c < H / V; c += 32) {
        float va[V];
        load_vec16_as_float(a + c * V, va);
#pragma unroll
        for (int jj = 0; jj < kDotGroup; ++jj) {
          if (rows[jj] < 0 || rows[jj] >= p.num_b_rows) continue;
          float vb[V];
          load_vec16_as_float(b_base + rows[jj] * H + c * V, vb);
#pragma unroll
          for (int i = 0; i < V; ++i) dot[jj] += va[i] * vb[i];
        }
      }
    } else {
      for (int64_t i = lane; i < H; i += 32) {
        const float va = to_float(a[i]);
#pragma unroll
        for (int jj = 0; jj < kDotGroup; ++jj) {
          if (rows[jj] < 0 || rows[jj] >= p.num_b_rows) continue;
          dot[jj] += va * to_float(b_base[rows[jj] * H + i]);
        }
      }
    }
    float mine = 0.f;
#pragma unroll
    for (int jj = 0; jj < kDotGroup; ++jj) {
      const float d = warp_allreduce<32>(dot[jj], SumOp{});
      if (lane == jj) mine = d;
    }
    if (lane < group) p.out[t * p.k + j0 + lane] = mine;
  }
}

// ---------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
void launch_scatter_typed(const ScatterRowsParams& p, cudaStream_t stream) {
  const bool vector_path = (p.hidden * sizeof(T)) % 16 == 0 && aligned16(p.x) && aligned16(p.out);
  const int group = row_group_threads(vector_path ? p.hidden / Vec16<T>::size : p.hidden);
  const int groups = kRowThreads / group;
  const unsigned token_blocks = ceil_div(p.num_tokens, groups);
  // Enough blocks to fill the padding and the tail at full bandwidth, not one per row.
  const int64_t fill_rows = p.gather != nullptr ? p.num_out_rows : 0;
  const unsigned fill_blocks = std::min(ceil_div(fill_rows, groups), kMaxFillBlocks);
  LaunchConfig cfg{dim3(token_blocks + fill_blocks), dim3(kRowThreads), 0, stream};
  launch_kernel("scatter_rows_kernel", scatter_rows_kernel<T>, cfg, p, group, vector_path,
                token_blocks);
}

template <typename T>
void launch_gather_typed(const GatherRowsParams& p, cudaStream_t stream) {
  const bool vector_path = (p.hidden * sizeof(T)) % 16 == 0 && aligned16(p.in) && aligned16(p.out);
  const int group = row_group_threads(vector_path ? p.hidden / Vec16<T>::size : p.hidden);
  LaunchConfig cfg{dim3(ceil_div(p.num_tokens, kRowThreads / group)), dim3(kRowThreads), 0, stream};
  launch_kernel("gather_rows_kernel", gather_rows_kernel<T>, cfg, p, group, vector_path);
}

template <typename T>
void launch_row_dot_typed(const RowDotParams& p, cudaStream_t stream) {
  const bool vector_path = (p.hidden * sizeof(T)) % 16 == 0 && aligned16(p.a) && aligned16(p.b);
  LaunchConfig cfg{dim3(ceil_div(p.num_tokens, kDotThreads / 32)), dim3(kDotThreads), 0, stream};
  launch_kernel("row_dot_kernel", row_dot_kernel<T>, cfg, p, vector_path);
}

}  // namespace permute

size_t permute_index_workspace_bytes(int64_t num_tokens, int k, int num_experts, bool select_by_weight) {
  return permute::index_workspace(nullptr, num_tokens * k, num_experts, select_by_weight).bytes;
}

void launch_permute_index(const PermuteIndexParams& p, cudaStream_t stream) {
  if (p.num_experts < 1 || p.num_experts > kMaxExperts) {
    throw std::invalid_argument("permute: num_experts must be in [1, 4096]");
  }
  if (p.expert_begin < 0 || p.expert_begin >= p.expert_end || p.expert_end > p.num_experts) {
    throw std::invalid_argument("permute: expert range must satisfy 0 <= begin < end <= num_experts");
  }
  if (p.k < 1 || p.align < 1) throw std::invalid_argument("permute: k and align must be positive");
  const int64_t n = p.num_tokens * p.k;
  if (n >= (int64_t{1} << 31)) throw std::invalid_argument("permute: num_tokens * k must be < 2^31");
  if (permute::selects_by_weight(p) && p.weights == nullptr && n > 0) {
    throw std::invalid_argument("permute: drop by weight needs weights");
  }
  const bool select = permute::selects_by_weight(p);
  const permute::IndexWorkspace w = permute::index_workspace(p.workspace, n, p.num_experts, select);
  const int num_local = permute::num_keys(p);
  const size_t counter_bytes = static_cast<size_t>(num_local) * sizeof(int32_t);
  if (w.num_tiles <= 1) {
    // Also runs with no tokens: offsets and num_rows are still written.
    launch_kernel("permute_index_one_tile_kernel", permute::permute_index_one_tile_kernel,
                  LaunchConfig{dim3(1), dim3(permute::kOffsetsThreads),
                               permute::tile_smem_bytes(num_local), stream},
                  p, w);
  } else {
    launch_kernel("permute_count_kernel", permute::permute_count_kernel,
                  LaunchConfig{dim3(w.num_tiles), dim3(permute::kCountThreads), counter_bytes, stream},
                  p, w);
    const LaunchConfig slices{dim3(std::max(w.num_slices, 1), ceil_div(num_local, 32)), dim3(permute::kSliceThreads),
                              0, stream};
    if (w.num_slices > 0) launch_kernel("permute_slice_kernel", permute::permute_slice_kernel, slices, p, w, false);
    launch_kernel("permute_offsets_kernel", permute::permute_offsets_kernel,
                  LaunchConfig{dim3(1), dim3(permute::kOffsetsThreads), counter_bytes, stream}, p, w);
    if (w.num_slices > 0) launch_kernel("permute_slice_kernel", permute::permute_slice_kernel, slices, p, w, true);
    const LaunchConfig place{dim3(w.num_tiles), dim3(permute::kPlaceThreads), permute::tile_smem_bytes(num_local),
                             stream};
    // Drop by weight (a single tile selects above): the list grouped by key, the select
    // kernel's verdict on it, then row_map.
    launch_kernel("permute_place_kernel", permute::permute_place_kernel, place, p, w,
                  select ? permute::kPlaceList : permute::kPlaceRows);
    if (select) {
      // Keys per select block: 32, halved while the group's expected list (n / E entries a
      // key) would fill more than half the stage, so that it stays in shared memory (a
      // skewed group that does not fit still works, in global memory).
      int group_keys = permute::kSelectGroup;
      const int64_t per_key = std::max<int64_t>(n / p.num_experts, 1);
      while (group_keys > 1 && 2 * group_keys * per_key > permute::kSelectStage) group_keys /= 2;
      launch_kernel("permute_select_kernel", permute::permute_select_kernel,
                    LaunchConfig{dim3(ceil_div(num_local, group_keys)), dim3(permute::kSelectThreads),
                                 permute::kSelectStage * sizeof(uint64_t), stream},
                    p, w, group_keys);
      launch_kernel("permute_place_kernel", permute::permute_place_kernel, place, p, w, permute::kPlaceFinish);
    }
  }
}

void launch_scatter_rows(const ScatterRowsParams& p, cudaStream_t stream) {
  if (p.num_tokens > 0 && p.k < 1) throw std::invalid_argument("scatter_rows: k must be positive");
  if (p.hidden == 0) return;
  MOE_DISPATCH_FLOAT_TYPES(p.dtype, T, permute::launch_scatter_typed<T>(p, stream));
}

void launch_gather_rows(const GatherRowsParams& p, cudaStream_t stream) {
  if (p.hidden == 0) return;
  MOE_DISPATCH_FLOAT_TYPES(p.dtype, T, permute::launch_gather_typed<T>(p, stream));
}

void launch_row_dot(const RowDotParams& p, cudaStream_t stream) {
  MOE_DISPATCH_FLOAT_TYPES(p.dtype, T, permute::launch_row_dot_typed<T>(p, stream));
}

}  // namespace moe
