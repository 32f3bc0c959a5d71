// The simt build of every kernel: the same sources nvcc compiles, with the emulator.
#include "simt.h"

#include "../kernels/gating.cuh"
#include "../kernels/permute.cuh"
#include "../kernels/routing.cuh"
#include "../kernels/testing.cuh"
