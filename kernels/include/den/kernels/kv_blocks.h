// Whole-block KV copies: copy-on-write of a shared block, and gather / scatter between a pool
// and a contiguous staging buffer so that many small scattered blocks move between tiers as one
// large transfer (per-block copies of 16-64 KiB are far below link speed). Used by the memory
// manager's transfer engine.
#pragma once

#include <cstdint>

#include "den/kernels/cuda_stream.h"

namespace den::kernels {

// dst[dst_ids[i]] = src[src_ids[i]] for i < n, whole blocks of block_bytes (a multiple of 16).
// A null id array means the identity (0, 1, 2, ...): gather is (pool -> staging, dst_ids null),
// scatter is (staging -> pool, src_ids null). Blocks must not overlap between source and target.
void kv_copy_blocks_ref(const void* src, void* dst, const int32_t* src_ids, const int32_t* dst_ids, int32_t n,
                        int64_t block_bytes);
// Device memory and device id arrays; may run on any stream.
void kv_copy_blocks_cuda(const void* src, void* dst, const int32_t* src_ids, const int32_t* dst_ids, int32_t n,
                         int64_t block_bytes, CudaStream stream);

// The same for bytes [slice_offset, slice_offset + slice_bytes) of each block only: one layer's
// K and V slices (layer-wise wake). On the GPU, offset and size must be multiples of 16;
// max_ctas > 0 caps the thread blocks (a copy over PCIe needs few SMs to keep the link busy, and
// leaves the rest to kernels running beside it); 0 fills the GPU.
void kv_copy_block_slices_ref(const void* src, void* dst, const int32_t* src_ids, const int32_t* dst_ids, int32_t n,
                              int64_t block_bytes, int64_t slice_offset, int64_t slice_bytes);
void kv_copy_block_slices_cuda(const void* src, void* dst, const int32_t* src_ids, const int32_t* dst_ids, int32_t n,
                               int64_t block_bytes, int64_t slice_offset, int64_t slice_bytes, CudaStream stream,
                               int32_t max_ctas = 0);

}  // namespace den::kernels
