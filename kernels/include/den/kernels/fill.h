// Deterministic pseudo-random fill (uniform in [-scale, scale), from a counter hash of
// (seed, index)): benchmarks and tests fill device buffers without copying from the host, and
// the CPU twin produces the very same values.
#pragma once

#include <cstdint>

#include "den/kernels/cuda_stream.h"
#include "den/kernels/dtype.h"

namespace den::kernels {

void fill_random_ref(void* dst, DType type, int64_t n, uint64_t seed, float scale);
void fill_random_cuda(void* dst, DType type, int64_t n, uint64_t seed, float scale, CudaStream stream);

}  // namespace den::kernels
