// Dequantization of weight rows to float32: the CPU reference of every weight format.
// Used by the CPU matrix products (rows expanded on the fly) and by CUDA weight upload.
#pragma once

#include <cstdint>

#include "den/kernels/tensor_type.h"

namespace den::kernels {

// src: one row in `type`'s block format, n elements (a multiple of the block size)
// dst: [n] float32
void dequantize_row_ref(TensorType type, const void* src, float* dst, int64_t n);

}  // namespace den::kernels
