// The one way to launch a kernel: on the GPU with <<<>>>, or in the SIMT emulator.
#pragma once

#include "platform.cuh"

#include <stdexcept>
#include <string>

namespace moe {

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t smem_bytes = 0;
  cudaStream_t stream = nullptr;
  // Opt in to more than 48 KiB of shared memory when the launch needs it. Only the
  // emulator's tests of the launch limits turn this off.
  bool opt_in_shared = true;
};

template <typename T>
struct type_identity {
  using type = T;
};

// Shared memory a block may use without opting in (every architecture).
constexpr size_t kDefaultSharedLimit = 48 * 1024;

// Static shared memory of `kernel` (its __shared__ variables), as the GPU or the emulator
// knows it.
template <typename Kernel>
size_t static_shared_bytes(Kernel* kernel) {
#if defined(MOE_KERNELS_SIMT)
  return simt::static_shared_bytes(reinterpret_cast<const void*>(kernel));
#else
  cudaFuncAttributes attributes{};
  cudaError_t err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess) throw std::runtime_error(std::string("cudaFuncGetAttributes: ") + cudaGetErrorString(err));
  return attributes.sharedSizeBytes;
#endif
}

// Arguments convert to the kernel's parameter types at the call site (no deduction from
// the arguments), so a narrowing conversion is visible where the launch is written.
// A launch whose static + dynamic shared memory exceeds 48 KiB opts in to the larger
// dynamic size first (cudaFuncAttributeMaxDynamicSharedMemorySize): the limit counts
// both, so the opt-in is needed even when the dynamic part alone fits in 48 KiB.
template <typename... Params>
void launch_kernel(const char* name, void (*kernel)(Params...), const LaunchConfig& cfg,
                   typename type_identity<Params>::type... args) {
  if (cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0) return;  // empty input
  const bool opt_in = cfg.opt_in_shared && cfg.smem_bytes > 0 && static_shared_bytes(kernel) + cfg.smem_bytes > kDefaultSharedLimit;
#if defined(MOE_KERNELS_SIMT)
  if (opt_in) simt::set_max_dynamic_shared_bytes(name, reinterpret_cast<const void*>(kernel), cfg.smem_bytes);
  auto body = [&] { kernel(args...); };
  simt::launch(name, reinterpret_cast<const void*>(kernel), cfg.grid, cfg.block, cfg.smem_bytes,
               [](const void* closure) { (*static_cast<const decltype(body)*>(closure))(); }, &body);
#else
  if (opt_in) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(cfg.smem_bytes));
    if (err != cudaSuccess) {
      throw std::runtime_error(std::string(name) + ": " + cudaGetErrorString(err));
    }
  }
  kernel<<<cfg.grid, cfg.block, cfg.smem_bytes, cfg.stream>>>(args...);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("launch of ") + name + " failed: " + cudaGetErrorString(err));
  }
#endif
}

// What tile heuristics need to know of the device that runs the launch: compute capability
// * 10 and multiprocessor count (cudaDeviceGetAttribute: no synchronization). The emulator
// reports its emulated architecture and a few multiprocessors.
struct DeviceProperties {
  int arch = 0;
  int num_sms = 0;
};

inline DeviceProperties current_device_properties() {
#if defined(MOE_KERNELS_SIMT)
  return {simt::emulated_arch(), simt::kEmulatedMultiprocessors};
#else
  int device = 0, major = 0, minor = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) throw std::runtime_error(std::string("cudaDeviceGetAttribute: ") + cudaGetErrorString(err));
  return {major * 10 + minor, sms};
#endif
}

inline unsigned ceil_div(long long a, long long b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace moe
