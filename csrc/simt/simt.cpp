// The SIMT emulator's scheduler: fibers, block barriers and warp collectives.
#include "internal.h"

#include <map>
#include <mutex>

#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SIMT_ASAN 1
#endif
#endif

#if defined(SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace simt {
namespace {

// ---------------------------------------------------------------------------------------
// Context switching. On x86-64 a dozen instructions save the callee-saved registers and
// swap stacks (ucontext's swapcontext makes a signal-mask system call on every switch,
// which dominates emulated kernels full of shuffles). Elsewhere: ucontext.
// ---------------------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void simt_switch_stack(void** save_sp, void* new_sp);
extern "C" void simt_fiber_entry();
asm(R"(
  .text
  .globl simt_switch_stack
  .hidden simt_switch_stack
  .type simt_switch_stack, @function
simt_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_switch_stack, .-simt_switch_stack

  .globl simt_fiber_entry
  .hidden simt_fiber_entry
  .type simt_fiber_entry, @function
simt_fiber_entry:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size simt_fiber_entry, .-simt_fiber_entry
)");

struct Context {
  void* sp = nullptr;
};

// Lays out a fresh stack so that the first switch to it "returns" into simt_fiber_entry,
// which calls entry(arg) with a 16-byte aligned stack.
void make_context(Context& ctx, char* stack, size_t size, void (*entry)(void*), void* arg) {
  uintptr_t top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  // `ret` pops the entry address and leaves rsp = top (16-byte aligned), so the call in
  // simt_fiber_entry enters `entry` with the alignment the ABI requires.
  *--sp = reinterpret_cast<uint64_t>(&simt_fiber_entry);      // return address
  *--sp = 0;                                                  // rbp
  *--sp = 0;                                                  // rbx
  *--sp = reinterpret_cast<uint64_t>(arg);                    // r12
  *--sp = reinterpret_cast<uint64_t>(entry);                  // r13
  *--sp = 0;                                                  // r14
  *--sp = 0;                                                  // r15
  *--sp = (uint64_t(0x037F) << 32) | 0x1F80;                  // fcw : mxcsr defaults
  ctx.sp = sp;
}
void switch_context(Context& from, Context& to) { simt_switch_stack(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void make_context(Context& ctx, char* stack, size_t size, void (*entry)(void*), void* arg) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack;
  ctx.uc.uc_stack.ss_size = size;
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, reinterpret_cast<void (*)()>(entry), 1, arg);
}
void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

#if defined(SIMT_ASAN)
constexpr size_t kStackBytes = 512 * 1024;  // ASan's redzones make frames much larger
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

enum class State { runnable, at_barrier, at_collective, done };

struct AsyncCopy {
  void* dst;
  const void* src;
  int cp_size, src_size, group;
  const void* code_address;  // the cp.async in the kernel
};
enum class Order { forward, reverse, shuffle };  // see schedule_order()

struct Fiber {
  Context ctx;
  char* stack = nullptr;  // from the thread's stack pool
  uint3 thread_idx{};
  int linear_id = 0;
  State state = State::runnable;
  // __syncthreads call site, for the divergent-barrier check.
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  // Warp collective in flight.
  WarpOp op = WarpOp::shfl;
  unsigned mask = 0;
  uint64_t posted = 0;
  uint64_t received[32] = {};
  // Warp matrix instruction in flight (WarpOp::matrix).
  const char* instruction = nullptr;
  WarpCompute compute = nullptr;
  const void* matrix_in = nullptr;
  void* matrix_out = nullptr;
  const void* matrix_code_address = nullptr;  // where the kernel issued it (reports, traffic)
  // cp.async copies issued and not yet waited for; `group` is the commit group (copies
  // issued after the last commit belong to group `next_group`).
  std::vector<AsyncCopy> copies;
  int next_group = 0;
#if defined(SIMT_ASAN)
  void* fake_stack = nullptr;
#endif
};

struct Launch {
  const char* kernel_name = "";
  const void* kernel = nullptr;
  std::vector<const detail::SharedObject*> shared_objects;  // the kernel's static __shared__
  std::string skip_barrier;  // MOE_KERNELS_SIMT_SKIP_BARRIER: "file:line" made a no-op
  Order order = Order::forward;
  dim3 grid, block;
  uint3 block_idx{};
  KernelBody body = nullptr;
  const void* closure = nullptr;
  std::vector<unsigned char> dynamic_smem;
  std::vector<Fiber> fibers;
  int num_threads = 0;
  int at_barrier = 0;
  Context scheduler;
  Fiber* current = nullptr;
  std::string error;
#if defined(SIMT_ASAN)
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
};

thread_local Launch* g_launch = nullptr;

Launch& launch_state() {
  if (g_launch == nullptr) {
    throw std::logic_error("simt: a device function was called outside of a kernel launch");
  }
  return *g_launch;
}
Fiber& self() { return *launch_state().current; }

// Switch from the running fiber back to the scheduler.
void yield_to_scheduler(bool finished = false) {
  Launch& l = launch_state();
  Fiber& f = *l.current;
#if defined(SIMT_ASAN)
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, l.scheduler_stack_bottom,
                                 l.scheduler_stack_size);
#else
  (void)finished;
#endif
  switch_context(f.ctx, l.scheduler);
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

void fiber_main(void* arg) {
  Launch& l = *static_cast<Launch*>(arg);
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &l.scheduler_stack_bottom, &l.scheduler_stack_size);
#endif
  l.body(l.closure);
  if (!l.current->copies.empty()) {
    fail("thread exits with " + std::to_string(l.current->copies.size()) +
         " cp.async copies in flight (no cp.async.wait_group covers them)");
  }
  l.current->state = State::done;
  yield_to_scheduler(/*finished=*/true);
  std::abort();  // a finished fiber is never resumed
}

