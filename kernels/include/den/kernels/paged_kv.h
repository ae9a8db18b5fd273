// The paged KV-cache view: a plain, non-owning description of a pool of KV blocks.
// The memory manager builds it after making blocks resident; the engine and every attention
// kernel (CPU reference and CUDA) read and write KV only through it.
//
// One block holds `block_tokens` consecutive tokens of one sequence, for all layers:
//   [n_layers, 2 (K then V), block_tokens, n_kv_heads, head_dim]
// so one layer's K or V slice of a block is contiguous (layer-wise transfer) and the whole
// block is one contiguous chunk (one copy per block when it changes tier).
#pragma once

#include <cstdint>
#include <span>

#include "den/kernels/dtype.h"
#include "den/kernels/host_device.h"

namespace den::kernels {

// Largest head dimension the attention kernels accept (model loading rejects larger ones).
inline constexpr int32_t kMaxHeadDim = 512;

struct KvLayout {
  int32_t n_layers = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_tokens = 0;
  DType dtype = DType::f32;

  // Elements of one token's K (or V) in one layer.
  DEN_HOST_DEVICE int64_t token_elements() const { return int64_t{n_kv_heads} * head_dim; }
  // Elements of one layer's K (or V) slice of a block.
  DEN_HOST_DEVICE int64_t slab_elements() const { return block_tokens * token_elements(); }
  DEN_HOST_DEVICE int64_t layer_elements() const { return 2 * slab_elements(); }
  DEN_HOST_DEVICE int64_t block_elements() const { return n_layers * layer_elements(); }
  DEN_HOST_DEVICE int64_t block_bytes() const { return block_elements() * dtype_bytes(dtype); }
  DEN_HOST_DEVICE int64_t layer_slice_bytes() const { return layer_elements() * dtype_bytes(dtype); }

  bool operator==(const KvLayout&) const = default;
};

// Non-owning view of a block pool. Element offsets are in units of the KV dtype.
struct PagedKvView {
  void* blocks = nullptr;  // [n_blocks, n_layers, 2, block_tokens, n_kv_heads, head_dim]
  int64_t n_blocks = 0;
  KvLayout layout;

  // Offset of token `slot` of `block`, layer `layer`, K (kv = 0) or V (kv = 1), head 0.
  DEN_HOST_DEVICE int64_t offset(int64_t block, int32_t layer, int kv, int32_t slot) const {
    return block * layout.block_elements() + layer * layout.layer_elements() + kv * layout.slab_elements() +
           slot * layout.token_elements();
  }
};

// The KV of one sequence: which pool blocks hold its tokens, in order.
struct PagedSequence {
  std::span<const int32_t> block_table;  // [ceil(kv_tokens / block_tokens)] block ids
  int32_t kv_tokens = 0;                 // tokens whose K/V are (or are being) stored
};

// The new tokens of one engine step and the sequences they belong to, as device arrays the
// backend builds per step (the GPU counterpart of a list of PagedSequence).
struct PagedBatch {
  const int32_t* block_tables = nullptr;   // every sequence's block table, concatenated
  const int32_t* table_offsets = nullptr;  // [n_seqs] where each sequence's table starts
  const int32_t* kv_lengths = nullptr;     // [n_seqs] tokens in its KV after this step
  const int32_t* token_seq = nullptr;      // [n_tokens] the sequence of each new token
  const int32_t* token_pos = nullptr;      // [n_tokens] the position of each new token
  int32_t n_seqs = 0;
  int32_t n_tokens = 0;
};

}  // namespace den::kernels
