// RMSNorm on the GPU: one block per row, a block-wide sum of squares, then the scaled write in
// the output type (rows of up to 8,192 floats, a multiple of 4, held in registers). Same formula
// and epsilon as rmsnorm_ref (kernels/ref/rmsnorm_ref.cpp). The residual variant first adds a
// split product's parts to the row (one kernel instead of a reduction and a norm).
#include <cstdint>
#include <stdexcept>

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

// What a block adds to its row before the norm: nothing (a plain norm), or the parts of a
// product computed over slices of its inputs (residual_rmsnorm), added in order and written back.
struct ResidualParts {
  const float* parts = nullptr;  // [n_parts, n_rows, n]
  int32_t n_parts = 0;
  int64_t part_stride = 0;  // n_rows * n
  float* x = nullptr;       // the residual rows, updated
};

template <typename T, bool RESIDUAL>
__global__ void rmsnorm_kernel(const float* __restrict__ x, const float* __restrict__ weight, T* y,
                               const int32_t* __restrict__ rows, int64_t n, float eps, ResidualParts residual) {
  const int64_t src_row = rows != nullptr ? rows[blockIdx.x] : blockIdx.x;
  // The residual rows are read and written through residual.x, never through the restricted x.
  const float* xr = (RESIDUAL ? residual.x : x) + src_row * n;
  T* yr = y + static_cast<int64_t>(blockIdx.x) * n;
  float partial = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    float v = xr[i];
    if constexpr (RESIDUAL) {
      const float* part = residual.parts + src_row * n + i;
      for (int32_t s = 0; s < residual.n_parts; ++s) v += part[s * residual.part_stride];
      residual.x[src_row * n + i] = v;  // re-read below (xr) by this thread only
    }
    partial += v * v;
  }
  if (weight == nullptr) return;  // the add alone (uniform over the block)
  const float inv_rms = block_inv_rms(partial, n, eps);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) yr[i] = from_float<T>(weight[i] * (xr[i] * inv_rms));
}

__device__ __forceinline__ void add_to(float4& a, const float4& b) {
  a.x += b.x;
  a.y += b.y;
  a.z += b.z;
  a.w += b.w;
}

// Rows whose length is a multiple of 4 and at most 4 * kThreads * P: each thread keeps its float4
// pieces in registers, so a row is read from memory once (a decode step's norms are a few rows,
// and latency is all they cost: every load, the norm weights' and the PARTS parts' too, goes
// out before the first sum). PARTS = 0: a plain norm; else the residual variant.
template <typename T, int P, int PARTS>
__global__ void __launch_bounds__(kThreads)
    rmsnorm_quads_kernel(const float* __restrict__ x, const float* __restrict__ weight, T* y,
                         const int32_t* __restrict__ rows, int64_t n, float eps, ResidualParts residual) {
  const int64_t src_row = rows != nullptr ? rows[blockIdx.x] : blockIdx.x;
  const float4* xr = reinterpret_cast<const float4*>((PARTS > 0 ? residual.x : x) + src_row * n);
  const auto* w4 = reinterpret_cast<const float4*>(weight);
  const int quads = static_cast<int>(n / 4);
  float4 v[P], g[P], part[P][PARTS > 0 ? PARTS : 1];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int i = threadIdx.x + p * kThreads;
    if (i >= quads) continue;
    v[p] = xr[i];
    if (weight != nullptr) g[p] = w4[i];
    if constexpr (PARTS > 0) {
      const float4* from = reinterpret_cast<const float4*>(residual.parts + src_row * n) + i;
#pragma unroll
      for (int s = 0; s < PARTS; ++s) part[p][s] = from[s * (residual.part_stride / 4)];
    }
  }
  float partial = 0.0f;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int i = threadIdx.x + p * kThreads;
    if (i >= quads) continue;
    if constexpr (PARTS > 0) {
#pragma unroll
      for (int s = 0; s < PARTS; ++s) add_to(v[p], part[p][s]);
      reinterpret_cast<float4*>(residual.x + src_row * n)[i] = v[p];
    }
    partial += v[p].x * v[p].x + v[p].y * v[p].y + v[p].z * v[p].z + v[p].w * v[p].w;
  }
  if (weight == nullptr) return;  // the add alone (uniform over the block)
  const float inv_rms = block_inv_rms(partial, n, eps);
  T* yr = y + static_cast<int64_t>(blockIdx.x) * n;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int i = threadIdx.x + p * kThreads;
    if (i < quads) {
      yr[4 * i] = from_float<T>(g[p].x * (v[p].x * inv_rms));
      yr[4 * i + 1] = from_float<T>(g[p].y * (v[p].y * inv_rms));
      yr[4 * i + 2] = from_float<T>(g[p].z * (v[p].z * inv_rms));
      yr[4 * i + 3] = from_float<T>(g[p].w * (v[p].w * inv_rms));
    }
  }
}

