// Matrix products of a weight matrix (any supported block format, rows = outputs) with a
// batch of float32 activations. The CPU reference expands one weight row at a time and takes
// its dot product with every token, so each output's arithmetic (and rounding) is the same
// whatever the batch holds: batch invariance by construction.
#pragma once

#include <cstdint>

#include "den/kernels/tensor_type.h"

namespace den::kernels {

// Fixed-order float32 dot product (16 partial sums, then a fixed tree).
float dot_ref(const float* a, const float* b, int64_t n);

struct WeightMatrix {
  TensorType type = TensorType::f32;
  const void* data = nullptr;  // [n_out rows, each row_bytes(type, n_in)]
  int64_t n_in = 0;
  int64_t n_out = 0;
};

// y[t, r] = dot(W[r, :], x[t, :]) for r in [row_begin, row_end), t in [0, n_tokens)
// x: [n_tokens, w.n_in]  y: [n_tokens, y_stride]  scratch: [w.n_in] floats
void matmul_rows_ref(const WeightMatrix& w, const float* x, int64_t n_tokens, float* y, int64_t y_stride,
                     int64_t row_begin, int64_t row_end, float* scratch);

}  // namespace den::kernels
