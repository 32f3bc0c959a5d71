// The emulator's memory observer: every load and store a kernel makes, for
//   - alignment: a 2-, 4-, 8- or 16-byte access to shared or global memory must be
//     naturally aligned, as the GPU faults otherwise (always on);
//   - the race detector (MOE_KERNELS_SIMT_RACECHECK=1);
//   - the traffic counters (traffic_begin/traffic_end, for bench/traffic_report.py).
//
// How accesses reach us. The kernels' translation unit (kernels.cpp) is compiled with
// -fsanitize=thread, so the compiler calls __tsan_read4(addr), __tsan_write16(addr), ... at
// every load and store of kernel code, plain array indexing included. We link no
// ThreadSanitizer runtime: the callbacks below are ours (the approach of the Linux
// kernel's KCSAN). Only kernel code is instrumented; the emulator and the adapters are not,
// and the emulator reports the accesses it makes for a kernel (ldmatrix, cp.async) with
// observe(). Thread-private memory (the fibers' stacks) is skipped.
//
// The race detector. Two accesses to one byte conflict when they come from different
// threads, at least one writes and not both are atomics. They are ordered when:
//   - same block: a __syncthreads lies between them (the block's barrier epoch differs),
//     or both threads are in one warp and a __syncwarp whose mask holds both lies between
//     them (per-lane vector clocks inside a warp, reset at each __syncthreads);
//   - different blocks: never (global memory; blocks run in no defined order).
// Shuffles and votes order nothing. A cp.async destination is "in flight" from the issue
// to the wait that lands it: any access to it in between is reported; the copy itself
// counts as a write by the issuing thread at the wait. Each byte keeps its last write and
// a summary of the reads since (epoch, block, the warp or "several warps", the lanes and
// their newest clock), which is enough to find a conflict with every earlier access that a
// later one could race with, so the verdict does not depend on the order the scheduler
// runs threads in. The summary is conservative in one case only: reads by several lanes of
// one warp that synchronized through different partial-mask __syncwarps.
#include "internal.h"
#include "traffic.h"

#include <array>
#include <cstdio>
#include <pthread.h>
#include <map>
#include <memory>
#include <set>
#include <unordered_map>
#include <unordered_set>

namespace simt {
namespace detail {
namespace {

constexpr int kWarp = 32;

// ---- What the running launch looks like -------------------------------------------------
struct LaunchView {
  bool active = false;
  bool racecheck = false;
  bool traffic = false;
  uint64_t block = 0;
  uintptr_t dyn_begin = 0, dyn_end = 0;  // dynamic shared memory of the block
  uintptr_t tls_begin = 0, tls_end = 0;  // static shared memory (the module's thread-locals)
  uintptr_t host_stack_begin = 0, host_stack_end = 0;  // the OS thread's stack
  int num_threads = 0;
  uint32_t epoch = 0;  // completed __syncthreads of the block
  // clocks[t][l]: what thread t knows of lane l of its warp (its own lane: its clock).
  std::vector<std::array<uint32_t, kWarp>> clocks;
};
thread_local LaunchView g_view;

enum class Space : uint8_t { none, shared, global };

Space space_of(uintptr_t a) {
  const LaunchView& v = g_view;
  if (a - v.dyn_begin < v.dyn_end - v.dyn_begin) return Space::shared;
  if (a - v.tls_begin < v.tls_end - v.tls_begin) return Space::shared;
  if (on_fiber_stack(reinterpret_cast<const void*>(a))) return Space::none;
  // The launcher's stack: the kernel's arguments (parameter space on the GPU, not global).
  if (a - v.host_stack_begin < v.host_stack_end - v.host_stack_begin) return Space::none;
  return Space::global;
}

// ---- Source locations -------------------------------------------------------------------
std::string source_line(uint32_t code_offset) {
  if (code_offset == 0) return "(inside the emulator)";
  const uintptr_t address = module_base() + code_offset;
  char command[1024];
  std::snprintf(command, sizeof(command), "addr2line -C -i -e '%s' 0x%lx 2>/dev/null",
                module_path().c_str(), static_cast<unsigned long>(code_offset - 1));
  std::string line;
  if (FILE* pipe = popen(command, "r")) {
    char buffer[512];
    if (std::fgets(buffer, sizeof(buffer), pipe)) line = buffer;
    pclose(pipe);
  }
  while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
  if (line.empty() || line[0] == '?') line = "(no line information)";
  const std::string function = function_name(reinterpret_cast<const void*>(address));
  return line + (function.empty() ? "" : " in " + function);
}

uint32_t code_offset(const void* pc) {
  return pc ? static_cast<uint32_t>(reinterpret_cast<uintptr_t>(pc) - module_base()) : 0;
}

// ---- Shadow memory of the race detector --------------------------------------------------
constexpr int16_t kNoReads = -1, kManyWarps = -2;
constexpr uint8_t kNone = 0, kWrite = 1, kAtomic = 2;

struct Cell {
  // The last write.
  uint32_t w_block = 0, w_epoch = 0, w_clock = 0, w_pc = 0;
  uint16_t w_thread = 0;
  uint8_t w_kind = kNone;
  bool in_flight = false;  // a cp.async destination before its wait
  // Reads since the last write: those of `r_block` in `r_epoch` by lanes `r_lanes` of warp
  // `r_warp` (or kManyWarps), with the newest clock among them; `r_other_blocks` when some
  // block other than r_block read too. `r_thread`/`r_pc`: one of them, for the report.
  uint32_t r_block = 0, r_epoch = 0, r_clock = 0, r_pc = 0, r_lanes = 0;
  uint16_t r_thread = 0;
  int16_t r_warp = kNoReads;
  bool r_other_blocks = false;
};

constexpr int kPageBits = 12;
constexpr size_t kPageBytes = size_t(1) << kPageBits;

class Shadow {
 public:
  Cell* cell(uintptr_t address) {
    const uintptr_t page = address >> kPageBits;
    if (page != last_page_) {
      auto& slot = pages_[page];
      if (!slot) slot.reset(new Cell[kPageBytes]);
      last_page_ = page;
      last_cells_ = slot.get();
    }
    return last_cells_ + (address & (kPageBytes - 1));
  }
  void clear() {
    pages_.clear();
    last_page_ = ~uintptr_t(0);
  }

