// Device-side platform: the CUDA toolkit under nvcc, the SIMT emulator under a host
// compiler. Every kernel header includes this first and nothing else platform-specific.
#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#else
#include "../../simt/simt.h"
#endif

#include <cstdint>
