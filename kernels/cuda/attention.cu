// paged_attention_cuda: picks the fast paths (decode + prefill) or the exact generic kernel.
#include "attention_common.cuh"
#include "den/kernels/cuda_check.h"

namespace den::kernels {

bool attention_fast_path(DType kv_dtype, int32_t head_dim) {
  return (kv_dtype == DType::f16 || kv_dtype == DType::bf16) && (head_dim == 64 || head_dim == 128);
}

size_t attention_workspace_bytes(int32_t n_decode, int32_t n_heads, int32_t n_splits, int32_t head_dim) {
  // Merge counters first (a fixed region, so their place never changes between steps), then
  // the partial states of the splits.
  return kAttentionCounterBytes + static_cast<size_t>(n_decode) * n_heads * n_splits * (head_dim + 2) * sizeof(float);
}

void paged_attention_cuda(const void* q, void* out, const PagedKvView& kv, const PagedBatch& batch,
                          const AttentionPlan& plan, int32_t layer, int32_t n_heads, float scale, CudaStream stream) {
  if (!attention_fast_path(kv.layout.dtype, kv.layout.head_dim)) {
    generic_attention_launch(q, out, kv, batch, layer, n_heads, scale, stream);
    return;
  }
  decode_attention_launch(q, out, kv, batch, plan, layer, n_heads, scale, stream);
  prefill_attention_launch(q, out, kv, batch, plan, layer, n_heads, scale, stream);
}

}  // namespace den::kernels
