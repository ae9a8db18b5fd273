// What a CUDA device is and what it can do, measured: the floors benchmarks divide by.
// Without a CUDA build every function throws std::runtime_error saying so.
#pragma once

#include <cstddef>
#include <span>
#include <string>

#include "den/engine/backend.h"
#include "den/kernels/paged_kv.h"

namespace den::engine {

struct CudaDeviceInfo {
  std::string name;
  int sm_count = 0;
  size_t free_bytes = 0;
  size_t total_bytes = 0;
};

CudaDeviceInfo cuda_device_info(int device);

struct CudaFloors {
  double copy_bytes_per_second = 0;  // device-to-device copy, bytes read + written
  double gemm_flops_per_second = 0;  // cuBLAS bf16 GEMM 8192^3, fp32 accumulation, random data
};

// Takes a few seconds: best of several timed repetitions of each, after warm-up.
CudaFloors measure_cuda_floors(int device);

// Seconds one decode attention launch (one layer, every sequence of `batch` decoding one token)
// takes over `kv`, median of repeated launches: the attention kernel's own bandwidth, apart
// from the rest of the step. Queries are random.
double time_decode_attention(const kernels::PagedKvView& kv, int32_t n_heads, std::span<const SequenceInput> batch,
                             int device);

}  // namespace den::engine
