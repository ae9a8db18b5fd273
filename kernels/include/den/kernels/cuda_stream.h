// The CUDA stream handle type, declared without including CUDA headers so that host-only
// code can name launchers' signatures. Used by every CUDA launcher declaration.
#pragma once

struct CUstream_st;

namespace den::kernels {
using CudaStream = CUstream_st*;
}  // namespace den::kernels
