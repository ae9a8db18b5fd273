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

namespace den::kernels {

enum class KvDtype : uint8_t { f32, f16, bf16 };

// Largest head dimension the attention kernels accept (model loading rejects larger ones).
inline constexpr int32_t kMaxHeadDim = 512;

inline int64_t kv_dtype_bytes(KvDtype dtype) { return dtype == KvDtype::f32 ? 4 : 2; }

struct KvLayout {
  int32_t n_layers = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_tokens = 0;
  KvDtype dtype = KvDtype::f32;

  // Elements of one token's K (or V) in one layer.
  int64_t token_elements() const { return int64_t{n_kv_heads} * head_dim; }
  // Elements of one layer's K (or V) slice of a block.
  int64_t slab_elements() const { return block_tokens * token_elements(); }
  int64_t layer_elements() const { return 2 * slab_elements(); }
  int64_t block_elements() const { return n_layers * layer_elements(); }
  int64_t block_bytes() const { return block_elements() * kv_dtype_bytes(dtype); }
  int64_t layer_slice_bytes() const { return layer_elements() * kv_dtype_bytes(dtype); }

  bool operator==(const KvLayout&) const = default;
};

// Non-owning view of a block pool. Element offsets are in units of the KV dtype.
struct PagedKvView {
  void* blocks = nullptr;  // [n_blocks, n_layers, 2, block_tokens, n_kv_heads, head_dim]
  int64_t n_blocks = 0;
  KvLayout layout;

  // Offset of token `slot` of `block`, layer `layer`, K (kv = 0) or V (kv = 1), head 0.
  int64_t offset(int64_t block, int32_t layer, int kv, int32_t slot) const {
    return block * layout.block_elements() + layer * layout.layer_elements() + kv * layout.slab_elements() +
           slot * layout.token_elements();
  }
};

// The KV of one sequence: which pool blocks hold its tokens, in order.
struct PagedSequence {
  std::span<const int32_t> block_table;  // [ceil(kv_tokens / block_tokens)] block ids
  int32_t kv_tokens = 0;                 // tokens whose K/V are (or are being) stored
};

}  // namespace den::kernels
