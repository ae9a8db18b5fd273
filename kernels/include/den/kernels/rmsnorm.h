// RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, per row, computed in float32.
// CPU reference and CUDA launcher with the same formula and epsilon.
#pragma once

#include <cstdint>

#include "den/kernels/cuda_stream.h"
#include "den/kernels/dtype.h"

namespace den::kernels {

// x: [n_rows, n]  weight: [n]  y: [n_rows, n] (may alias x)
void rmsnorm_ref(const float* x, const float* weight, float* y, int64_t n_rows, int64_t n, float eps);

// Same formula on device memory, the output in `y_type` (the GEMM input type). rows, when not
// null, picks input row rows[r] for output row r (the rows whose logits a step wants).
// x: [*, n] float  weight: [n] float  y: [n_rows, n] y_type  rows: [n_rows] or null
void rmsnorm_cuda(const float* x, const float* weight, void* y, DType y_type, const int32_t* rows, int64_t n_rows,
                  int64_t n, float eps, CudaStream stream);

// The residual add of a product computed in parts (over slices of its inputs), then RMSNorm:
// x[r] = ((x[r] + parts[0][r]) + parts[1][r]) + ... in that order, then y[r] = the norm of the new
// x[r] (skipped when weight is null: the add alone).
// parts: [n_parts, n_rows, n] float  x: [n_rows, n] float, updated  weight: [n] or null
// y: [n_rows, n] (y_type on the device)
void residual_rmsnorm_ref(const float* parts, int32_t n_parts, float* x, const float* weight, float* y, int64_t n_rows,
                          int64_t n, float eps);
// Whether rows of n take the register kernel (up to 4 parts) rather than the generic loop.
bool residual_rmsnorm_fast(int64_t n);
void residual_rmsnorm_cuda(const float* parts, int32_t n_parts, float* x, const float* weight, void* y, DType y_type,
                           int64_t n_rows, int64_t n, float eps, CudaStream stream);

}  // namespace den::kernels