// Rows the register kernel holds: a multiple of 4 floats, up to 8 float4 a thread.
bool quads_fit(int64_t n) { return n % 4 == 0 && n / 4 <= int64_t{8} * kThreads; }

template <bool RESIDUAL>
void launch_rmsnorm(const float* x, const float* weight, void* y, DType y_type, const int32_t* rows, int64_t n_rows,
                    int64_t n, float eps, const ResidualParts& residual, cudaStream_t stream) {
  const int64_t per_thread = (n / 4 + kThreads - 1) / kThreads;
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                       (weight == nullptr || reinterpret_cast<uintptr_t>(weight) % 16 == 0) &&
                       reinterpret_cast<uintptr_t>(residual.parts) % 16 == 0;
  // The register kernel holds every part's pieces: up to 4 parts (more take the generic one).
  if (quads_fit(n) && aligned && residual.n_parts <= 4) {
    dispatch_dtype(y_type, [&](auto t) {
      using T = decltype(t);
      dispatch_count_1_to_8(static_cast<int32_t>(per_thread), "rmsnorm: pieces per thread", [&](auto p_tag) {
        constexpr int P = decltype(p_tag)::value;
        auto run = [&](auto kernel) {
          kernel<<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(x, weight, static_cast<T*>(y), rows, n, eps,
                                                                        residual);
        };
        switch (RESIDUAL ? residual.n_parts : 0) {
          case 0: return run(rmsnorm_quads_kernel<T, P, 0>);
          case 1: return run(rmsnorm_quads_kernel<T, P, 1>);
          case 2: return run(rmsnorm_quads_kernel<T, P, 2>);
          case 3: return run(rmsnorm_quads_kernel<T, P, 3>);
          default: return run(rmsnorm_quads_kernel<T, P, 4>);
        }
      });
    });
  } else {
    dispatch_dtype(y_type, [&](auto t) {
      using T = decltype(t);
      rmsnorm_kernel<T, RESIDUAL><<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(
          x, weight, static_cast<T*>(y), rows, n, eps, residual);
    });
  }
  check_launch();
}

}  // namespace

void rmsnorm_cuda(const float* x, const float* weight, void* y, DType y_type, const int32_t* rows, int64_t n_rows,
                  int64_t n, float eps, CudaStream stream) {
  if (n_rows == 0) return;
  launch_rmsnorm<false>(x, weight, y, y_type, rows, n_rows, n, eps, ResidualParts{}, stream);
}

bool residual_rmsnorm_fast(int64_t n) { return quads_fit(n); }

void residual_rmsnorm_cuda(const float* parts, int32_t n_parts, float* x, const float* weight, void* y, DType y_type,
                           int64_t n_rows, int64_t n, float eps, CudaStream stream) {
  if (n_parts < 1) throw std::invalid_argument("residual_rmsnorm: needs at least one part");
  if (n_rows == 0) return;
  // x is read and written through the ResidualParts (the kernel's x parameter is restricted).
  launch_rmsnorm<true>(x, weight, y, y_type, nullptr, n_rows, n, eps, ResidualParts{parts, n_parts, n_rows * n, x},
                       stream);
}

}  // namespace den::kernels
