// check(): CUDA status to exception, with the call site in the message.
#include "den/kernels/cuda_check.h"

#include "device_query.h"
#include "pdl.cuh"

namespace den::kernels {

void check(cudaError_t status, std::source_location where) {
  if (status == cudaSuccess) return;
  throw CudaError(status, std::string("CUDA error ") + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) +
                              ") at " + where.file_name() + ":" + std::to_string(where.line()) + " in " +
                              where.function_name());
}

bool is_sticky(cudaError_t code) {
  switch (code) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorECCUncorrectable:
    case cudaErrorLaunchTimeout:
      return true;
    default:
      return false;
  }
}

namespace {
__global__ void write_through_null(int* target) { *target = 1; }
}  // namespace

void trigger_illegal_address_cuda(cudaStream_t stream) {
  write_through_null<<<1, 1, 0, stream>>>(nullptr);
  check_launch();
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

namespace den::kernels {

bool pdl_supported() {
  // Per device: the answer is fixed for the process.
  static thread_local int cached_device = -1;
  static thread_local bool cached = false;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (device != cached_device) {
    int major = 0;
    cached = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9;
    cached_device = device;
  }
  return cached;
}

int sm_count() {
  static thread_local int cached_device = -1, count = 0;
  int device = 0;
  check(cudaGetDevice(&device));
  if (device != cached_device) {
    check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cached_device = device;
  }
  return count;
}

}  // namespace den::kernels