std::string where(const Launch& l) {
  std::ostringstream os;
  os << "kernel '" << l.kernel_name << "' block (" << l.block_idx.x << "," << l.block_idx.y << ","
     << l.block_idx.z << ")";
  return os.str();
}

void resume(Launch& l, Fiber& f) {
  l.current = &f;
#if defined(SIMT_ASAN)
  void* scheduler_fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&scheduler_fake_stack, f.stack, kStackBytes);
#endif
  switch_context(l.scheduler, f.ctx);
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(scheduler_fake_stack, nullptr, nullptr);
#endif
  l.current = nullptr;
}

// Explains why no fiber of the block can run.
std::string describe_deadlock(const Launch& l) {
  int exited = 0, at_barrier = 0, at_collective = 0;
  std::string barrier_site;
  for (const Fiber& f : l.fibers) {
    if (f.state == State::done) ++exited;
    if (f.state == State::at_barrier) {
      ++at_barrier;
      barrier_site = std::string(f.barrier_file) + ":" + std::to_string(f.barrier_line);
    }
    if (f.state == State::at_collective) ++at_collective;
  }
  std::ostringstream os;
  if (at_barrier > 0) {
    os << "divergent __syncthreads in " << where(l) << ": reached at " << barrier_site << " by "
       << at_barrier << " of " << l.num_threads << " threads (" << exited << " exited, "
       << at_collective << " waiting in a warp collective)";
  } else {
    os << "deadlock in " << where(l) << ": " << at_collective
       << " threads wait in a warp collective whose other lanes exited or never arrive ("
       << exited << " exited)";
  }
  return os.str();
}

// The order in which the scheduler resumes a block's threads. On a GPU threads between two
// barriers run in no defined order, so a kernel whose result changes with this order has a
// race (a missing __syncthreads or __syncwarp) that the emulator would otherwise hide by
// always running thread 0 first. MOE_KERNELS_SIMT_ORDER=forward (default), reverse or
// shuffle (a fixed pseudo-random order per block); CI runs the suite under two of them.

Order schedule_order() {  // read at every launch, so a test can switch it
  const char* env = std::getenv("MOE_KERNELS_SIMT_ORDER");
  const std::string value = env ? env : "forward";
  if (value == "forward") return Order::forward;
  if (value == "reverse") return Order::reverse;
  if (value == "shuffle") return Order::shuffle;
  throw KernelError("MOE_KERNELS_SIMT_ORDER: expected forward, reverse or shuffle, got '" + value + "'");
}

