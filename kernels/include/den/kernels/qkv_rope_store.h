// After the fused Q/K/V product: add the bias (qwen2), rotate Q and K (RoPE), write Q for the
// attention kernels and K, V into the sequence's KV pages. One launch for every new token of
// a step. The CPU twin composes rope_ref and kv_store_ref, so it is the CPU backend's math.
#pragma once

#include <cstdint>

#include "den/kernels/cuda_stream.h"
#include "den/kernels/dtype.h"
#include "den/kernels/paged_kv.h"
#include "den/kernels/rope.h"

namespace den::kernels {

struct QkvShape {
  int32_t n_heads;
  int32_t n_kv_heads;
  int32_t head_dim;
  int32_t n_rot;
  RopeStyle style;
  DEN_HOST_DEVICE int32_t q_dim() const { return n_heads * head_dim; }
  DEN_HOST_DEVICE int32_t kv_dim() const { return n_kv_heads * head_dim; }
  DEN_HOST_DEVICE int32_t row() const { return q_dim() + 2 * kv_dim(); }
};

// qkv: [n_tokens, q_dim + 2 kv_dim] float (Q, K, V of each token), modified (bias, rotation)
// bias: [q_dim + 2 kv_dim] or null  inv_freq: [n_rot / 2]  q_out: [n_tokens, q_dim] float
// positions / sequences: [n_tokens]
void qkv_rope_store_ref(float* qkv, const float* bias, const QkvShape& shape, const float* inv_freq,
                        const PagedKvView& kv, const PagedSequence* sequences, const int32_t* token_seq,
                        const int32_t* token_pos, int64_t n_tokens, int32_t layer, float* q_out);

// Device version; q_out in q_type. inv_freq is a device array. qkv may hold the product in
// n_parts parts (over slices of its inputs: [n_parts, n_tokens, row]), summed in order first,
// as the twin's input would be by the host.
void qkv_rope_store_cuda(const float* qkv, const float* bias, const QkvShape& shape, const float* inv_freq,
                         const PagedKvView& kv, const PagedBatch& batch, int32_t layer, void* q_out, DType q_type,
                         CudaStream stream, int32_t n_parts = 1);

}  // namespace den::kernels
