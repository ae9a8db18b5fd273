// Matrix-product CPU reference (see den/kernels/matmul.h).
#include <cmath>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DEN_MATMUL_AVX2 1
#endif

#include "den/kernels/dequantize.h"
#include "den/kernels/matmul.h"

namespace den::kernels {

float dot_ref(const float* a, const float* b, int64_t n) {
  // 16 independent partial sums with fused multiply-adds (lane l takes elements i with
  // i % 16 == l), then a fixed halving tree. The AVX2 path and the portable loop perform the
  // very same operations, so the result never depends on the machine.
  constexpr int kLanes = 16;
  float partial[kLanes] = {};
  int64_t i = 0;
#ifdef DEN_MATMUL_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + kLanes <= n; i += kLanes) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  if (i == n) {
    const __m256 s8 = _mm256_add_ps(acc0, acc1);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
  }
  _mm256_storeu_ps(partial, acc0);
  _mm256_storeu_ps(partial + 8, acc1);
#else
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) partial[l] = std::fma(a[i + l], b[i + l], partial[l]);
  }
#endif
  for (int l = 0; i < n; ++i, ++l) partial[l] = std::fma(a[i], b[i], partial[l]);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) partial[l] += partial[l + width];
  }
  return partial[0];
}

void matmul_rows_ref(const WeightMatrix& w, const float* x, int64_t n_tokens, float* y, int64_t y_stride,
                     int64_t row_begin, int64_t row_end, float* scratch) {
  const int64_t bytes_per_row = row_bytes(w.type, w.n_in);
  const auto* base = static_cast<const uint8_t*>(w.data);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* row = scratch;
    if (w.type == TensorType::f32) {
      row = reinterpret_cast<const float*>(base + r * bytes_per_row);
    } else {
      dequantize_row_ref(w.type, base + r * bytes_per_row, scratch, w.n_in);
    }
    for (int64_t t = 0; t < n_tokens; ++t) y[t * y_stride + r] = dot_ref(row, x + t * w.n_in, w.n_in);
  }
}

}  // namespace den::kernels
