#include "routing.cuh"
