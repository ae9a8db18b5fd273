// Exact attention for any KV dtype and head size up to 256: one warp per (new token, query
// head) walks the token's sequence position by position with an online softmax. Slow, simple,
// the fallback for models the fast paths do not cover (f32 KV, small heads such as stories260K's).
#include "attention_common.cuh"
#include "den/kernels/cuda_check.h"

namespace den::kernels {
namespace {

constexpr int kMaxPerLane = 8;  // head_dim <= 256

template <typename T>
__global__ void generic_attention_kernel(const T* __restrict__ q, T* __restrict__ out, PagedKvView kv,
                                         PagedBatch batch, int32_t layer, int32_t n_heads, float scale_log2) {
  const int token = blockIdx.x, head = blockIdx.y, lane = threadIdx.x;
  const int hd = kv.layout.head_dim;
  const int group = n_heads / kv.layout.n_kv_heads;
  const int kv_head = head / group;
  const int seq = batch.token_seq[token];
  const int position = batch.token_pos[token];
  const int32_t* table = batch.block_tables + batch.table_offsets[seq];
  const T* pool = static_cast<const T*>(kv.blocks);
  const int bt = kv.layout.block_tokens;
  float qv[kMaxPerLane];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    qv[i] = d < hd ? to_float<T>(q[(static_cast<int64_t>(token) * n_heads + head) * hd + d]) * scale_log2 : 0.0f;
  }
  float m = -INFINITY, l = 0.0f, acc[kMaxPerLane] = {};
  for (int p = 0; p <= position; ++p) {
    const int64_t row = kv.offset(table[p / bt], layer, 0, p % bt) + static_cast<int64_t>(kv_head) * hd;
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < hd) s += qv[i] * to_float<T>(pool[row + d]);
    }
    s = warp_sum(s);
    const float m_new = fmaxf(m, s);
    const float correction = exp2f(m - m_new), w = exp2f(s - m_new);
    l = l * correction + w;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      const float v = d < hd ? to_float<T>(pool[row + kv.layout.slab_elements() + d]) : 0.0f;
      acc[i] = acc[i] * correction + w * v;
    }
    m = m_new;
  }
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < hd) out[(static_cast<int64_t>(token) * n_heads + head) * hd + d] = from_float<T>(acc[i] / l);
  }
}

}  // namespace

void generic_attention_launch(const void* q, void* out, const PagedKvView& kv, const PagedBatch& batch, int32_t layer,
                              int32_t n_heads, float scale, CudaStream stream) {
  if (batch.n_tokens == 0) return;
  if (kv.layout.head_dim > 32 * kMaxPerLane) throw std::invalid_argument("attention: head_dim above 256");
  const float scale_log2 = scale * 1.4426950408889634f;
  dispatch_dtype(kv.layout.dtype, [&](auto tag) {
    using T = decltype(tag);
    generic_attention_kernel<T><<<dim3(static_cast<unsigned>(batch.n_tokens), static_cast<unsigned>(n_heads)), 32, 0,
                                  stream>>>(static_cast<const T*>(q), static_cast<T*>(out), kv, batch, layer, n_heads,
                                            scale_log2);
  });
  check_launch();
}

}  // namespace den::kernels
