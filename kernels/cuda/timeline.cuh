// Device side of the kernel timeline (den/kernels/timeline.h): the stamps pdl_allow_next(),
// pdl_wait() and timeline_end() take in a -DDEN_KERNEL_TIMELINE=ON build; in other builds
// they compile to nothing. Private to kernels/cuda.
#pragma once

#include <cuda_runtime.h>

namespace den::kernels {

#ifdef DEN_KERNEL_TIMELINE
// Called once per translation unit at static initialization: attach() points that unit's copy
// of the buffer pointer (a __device__ variable is per unit without separable compilation).
void timeline_register(void (*attach)(unsigned long long* buffer));
void timeline_note_launch(unsigned blocks);

namespace {
__device__ unsigned long long* g_timeline = nullptr;  // [count, capacity, 4 words an entry]

void attach_timeline(unsigned long long* buffer) {
  if (cudaMemcpyToSymbol(g_timeline, &buffer, sizeof buffer) != cudaSuccess) (void)cudaGetLastError();
}
const bool g_timeline_registered = (timeline_register(&attach_timeline), true);

__device__ __forceinline__ unsigned long long timeline_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
  return t;
}
__device__ __forceinline__ unsigned& timeline_slot() {  // the block's entry
  __shared__ unsigned slot;
  return slot;
}
}  // namespace

__device__ __forceinline__ void timeline_started() {
  unsigned long long* tl = g_timeline;
  if (tl == nullptr || threadIdx.x != 0 || threadIdx.y != 0) return;
  const unsigned long long t = timeline_now();
  const unsigned k = atomicAdd(reinterpret_cast<unsigned*>(tl), 1u);
  timeline_slot() = k;
  if (k >= tl[1]) return;
  unsigned long long* e = tl + 2 + 4 * static_cast<unsigned long long>(k);
  e[0] = t;
  e[1] = 0;
  e[2] = (static_cast<unsigned long long>(gridDim.x * gridDim.y * gridDim.z) << 32) |
         (blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z));
  e[3] = 0;
}
// The pointer is read before the wait, so the stamp after it is not a load late.
__device__ __forceinline__ unsigned long long* timeline_before_wait() { return g_timeline; }
__device__ __forceinline__ void timeline_waited(unsigned long long* tl) {
  if (tl == nullptr || threadIdx.x != 0 || threadIdx.y != 0) return;
  const unsigned k = timeline_slot();
  if (k < tl[1]) tl[2 + 4 * static_cast<unsigned long long>(k) + 1] = timeline_now();
}
// At a block's end, reached by all its threads (a barrier first, so the stamp is the block's).
__device__ __forceinline__ void timeline_end() {
  unsigned long long* tl = g_timeline;
  if (tl == nullptr) return;
  __syncthreads();
  if (threadIdx.x != 0 || threadIdx.y != 0) return;
  const unsigned k = timeline_slot();
  if (k < tl[1]) tl[2 + 4 * static_cast<unsigned long long>(k) + 3] = timeline_now();
}
inline void timeline_launch(dim3 grid) { timeline_note_launch(grid.x * grid.y * grid.z); }
#else
__device__ __forceinline__ void timeline_started() {}
__device__ __forceinline__ unsigned long long* timeline_before_wait() { return nullptr; }
__device__ __forceinline__ void timeline_waited(unsigned long long*) {}
__device__ __forceinline__ void timeline_end() {}
inline void timeline_launch(dim3) {}
#endif

}  // namespace den::kernels
