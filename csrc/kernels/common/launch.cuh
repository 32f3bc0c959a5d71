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
};

template <typename T>
struct type_identity {
  using type = T;
};

// Arguments convert to the kernel's parameter types at the call site (no deduction from
// the arguments), so a narrowing conversion is visible where the launch is written.
template <typename... Params>
void launch_kernel(const char* name, void (*kernel)(Params...), const LaunchConfig& cfg,
                   typename type_identity<Params>::type... args) {
  if (cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0) return;  // empty input
#if defined(MOE_KERNELS_SIMT)
  simt::launch(name, cfg.grid, cfg.block, cfg.smem_bytes, [&] { kernel(args...); });
#else
  if (cfg.smem_bytes > 48 * 1024) {
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

inline unsigned ceil_div(long long a, long long b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace moe
