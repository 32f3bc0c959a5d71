#include "permute.cuh"
