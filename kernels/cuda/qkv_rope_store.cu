// Fused bias + RoPE + KV store on the GPU: one block per new token, one thread per element of
// Q, K and V. Angles are formed in float exactly as rope_ref forms them; sincosf is the
// accurate variant (not __sincosf), so the twin agrees to rounding.
#include "den/kernels/cuda_check.h"
#include "den/kernels/qkv_rope_store.h"
#include "device_types.cuh"

namespace den::kernels {
namespace {

constexpr int kThreads = 256;

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
  extern __shared__ float row[];  // this token's biased Q, K, V
  const int t = blockIdx.x;
  const int width = shape.row();
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    row[i] = qkv[static_cast<int64_t>(t) * width + i] + (bias != nullptr ? bias[i] : 0.0f);
  }
  __syncthreads();
  const int position = batch.token_pos[t];
  const int seq = batch.token_seq[t];
  const int hd = shape.head_dim;
  const int block = batch.block_tables[batch.table_offsets[seq] + position / kv.layout.block_tokens];
  const int slot = position % kv.layout.block_tokens;
  TKV* pool = static_cast<TKV*>(kv.blocks);
  TKV* k_dst = pool + kv.offset(block, layer, 0, slot);
  TKV* v_dst = pool + kv.offset(block, layer, 1, slot);
  const int q_dim = shape.q_dim(), kv_dim = shape.kv_dim();
  for (int i = threadIdx.x; i < q_dim + 2 * kv_dim; i += blockDim.x) {
    if (i < q_dim) {
      const int d = i % hd;
      q_out[static_cast<int64_t>(t) * q_dim + i] =
          from_float<TQ>(rotated(row + (i - d), d, shape.n_rot, position, inv_freq, shape.style));
    } else if (i < q_dim + kv_dim) {
      const int j = i - q_dim, d = j % hd;
      k_dst[j] = from_float<TKV>(rotated(row + q_dim + (j - d), d, shape.n_rot, position, inv_freq, shape.style));
    } else {
      const int j = i - q_dim - kv_dim;
      v_dst[j] = from_float<TKV>(row[q_dim + kv_dim + j]);
    }
  }
}

}  // namespace

void qkv_rope_store_cuda(const float* qkv, const float* bias, const QkvShape& shape, const float* inv_freq,
                         const PagedKvView& kv, const PagedBatch& batch, int32_t layer, void* q_out, DType q_type,
                         CudaStream stream) {
  if (batch.n_tokens == 0) return;
  const size_t smem = static_cast<size_t>(shape.row()) * sizeof(float);
  dispatch_dtype(q_type, [&](auto q_tag) {
    using TQ = decltype(q_tag);
    dispatch_dtype(kv.layout.dtype, [&](auto kv_tag) {
      using TKV = decltype(kv_tag);
      auto kernel = qkv_rope_store_kernel<TQ, TKV>;
      if (smem > 48 * 1024) check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      kernel<<<static_cast<unsigned>(batch.n_tokens), kThreads, smem, stream>>>(qkv, bias, shape, inv_freq, kv, batch,
                                                                                layer, static_cast<TQ*>(q_out));
    });
  });
  check_launch();
}

}  // namespace den::kernels
