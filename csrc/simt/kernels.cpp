// The simt build of every kernel: the same sources nvcc compiles, with the emulator.
#include "simt.h"

#include "../kernels/gemm/gemm.cu"
#include "../kernels/permute/permute.cu"
#include "../kernels/quant/quant.cu"
#include "../kernels/routing/routing.cu"
#include "../kernels/testing/testing.cu"