 private:
  std::unordered_map<uintptr_t, std::unique_ptr<Cell[]>> pages_;
  uintptr_t last_page_ = ~uintptr_t(0);
  Cell* last_cells_ = nullptr;
};
thread_local Shadow g_shared_shadow, g_global_shadow;

struct Accessor {
  int thread;
  uint32_t block, epoch;
  uint32_t pc;
  const std::array<uint32_t, kWarp>* clock;  // the accessor's vector clock
};

const char* kind_name(uint8_t kind, bool write) {
  if (kind == kAtomic) return "atomic";
  return write ? "write" : "read";
}

[[noreturn]] void report_race(const char* what, Space space, uintptr_t address, const Accessor& now,
                              const char* now_kind, uint32_t then_block, uint16_t then_thread,
                              uint32_t then_pc, const char* then_kind) {
  std::string message = std::string("race detector: ") + what + " on " +
                        (space == Space::shared ? "shared" : "global") + " memory byte " +
                        std::to_string(address) + ": " + now_kind + " by thread " +
                        std::to_string(now.thread) + " at " + source_line(now.pc) + "; " +
                        then_kind + " by thread " + std::to_string(then_thread);
  if (then_block != now.block) message += " of block " + std::to_string(then_block) + " (linear)";
  message += " at " + source_line(then_pc);
  fail(message);
}

// Whether the earlier access by `thread` at (`epoch`, `clock`) in the accessor's block is
// ordered before the accessor's current point.
bool ordered_before(const Accessor& now, uint32_t epoch, int thread, uint32_t clock) {
  if (thread == now.thread) return true;
  if (epoch != now.epoch) return true;  // a __syncthreads lies between
  if (thread / kWarp != now.thread / kWarp) return false;
  return (*now.clock)[thread % kWarp] >= clock;
}

// Whether the reads summarized in `c` (one warp, the accessor's, same epoch) by lanes
// other than `lane` are all ordered before the accessor's current point.
bool reads_ordered_before(const Cell& c, const Accessor& now, int lane) {
  for (int l = 0; l < kWarp; ++l) {
    if (l != lane && ((c.r_lanes >> l) & 1u) && (*now.clock)[l] < c.r_clock) return false;
  }
  return true;
}

void check_and_record(Space space, uintptr_t address, size_t bytes, Access kind, const Accessor& now) {
  Shadow& shadow = space == Space::shared ? g_shared_shadow : g_global_shadow;
  const bool writes = kind != Access::read;
  const uint8_t my_kind = kind == Access::atomic ? kAtomic : kWrite;
  const int warp = now.thread / kWarp, lane = now.thread % kWarp;
  const uint32_t my_clock = (*now.clock)[lane];
  for (size_t i = 0; i < bytes; ++i) {
    Cell& c = *shadow.cell(address + i);
    const char* now_kind = kind_name(kind == Access::atomic ? kAtomic : kNone, writes);
    if (c.in_flight) {
      report_race("access to a cp.async destination before the cp.async.wait_group that lands it",
                  space, address + i, now, now_kind, c.w_block, c.w_thread, c.w_pc, "cp.async issued");
    }
    // Against the last write.
    if (c.w_kind != kNone && !(c.w_kind == kAtomic && kind == Access::atomic)) {
      if (c.w_block != now.block || !ordered_before(now, c.w_epoch, c.w_thread, c.w_clock)) {
        report_race(c.w_block != now.block ? "accesses from two blocks of one launch"
                                           : "conflicting accesses with no barrier between them",
                    space, address + i, now, now_kind, c.w_block, c.w_thread, c.w_pc,
                    kind_name(c.w_kind, true));
      }
    }
    if (writes) {
      // Against the reads since that write.
      if (c.r_warp != kNoReads) {
        bool race = c.r_other_blocks || c.r_block != now.block;
        if (!race && c.r_epoch == now.epoch) {
          if (c.r_warp != warp) {
            race = true;  // another warp, or several
          } else {
            race = !reads_ordered_before(c, now, lane);
          }
        }
        if (race) {
          report_race(c.r_block != now.block || c.r_other_blocks
                          ? "accesses from two blocks of one launch"
                          : "conflicting accesses with no barrier between them",
                      space, address + i, now, now_kind, c.r_block, c.r_thread, c.r_pc, "read");
        }
      }
      c.w_block = now.block;
      c.w_epoch = now.epoch;
      c.w_clock = my_clock;
      c.w_pc = now.pc;
      c.w_thread = static_cast<uint16_t>(now.thread);
      c.w_kind = my_kind;
      c.r_warp = kNoReads;
      c.r_other_blocks = false;
    } else {
      const bool fresh = c.r_warp == kNoReads || c.r_block != now.block || c.r_epoch != now.epoch;
      if (fresh) {
        c.r_other_blocks = c.r_warp != kNoReads && (c.r_other_blocks || c.r_block != now.block);
        c.r_block = now.block;
        c.r_epoch = now.epoch;
        c.r_warp = static_cast<int16_t>(warp);
        c.r_lanes = 1u << lane;
        c.r_clock = my_clock;
        c.r_thread = static_cast<uint16_t>(now.thread);
        c.r_pc = now.pc;
      } else if (c.r_warp == warp && reads_ordered_before(c, now, lane)) {
        // Every earlier read is ordered before this one, hence before whatever is ordered
        // after this one: this read alone stands for them all.
        c.r_lanes = 1u << lane;
        c.r_clock = my_clock;
        c.r_thread = static_cast<uint16_t>(now.thread);
        c.r_pc = now.pc;
      } else {
        if (c.r_warp != warp) c.r_warp = kManyWarps;
        c.r_lanes |= 1u << lane;
        c.r_clock = std::max(c.r_clock, my_clock);
      }
    }
  }
}

// ---- Traffic counters --------------------------------------------------------------------
// A warp-level memory instruction is the accesses that the lanes of one warp make at the
// same code address for the same time (the n-th execution of that address by each lane).
struct InstructionKey {
  uint32_t warp, pc, count;
  bool operator==(const InstructionKey& o) const { return warp == o.warp && pc == o.pc && count == o.count; }
};
struct InstructionKeyHash {
  size_t operator()(const InstructionKey& k) const {
    return (size_t(k.warp) * 0x9E3779B97F4A7C15ull) ^ (size_t(k.pc) << 20) ^ k.count;
  }
};
struct LaneAccess {
  uintptr_t address;
  uint32_t bytes;
  uint8_t lane;
  bool write;
};
struct Instruction {
  Space space;
  std::vector<LaneAccess> accesses;
};

struct TrafficState {
  bool enabled = false;
  std::vector<TrafficRow> rows;
  TrafficRow current;
  std::vector<std::unordered_map<uint32_t, uint32_t>> executions;  // per thread: pc -> count
  std::unordered_map<InstructionKey, Instruction, InstructionKeyHash> instructions;
  std::unordered_set<uintptr_t> bytes_read, bytes_written;  // distinct global bytes
};
TrafficState g_traffic;

// Each code address has two instruction streams, its reads and its writes: a cp.async reads
// global memory and writes shared memory from one code address, and the lanes' n-th reads
// must meet in one instruction even when a lane's copy is all zero-fill (it reads nothing:
// traffic_skip_read keeps its read stream in step). Mixing them put global reads into
// instructions classified as shared, where their sectors went uncounted.
uint32_t stream_of(uint32_t pc, bool write) { return pc * 2 + (write ? 1 : 0); }

void traffic_record(int thread, Space space, uintptr_t address, size_t bytes, bool write, uint32_t pc) {
  const uint32_t stream = stream_of(pc, write);
  uint32_t& count = g_traffic.executions[thread][stream];
  Instruction& ins = g_traffic.instructions[InstructionKey{uint32_t(thread / kWarp), stream, count++}];
  ins.space = space;
  ins.accesses.push_back(LaneAccess{address, uint32_t(bytes), uint8_t(thread % kWarp), write});
  TrafficRow& row = g_traffic.current;
  if (space == Space::global) {
    (write ? row.global_bytes_written : row.global_bytes_read) += bytes;
    auto& distinct = write ? g_traffic.bytes_written : g_traffic.bytes_read;
    for (size_t i = 0; i < bytes; ++i) distinct.insert(address + i);
  }
}

// Folds the block's warp instructions into the launch's row.
void traffic_flush_block() {
  TrafficRow& row = g_traffic.current;
  for (auto& [key, ins] : g_traffic.instructions) {
    if (ins.space == Space::global) {
      std::set<uintptr_t> read_sectors, write_sectors;
      for (const LaneAccess& a : ins.accesses) {
        auto& sectors = a.write ? write_sectors : read_sectors;
        for (uintptr_t s = a.address >> 5; s <= (a.address + a.bytes - 1) >> 5; ++s) sectors.insert(s);
      }
      row.global_instructions += 1;
      row.sectors_read += read_sectors.size();
      row.sectors_written += write_sectors.size();
    } else {
      // Banks: 32 of 4 bytes. The hardware serves a warp's request in phases of 128 bytes
      // (32 lanes of 4 bytes, 16 of 8, 8 of 16); within a phase, distinct 4-byte words in
      // one bank serialize (the same word is broadcast).
      uint32_t size = 4;
      for (const LaneAccess& a : ins.accesses) size = std::max(size, a.bytes);
      const int lanes_per_phase = 128 / std::min<uint32_t>(size, 16);
      std::map<int, std::array<std::set<uintptr_t>, 32>> phases;
      for (const LaneAccess& a : ins.accesses) {
        auto& banks = phases[a.lane / lanes_per_phase];
        for (uintptr_t w = a.address >> 2; w <= (a.address + a.bytes - 1) >> 2; ++w) banks[w % 32].insert(w);
      }
      uint64_t wavefronts = 0;
      for (auto& [phase, banks] : phases) {
        size_t ways = 1;
        for (const auto& words : banks) ways = std::max(ways, words.size());
        wavefronts += ways;
        row.max_bank_conflict_ways = std::max<uint64_t>(row.max_bank_conflict_ways, ways);
      }
      row.shared_instructions += 1;
      row.shared_wavefronts += wavefronts;
      row.shared_ideal_wavefronts += phases.size();
    }
  }
  g_traffic.instructions.clear();
  for (auto& counts : g_traffic.executions) counts.clear();
}

// ---- The one entry point of every access --------------------------------------------------
void on_access(const void* address, size_t bytes, Access kind, const void* pc, int lane = -1) {
  LaunchView& v = g_view;
  if (!v.active) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  const Space space = space_of(a);
  if (space == Space::none) return;
  if ((bytes == 2 || bytes == 4 || bytes == 8 || bytes == 16) && (a & (bytes - 1)) != 0) {
    fail("misaligned " + std::to_string(bytes) + "-byte " + (kind == Access::read ? "load" : "store") +
         " at " + (space == Space::shared ? "shared" : "global") + " memory address " +
         std::to_string(a) + " (not a multiple of " + std::to_string(bytes) + "; the GPU faults), at " +
         source_line(code_offset(pc)));
  }
  int thread = current_thread();
  if (thread < 0) return;
  if (lane >= 0) thread = thread - thread % kWarp + lane;
  if (v.racecheck) {
    const Accessor now{thread, static_cast<uint32_t>(v.block), v.epoch, code_offset(pc), &v.clocks[thread]};
    check_and_record(space, a, bytes, kind, now);
  }
  if (v.traffic) traffic_record(thread, space, a, bytes, kind != Access::read, code_offset(pc));
}

bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && std::string(value) != "0";
}

void host_stack(uintptr_t* begin, uintptr_t* end) {
  thread_local uintptr_t cached_begin = 0, cached_end = 0;
  if (cached_end == 0) {
    pthread_attr_t attr;
    void* base = nullptr;
    size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      pthread_attr_getstack(&attr, &base, &size);
      pthread_attr_destroy(&attr);
    }
    cached_begin = reinterpret_cast<uintptr_t>(base);
    cached_end = cached_begin + size;
  }
  *begin = cached_begin;
  *end = cached_end;
}

void reset_clocks() {
  for (auto& clock : g_view.clocks) clock.fill(0);
  for (size_t t = 0; t < g_view.clocks.size(); ++t) g_view.clocks[t][t % kWarp] = 1;
}

}  // namespace

