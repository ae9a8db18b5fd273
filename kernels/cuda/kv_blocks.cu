// Whole-block copies on the GPU: a grid-stride loop of 16-byte loads and stores over every
// block of the list, so one launch moves any number of scattered blocks at full bandwidth.
#include "den/kernels/cuda_check.h"
#include "den/kernels/kv_blocks.h"

#include <algorithm>
#include <stdexcept>

namespace den::kernels {
namespace {

__global__ void kv_copy_blocks_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst,
                                      const int32_t* __restrict__ src_ids, const int32_t* __restrict__ dst_ids,
                                      int32_t n, int64_t vectors_per_block) {
  const int64_t total = n * vectors_per_block;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / vectors_per_block, v = i % vectors_per_block;
    const int64_t from = src_ids != nullptr ? src_ids[b] : b;
    const int64_t to = dst_ids != nullptr ? dst_ids[b] : b;
    dst[to * vectors_per_block + v] = src[from * vectors_per_block + v];
  }
}

}  // namespace

void kv_copy_blocks_cuda(const void* src, void* dst, const int32_t* src_ids, const int32_t* dst_ids, int32_t n,
                         int64_t block_bytes, CudaStream stream) {
  if (n == 0) return;
  if (block_bytes % 16 != 0) throw std::invalid_argument("kv_copy_blocks_cuda: block size must be a multiple of 16 bytes");
  const int64_t vectors = block_bytes / 16;
  const int64_t total = n * vectors;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 132 * 16));
  kv_copy_blocks_kernel<<<blocks, 256, 0, stream>>>(static_cast<const uint4*>(src), static_cast<uint4*>(dst), src_ids,
                                                   dst_ids, n, vectors);
  check_launch();
}

}  // namespace den::kernels
