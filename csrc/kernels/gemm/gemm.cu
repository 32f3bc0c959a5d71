#include "grouped_gemm.cuh"
#include "grouped_gemm_backward.cuh"