std::vector<Fiber*> resume_order(Launch& l, Order kind) {
  std::vector<Fiber*> order;
  for (Fiber& f : l.fibers) order.push_back(&f);
  switch (kind) {
    case Order::forward: break;
    case Order::reverse: std::reverse(order.begin(), order.end()); break;
    case Order::shuffle: {
      std::mt19937 rng(l.block_idx.x * 73856093u ^ l.block_idx.y * 19349663u ^ l.block_idx.z * 83492791u);
      std::shuffle(order.begin(), order.end(), rng);
      break;
    }
  }
  return order;
}

void run_block(Launch& l) {
  const int n = l.num_threads;
  for (int i = 0; i < n; ++i) {
    Fiber& f = l.fibers[i];
    f.linear_id = i;
    f.thread_idx = uint3{static_cast<unsigned>(i % l.block.x),
                         static_cast<unsigned>((i / l.block.x) % l.block.y),
                         static_cast<unsigned>(i / (l.block.x * l.block.y))};
    f.state = State::runnable;
    f.copies.clear();
    f.next_group = 0;
#if defined(SIMT_ASAN)
    // Frames of fibers that never returned (fiber_main, or a failed launch) left
    // poisoned redzones behind on this reused stack.
    ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
#endif
    make_context(f.ctx, f.stack, kStackBytes, &fiber_main, &l);
  }
  l.at_barrier = 0;
  // Uninitialized shared memory reads as a NaN-like pattern, never as zeros (and a block
  // never sees what the previous one left in its static shared variables).
  std::fill(l.dynamic_smem.begin(), l.dynamic_smem.end(), 0xFF);
  unsigned char *tls_begin, *tls_end;
  detail::thread_local_block(&tls_begin, &tls_end);
  for (const detail::SharedObject* object : l.shared_objects) {
    std::memset(tls_begin + object->tls_offset, 0xFF, object->size);
  }
  const uint64_t block_linear =
      (uint64_t(l.block_idx.z) * l.grid.y + l.block_idx.y) * l.grid.x + l.block_idx.x;
  detail::memory_block_begin(block_linear, l.dynamic_smem.data(), l.dynamic_smem.size());

  const std::vector<Fiber*> order = resume_order(l, l.order);
  for (;;) {
    bool progressed = false, all_done = true;
    for (Fiber* fiber : order) {
      Fiber& f = *fiber;
      if (f.state == State::runnable) {
        resume(l, f);
        progressed = true;
        if (!l.error.empty()) throw KernelError(l.error);
      }
      if (f.state != State::done) all_done = false;
    }
    if (all_done) return;
    if (!progressed) throw KernelError(describe_deadlock(l));
  }
}

}  // namespace

uint3 thread_idx() { return self().thread_idx; }
uint3 block_idx() { return launch_state().block_idx; }
dim3 block_dim() { return launch_state().block; }
dim3 grid_dim() { return launch_state().grid; }
int lane_id() { return self().linear_id % 32; }

unsigned char* dynamic_shared_memory() {
  Launch& l = launch_state();
  return l.dynamic_smem.empty() ? nullptr : l.dynamic_smem.data();
}

void fail(const std::string& message) {
  Launch& l = launch_state();
  l.error = message + " (in " + where(l) + ", thread " + std::to_string(self().linear_id) + ")";
  self().state = State::done;
  yield_to_scheduler(/*finished=*/true);
  std::abort();
}

// MOE_KERNELS_SIMT_SKIP_BARRIER=file:line turns the __syncthreads or __syncwarp at that
// source line into a no-op: the mutation test deletes one barrier at a time this way and
// expects the race detector to object. `file` matches as a suffix of the path, after
// "dir/../" is folded (__FILE__ of a header reached through "../common/x.cuh" has it).
bool skipped_barrier(const Launch& l, const char* file, int line) {
  if (l.skip_barrier.empty()) return false;
  const std::string site =
      std::filesystem::path(file).lexically_normal().string() + ":" + std::to_string(line);
  return site.size() >= l.skip_barrier.size() &&
         site.compare(site.size() - l.skip_barrier.size(), std::string::npos, l.skip_barrier) == 0 &&
         (site.size() == l.skip_barrier.size() || site[site.size() - l.skip_barrier.size() - 1] == '/');
}

