// Embedding gather CPU reference (see den/kernels/embedding.h).
#include "den/kernels/dequantize.h"
#include "den/kernels/embedding.h"

namespace den::kernels {

void embedding_gather_ref(const WeightMatrix& table, const int32_t* ids, int64_t n_tokens, float* out) {
  const int64_t bytes_per_row = row_bytes(table.type, table.n_in);
  const auto* base = static_cast<const uint8_t*>(table.data);
  for (int64_t t = 0; t < n_tokens; ++t) {
    dequantize_row_ref(table.type, base + ids[t] * bytes_per_row, out + t * table.n_in, table.n_in);
  }
}

}  // namespace den::kernels
