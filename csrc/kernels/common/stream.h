// The stream type of the launchers' signatures, without pulling in CUDA headers: host
// adapters include only plain headers (this one declares what driver_types.h declares).
#pragma once

struct CUstream_st;
typedef CUstream_st* cudaStream_t;