void syncthreads(const char* file, int line) {
  Launch& l = launch_state();
  if (skipped_barrier(l, file, line)) return;
  Fiber& f = self();
  f.state = State::at_barrier;
  f.barrier_file = file;
  f.barrier_line = line;
  if (++l.at_barrier == l.num_threads) {
    for (Fiber& other : l.fibers) {
      if (other.barrier_line != line || std::strcmp(other.barrier_file, file) != 0) {
        fail("divergent __syncthreads: threads wait at " + std::string(file) + ":" +
             std::to_string(line) + " and at " + other.barrier_file + ":" +
             std::to_string(other.barrier_line));
      }
    }
    for (Fiber& other : l.fibers) other.state = State::runnable;
    l.at_barrier = 0;
    detail::memory_block_barrier();
    return;
  }
  yield_to_scheduler();
}

void syncwarp(const char* file, int line, unsigned mask) {
  if (skipped_barrier(launch_state(), file, line)) return;
  warp_exchange(WarpOp::syncwarp, mask, 0);
}

namespace {

// Waits until every lane of `mask` in the caller's warp posted the same collective; the
// last to arrive runs `release` (all others blocked) and wakes them.
template <typename Release>
void warp_rendezvous(WarpOp op, unsigned mask, Release release) {
  Launch& l = launch_state();
  Fiber& f = self();
  const int lane = f.linear_id % 32;
  const int warp_base = f.linear_id - lane;
  if (!((mask >> lane) & 1u)) fail("warp collective with a mask that does not include the caller");
  f.op = op;
  f.mask = mask;
  f.state = State::at_collective;
  for (int other = 0; other < 32; ++other) {
    if (!((mask >> other) & 1u)) continue;
    if (warp_base + other >= l.num_threads) fail("warp collective mask names a lane beyond the block");
    const Fiber& g = l.fibers[warp_base + other];
    if (g.state != State::at_collective || g.mask != mask) {
      yield_to_scheduler();  // not all there yet; the last to arrive releases everyone
      return;
    }
    if (g.op != op) fail("different warp collectives meet under one mask");
  }
  release(l, warp_base);
  for (int dst = 0; dst < 32; ++dst) {
    if ((mask >> dst) & 1u) l.fibers[warp_base + dst].state = State::runnable;
  }
}

}  // namespace

const uint64_t* warp_exchange(WarpOp op, unsigned mask, uint64_t value) {
  self().posted = value;
  warp_rendezvous(op, mask, [&](Launch& l, int warp_base) {
    for (int dst = 0; dst < 32; ++dst) {
      if (!((mask >> dst) & 1u)) continue;
      Fiber& g = l.fibers[warp_base + dst];
      for (int src = 0; src < 32; ++src) {
        g.received[src] = ((mask >> src) & 1u) ? l.fibers[warp_base + src].posted : 0;
      }
    }
    if (op == WarpOp::syncwarp) detail::memory_warp_barrier(warp_base, mask);
  });
  return self().received;
}

void warp_matrix_op(const char* instruction, const void* in, void* out, WarpCompute compute) {
  Launch& l = launch_state();
  Fiber& f = self();
  const int warp_base = f.linear_id - f.linear_id % 32;
  // .aligned: the whole warp executes the instruction. A lane past the end of the block or
  // one that already exited can never arrive (on the GPU: undefined behaviour).
  for (int lane = 0; lane < 32; ++lane) {
    if (warp_base + lane >= l.num_threads) {
      fail(std::string(instruction) + " needs all 32 lanes of the warp (.aligned), but the block "
           "has only " + std::to_string(l.num_threads - warp_base) + " threads in this warp");
    }
    if (l.fibers[warp_base + lane].state == State::done) {
      fail(std::string(instruction) + " needs all 32 lanes of the warp (.aligned), but lane " +
           std::to_string(lane) + " has exited");
    }
  }
  f.instruction = instruction;
  f.compute = compute;
  f.matrix_in = in;
  f.matrix_out = out;
  f.matrix_code_address = __builtin_return_address(0);
  warp_rendezvous(WarpOp::matrix, 0xffffffffu, [&](Launch& l, int base) {
    const void* ins[32];
    void* outs[32];
    for (int lane = 0; lane < 32; ++lane) {
      const Fiber& g = l.fibers[base + lane];
      if (g.compute != compute || std::strcmp(g.instruction, instruction) != 0) {
        fail(std::string("different warp matrix instructions meet: ") + instruction + " and " +
             g.instruction);
      }
      ins[lane] = g.matrix_in;
      outs[lane] = g.matrix_out;
    }
    compute(ins, outs);
  });
}

