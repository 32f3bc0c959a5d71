#include "gating.cuh"