void memory_launch_begin(const char* kernel_name, const void*, dim3 grid, dim3 block) {
  LaunchView& v = g_view;
  v = LaunchView{};
  v.active = true;
  v.racecheck = env_flag("MOE_KERNELS_SIMT_RACECHECK");
  v.traffic = g_traffic.enabled;
  v.num_threads = static_cast<int>(block.x * block.y * block.z);
  v.clocks.resize(v.num_threads);
  unsigned char *tls_begin, *tls_end;
  thread_local_block(&tls_begin, &tls_end);
  v.tls_begin = reinterpret_cast<uintptr_t>(tls_begin);
  v.tls_end = reinterpret_cast<uintptr_t>(tls_end);
  host_stack(&v.host_stack_begin, &v.host_stack_end);
  g_global_shadow.clear();
  if (v.traffic) {
    g_traffic.current = TrafficRow{};
    g_traffic.current.kernel = kernel_name;
    g_traffic.current.grid = {grid.x, grid.y, grid.z};
    g_traffic.current.block = {block.x, block.y, block.z};
    g_traffic.executions.assign(v.num_threads, {});
    g_traffic.bytes_read.clear();
    g_traffic.bytes_written.clear();
  }
}

void memory_block_begin(uint64_t block_linear, unsigned char* dynamic_smem, size_t dynamic_bytes) {
  LaunchView& v = g_view;
  if (v.traffic && block_linear > 0) traffic_flush_block();
  v.block = block_linear;
  v.dyn_begin = reinterpret_cast<uintptr_t>(dynamic_smem);
  v.dyn_end = v.dyn_begin + dynamic_bytes;
  v.epoch = 0;
  if (v.racecheck) {
    reset_clocks();
    g_shared_shadow.clear();
  }
}

