// Between the emulator's scheduler (simt.cpp), its memory observer (memory.cpp) and the
// symbol table reader (symbols.cpp). Not included by kernels.
#pragma once

#include "simt.h"

#include <string>
#include <vector>

namespace simt {
namespace detail {

// The running thread: its linear index in the block, or -1 outside a kernel (the
// scheduler, host code of the launchers).
int current_thread();
// The running kernel's name, block and thread, for error messages.
std::string where_now();

// The fiber stacks of this OS thread (one region), and whether `address` lies in them:
// a thread's stack is private, never shared or global memory.
char* fiber_stacks();
bool on_fiber_stack(const void* address);

// Limits of the emulated architecture (MOE_KERNELS_SIMT_ARCH=80|90|120, default 90).
struct ArchLimits {
  int arch;
  size_t smem_optin_max;  // static + dynamic shared memory per block with the opt-in
};
ArchLimits arch_limits();
constexpr size_t kDefaultSharedLimit = 48 * 1024;  // without the opt-in

// Hooks of the memory observer, called by the scheduler.
void memory_launch_begin(const char* kernel_name, const void* kernel, dim3 grid, dim3 block);
void memory_block_begin(uint64_t block_linear, unsigned char* dynamic_smem, size_t dynamic_bytes);
void memory_launch_end(bool completed);
void memory_block_barrier();                        // a __syncthreads completed
void memory_warp_barrier(int warp_base, unsigned mask);  // a __syncwarp(mask) completed
// cp.async bookkeeping: the destination is in flight from issue to its wait.
void memory_async_issue(void* dst, size_t bytes, const void* code_address);
void memory_async_land(void* dst, const void* src, size_t src_bytes, size_t cp_bytes,
                       const void* code_address);
// Where `lane` of the running thread's warp issued the warp matrix instruction in flight.
const void* matrix_code_address(int lane);

// Symbols of the module holding the kernels (its ELF symbol table).
struct SharedObject {  // a static __shared__ variable: a thread_local in the emulator
  std::string name;
  size_t tls_offset, size;
};
// Static shared variables declared in `kernel`'s body.
std::vector<const SharedObject*> kernel_shared_objects(const void* kernel);
// [begin, end) of this OS thread's block of the module's thread-locals, where every
// static __shared__ variable lives.
void thread_local_block(unsigned char** begin, unsigned char** end);
// The demangled name of the function holding `address`, "" if unknown; and the module's
// path and load address (to turn a code address into file:line with addr2line).
std::string function_name(const void* address);
const std::string& module_path();
uintptr_t module_base();

}  // namespace detail
}  // namespace simt
