// Whole-block copies on the GPU (see den/kernels/kv_blocks.h). Each CTA iteration copies one
// tile (up to 16 KiB) of one block, so the block id is read once per tile rather than divided
// out per element, and every thread keeps four 16-byte loads in flight before storing: that
// hides the latency of zero-copy reads over PCIe (a mapped pinned pool) as well as of HBM.
#include "den/kernels/cuda_check.h"
#include "den/kernels/kv_blocks.h"

#include <algorithm>
#include <stdexcept>

namespace den::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kTileVectors = int64_t{kThreads} * kUnroll;  // 16 KiB per tile

// Copies vectors [offset, offset + count) of each block; blocks are `stride` vectors apart.
__global__ void kv_copy_blocks_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                      const int32_t* __restrict__ src_ids, const int32_t* __restrict__ dst_ids,
                                      int32_t n, int64_t stride, int64_t offset, int64_t vectors_per_block,
                                      int64_t tiles_per_block) {
  const int64_t tiles = n * tiles_per_block;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    // Uniform across the CTA: one division per tile, not per element.
    const int64_t b = t / tiles_per_block;
    const int64_t first = (t - b * tiles_per_block) * kTileVectors + threadIdx.x;
    const int64_t from = src_ids != nullptr ? src_ids[b] : b;
    const int64_t to = dst_ids != nullptr ? dst_ids[b] : b;
    const uint4* s = src + from * stride + offset;
    uint4* d = dst + to * stride + offset;
    uint4 r[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t v = first + k * kThreads;
      if (v < vectors_per_block) r[k] = s[v];
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t v = first + k * kThreads;
      if (v < vectors_per_block) d[v] = r[k];
    }
  }
}

// Resident CTAs to launch: enough to fill every SM, no more (the loop strides over tiles).
int64_t max_ctas() {
  static thread_local int cached_device = -1;
  static thread_local int64_t cached = 132 * 8;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return cached;
  if (device != cached_device) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && sms > 0) {
      cached = int64_t{sms} * 8;  // 8 x 256 threads = a full SM
    }
    cached_device = device;
  }
  return cached;
}

}  // namespace

void kv_copy_block_slices_cuda(const void* src, void* dst, const int32_t* src_ids, const int32_t* dst_ids, int32_t n,
                               int64_t block_bytes, int64_t slice_offset, int64_t slice_bytes, CudaStream stream,
                               int32_t max_ctas_wanted) {
  if (n == 0 || slice_bytes == 0) return;
  if (block_bytes % 16 != 0 || slice_offset % 16 != 0 || slice_bytes % 16 != 0) {
    throw std::invalid_argument("kv_copy_block_slices_cuda: block size, slice offset and size must be multiples of 16 bytes");
  }
  if (slice_offset < 0 || slice_bytes < 0 || slice_offset + slice_bytes > block_bytes) {
    throw std::invalid_argument("kv_copy_block_slices_cuda: the slice is not inside the block");
  }
  const int64_t vectors = slice_bytes / 16;
  const int64_t tiles_per_block = (vectors + kTileVectors - 1) / kTileVectors;
  const int64_t limit = max_ctas_wanted > 0 ? std::min<int64_t>(max_ctas_wanted, max_ctas()) : max_ctas();
  const auto ctas = static_cast<unsigned>(std::min<int64_t>(n * tiles_per_block, limit));
  kv_copy_blocks_kernel<<<ctas, kThreads, 0, stream>>>(static_cast<const uint4*>(src), static_cast<uint4*>(dst), src_ids,
                                                       dst_ids, n, block_bytes / 16, slice_offset / 16, vectors,
                                                       tiles_per_block);
  check_launch();
}

void kv_copy_blocks_cuda(const void* src, void* dst, const int32_t* src_ids, const int32_t* dst_ids, int32_t n,
                         int64_t block_bytes, CudaStream stream) {
  if (block_bytes % 16 != 0) throw std::invalid_argument("kv_copy_blocks_cuda: block size must be a multiple of 16 bytes");
  kv_copy_block_slices_cuda(src, dst, src_ids, dst_ids, n, block_bytes, 0, block_bytes, stream);
}

}  // namespace den::kernels
