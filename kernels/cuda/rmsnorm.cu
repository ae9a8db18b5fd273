// RMSNorm on the GPU: one block per row, a block-wide sum of squares, then the scaled write in
// the output type. Same formula and epsilon as rmsnorm_ref (kernels/ref/rmsnorm_ref.cpp).
#include "den/kernels/cuda_check.h"
#include "den/kernels/rmsnorm.h"
#include "device_types.cuh"

namespace den::kernels {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void rmsnorm_kernel(const float* __restrict__ x, const float* __restrict__ weight, T* y,
                               const int32_t* __restrict__ rows, int64_t n, float eps) {
  const int64_t src_row = rows != nullptr ? rows[blockIdx.x] : blockIdx.x;
  const float* xr = x + src_row * n;
  T* yr = y + static_cast<int64_t>(blockIdx.x) * n;
  float partial = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) partial += xr[i] * xr[i];
  partial = warp_sum(partial);
  __shared__ float warp_sums[kThreads / 32];
  __shared__ float inv_rms;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = partial;
  __syncthreads();
  if (warp == 0) {
    float total = warp_sum(lane < kThreads / 32 ? warp_sums[lane] : 0.0f);
    if (lane == 0) inv_rms = 1.0f / sqrtf(total / static_cast<float>(n) + eps);
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = from_float<T>(weight[i] * (xr[i] * inv_rms));
}

}  // namespace

void rmsnorm_cuda(const float* x, const float* weight, void* y, DType y_type, const int32_t* rows, int64_t n_rows,
                  int64_t n, float eps, CudaStream stream) {
  if (n_rows == 0) return;
  dispatch_dtype(y_type, [&](auto t) {
    using T = decltype(t);
    rmsnorm_kernel<T><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(x, weight, static_cast<T*>(y), rows, n,
                                                                             eps);
  });
  check_launch();
}

}  // namespace den::kernels
