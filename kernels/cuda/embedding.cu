// Embedding gather on the GPU: one block per token, the row converted to float.
#include "den/kernels/cuda_check.h"
#include "den/kernels/embedding.h"
#include "device_types.cuh"
#include "pdl.cuh"

namespace den::kernels {
namespace {

template <typename T>
__global__ void embedding_gather_kernel(const T* __restrict__ table, const int32_t* __restrict__ ids, int64_t dim,
                                        float* __restrict__ out) {
  pdl_allow_next();
  pdl_wait();  // out may still be read by the kernel before
  const T* row = table + static_cast<int64_t>(ids[blockIdx.x]) * dim;
  float* dst = out + static_cast<int64_t>(blockIdx.x) * dim;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) dst[i] = to_float<T>(row[i]);
  timeline_end();
}

}  // namespace

void embedding_gather_cuda(const void* table, DType table_type, const int32_t* ids, int64_t n_tokens, int64_t dim,
                           float* out, CudaStream stream) {
  if (n_tokens == 0) return;
  dispatch_dtype(table_type, [&](auto tag) {
    using T = decltype(tag);
    launch_chained(embedding_gather_kernel<T>, dim3(static_cast<unsigned>(n_tokens)), dim3(256), 0, stream,
                   static_cast<const T*>(table), ids, dim, out);
  });
  check_launch();
}

}  // namespace den::kernels
