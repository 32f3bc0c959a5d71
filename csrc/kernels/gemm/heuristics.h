// Tile heuristic of the grouped GEMM: pure host code, no CUDA. Picks one of the built tile
// configurations (gemm.h, GemmTile) from the problem's static shape (never from the
// expert boundaries, which live on the device) and the device (arch, multiprocessors).
#pragma once

#include <algorithm>
#include <cstdint>

#include "gemm.h"

namespace moe {
namespace gemm {

// The shapes of the built configurations; grouped_gemm.cuh static_asserts its traits
// against these numbers. With 4-bit weights every tile is 64 deep: a weight row's codes
// for one step are then 32 bytes, a whole sector, where 32 deep would read half a sector
// per step (and the other half again in the next).
inline GemmConfig tile_config(GemmTile tile, bool quantized = false) {
  GemmConfig c;
  c.tile = tile;
  switch (tile) {
    case GemmTile::m128n128:
      c.tile_m = 128, c.tile_n = 128, c.tile_k = 32, c.warps = 8, c.stages = 3, c.variant = "prefill";
      break;
    case GemmTile::m64n64:
      c.tile_m = 64, c.tile_n = 64, c.tile_k = 32, c.warps = 4, c.stages = 4, c.variant = "prefill";
      break;
    case GemmTile::m16n64:
      c.tile_m = 16, c.tile_n = 64, c.tile_k = 64, c.warps = 4, c.stages = 4, c.variant = "decode";
      break;
  }
  if (quantized) c.tile_k = 64;
  return c;
}

// Shared memory per block of a configuration: `stages` copies of the A and B tiles, each
// smem row padded by 8 elements (16 bytes) so that ldmatrix rows fall in distinct banks.
// 4-bit weights: codes rows of tile_k / 2 bytes padded to an odd number of 16-byte units,
// and a ring of stages * tile_k / 32 + 1 group slots of 3 bytes per column.
inline int64_t tile_smem_bytes(const GemmConfig& c, bool w_kn, bool quantized = false) {
  const int64_t a = int64_t{c.tile_m} * (c.tile_k + 8);
  if (quantized) {
    const int64_t row_bytes = (c.tile_k / 2) % 32 == 0 ? c.tile_k / 2 + 16 : c.tile_k / 2;
    return c.stages * (a * 2 + c.tile_n * row_bytes) + (c.stages * (c.tile_k / 32) + 1) * c.tile_n * 3;
  }
  const int64_t b = w_kn ? int64_t{c.tile_k} * (c.tile_n + 8) : int64_t{c.tile_n} * (c.tile_k + 8);
  return c.stages * (a + b) * 2;
}

// Blocks of the persistent grid: enough to fill every multiprocessor twice (a block
// waiting on its copies overlaps another's math), never more than the tiles that can exist.
inline int persistent_grid(int num_sms, int64_t max_tiles) {
  const int64_t blocks = std::min<int64_t>(int64_t{2} * std::max(num_sms, 1), std::max<int64_t>(max_tiles, 1));
  return static_cast<int>(blocks);
}

// Tiles the schedule can hold at most: every expert's last m-tile may be partial, so
// ceil(m / tile_m) + E m-tiles, times the n-tiles.
inline int64_t max_tiles(const GemmConfig& c, int64_t m, int64_t n_out_per_tile_cols, int num_experts) {
  return ((m + c.tile_m - 1) / c.tile_m + num_experts) * n_out_per_tile_cols;
}

// The choice:
//  - decode (m16n64) when experts average at most 8 rows (masked: S <= 16, a hard bound):
//    one m16 block covers an expert's rows, so each active expert's weights are read
//    exactly once, and experts without rows are never touched. Half the tile, not all of
//    it: routing is uneven, and an expert past 16 rows would take a second m-tile and read
//    its weights twice (at 16 rows on average, 1.5-1.8x the weight bytes on random routing);
//  - else m128n128 when it still gives every multiprocessor a tile (arch-independent today:
//    its 3 stages need 61 KiB, within every supported arch's opt-in limit), else the
//    smaller m64n64 (four times the tiles) so small problems spread over the device.
inline GemmConfig choose(int arch, int num_sms, int64_t m, int64_t n, int64_t k, int num_experts,
                         bool masked, int64_t rows_per_expert, Activation activation, bool w_kn,
                         bool quantized = false) {
  (void)k;
  const bool decode = masked ? rows_per_expert <= 16 : m <= int64_t{8} * std::max(num_experts, 1);
  GemmTile tile;
  if (decode) {
    tile = GemmTile::m16n64;
  } else {
    const GemmConfig big = tile_config(GemmTile::m128n128);
    const int64_t big_tiles = ((m + big.tile_m - 1) / big.tile_m) * ((n + big.tile_n - 1) / big.tile_n);
    tile = big_tiles >= num_sms ? GemmTile::m128n128 : GemmTile::m64n64;
  }
  GemmConfig c = tile_config(tile, quantized);
  // sm_120 / sm_89 parts have ~100 KiB per block; every configuration fits (checked here
  // so that a new, larger one is not launched where it cannot run).
  const int64_t limit = (arch == 80) ? 163 * 1024 : (arch == 90 || arch == 100) ? 227 * 1024 : 99 * 1024;
  if (tile_smem_bytes(c, w_kn, quantized) > limit) c = tile_config(GemmTile::m64n64, quantized);
  (void)activation;
  return c;
}

}  // namespace gemm
}  // namespace moe
