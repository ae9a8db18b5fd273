// Causal scaled-dot-product attention over a paged KV cache, and the KV store that feeds it.
// CPU references: one (token, head) at a time so callers can parallelise freely; the
// arithmetic of a token never depends on other tokens or sequences in the batch.
#pragma once

#include <cstddef>
#include <cstdint>

#include "den/kernels/cuda_stream.h"
#include "den/kernels/host_device.h"
#include "den/kernels/paged_kv.h"

namespace den::kernels {

// Writes one token's K and V of `layer` at `position` of the sequence.
// k, v: [n_kv_heads, head_dim] float32 (converted to the pool's dtype)
void kv_store_ref(const PagedKvView& kv, const PagedSequence& seq, int32_t layer, int32_t position, const float* k,
                  const float* v);

// Attention output of one query head of one token at `position`, attending to positions
// [0, position] of the sequence (causal). GQA: query head h reads KV head h / (n_heads / n_kv_heads).
// q: [head_dim]  out: [head_dim]  scores: [position + 1] scratch
void paged_attention_head_ref(const PagedKvView& kv, const PagedSequence& seq, int32_t layer, int32_t position,
                              int32_t kv_head, const float* q, float scale, float* out, float* scores);

// ---- GPU ----
// Two fast paths for f16/bf16 KV with head_dim 64 or 128 (attention_fast_path()):
//  decode: one query token per sequence; a block per (KV head, KV split, sequence) reads each
//          K/V row once for the whole query group (GQA), splits long contexts over many blocks,
//          and the last of a sequence's blocks to finish merges the splits' partial softmax states;
//  prefill: flash attention on tensor cores over tiles of up to 64 new tokens of a sequence,
//          K/V tiles gathered through the block table, online softmax, causal mask.
// Anything else (f32 KV, other head sizes) runs a simple exact kernel, a warp per (token, head).

inline constexpr int32_t kAttentionTileRows = 64;
// The decode workspace starts with one merge counter per (sequence, KV head): room for
// 16384 of them (2048 sequences of 8 KV heads in one step).
inline constexpr size_t kAttentionCounterBytes = 16384 * sizeof(int32_t);

// Up to kAttentionTileRows consecutive new tokens of one sequence (rows of q and out).
struct AttentionTile {
  int32_t seq;
  int32_t first_token;     // row of the first token in the step's q / out
  int32_t n_rows;
  int32_t first_position;  // position of that token in its sequence
};

// A single-token (decode) sequence, everything its attention block needs in one load.
struct DecodeEntry {
  int32_t token;         // row in the step's q / out
  int32_t seq;           // sequence index in the batch
  int32_t kv_length;     // tokens in its KV
  int32_t table_offset;  // its block table in PagedBatch::block_tables
};

// How the decode kernel cuts a sequence of kv_length positions over a grid of n_splits splits:
// into `used` splits of whole kDecodeTile-position tiles, as many as n_splits but none planned
// shorter than min_split_tokens, their tile counts differing by at most one; split `split` covers
// [begin, end). Splits at or past `used` have no work; an empty context keeps split 0, empty.
inline constexpr int32_t kDecodeTile = 16;
struct DecodeSplit {
  int32_t begin, end, used;
};
DEN_HOST_DEVICE inline DecodeSplit decode_split(int32_t kv_length, int32_t split, int32_t n_splits,
                                                int32_t min_split_tokens) {
  const int32_t tiles = (kv_length + kDecodeTile - 1) / kDecodeTile;
  const int32_t n_tiles = tiles > 1 ? tiles : 1;
  const int32_t by_length = (kv_length + min_split_tokens - 1) / min_split_tokens;
  int32_t used = n_splits < n_tiles ? n_splits : n_tiles;
  used = by_length < used ? by_length : used;
  used = used > 1 ? used : 1;
  if (split >= used) return {0, 0, used};
  const auto first_tile = static_cast<int32_t>(int64_t{split} * n_tiles / used);
  const auto last_tile = static_cast<int32_t>(int64_t{split + 1} * n_tiles / used);
  const int32_t end = last_tile * kDecodeTile;
  return {first_tile * kDecodeTile, end < kv_length ? end : kv_length, used};
}

struct AttentionPlan {
  const DecodeEntry* decode = nullptr;  // [n_decode] single-token sequences
  int32_t n_decode = 0;
  // Each decode sequence's KV is cut into at most n_splits (<= 128) blocks' worth of whole
  // 16-position tiles, none planned shorter than min_split_tokens; the kernel sizes the splits
  // from each sequence's own length, so one plan (and one captured graph) serves a range of lengths.
  int32_t n_splits = 1;
  int32_t min_split_tokens = 128;
  float* partial = nullptr;   // workspace of attention_workspace_bytes(), zeroed once when
                              // allocated (its merge counters return to zero after every launch)
  const AttentionTile* tiles = nullptr;  // [n_tiles] prefill work
  int32_t n_tiles = 0;
};

bool attention_fast_path(DType kv_dtype, int32_t head_dim);
// How many decode-attention blocks the current device holds at once (blocks per SM for this
// instance, within the shared-memory carveout the kernel asks for, times SMs): a step plan
// sizes its splits to fill these once. 0 without a fast path.
int64_t decode_attention_resident_blocks(DType kv_dtype, int32_t head_dim, int32_t group);
size_t attention_workspace_bytes(int32_t n_decode, int32_t n_heads, int32_t n_splits, int32_t head_dim);

// q, out: [n_tokens, n_heads, head_dim] in the KV's dtype. With a fast path, every token must be
// in exactly one of plan.decode or plan.tiles; otherwise the plan is ignored and every
// token of the batch is computed.
void paged_attention_cuda(const void* q, void* out, const PagedKvView& kv, const PagedBatch& batch,
                          const AttentionPlan& plan, int32_t layer, int32_t n_heads, float scale, CudaStream stream);

}  // namespace den::kernels
