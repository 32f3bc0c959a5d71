// The SIMT emulator: the CUDA execution model on the CPU.
//
// Kernel sources under csrc/kernels/ compile unchanged with the host compiler when this
// header comes first. Each CUDA thread of a block runs as a fiber with its own stack;
// blocks run one after another. Barriers and warp collectives switch between fibers
// cooperatively, so the emulator is deterministic and single-threaded: a plain
// read-modify-write is an atomic here.
//
// What is checked (each a KernelError that names the kernel):
//   - __syncthreads reached by only part of the block (others exited or wait elsewhere),
//   - __syncthreads at different source lines in the same phase (divergent barrier),
//   - warp collectives whose mask lacks the caller, names a missing lane, mixes
//     different collectives or reads a lane that is not in the mask,
//   - any deadlock (no thread can make progress).
#pragma once

#if defined(__CUDACC__)
#error "simt.h is the CPU emulator; it must not be compiled by nvcc"
#endif

#define MOE_KERNELS_SIMT 1

// CUDA keywords, defined before the toolkit headers see them.
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
// One object per block: blocks run one after another on a thread, and a thread_local
// keeps a future multi-threaded block runner correct.
#define __shared__ static thread_local

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_types.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace simt {

// Raised for every error the emulator detects inside a kernel.
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Per-thread (fiber) coordinates of the running kernel.
// By value: the coordinates live in the emulator, not in memory the kernel accesses.
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

// Runs `body` once per CUDA thread of every block of the grid. `kernel` identifies the
// kernel function (its static shared memory is looked up from the module's symbols);
// the launch is checked against the emulated architecture's limits first.
// `body(closure)` runs the kernel for one thread; the closure (the kernel's arguments) stays
// on the launcher's stack, where the memory observer does not count it as global memory.
using KernelBody = void (*)(const void* closure);
void launch(const char* kernel_name, const void* kernel, dim3 grid, dim3 block,
            size_t dynamic_smem_bytes, KernelBody body, const void* closure);

// Static shared memory of a kernel: the `__shared__` variables declared in its body.
size_t static_shared_bytes(const void* kernel);
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes): the
// opt-in above 48 KiB. Fails, as the GPU does, past the architecture's maximum.
void set_max_dynamic_shared_bytes(const char* kernel_name, const void* kernel, size_t bytes);

// The emulated architecture (MOE_KERNELS_SIMT_ARCH: 80, 90 or 120), as compute capability
// * 10, and the multiprocessors the emulated device reports (a few, so that persistent
// kernels run several tiles per block in tests).
int emulated_arch();
constexpr int kEmulatedMultiprocessors = 4;

// Dynamic shared memory of the running block (exactly the launch's byte count).
unsigned char* dynamic_shared_memory();

void syncthreads(const char* file, int line);

// The warp collective primitive: every lane of `mask` posts `value` (up to 8 bytes);
// once all have, each gets the values of all lanes of the mask. `op` names the
// collective so that mixing two different ones is reported.
enum class WarpOp { shfl, ballot, any, all, syncwarp, matrix };
const uint64_t* warp_exchange(WarpOp op, unsigned mask, uint64_t value);
int lane_id();
[[noreturn]] void fail(const std::string& message);

// A warp-wide matrix instruction (mma.sync, ldmatrix): all 32 lanes of the warp must call
// it (the PTX `.aligned` rule; a lane that exited is an error naming `instruction`). Each
// lane posts a pointer to its inputs and to its outputs; when the last lane arrives,
// `compute(in, out)` runs once with every lane's pointers (indexed by lane, all lanes
// blocked, so their data is stable) and then all lanes go on. Not a memory fence: the
// race detector orders nothing by it, as the GPU does not.
using WarpCompute = void (*)(const void* const* in, void* const* out);
void warp_matrix_op(const char* instruction, const void* in, void* out, WarpCompute compute);

// ---- Memory accesses the emulator makes on a kernel's behalf --------------------------
// Kernel code is compiled with the compiler's thread-sanitizer instrumentation, so every
// load and store it makes reaches the emulator (race detector, traffic counters,
// alignment). Code inside the emulator (ldmatrix rows, cp.async copies) is not
// instrumented and reports its accesses here. `lane` >= 0 attributes the access to that
// lane of the calling thread's warp, inside the warp matrix instruction it issued (a
// warp-wide instruction reads for all its lanes; reports name where it was issued).
enum class Access : uint8_t { read, write, atomic };
void observe(const void* address, size_t bytes, Access kind, int lane = -1);
// The same, with the code address to name in reports (atomics pass their caller's).
void observe_at(const void* address, size_t bytes, Access kind, const void* code_address);
// One 16-byte access, as the GPU's LDG.128/STG.128/LDS.128/STS.128: alignment checked and
// observed as one access of one instruction (the host compiler may split a uint4 copy into
// smaller ones, which the traffic counters would take for separate instructions).
uint4 load16(const void* address);
void store16(void* address, uint4 bits);
// Fails, naming the kernel and `what`, unless `address` is a multiple of `alignment`.
void check_alignment(const void* address, size_t alignment, const char* what);
// Whether `address` lies in the running block's shared memory (static or dynamic).
bool is_shared_memory(const void* address);