void memory_launch_end(bool completed) {
  LaunchView& v = g_view;
  if (v.traffic && completed) {
    traffic_flush_block();
    g_traffic.current.unique_bytes_read = g_traffic.bytes_read.size();
    g_traffic.current.unique_bytes_written = g_traffic.bytes_written.size();
    g_traffic.rows.push_back(g_traffic.current);
  }
  g_traffic.instructions.clear();
  g_traffic.bytes_read.clear();
  g_traffic.bytes_written.clear();
  v = LaunchView{};
  g_global_shadow.clear();
  g_shared_shadow.clear();
}

void memory_block_barrier() {
  ++g_view.epoch;
  if (g_view.racecheck) reset_clocks();
}

void memory_warp_barrier(int warp_base, unsigned mask) {
  LaunchView& v = g_view;
  if (!v.racecheck) return;
  std::array<uint32_t, kWarp> joined{};
  for (int l = 0; l < kWarp; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const auto& c = v.clocks[warp_base + l];
    for (int j = 0; j < kWarp; ++j) joined[j] = std::max(joined[j], c[j]);
  }
  for (int l = 0; l < kWarp; ++l) {
    if (!((mask >> l) & 1u)) continue;
    v.clocks[warp_base + l] = joined;
    v.clocks[warp_base + l][l] = joined[l] + 1;
  }
}

