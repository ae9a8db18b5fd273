// RMSNorm on the GPU: one block per row, a block-wide sum of squares, then the scaled write.
// Same formula and epsilon as rmsnorm_ref (kernels/ref/rmsnorm_ref.cpp).
#include "den/kernels/cuda_check.h"
#include "den/kernels/rmsnorm.h"

namespace den::kernels {
namespace {

constexpr int kThreads = 256;

__global__ void rmsnorm_kernel(const float* __restrict__ x, const float* __restrict__ weight, float* y, int64_t n,
                               float eps) {
  const float* xr = x + blockIdx.x * n;
  float* yr = y + blockIdx.x * n;
  float partial = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) partial += xr[i] * xr[i];
  for (int offset = 16; offset > 0; offset /= 2) partial += __shfl_xor_sync(0xffffffffu, partial, offset);
  __shared__ float warp_sums[kThreads / 32];
  __shared__ float inv_rms;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = partial;
  __syncthreads();
  if (warp == 0) {
    float total = lane < kThreads / 32 ? warp_sums[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
    if (lane == 0) inv_rms = rsqrtf(total / static_cast<float>(n) + eps);
  }
  __syncthreads();
  // Reads of x finish before any write of y (the barrier above), so y may alias x.
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = weight[i] * (xr[i] * inv_rms);
}

}  // namespace

void rmsnorm_cuda(const float* x, const float* weight, float* y, int64_t n_rows, int64_t n, float eps,
                  CudaStream stream) {
  if (n_rows == 0) return;
  rmsnorm_kernel<<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(x, weight, y, n, eps);
  check_launch();
}

}  // namespace den::kernels
