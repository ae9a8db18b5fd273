// Deterministic fill on the GPU: the same hash as fill_random_ref, a grid-stride loop.
#include <algorithm>

#include "den/kernels/cuda_check.h"
#include "den/kernels/fill.h"
#include "den/kernels/sampling.h"
#include "device_types.cuh"

namespace den::kernels {
namespace {

template <typename T>
__global__ void fill_random_kernel(T* dst, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = from_float<T>(static_cast<float>(sampling_uniform(seed, static_cast<uint64_t>(i)) * 2.0 - 1.0) * scale);
  }
}

}  // namespace

void fill_random_cuda(void* dst, DType type, int64_t n, uint64_t seed, float scale, CudaStream stream) {
  if (n == 0) return;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 132 * 32));
  dispatch_dtype(type, [&](auto tag) {
    using T = decltype(tag);
    fill_random_kernel<T><<<blocks, 256, 0, stream>>>(static_cast<T*>(dst), n, seed, scale);
  });
  check_launch();
}

}  // namespace den::kernels
