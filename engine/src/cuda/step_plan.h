// One engine step's bookkeeping for the GPU: every small array the kernels need (token ids,
// positions, block tables, logits rows, attention work, sampling requests) laid out in one
// pinned buffer and copied to its device mirror with a single transfer. Private to the CUDA
// backend.
#pragma once

#include <algorithm>
#include <compare>
#include <cstdint>
#include <span>
#include <vector>

#include "den/engine/backend.h"
#include "den/kernels/attention.h"
#include "den/kernels/cuda_resources.h"
#include "den/kernels/paged_kv.h"
#include "den/kernels/sampling.h"

namespace den::engine::cuda {

class StepPlan {
 public:
  // Fills the arrays from the batch (already validated). fast_attention: whether the KV dtype
  // and head size have the decode/prefill kernels (else the generic one reads the batch only);
  // resident_blocks: kernels::decode_attention_resident_blocks() for the model.
  void build(std::span<const SequenceInput> batch, int32_t n_heads, bool fast_attention, int64_t resident_blocks,
             int32_t n_kv_heads);
  // Copies everything to the device (after the previous step's kernels stopped reading it).
  void upload(cudaStream_t stream);

  int32_t n_tokens() const { return static_cast<int32_t>(ids_.size()); }
  int32_t n_logit_rows() const { return static_cast<int32_t>(logit_rows_.size()); }
  int32_t n_host_rows() const { return n_host_rows_; }  // leading logit rows the host wants
  int32_t n_samples() const { return static_cast<int32_t>(configs_.size()); }
  const std::vector<int32_t>& first_row() const { return first_row_; }
  const std::vector<int32_t>& sample_of_sequence() const { return sample_of_seq_; }
  const std::vector<uint8_t>& wants_logprob() const { return want_logprob_; }
  bool decode_only() const { return tiles_.empty() && decode_.size() == table_offsets_.size(); }
  int32_t n_decode() const { return static_cast<int32_t>(decode_.size()); }
  bool any_logprob() const {
    return std::find(want_logprob_.begin(), want_logprob_.end(), 1) != want_logprob_.end();
  }
  // Every sample is a plain argmax: temperature 0, no penalty that changes a logit, no
  // log-probability (kernels::argmax_cuda serves the step).
  bool plain_greedy() const { return plain_greedy_; }
  int32_t n_splits() const { return n_splits_; }
  const void* device_buffer() const { return device_.get(); }

  // Where each array sits in the device buffer. A captured graph bakes these addresses in, so
  // it may be replayed only for a step with the same layout; arrays get power-of-two room, so
  // the layout stays put while block tables and penalty histories grow a little.
  struct Offsets {
    size_t ids, token_seq, token_pos, tables, table_offsets, kv_lengths, logit_rows, decode, tiles, configs,
        seen, seen_offsets, steps;
    auto operator<=>(const Offsets&) const = default;
  };
  const Offsets& layout() const { return at_; }

  // Device arrays (valid after upload()).
  const int32_t* ids() const;
  const int32_t* logit_rows() const;  // [n_logit_rows] token rows: host rows first, then sampled ones
  kernels::PagedBatch paged_batch() const;
  kernels::AttentionPlan attention(float* workspace) const;
  size_t attention_workspace_bytes(int32_t n_heads, int32_t head_dim) const;
  const kernels::SamplingConfig* configs() const;
  const kernels::TokenCount* seen() const;
  const int32_t* seen_offsets() const;
  const uint64_t* steps() const;

 private:
  template <typename T>
  size_t place(const std::vector<T>& v);  // offset of v in the staging buffer, with room to grow

  std::vector<int32_t> ids_, token_seq_, token_pos_, tables_, table_offsets_, kv_lengths_;
  std::vector<int32_t> logit_rows_, first_row_;
  std::vector<kernels::DecodeEntry> decode_;
  std::vector<kernels::AttentionTile> tiles_;
  std::vector<kernels::SamplingConfig> configs_;
  std::vector<kernels::TokenCount> seen_;
  std::vector<int32_t> seen_offsets_;
  std::vector<uint64_t> steps_;
  std::vector<int32_t> sample_of_seq_;
  std::vector<uint8_t> want_logprob_;
  int32_t n_host_rows_ = 0;
  bool plain_greedy_ = true;
  static constexpr int32_t kMinSplitTokens = 128, kMaxDecodeSplits = 64;
  int32_t n_splits_ = 1;

  std::vector<uint8_t> bytes_;
  Offsets at_{};
  kernels::PinnedBuffer pinned_;
  kernels::DeviceBuffer device_;
  kernels::Event uploaded_;
};

}  // namespace den::engine::cuda
