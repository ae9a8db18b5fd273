// Paged attention and KV store CPU references (see den/kernels/attention.h).
#include <cmath>
#include <limits>

#include "den/kernels/attention.h"
#include "den/kernels/half.h"
#include "den/kernels/matmul.h"

namespace den::kernels {
namespace {

// Returns a float pointer to n elements at `index`: the pool itself for f32, else `tmp` filled.
const float* load_row(const void* base, int64_t index, int32_t n, DType dtype, float* tmp) {
  switch (dtype) {
    case DType::f32:
      return static_cast<const float*>(base) + index;
    case DType::f16:
      for (int32_t i = 0; i < n; ++i) tmp[i] = fp16_to_f32(static_cast<const uint16_t*>(base)[index + i]);
      return tmp;
    case DType::bf16:
      for (int32_t i = 0; i < n; ++i) tmp[i] = bf16_to_f32(static_cast<const uint16_t*>(base)[index + i]);
      return tmp;
  }
  return tmp;
}

void store_row(void* base, int64_t index, const float* values, int64_t n, DType dtype) {
  for (int64_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::f32:
        static_cast<float*>(base)[index + i] = values[i];
        break;
      case DType::f16:
        static_cast<uint16_t*>(base)[index + i] = f32_to_fp16(values[i]);
        break;
      case DType::bf16:
        static_cast<uint16_t*>(base)[index + i] = f32_to_bf16(values[i]);
        break;
    }
  }
}

}  // namespace

void kv_store_ref(const PagedKvView& kv, const PagedSequence& seq, int32_t layer, int32_t position, const float* k,
                  const float* v) {
  const KvLayout& l = kv.layout;
  const int32_t block = seq.block_table[static_cast<size_t>(position / l.block_tokens)];
  const int32_t slot = position % l.block_tokens;
  store_row(kv.blocks, kv.offset(block, layer, 0, slot), k, l.token_elements(), l.dtype);
  store_row(kv.blocks, kv.offset(block, layer, 1, slot), v, l.token_elements(), l.dtype);
}

void paged_attention_head_ref(const PagedKvView& kv, const PagedSequence& seq, int32_t layer, int32_t position,
                              int32_t kv_head, const float* q, float scale, float* out, float* scores) {
  const KvLayout& l = kv.layout;
  const int32_t head_dim = l.head_dim;
  const int64_t head_offset = int64_t{kv_head} * head_dim;
  float tmp[kMaxHeadDim];
  float max_score = -std::numeric_limits<float>::infinity();
  for (int32_t p = 0; p <= position; ++p) {
    const int32_t block = seq.block_table[static_cast<size_t>(p / l.block_tokens)];
    const float* k = load_row(kv.blocks, kv.offset(block, layer, 0, p % l.block_tokens) + head_offset, head_dim,
                              l.dtype, tmp);
    const float s = dot_ref(q, k, head_dim) * scale;
    scores[p] = s;
    if (s > max_score) max_score = s;
  }
  float sum = 0.0f;
  for (int32_t p = 0; p <= position; ++p) {
    scores[p] = std::exp(scores[p] - max_score);
    sum += scores[p];
  }
  const float inv_sum = 1.0f / sum;
  for (int32_t d = 0; d < head_dim; ++d) out[d] = 0.0f;
  for (int32_t p = 0; p <= position; ++p) {
    const int32_t block = seq.block_table[static_cast<size_t>(p / l.block_tokens)];
    const float* v = load_row(kv.blocks, kv.offset(block, layer, 1, p % l.block_tokens) + head_offset, head_dim,
                              l.dtype, tmp);
    const float weight = scores[p] * inv_sum;
    for (int32_t d = 0; d < head_dim; ++d) out[d] += weight * v[d];
  }
}

}  // namespace den::kernels
