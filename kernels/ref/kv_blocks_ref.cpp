// Whole-block copies on the host (see den/kernels/kv_blocks.h).
#include <cstring>

#include "den/kernels/kv_blocks.h"

namespace den::kernels {

void kv_copy_block_slices_ref(const void* src, void* dst, const int32_t* src_ids, const int32_t* dst_ids, int32_t n,
                              int64_t block_bytes, int64_t slice_offset, int64_t slice_bytes) {
  for (int32_t i = 0; i < n; ++i) {
    const int64_t from = src_ids != nullptr ? src_ids[i] : i;
    const int64_t to = dst_ids != nullptr ? dst_ids[i] : i;
    std::memcpy(static_cast<char*>(dst) + to * block_bytes + slice_offset,
                static_cast<const char*>(src) + from * block_bytes + slice_offset, static_cast<size_t>(slice_bytes));
  }
}

void kv_copy_blocks_ref(const void* src, void* dst, const int32_t* src_ids, const int32_t* dst_ids, int32_t n,
                        int64_t block_bytes) {
  kv_copy_block_slices_ref(src, dst, src_ids, dst_ids, n, block_bytes, 0, block_bytes);
}

}  // namespace den::kernels