void async_copy(void* dst, const void* src, int cp_size, int src_size) {
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) fail("cp.async: cp-size must be 4, 8 or 16");
  if (src_size < 0 || src_size > cp_size) fail("cp.async: src-size must lie in [0, cp-size]");
  check_alignment(dst, cp_size, "cp.async shared destination");
  check_alignment(src, cp_size, "cp.async global source");
  if (!is_shared_memory(dst)) fail("cp.async: the destination is not shared memory");
  if (is_shared_memory(src)) fail("cp.async: the source is shared memory, not global");
  Fiber& f = self();
  f.copies.push_back(AsyncCopy{dst, src, cp_size, src_size, f.next_group, __builtin_return_address(0)});
  detail::memory_async_issue(dst, cp_size, f.copies.back().code_address);
}

void async_commit() { ++self().next_group; }

namespace {
// Lands every copy of a group below `group_end` (in issue order) and forgets it.
void land_copies(Fiber& f, int group_end) {
  std::vector<AsyncCopy> still;
  for (const AsyncCopy& c : f.copies) {
    if (c.group >= group_end) {
      still.push_back(c);
      continue;
    }
    detail::memory_async_land(c.dst, c.src, c.src_size, c.cp_size, c.code_address);
    std::memcpy(c.dst, c.src, c.src_size);
    std::memset(static_cast<unsigned char*>(c.dst) + c.src_size, 0, c.cp_size - c.src_size);
  }
  f.copies.swap(still);
}
}  // namespace

void async_wait(int pending_groups) {
  if (pending_groups < 0) fail("cp.async.wait_group: N must be >= 0");
  Fiber& f = self();
  land_copies(f, f.next_group - pending_groups);
}

void async_wait_all() {
  Fiber& f = self();
  land_copies(f, f.next_group + 1);
}

namespace detail {

const void* matrix_code_address(int lane) {
  Launch& l = launch_state();
  const int base = l.current->linear_id - l.current->linear_id % 32;
  return l.fibers[base + lane].matrix_code_address;
}

int current_thread() {
  return g_launch != nullptr && g_launch->current != nullptr ? g_launch->current->linear_id : -1;
}

std::string where_now() {
  Launch& l = launch_state();
  return where(l) + (l.current ? ", thread " + std::to_string(l.current->linear_id) : "");
}

ArchLimits arch_limits() {
  const char* env = std::getenv("MOE_KERNELS_SIMT_ARCH");
  const std::string value = env ? env : "90";
  // Shared memory per block with the opt-in (CUDA programming guide, compute capabilities).
  if (value == "80") return {80, 163 * 1024};
  if (value == "90") return {90, 227 * 1024};
  if (value == "120") return {120, 99 * 1024};
  throw KernelError("MOE_KERNELS_SIMT_ARCH: expected 80, 90 or 120, got '" + value + "'");
}

}  // namespace detail

int emulated_arch() { return detail::arch_limits().arch; }

