// The one place CUDA and cuBLAS status codes become exceptions. Every CUDA call and every
// kernel launch goes through check(); the message names the call site.
// Include only from CUDA translation units or CUDA-enabled host code.
#pragma once

#include <cuda_runtime.h>

#include <source_location>
#include <stdexcept>
#include <string>

namespace den::kernels {

class CudaError : public std::runtime_error {
 public:
  CudaError(cudaError_t code, const std::string& what) : std::runtime_error(what), code_(code) {}
  cudaError_t code() const { return code_; }

 private:
  cudaError_t code_;
};

void check(cudaError_t status, std::source_location where = std::source_location::current());

// After a kernel launch: reports launch-configuration errors at the launch site.
inline void check_launch(std::source_location where = std::source_location::current()) {
  check(cudaGetLastError(), where);
}

// True when a CUDA device is present and usable (tests skip cleanly otherwise).
bool cuda_device_available();

// Errors after which the CUDA context is unusable until the process ends (an illegal address,
// a kernel that trapped, an uncorrectable ECC error): every later call fails the same way.
bool is_sticky(cudaError_t code);

// Test-only: a kernel that writes through a null pointer, so that the context dies with
// cudaErrorIllegalAddress (the GPU-fault tests of issue #7). No CPU twin: there is nothing to
// compute.
void trigger_illegal_address_cuda(cudaStream_t stream);

}  // namespace den::kernels
