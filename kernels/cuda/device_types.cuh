// Device-side element conversions and 16-byte vector access for float, half and bfloat16, and
// the one switch that turns a run-time DType into a template argument, warp reductions and the
// last-block arrival count. Private to kernels/cuda.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/atomic>

#include <cstdint>
#include <algorithm>
#include <stdexcept>
#include <string>

#include "den/kernels/dtype.h"

namespace den::kernels {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements of T in one 16-byte vector.
template <typename T>
inline constexpr int kVec = 16 / sizeof(T);

// Loads kVec<T> elements (16-byte aligned) as floats.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = to_float<T>(e[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) e[i] = from_float<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Calls f(T{}) with T the C++ type of `dtype`.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32:
      return f(float{});
    case DType::f16:
      return f(__half{});
    case DType::bf16:
      return f(__nv_bfloat16{});
  }
  throw std::logic_error("dispatch_dtype: unknown DType");
}

// Calls f(T{}) for the 16-bit types only (the tensor-core and single-token paths); `what` names
// the caller in the error for any other type.
template <typename F>
void dispatch_half_types(DType dtype, F&& f, const char* what = "attention fast path: KV dtype") {
  switch (dtype) {
    case DType::f16:
      return f(__half{});
    case DType::bf16:
      return f(__nv_bfloat16{});
    default:
      throw std::logic_error(std::string(what) + " must be f16 or bf16");
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// One thread per block counts its block in at `counter`, after the block's writes that the
// last one will read (release), and learns whether it is the last of `expected` (acquire: the
// others' writes are visible to it, and to its block after a barrier). The last one returns
// the counter to zero for the next launch.
__device__ __forceinline__ bool arrive_last(int32_t* counter, int32_t expected) {
  cuda::atomic_ref<int32_t, cuda::thread_scope_device> arrivals(*counter);
  const bool last = arrivals.fetch_add(1, cuda::memory_order_acq_rel) == expected - 1;
  if (last) arrivals.store(0, cuda::memory_order_relaxed);
  return last;
}

}  // namespace den::kernels