namespace {

std::mutex g_attributes_mutex;
std::map<const void*, size_t> g_max_dynamic_smem;  // kernels that opted in, and to how much

std::string kernel_label(const char* kernel_name) {
  return std::string("simt: kernel '") + kernel_name + "' ";
}

// What cudaLaunchKernel refuses, for the emulated architecture.
void check_launch_limits(const char* kernel_name, const void* kernel, dim3 grid, dim3 block,
                         size_t dynamic_smem_bytes) {
  const detail::ArchLimits arch = detail::arch_limits();
  const long long threads = 1LL * block.x * block.y * block.z;
  if (threads <= 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) {
    throw KernelError(kernel_label(kernel_name) + "launched with block (" + std::to_string(block.x) +
                      "," + std::to_string(block.y) + "," + std::to_string(block.z) +
                      "): at most 1024 threads, x and y <= 1024, z <= 64");
  }
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    throw KernelError(kernel_label(kernel_name) + "launched with grid (" + std::to_string(grid.x) +
                      "," + std::to_string(grid.y) + "," + std::to_string(grid.z) +
                      "): x <= 2^31-1, y and z <= 65535");
  }
  const size_t static_bytes = static_shared_bytes(kernel);
  size_t max_dynamic = detail::kDefaultSharedLimit - std::min(static_bytes, detail::kDefaultSharedLimit);
  {
    std::lock_guard<std::mutex> lock(g_attributes_mutex);
    auto it = g_max_dynamic_smem.find(kernel);
    if (it != g_max_dynamic_smem.end()) max_dynamic = it->second;
  }
  if (static_bytes > detail::kDefaultSharedLimit) {
    throw KernelError(kernel_label(kernel_name) + "declares " + std::to_string(static_bytes) +
                      " bytes of static shared memory (at most 48 KiB)");
  }
  if (dynamic_smem_bytes > max_dynamic) {
    throw KernelError(kernel_label(kernel_name) + "needs " + std::to_string(static_bytes) +
                      " bytes of static + " + std::to_string(dynamic_smem_bytes) +
                      " bytes of dynamic shared memory, over the " + std::to_string(max_dynamic) +
                      " bytes of dynamic shared memory it may use on sm_" + std::to_string(arch.arch) +
                      (max_dynamic + static_bytes <= detail::kDefaultSharedLimit
                           ? " without the opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize)"
                           : ""));
  }
}

}  // namespace

void set_max_dynamic_shared_bytes(const char* kernel_name, const void* kernel, size_t bytes) {
  const detail::ArchLimits arch = detail::arch_limits();
  const size_t static_bytes = static_shared_bytes(kernel);
  if (static_bytes + bytes > arch.smem_optin_max) {
    throw KernelError(kernel_label(kernel_name) + "cannot opt in to " + std::to_string(bytes) +
                      " bytes of dynamic shared memory: with its " + std::to_string(static_bytes) +
                      " static bytes that exceeds the " + std::to_string(arch.smem_optin_max) +
                      " bytes per block of sm_" + std::to_string(arch.arch));
  }
  std::lock_guard<std::mutex> lock(g_attributes_mutex);
  g_max_dynamic_smem[kernel] = bytes;
}

size_t static_shared_bytes(const void* kernel) {
  size_t bytes = 0;
  for (const detail::SharedObject* object : detail::kernel_shared_objects(kernel)) bytes += object->size;
  return bytes;
}

void launch(const char* kernel_name, const void* kernel, dim3 grid, dim3 block,
            size_t dynamic_smem_bytes, KernelBody body, const void* closure) {
  if (g_launch != nullptr) throw std::logic_error("simt: kernel launched from inside a kernel");
  check_launch_limits(kernel_name, kernel, grid, block, dynamic_smem_bytes);
  Launch l;
  l.kernel_name = kernel_name;
  l.kernel = kernel;
  l.shared_objects = detail::kernel_shared_objects(kernel);
  if (const char* skip = std::getenv("MOE_KERNELS_SIMT_SKIP_BARRIER")) l.skip_barrier = skip;
  l.order = schedule_order();
  l.grid = grid;
  l.block = block;
  l.body = body;
  l.closure = closure;
  l.num_threads = static_cast<int>(block.x * block.y * block.z);
  l.dynamic_smem.resize(dynamic_smem_bytes);
  l.fibers.resize(l.num_threads);
  // One region for the stacks of up to 1024 fibers, kept between launches (allocating them
  // per launch costs more than running a small kernel; untouched pages cost nothing).
  char* stacks = detail::fiber_stacks();
  for (size_t i = 0; i < l.fibers.size(); ++i) l.fibers[i].stack = stacks + i * kStackBytes;

  g_launch = &l;
  detail::memory_launch_begin(kernel_name, kernel, grid, block);
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          l.block_idx = uint3{x, y, z};
          run_block(l);
        }
  } catch (...) {
    g_launch = nullptr;
    detail::memory_launch_end(false);
    throw;
  }
  g_launch = nullptr;
  detail::memory_launch_end(true);
}

namespace detail {

char* fiber_stacks() {
  thread_local std::unique_ptr<char[]> region(new char[1024 * kStackBytes]);
  return region.get();
}

bool on_fiber_stack(const void* address) {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(fiber_stacks());
  return reinterpret_cast<uintptr_t>(address) - begin < 1024 * kStackBytes;
}

}  // namespace detail

}  // namespace simt
