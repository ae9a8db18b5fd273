// Programmatic dependent launch (Hopper): a kernel launched with launch_chained() may start
// while its predecessor in the stream is still finishing; it reads only what no running kernel
// writes (weights, the step's plan) until pdl_wait() returns, when the predecessor has
// completed and its writes are visible. Each chained kernel also calls pdl_allow_next() early,
// so the next one's prologue (weight loads, table lookups) overlaps this one's tail.
// The predecessor's outputs are read after pdl_wait() with coherent loads (plain loads through a
// pointer the kernel also writes, __ldcg, cp.async.cg), never through the non-coherent path that
// nvcc gives plain loads from a `const T* __restrict__` parameter (ld.global.nc): that path
// requires the data to stay unchanged for the kernel's whole lifetime, and a chained kernel
// starts while its predecessor still writes.
// On GPUs before sm_90 the attribute is not set and both calls compile to nothing.
// Private to kernels/cuda.
#pragma once

#include <cuda_runtime.h>

#include "den/kernels/cuda_check.h"
#include "timeline.cuh"

namespace den::kernels {

__device__ __forceinline__ void pdl_wait() {
  unsigned long long* timeline = timeline_before_wait();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  timeline_waited(timeline);
}

__device__ __forceinline__ void pdl_allow_next() {
  timeline_started();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#ifdef DEN_KERNEL_TIMELINE
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");  // after the block's stamp
#else
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
#endif
}

// Whether the current device supports programmatic dependent launch (compute capability 9+).
bool pdl_supported();

template <typename... KernelArgs, typename... Args>
void launch_chained(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                    Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  timeline_launch(grid);
  if (pdl_supported()) {
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  check(cudaLaunchKernelEx(&config, kernel, static_cast<KernelArgs>(args)...));
}

}  // namespace den::kernels
