// CPU twin of the fused bias + RoPE + KV store (see den/kernels/qkv_rope_store.h).
#include <algorithm>

#include "den/kernels/attention.h"
#include "den/kernels/qkv_rope_store.h"

namespace den::kernels {

void qkv_rope_store_ref(float* qkv, const float* bias, const QkvShape& s, const float* inv_freq,
                        const PagedKvView& kv, const PagedSequence* sequences, const int32_t* token_seq,
                        const int32_t* token_pos, int64_t n_tokens, int32_t layer, float* q_out) {
  for (int64_t t = 0; t < n_tokens; ++t) {
    float* row = qkv + t * s.row();
    if (bias != nullptr) {
      for (int32_t i = 0; i < s.row(); ++i) row[i] += bias[i];
    }
    rope_ref(row, s.n_heads, s.head_dim, s.n_rot, token_pos[t], inv_freq, s.style);
    rope_ref(row + s.q_dim(), s.n_kv_heads, s.head_dim, s.n_rot, token_pos[t], inv_freq, s.style);
    std::copy(row, row + s.q_dim(), q_out + t * s.q_dim());
    kv_store_ref(kv, sequences[token_seq[t]], layer, token_pos[t], row + s.q_dim(), row + s.q_dim() + s.kv_dim());
  }
}

}  // namespace den::kernels
