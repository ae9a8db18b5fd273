// Fused bias + RoPE + KV store on the GPU: one block per (new token, head of Q, K or V), one
// thread per element. Angles are formed in float exactly as rope_ref forms them; sincosf is the
// accurate variant (not __sincosf), so the twin agrees to rounding.
#include <stdexcept>

#include "den/kernels/cuda_check.h"
#include "den/kernels/qkv_rope_store.h"
#include "device_types.cuh"

namespace den::kernels {
namespace {

// The rotated value of element d of one head, whose row starts at `head`.
__device__ __forceinline__ float rotated(const float* head, int d, int n_rot, int position, const float* inv_freq,
                                         RopeStyle style) {
  if (d >= n_rot) return head[d];
  const int half = n_rot / 2;
  int i, a, b;
  bool first;
  if (style == RopeStyle::interleaved) {
    i = d / 2;
    a = 2 * i;
    b = a + 1;
    first = (d % 2) == 0;
  } else {
    i = d % half;
    a = i;
    b = i + half;
    first = d < half;
  }
  const float theta = static_cast<float>(position) * inv_freq[i];
  float s, c;
  sincosf(theta, &s, &c);
  return first ? head[a] * c - head[b] * s : head[a] * s + head[b] * c;
}

template <typename TQ, typename TKV>
__global__ void qkv_rope_store_kernel(const float* __restrict__ qkv, const float* __restrict__ bias, QkvShape shape,
                                      const float* __restrict__ inv_freq, PagedKvView kv, PagedBatch batch,
                                      int32_t layer, TQ* __restrict__ q_out) {
  extern __shared__ float head[];  // this block's biased head: Q head, K head or V head
  const int t = blockIdx.x, h = blockIdx.y;  // h: Q heads, then K heads, then V heads
  const int hd = shape.head_dim, d = threadIdx.x;
  const int64_t at = static_cast<int64_t>(h) * hd;  // the head's first element in the token's row
  if (d < hd) head[d] = qkv[static_cast<int64_t>(t) * shape.row() + at + d] + (bias != nullptr ? bias[at + d] : 0.0f);
  __syncthreads();
  if (d >= hd) return;
  const int position = batch.token_pos[t];
  if (h < shape.n_heads) {
    q_out[static_cast<int64_t>(t) * shape.q_dim() + at + d] =
        from_float<TQ>(rotated(head, d, shape.n_rot, position, inv_freq, shape.style));
    return;
  }
  const int seq = batch.token_seq[t];
  const int block = batch.block_tables[batch.table_offsets[seq] + position / kv.layout.block_tokens];
  const int slot = position % kv.layout.block_tokens;
  TKV* pool = static_cast<TKV*>(kv.blocks);
  const bool is_k = h < shape.n_heads + shape.n_kv_heads;
  const int kv_head = h - shape.n_heads - (is_k ? 0 : shape.n_kv_heads);
  TKV* dst = pool + kv.offset(block, layer, is_k ? 0 : 1, slot) + static_cast<int64_t>(kv_head) * hd;
  dst[d] = from_float<TKV>(is_k ? rotated(head, d, shape.n_rot, position, inv_freq, shape.style) : head[d]);
}

}  // namespace

void qkv_rope_store_cuda(const float* qkv, const float* bias, const QkvShape& shape, const float* inv_freq,
                         const PagedKvView& kv, const PagedBatch& batch, int32_t layer, void* q_out, DType q_type,
                         CudaStream stream) {
  if (batch.n_tokens == 0) return;
  // A block per (token, head): the heads are independent, and a decode step has few tokens.
  const size_t smem = static_cast<size_t>(shape.head_dim) * sizeof(float);
  const unsigned threads = static_cast<unsigned>((shape.head_dim + 31) / 32 * 32);
  if (threads > 1024) throw std::invalid_argument("qkv_rope_store: head_dim over 1024");
  const dim3 grid(static_cast<unsigned>(batch.n_tokens), static_cast<unsigned>(shape.n_heads + 2 * shape.n_kv_heads));
  dispatch_dtype(q_type, [&](auto q_tag) {
    using TQ = decltype(q_tag);
    dispatch_dtype(kv.layout.dtype, [&](auto kv_tag) {
      using TKV = decltype(kv_tag);
      qkv_rope_store_kernel<TQ, TKV><<<grid, threads, smem, stream>>>(qkv, bias, shape, inv_freq, kv, batch, layer,
                                                                      static_cast<TQ*>(q_out));
    });
  });
  check_launch();
}

}  // namespace den::kernels
