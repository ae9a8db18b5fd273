// Causal scaled-dot-product attention over a paged KV cache, and the KV store that feeds it.
// CPU references: one (token, head) at a time so callers can parallelise freely; the
// arithmetic of a token never depends on other tokens or sequences in the batch.
#pragma once

#include <cstdint>

#include "den/kernels/paged_kv.h"

namespace den::kernels {

// Writes one token's K and V of `layer` at `position` of the sequence.
// k, v: [n_kv_heads, head_dim] float32 (converted to the pool's dtype)
void kv_store_ref(const PagedKvView& kv, const PagedSequence& seq, int32_t layer, int32_t position, const float* k,
                  const float* v);

// Attention output of one query head of one token at `position`, attending to positions
// [0, position] of the sequence (causal). GQA: query head h reads KV head h / (n_heads / n_kv_heads).
// q: [head_dim]  out: [head_dim]  scores: [position + 1] scratch
void paged_attention_head_ref(const PagedKvView& kv, const PagedSequence& seq, int32_t layer, int32_t position,
                              int32_t kv_head, const float* q, float scale, float* out, float* scores);

}  // namespace den::kernels
