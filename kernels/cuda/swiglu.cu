// SwiGLU on the GPU over the fused gate/up output: same formula as swiglu_ref (expf, not the
// fast approximation).
#include <cstdint>

#include "den/kernels/cuda_check.h"
#include "den/kernels/swiglu.h"
#include "device_types.cuh"

namespace den::kernels {
namespace {

template <typename T>
__global__ void swiglu_kernel(const float* __restrict__ gate_up, T* __restrict__ out, int64_t n_tokens, int64_t n_ff) {
  const int64_t total = n_tokens * n_ff;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / n_ff, j = i % n_ff;
    const float g = gate_up[t * 2 * n_ff + j];
    const float u = gate_up[t * 2 * n_ff + n_ff + j];
    out[i] = from_float<T>(g / (1.0f + expf(-g)) * u);
  }
}

// n_ff a multiple of 4: a thread per four outputs of one token (float4 loads, no 64-bit
// division per element), a grid row per token.
template <typename T>
__global__ void swiglu_quads_kernel(const float* __restrict__ gate_up, T* __restrict__ out, int64_t n_ff) {
  const int64_t t = blockIdx.y;
  const int64_t j = 4 * (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
  if (j >= n_ff) return;
  const float4 g = *reinterpret_cast<const float4*>(gate_up + t * 2 * n_ff + j);
  const float4 u = *reinterpret_cast<const float4*>(gate_up + t * 2 * n_ff + n_ff + j);
  T* o = out + t * n_ff + j;
  o[0] = from_float<T>(g.x / (1.0f + expf(-g.x)) * u.x);
  o[1] = from_float<T>(g.y / (1.0f + expf(-g.y)) * u.y);
  o[2] = from_float<T>(g.z / (1.0f + expf(-g.z)) * u.z);
  o[3] = from_float<T>(g.w / (1.0f + expf(-g.w)) * u.w);
}

}  // namespace

void swiglu_cuda(const float* gate_up, void* out, DType out_type, int64_t n_tokens, int64_t n_ff, CudaStream stream) {
  const int64_t total = n_tokens * n_ff;
  if (total == 0) return;
  if (n_ff % 4 == 0 && n_tokens <= 65535 && reinterpret_cast<uintptr_t>(gate_up) % 16 == 0) {
    const dim3 grid(static_cast<unsigned>((n_ff / 4 + 255) / 256), static_cast<unsigned>(n_tokens));
    dispatch_dtype(out_type, [&](auto tag) {
      using T = decltype(tag);
      swiglu_quads_kernel<T><<<grid, 256, 0, stream>>>(gate_up, static_cast<T*>(out), n_ff);
    });
    check_launch();
    return;
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 65535));
  dispatch_dtype(out_type, [&](auto tag) {
    using T = decltype(tag);
    swiglu_kernel<T><<<blocks, 256, 0, stream>>>(gate_up, static_cast<T*>(out), n_tokens, n_ff);
  });
  check_launch();
}

}  // namespace den::kernels
