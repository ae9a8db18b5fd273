// RMSNorm on the GPU: one block per row, a block-wide sum of squares, then the scaled write in
// the output type (rows of up to 8,192 floats, a multiple of 4, held in registers). Same formula
// and epsilon as rmsnorm_ref (kernels/ref/rmsnorm_ref.cpp).
#include <cstdint>

#include "den/kernels/cuda_check.h"
#include "den/kernels/rmsnorm.h"
#include "count_dispatch.h"
#include "device_types.cuh"

namespace den::kernels {
namespace {

constexpr int kThreads = 256;

// 1 / sqrt(mean of squares + eps) of a row, given each thread's partial sum of squares (every
// thread of the kThreads-thread block calls it; all get the result).
__device__ __forceinline__ float block_inv_rms(float partial, int64_t n, float eps) {
  partial = warp_sum(partial);
  __shared__ float warp_sums[kThreads / 32];
  __shared__ float inv_rms;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = partial;
  __syncthreads();
  if (warp == 0) {
    const float total = warp_sum(lane < kThreads / 32 ? warp_sums[lane] : 0.0f);
    if (lane == 0) inv_rms = 1.0f / sqrtf(total / static_cast<float>(n) + eps);
  }
  __syncthreads();
  return inv_rms;
}

template <typename T>
__global__ void rmsnorm_kernel(const float* __restrict__ x, const float* __restrict__ weight, T* y,
                               const int32_t* __restrict__ rows, int64_t n, float eps) {
  const int64_t src_row = rows != nullptr ? rows[blockIdx.x] : blockIdx.x;
  const float* xr = x + src_row * n;
  T* yr = y + static_cast<int64_t>(blockIdx.x) * n;
  float partial = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) partial += xr[i] * xr[i];
  const float inv_rms = block_inv_rms(partial, n, eps);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = from_float<T>(weight[i] * (xr[i] * inv_rms));
}

// Rows whose length is a multiple of 4 and at most 4 * kThreads * P: each thread keeps its float4
// pieces in registers, so a row is read from memory once (a decode step's norms are a few rows,
// and latency is all they cost).
template <typename T, int P>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_quads_kernel(const float* __restrict__ x, const float* __restrict__ weight, T* y,
                         const int32_t* __restrict__ rows, int64_t n, float eps) {
  const int64_t src_row = rows != nullptr ? rows[blockIdx.x] : blockIdx.x;
  const float4* xr = reinterpret_cast<const float4*>(x + src_row * n);
  const auto* w4 = reinterpret_cast<const float4*>(weight);
  const int quads = static_cast<int>(n / 4);
  float4 v[P];
  float partial = 0.0f;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int i = threadIdx.x + p * kThreads;
    if (i < quads) {
      v[p] = xr[i];
      partial += v[p].x * v[p].x + v[p].y * v[p].y + v[p].z * v[p].z + v[p].w * v[p].w;
    }
  }
  const float inv_rms = block_inv_rms(partial, n, eps);
  T* yr = y + static_cast<int64_t>(blockIdx.x) * n;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int i = threadIdx.x + p * kThreads;
    if (i < quads) {
      const float4 g = w4[i];
      yr[4 * i] = from_float<T>(g.x * (v[p].x * inv_rms));
      yr[4 * i + 1] = from_float<T>(g.y * (v[p].y * inv_rms));
      yr[4 * i + 2] = from_float<T>(g.z * (v[p].z * inv_rms));
      yr[4 * i + 3] = from_float<T>(g.w * (v[p].w * inv_rms));
    }
  }
}

}  // namespace

void rmsnorm_cuda(const float* x, const float* weight, void* y, DType y_type, const int32_t* rows, int64_t n_rows,
                  int64_t n, float eps, CudaStream stream) {
  if (n_rows == 0) return;
  const int64_t per_thread = (n / 4 + kThreads - 1) / kThreads;
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(weight) % 16 == 0;
  if (n % 4 == 0 && per_thread <= 8 && aligned) {
    dispatch_dtype(y_type, [&](auto t) {
      using T = decltype(t);
      dispatch_count_1_to_8(static_cast<int32_t>(per_thread), "rmsnorm: pieces per thread", [&](auto p_tag) {
        constexpr int P = decltype(p_tag)::value;
        rmsnorm_quads_kernel<T, P><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
            x, weight, static_cast<T*>(y), rows, n, eps);
      });
    });
    check_launch();
    return;
  }
  dispatch_dtype(y_type, [&](auto t) {
    using T = decltype(t);
    rmsnorm_kernel<T><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(x, weight, static_cast<T*>(y), rows, n,
                                                                             eps);
  });
  check_launch();
}

}  // namespace den::kernels
