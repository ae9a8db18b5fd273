// RMSNorm CPU reference (see den/kernels/rmsnorm.h).
#include <cmath>

#include "den/kernels/rmsnorm.h"

namespace den::kernels {

void rmsnorm_ref(const float* x, const float* weight, float* y, int64_t n_rows, int64_t n, float eps) {
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    float sum_squares = 0.0f;
    for (int64_t i = 0; i < n; ++i) sum_squares += xr[i] * xr[i];
    const float inv_rms = 1.0f / std::sqrt(sum_squares / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) yr[i] = weight[i] * (xr[i] * inv_rms);
  }
}

void residual_rmsnorm_ref(const float* parts, int32_t n_parts, float* x, const float* weight, float* y, int64_t n_rows,
                          int64_t n, float eps) {
  for (int64_t r = 0; r < n_rows; ++r) {
    float* xr = x + r * n;
    for (int64_t i = 0; i < n; ++i) {
      float v = xr[i];
      for (int32_t s = 0; s < n_parts; ++s) v += parts[(s * n_rows + r) * n + i];
      xr[i] = v;
    }
  }
  if (weight != nullptr) rmsnorm_ref(x, weight, y, n_rows, n, eps);
}

}  // namespace den::kernels
