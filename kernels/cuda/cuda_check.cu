// check(): CUDA status to exception, with the call site in the message.
#include "den/kernels/cuda_check.h"

namespace den::kernels {

void check(cudaError_t status, std::source_location where) {
  if (status == cudaSuccess) return;
  throw CudaError(status, std::string("CUDA error ") + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) +
                              ") at " + where.file_name() + ":" + std::to_string(where.line()) + " in " +
                              where.function_name());
}

bool cuda_device_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the non-sticky "no device" error
    return false;
  }
  return count > 0;
}

}  // namespace den::kernels
