// The cuBLAS handle of a device context (RAII) and the one matrix product the decoder needs:
// Y[t, r] (+)= sum_k W[r, k] X[t, k] with W row-major [n_out, n_in] in the weight type, X in the
// same type, Y float32, fp32 accumulation. Private to the CUDA backend.
#pragma once

#include <cublas_v2.h>

#include <source_location>
#include <stdexcept>
#include <string>

#include "den/kernels/cuda_resources.h"
#include "den/kernels/dtype.h"

namespace den::engine::cuda {

inline void check_cublas(cublasStatus_t status, std::source_location where = std::source_location::current()) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw std::runtime_error(std::string("cuBLAS error ") + cublasGetStatusName(status) + " (" +
                           cublasGetStatusString(status) + ") at " + where.file_name() + ":" +
                           std::to_string(where.line()));
}

class CublasHandle {
 public:
  CublasHandle(cudaStream_t stream, size_t workspace_bytes) : workspace_(workspace_bytes) {
    check_cublas(cublasCreate(&handle_));
    check_cublas(cublasSetStream(handle_, stream));
    check_cublas(cublasSetWorkspace(handle_, workspace_.get(), workspace_.bytes()));
    // Pure fp32 for f32 models (no TF32): the f32 path is the exactness reference on the GPU.
    check_cublas(cublasSetMathMode(handle_, CUBLAS_DEFAULT_MATH));
  }
  ~CublasHandle() {
    if (handle_ != nullptr) cublasDestroy(handle_);
  }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;

  // weights: [n_out, n_in] row-major; x: [n_tokens, n_in]; y: [n_tokens, n_out] float.
  // beta = 1 accumulates into y (the residual stream), beta = 0 overwrites.
  void matmul(const void* weights, kernels::DType type, const void* x, int64_t n_tokens, int64_t n_in, int64_t n_out,
              float* y, float beta) const {
    const float alpha = 1.0f;
    const cudaDataType_t t = cuda_type(type);
    check_cublas(cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n_out), static_cast<int>(n_tokens),
                              static_cast<int>(n_in), &alpha, weights, t, static_cast<int>(n_in), x, t,
                              static_cast<int>(n_in), &beta, y, CUDA_R_32F, static_cast<int>(n_out),
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

  // The same product in n_parts parts, over equal slices of n_in: parts[s] = the slice s's sum,
  // [n_parts, n_tokens, n_out] float. One batched call: a few-token product gets n_parts times
  // the blocks without cuBLAS's own split-K reduction, and the caller's next kernel adds them.
  // n_in / n_parts must keep slices 16-byte aligned (split_parts_fit).
  void matmul_parts(const void* weights, kernels::DType type, const void* x, int64_t n_tokens, int64_t n_in,
                    int64_t n_out, float* parts, int32_t n_parts) const {
    if (!split_parts_fit(type, n_in, n_parts)) throw std::invalid_argument("matmul_parts: slices would not be aligned");
    const float alpha = 1.0f, beta = 0.0f;
    const int64_t slice = n_in / n_parts;
    check_cublas(cublasGemmStridedBatchedEx(
        handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n_out), static_cast<int>(n_tokens), static_cast<int>(slice),
        &alpha, weights, cuda_type(type), static_cast<int>(n_in), slice, x, cuda_type(type), static_cast<int>(n_in),
        slice, &beta, parts, CUDA_R_32F, static_cast<int>(n_out), n_tokens * n_out, n_parts, CUBLAS_COMPUTE_32F,
        CUBLAS_GEMM_DEFAULT));
  }
  static bool split_parts_fit(kernels::DType type, int64_t n_in, int32_t n_parts) {
    const int64_t per_16_bytes = 16 / kernels::dtype_bytes(type);
    return n_parts >= 1 && n_in % n_parts == 0 && (n_in / n_parts) % per_16_bytes == 0;
  }

  cublasHandle_t get() const { return handle_; }

 private:
  static cudaDataType_t cuda_type(kernels::DType type) {
    return type == kernels::DType::f32 ? CUDA_R_32F : type == kernels::DType::f16 ? CUDA_R_16F : CUDA_R_16BF;
  }

  kernels::DeviceBuffer workspace_;
  cublasHandle_t handle_ = nullptr;
};

}  // namespace den::engine::cuda
