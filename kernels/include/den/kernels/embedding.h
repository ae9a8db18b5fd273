// Embedding gather: one float32 row of a (possibly quantized) embedding table per token id.
#pragma once

#include <cstdint>

#include "den/kernels/cuda_stream.h"
#include "den/kernels/dtype.h"
#include "den/kernels/matmul.h"

namespace den::kernels {

// table: [n_vocab = table.n_out, dim = table.n_in]  ids: [n_tokens]  out: [n_tokens, dim]
// ids must be in range (the engine validates them before any kernel runs).
void embedding_gather_ref(const WeightMatrix& table, const int32_t* ids, int64_t n_tokens, float* out);

// The same on the device, from a table in `table_type` (f32, f16 or bf16).
// table: [n_vocab, dim]  ids: [n_tokens]  out: [n_tokens, dim] float
void embedding_gather_cuda(const void* table, DType table_type, const int32_t* ids, int64_t n_tokens, int64_t dim,
                           float* out, CudaStream stream);

}  // namespace den::kernels