void memory_async_issue(void* dst, size_t bytes, const void* code_address) {
  LaunchView& v = g_view;
  if (!v.racecheck) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(dst);
  const int thread = current_thread();
  const Accessor now{thread, static_cast<uint32_t>(v.block), v.epoch, code_offset(code_address),
                     &v.clocks[thread]};
  // The issue itself must not race with earlier accesses to the destination.
  check_and_record(Space::shared, a, bytes, Access::write, now);
  for (size_t i = 0; i < bytes; ++i) g_shared_shadow.cell(a + i)->in_flight = true;
}

void memory_async_land(void* dst, const void* src, size_t src_bytes, size_t cp_bytes,
                       const void* code_address) {
  LaunchView& v = g_view;
  if (v.racecheck) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(dst);
    for (size_t i = 0; i < cp_bytes; ++i) g_shared_shadow.cell(a + i)->in_flight = false;
  }
  if (src_bytes > 0) {
    on_access(src, src_bytes, Access::read, code_address);
  } else if (v.traffic && current_thread() >= 0) {
    ++g_traffic.executions[current_thread()][stream_of(code_offset(code_address), false)];  // read nothing, in step
  }
  on_access(dst, cp_bytes, Access::write, code_address);  // the zero-filled tail is written too
}

}  // namespace detail

