// Fused bias + RoPE + KV store on the GPU: one block per (new token, head of Q, K or V), one
// thread per element (which first sums the product's parts when it came in parts). Launched
// chained (pdl.cuh), so decode attention's prologue overlaps it. Angles are formed in float
// exactly as rope_ref forms them; sincosf is the accurate variant (not __sincosf), so the twin
// agrees to rounding.
#include <stdexcept>

#include "den/kernels/cuda_check.h"
#include "den/kernels/qkv_rope_store.h"
#include "device_types.cuh"
#include "pdl.cuh"

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

// A chained kernel (pdl.cuh): the plan's lookups go before pdl_wait, the product (the previous
// kernel's output) is read after it, through L2 (__ldcg).
template <typename TQ, typename TKV>
__global__ void qkv_rope_store_kernel(const float* qkv, const float* __restrict__ bias, QkvShape shape,
                                      const float* __restrict__ inv_freq, PagedKvView kv, PagedBatch batch,
                                      int32_t layer, TQ* __restrict__ q_out, int32_t n_parts) {
  // The decode-attention kernel after this one may start now: before its pdl_wait it reads only
  // the plan and KV rows older than those this kernel writes.
  pdl_allow_next();
  extern __shared__ float head[];  // this block's biased head: Q head, K head or V head
  const int t = blockIdx.x, h = blockIdx.y;  // h: Q heads, then K heads, then V heads
  const int hd = shape.head_dim, d = threadIdx.x;
  const int64_t at = static_cast<int64_t>(h) * hd;  // the head's first element in the token's row
  const bool is_q = h < shape.n_heads, is_k = !is_q && h < shape.n_heads + shape.n_kv_heads;
  const int position = batch.token_pos[t];
  TKV* dst = nullptr;  // this block's K or V row in the pool
  if (!is_q) {
    const int seq = batch.token_seq[t];
    const int block = batch.block_tables[batch.table_offsets[seq] + position / kv.layout.block_tokens];
    const int kv_head = h - shape.n_heads - (is_k ? 0 : shape.n_kv_heads);
    dst = static_cast<TKV*>(kv.blocks) + kv.offset(block, layer, is_k ? 0 : 1, position % kv.layout.block_tokens) +
          static_cast<int64_t>(kv_head) * hd;
  }
  const float b = bias != nullptr && d < hd ? bias[at + d] : 0.0f;
  pdl_wait();
  if (d < hd) {
    const float* part = qkv + static_cast<int64_t>(t) * shape.row() + at + d;
    const int64_t part_stride = static_cast<int64_t>(batch.n_tokens) * shape.row();
    float v = __ldcg(part);
    for (int32_t s = 1; s < n_parts; ++s) v += __ldcg(part + s * part_stride);
    head[d] = v + b;
  }
  __syncthreads();
  if (d < hd) {
    if (is_q) {
      q_out[static_cast<int64_t>(t) * shape.q_dim() + at + d] =
          from_float<TQ>(rotated(head, d, shape.n_rot, position, inv_freq, shape.style));
    } else {
      dst[d] = from_float<TKV>(is_k ? rotated(head, d, shape.n_rot, position, inv_freq, shape.style) : head[d]);
    }
  }
  timeline_end();
}

}  // namespace

void qkv_rope_store_cuda(const float* qkv, const float* bias, const QkvShape& shape, const float* inv_freq,
                         const PagedKvView& kv, const PagedBatch& batch, int32_t layer, void* q_out, DType q_type,
                         CudaStream stream, int32_t n_parts) {
  if (n_parts < 1) throw std::invalid_argument("qkv_rope_store: needs at least one part");
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
      launch_chained(qkv_rope_store_kernel<TQ, TKV>, grid, dim3(threads), smem, stream, qkv, bias, shape, inv_freq, kv,
                     batch, layer, static_cast<TQ*>(q_out), n_parts);
    });
  });
  check_launch();
}

}  // namespace den::kernels
