#include "testing.cuh"
