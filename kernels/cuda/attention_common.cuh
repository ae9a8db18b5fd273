// Pieces shared by the attention kernels: online-softmax state (log2 domain), the dispatch of
// the fast-path instances (the one place that lists the supported dtype x head_dim pairs), and
// the launchers each .cu provides. Private to kernels/cuda.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <stdexcept>
#include <type_traits>

#include "den/kernels/attention.h"
#include "device_types.cuh"

namespace den::kernels {

// Running max m, sum l and accumulator of exp2(score - m)-weighted values, for N elements.
template <int N>
struct SoftmaxState {
  float m = -INFINITY;
  float l = 0.0f;
  float acc[N] = {};

  __device__ __forceinline__ void add(float s, const float* v) {
    const float m_new = fmaxf(m, s);
    const float correction = exp2f(m - m_new);  // m == -inf: exp2(-inf) = 0
    const float p = exp2f(s - m_new);
    l = l * correction + p;
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = fmaf(p, v[i], acc[i] * correction);
    m = m_new;
  }

  __device__ __forceinline__ void merge(const SoftmaxState& o) {
    const float m_new = fmaxf(m, o.m);
    if (m_new == -INFINITY) return;  // both empty
    const float a = exp2f(m - m_new), b = exp2f(o.m - m_new);
    l = l * a + o.l * b;
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = acc[i] * a + o.acc[i] * b;
    m = m_new;
  }

  // Merges with the state held by lane ^ offset (every lane of the warp must call this).
  __device__ __forceinline__ void merge_shuffle(int offset) {
    SoftmaxState o;
    o.m = __shfl_xor_sync(0xffffffffu, m, offset);
    o.l = __shfl_xor_sync(0xffffffffu, l, offset);
#pragma unroll
    for (int i = 0; i < N; ++i) o.acc[i] = __shfl_xor_sync(0xffffffffu, acc[i], offset);
    merge(o);
  }
};

// ---- Tensor-core building blocks (sm_80+): cp.async, ldmatrix, mma.sync m16n8k16 ----

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int size = valid ? 16 : 0;  // 0: zero-fill without reading
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 0;\n" ::);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one register of two T (the lower column in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <typename F>
void dispatch_head_dim(int32_t head_dim, F&& f) {
  switch (head_dim) {
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    default:
      throw std::logic_error("attention fast path: head_dim must be 64 or 128");
  }
}

void decode_attention_launch(const void* q, void* out, const PagedKvView& kv, const PagedBatch& batch,
                             const AttentionPlan& plan, int32_t layer, int32_t n_heads, float scale, CudaStream stream);
void prefill_attention_launch(const void* q, void* out, const PagedKvView& kv, const PagedBatch& batch,
                              const AttentionPlan& plan, int32_t layer, int32_t n_heads, float scale,
                              CudaStream stream);
void generic_attention_launch(const void* q, void* out, const PagedKvView& kv, const PagedBatch& batch, int32_t layer,
                              int32_t n_heads, float scale, CudaStream stream);

}  // namespace den::kernels