void observe(const void* address, size_t bytes, Access kind, int lane) {
  // A lane's access inside a warp matrix instruction is named by where it was issued.
  detail::on_access(address, bytes, kind, lane >= 0 ? detail::matrix_code_address(lane) : nullptr, lane);
}

void observe_at(const void* address, size_t bytes, Access kind, const void* code_address) {
  detail::on_access(address, bytes, kind, code_address);
}

uint4 load16(const void* address) {
  check_alignment(address, 16, "16-byte load");
  detail::on_access(address, 16, Access::read, __builtin_return_address(0));
  uint4 bits;
  std::memcpy(&bits, address, 16);
  return bits;
}

void store16(void* address, uint4 bits) {
  check_alignment(address, 16, "16-byte store");
  detail::on_access(address, 16, Access::write, __builtin_return_address(0));
  std::memcpy(address, &bits, 16);
}

void check_alignment(const void* address, size_t alignment, const char* what) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(address);
  if (a % alignment != 0) {
    fail(std::string("misaligned ") + what + " at " + (is_shared_memory(address) ? "shared" : "global") +
         " memory address " + std::to_string(a) + " (not a multiple of " + std::to_string(alignment) +
         "; the GPU faults)");
  }
}

bool is_shared_memory(const void* address) {
  return detail::g_view.active &&
         detail::space_of(reinterpret_cast<uintptr_t>(address)) == detail::Space::shared;
}

void traffic_begin() {
  detail::g_traffic.enabled = true;
  detail::g_traffic.rows.clear();
}

std::vector<TrafficRow> traffic_end() {
  detail::g_traffic.enabled = false;
  return std::move(detail::g_traffic.rows);
}

}  // namespace simt

// ---- The compiler's instrumentation calls ----------------------------------------------
// Signatures as GCC's and Clang's -fsanitize=thread emit them. Function entry/exit and
// volatile distinctions are switched off at compile time (see setup.py).
#define SIMT_TSAN_ACCESS(N)                                                                    \
  extern "C" void __tsan_read##N(void* a) {                                                   \
    simt::detail::on_access(a, N, simt::Access::read, __builtin_return_address(0));           \
  }                                                                                            \
  extern "C" void __tsan_write##N(void* a) {                                                  \
    simt::detail::on_access(a, N, simt::Access::write, __builtin_return_address(0));          \
  }                                                                                            \
  extern "C" void __tsan_unaligned_read##N(void* a) {                                         \
    simt::detail::on_access(a, N, simt::Access::read, __builtin_return_address(0));           \
  }                                                                                            \
  extern "C" void __tsan_unaligned_write##N(void* a) {                                        \
    simt::detail::on_access(a, N, simt::Access::write, __builtin_return_address(0));          \
  }
SIMT_TSAN_ACCESS(1)
SIMT_TSAN_ACCESS(2)
SIMT_TSAN_ACCESS(4)
SIMT_TSAN_ACCESS(8)
SIMT_TSAN_ACCESS(16)
#undef SIMT_TSAN_ACCESS

extern "C" void __tsan_read_range(void* a, unsigned long size) {
  simt::detail::on_access(a, size, simt::Access::read, __builtin_return_address(0));
}
extern "C" void __tsan_write_range(void* a, unsigned long size) {
  simt::detail::on_access(a, size, simt::Access::write, __builtin_return_address(0));
}
extern "C" void __tsan_init() {}
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
