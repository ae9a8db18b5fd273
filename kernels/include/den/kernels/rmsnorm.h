// RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, per row, computed in float32.
// CPU reference and CUDA launcher with the same formula and epsilon.
#pragma once

#include <cstdint>

#include "den/kernels/cuda_stream.h"

namespace den::kernels {

// x: [n_rows, n]  weight: [n]  y: [n_rows, n] (may alias x)
void rmsnorm_ref(const float* x, const float* weight, float* y, int64_t n_rows, int64_t n, float eps);

// Same contract on device memory. Requires a build with CUDA.
void rmsnorm_cuda(const float* x, const float* weight, float* y, int64_t n_rows, int64_t n, float eps,
                  CudaStream stream);

}  // namespace den::kernels
