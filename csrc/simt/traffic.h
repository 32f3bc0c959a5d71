// The emulator's memory-traffic counters, one row per kernel launch. A plain header (no
// CUDA types) so the Python bindings can read it.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace simt {

struct TrafficRow {
  std::string kernel;
  std::array<unsigned, 3> grid{}, block{};
  // Global memory: bytes the threads asked for, and the 32-byte sectors their warp-level
  // instructions touched (a warp's accesses of one instruction, deduplicated by sector,
  // as the GPU's coalescer does). unique_bytes_*: distinct bytes read / written by the
  // launch, the least any kernel doing this work must move.
  uint64_t global_instructions = 0;
  uint64_t global_bytes_read = 0, global_bytes_written = 0;
  uint64_t sectors_read = 0, sectors_written = 0;
  uint64_t unique_bytes_read = 0, unique_bytes_written = 0;
  // Shared memory: warp-level instructions, the wavefronts they took (bank conflicts add
  // wavefronts) and the ideal count without conflicts; the worst conflict's ways.
  uint64_t shared_instructions = 0;
  uint64_t shared_wavefronts = 0, shared_ideal_wavefronts = 0;
  uint64_t max_bank_conflict_ways = 0;
};

// Count the traffic of every launch from now on (this OS thread), until traffic_end,
// which returns one row per launch.
void traffic_begin();
std::vector<TrafficRow> traffic_end();

}  // namespace simt
