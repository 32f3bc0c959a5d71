#include "dequantize.cuh"
#include "quantize.cuh"