// cp.async (PTX ISA, asynchronous copy): copies `cp_size` bytes from global `src` to shared `dst`,
// of which the first `src_size` come from `src` and the rest are zero-filled. The copy
// lands in shared memory only at the async_wait that covers its group, as on the GPU;
// until then the destination holds what it held before (and the race detector reports any
// access to it). A thread that exits with copies in flight is an error.
void async_copy(void* dst, const void* src, int cp_size, int src_size);
void async_commit();                  // cp.async.commit_group
void async_wait(int pending_groups);  // cp.async.wait_group N: all but the newest N groups
void async_wait_all();                // cp.async.wait_all: every copy, committed or not

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// Source lane of a shuffle, following the CUDA programming guide: lanes are split into
// sections of `width`; a source outside the caller's section (above it, for up/down/xor)
// returns the caller's own value.
// Emulator internals inlined into kernel code carry no_sanitize_thread: the memory
// observer must not count the emulator's own buffers as the kernel's accesses.
template <typename T>
__attribute__((no_sanitize_thread)) T shuffle_from(unsigned mask, T var, int src_lane, int width) {
  const uint64_t* values = warp_exchange(WarpOp::shfl, mask, to_bits(var));
  if (src_lane < 0) return var;
  if (src_lane >= 32 || !((mask >> src_lane) & 1u)) {
    fail("__shfl_*_sync reads lane " + std::to_string(src_lane) + " which is not in mask");
  }
  (void)width;
  return from_bits<T>(values[src_lane]);
}

}  // namespace simt

#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())
#define warpSize 32

#define __syncthreads() ::simt::syncthreads(__FILE__, __LINE__)

namespace simt {
void syncwarp(const char* file, int line, unsigned mask);
}
// A macro, like __syncthreads, so the emulator knows the call site (mutation tests).
#define __syncwarp(...) ::simt::syncwarp(__FILE__, __LINE__, 0xffffffffu __VA_OPT__(&(__VA_ARGS__)))

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  const int lane = ::simt::lane_id();
  const int base = lane & ~(width - 1);
  return ::simt::shuffle_from(mask, var, base + (src_lane & (width - 1)), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int lane = ::simt::lane_id();
  const int base = lane & ~(width - 1);
  const int src = lane - static_cast<int>(delta);
  return ::simt::shuffle_from(mask, var, src < base ? -1 : src, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int lane = ::simt::lane_id();
  const int base = lane & ~(width - 1);
  const int src = lane + static_cast<int>(delta);
  return ::simt::shuffle_from(mask, var, src >= base + width ? -1 : src, width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  const int lane = ::simt::lane_id();
  const int base = lane & ~(width - 1);
  const int src = lane ^ lane_mask;
  return ::simt::shuffle_from(mask, var, src >= base + width ? -1 : src, width);
}

namespace simt {
__attribute__((no_sanitize_thread)) inline unsigned vote(WarpOp op, unsigned mask, int predicate) {
  const uint64_t* values = warp_exchange(op, mask, predicate ? 1 : 0);
  unsigned ballot = 0;
  for (int lane = 0; lane < 32; ++lane) {
    if (((mask >> lane) & 1u) && values[lane]) ballot |= 1u << lane;
  }
  return ballot;
}
}  // namespace simt

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return ::simt::vote(::simt::WarpOp::ballot, mask, predicate);
}
inline int __any_sync(unsigned mask, int predicate) {
  return ::simt::vote(::simt::WarpOp::any, mask, predicate) != 0;
}
inline int __all_sync(unsigned mask, int predicate) {
  return ::simt::vote(::simt::WarpOp::all, mask, predicate) == mask;
}

// Atomics: fibers switch only at barriers and collectives, so these are atomic as is.
// Their own loads and stores are not instrumented (the race detector would take them for
// plain accesses); each reports itself as one atomic access instead.
#define SIMT_ATOMIC(name, update)                                          \
  template <typename T>                                                    \
  __attribute__((no_sanitize_thread, noinline)) T name(T* address, T value) { \
    ::simt::observe_at(address, sizeof(T), ::simt::Access::atomic,         \
                       __builtin_return_address(0));                       \
    T old = *address;                                                      \
    *address = (update);                                                   \
    return old;                                                            \
  }
SIMT_ATOMIC(atomicAdd, old + value)
SIMT_ATOMIC(atomicSub, old - value)
SIMT_ATOMIC(atomicMax, std::max(old, value))
SIMT_ATOMIC(atomicMin, std::min(old, value))
SIMT_ATOMIC(atomicExch, value)
#undef SIMT_ATOMIC
template <typename T>
__attribute__((no_sanitize_thread, noinline)) T atomicCAS(T* address, T compare, T value) {
  ::simt::observe_at(address, sizeof(T), ::simt::Access::atomic, __builtin_return_address(0));
  T old = *address;
  if (old == compare) *address = value;
  return old;
}

template <typename T>
T __ldg(const T* address) {
  return *address;
}

// Device intrinsics used by our kernels, with their exact (not approximate) host values.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return std::min(1.0f, std::max(0.0f, x)); }
inline unsigned __float_as_uint(float x) { return simt::from_bits<unsigned>(simt::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return simt::from_bits<float>(simt::to_bits(x)); }
inline int __float_as_int(float x) { return simt::from_bits<int>(simt::to_bits(x)); }
inline float __int_as_float(int x) { return simt::from_bits<float>(simt::to_bits(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <typename T>
T min(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}
