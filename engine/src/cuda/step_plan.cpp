// StepPlan: host-side planning of one GPU step.
#include "step_plan.h"

#include <algorithm>
#include <cstring>

namespace den::engine::cuda {

void StepPlan::build(std::span<const SequenceInput> batch, int32_t n_heads, bool fast_attention, int64_t resident_blocks,
                     int32_t n_kv_heads) {
  (void)n_heads;
  ids_.clear();
  token_seq_.clear();
  token_pos_.clear();
  tables_.clear();
  table_offsets_.clear();
  kv_lengths_.clear();
  logit_rows_.clear();
  decode_.clear();
  tiles_.clear();
  configs_.clear();
  seen_.clear();
  seen_offsets_.assign(1, 0);
  steps_.clear();
  first_row_.assign(batch.size(), -1);
  sample_of_seq_.assign(batch.size(), -1);
  want_logprob_.clear();

  int32_t max_decode_len = 0;
  std::vector<int32_t> sample_rows;
  for (size_t s = 0; s < batch.size(); ++s) {
    const SequenceInput& in = batch[s];
    const auto first = static_cast<int32_t>(ids_.size());
    const auto n = static_cast<int32_t>(in.tokens.size());
    const int32_t end = in.start_position + n;
    table_offsets_.push_back(static_cast<int32_t>(tables_.size()));
    kv_lengths_.push_back(end);
    tables_.insert(tables_.end(), in.block_table.begin(), in.block_table.end());
    for (int32_t i = 0; i < n; ++i) {
      ids_.push_back(in.tokens[static_cast<size_t>(i)]);
      token_seq_.push_back(static_cast<int32_t>(s));
      token_pos_.push_back(in.start_position + i);
    }
    if (fast_attention) {
      if (n == 1) {
        decode_.push_back({first, static_cast<int32_t>(s), end, table_offsets_.back()});
        max_decode_len = std::max(max_decode_len, end);
      } else {
        for (int32_t r = 0; r < n; r += kernels::kAttentionTileRows) {
          tiles_.push_back({static_cast<int32_t>(s), first + r, std::min(kernels::kAttentionTileRows, n - r),
                            in.start_position + r});
        }
      }
    }
    switch (in.logits) {
      case LogitsWanted::none:
        break;
      case LogitsWanted::last:
        first_row_[s] = static_cast<int32_t>(logit_rows_.size());
        logit_rows_.push_back(first + n - 1);
        break;
      case LogitsWanted::all:
        first_row_[s] = static_cast<int32_t>(logit_rows_.size());
        for (int32_t i = 0; i < n; ++i) logit_rows_.push_back(first + i);
        break;
      case LogitsWanted::sample: {
        sample_of_seq_[s] = static_cast<int32_t>(configs_.size());
        sample_rows.push_back(first + n - 1);
        configs_.push_back(in.sampling->config());
        for (const kernels::TokenCount& tc : penalty_counts(*in.sampling, in.history)) seen_.push_back(tc);
        seen_offsets_.push_back(static_cast<int32_t>(seen_.size()));
        steps_.push_back(in.sample_step);
        want_logprob_.push_back(in.want_logprob ? 1 : 0);
        break;
      }
    }
  }
  plain_greedy_ = true;
  for (size_t k = 0; k < configs_.size(); ++k) {
    const kernels::SamplingConfig& c = configs_[k];
    const bool no_penalty = seen_offsets_[k + 1] == seen_offsets_[k] ||
                            (c.repeat_penalty == 1.0f && c.presence_penalty == 0.0f && c.frequency_penalty == 0.0f);
    if (c.temperature > 0.0f || !no_penalty || want_logprob_[k] != 0) plain_greedy_ = false;
  }
  n_host_rows_ = static_cast<int32_t>(logit_rows_.size());
  logit_rows_.insert(logit_rows_.end(), sample_rows.begin(), sample_rows.end());

  // Split decode contexts into as many splits as fill the attention blocks the GPU holds at once
  // one time: blocks of equal work, no sequence split more than that (each split adds a partial
  // state to write and merge). A sweep of split counts on an H200 (8B shape, one session) against
  // the eight waves of blocks planned before: batch 1 at 32K 191.0 tok/s with 33 splits against
  // 177.7 with 64 and 173.7 with 44; batch 8 at 32K 562-564 with 4 to 12 against 515 with 17;
  // batch 32 at 1K 4712 with one split against 4042 with five. Filling two thirds of the
  // resident blocks instead was slower in every cell. The count comes from the kernels layer
  // (decode_attention_resident_blocks: the occupancy calculator's blocks an SM, capped by the
  // shared-memory carveout that layer asks for; two at the 8B shape, so 33 splits at batch 1 at
  // 32K). The kernel cuts each sequence into
  // that many equal splits of its own length, none shorter than 128 positions (two tiles per
  // warp, so each warp's loads pipeline). Only the count is fixed here, bounded by the longest
  // context rounded up to a power of two, so it stays the same for many steps in a row (a
  // captured decode graph bakes it in).
  n_splits_ = 1;
  if (!decode_.empty()) {
    int32_t bucket = 256;
    while (bucket < max_decode_len) bucket *= 2;
    const int64_t per_split_blocks = static_cast<int64_t>(decode_.size()) * n_kv_heads;
    const auto fill = static_cast<int32_t>(std::min<int64_t>(resident_blocks / per_split_blocks, kMaxDecodeSplits));
    n_splits_ = std::max(1, std::min(fill, bucket / kMinSplitTokens));
  }
}

template <typename T>
size_t StepPlan::place(const std::vector<T>& v) {
  const size_t at = (bytes_.size() + 15) / 16 * 16;
  size_t room = std::max<size_t>(1, 16 / sizeof(T));
  while (room < v.size()) room *= 2;
  bytes_.resize(at + room * sizeof(T));
  if (!v.empty()) std::memcpy(bytes_.data() + at, v.data(), v.size() * sizeof(T));
  return at;
}

void StepPlan::upload(cudaStream_t stream) {
  bytes_.clear();
  at_.ids = place(ids_);
  at_.token_seq = place(token_seq_);
  at_.token_pos = place(token_pos_);
  at_.tables = place(tables_);
  at_.table_offsets = place(table_offsets_);
  at_.kv_lengths = place(kv_lengths_);
  at_.logit_rows = place(logit_rows_);
  at_.decode = place(decode_);
  at_.tiles = place(tiles_);
  at_.configs = place(configs_);
  at_.seen = place(seen_);
  at_.seen_offsets = place(seen_offsets_);
  at_.steps = place(steps_);
  // The previous step's copy must be done before the pinned buffer is rewritten; the device
  // buffer is reused only by kernels on the same stream, in order.
  uploaded_.synchronize();
  if (pinned_.bytes() < bytes_.size()) {
    // Start large: the device buffer's address is baked into captured decode graphs.
    const size_t size = std::max<size_t>(bytes_.size() * 2, size_t{4} << 20);
    kernels::check(cudaStreamSynchronize(stream));
    pinned_ = kernels::PinnedBuffer(size);
    device_ = kernels::DeviceBuffer(size);
  }
  std::memcpy(pinned_.get(), bytes_.data(), bytes_.size());
  kernels::check(cudaMemcpyAsync(device_.get(), pinned_.get(), bytes_.size(), cudaMemcpyHostToDevice, stream));
  uploaded_.record(stream);
}

namespace {
template <typename T>
const T* at(const kernels::DeviceBuffer& buffer, size_t offset) {
  return reinterpret_cast<const T*>(static_cast<const uint8_t*>(buffer.get()) + offset);
}
}  // namespace

const int32_t* StepPlan::ids() const { return at<int32_t>(device_, at_.ids); }
const int32_t* StepPlan::logit_rows() const { return at<int32_t>(device_, at_.logit_rows); }

kernels::PagedBatch StepPlan::paged_batch() const {
  return {at<int32_t>(device_, at_.tables),
          at<int32_t>(device_, at_.table_offsets),
          at<int32_t>(device_, at_.kv_lengths),
          at<int32_t>(device_, at_.token_seq),
          at<int32_t>(device_, at_.token_pos),
          static_cast<int32_t>(table_offsets_.size()),
          n_tokens()};
}

kernels::AttentionPlan StepPlan::attention(float* workspace) const {
  kernels::AttentionPlan p;
  p.decode = at<kernels::DecodeEntry>(device_, at_.decode);
  p.n_decode = static_cast<int32_t>(decode_.size());
  p.n_splits = n_splits_;
  p.min_split_tokens = kMinSplitTokens;
  p.partial = workspace;
  p.tiles = at<kernels::AttentionTile>(device_, at_.tiles);
  p.n_tiles = static_cast<int32_t>(tiles_.size());
  return p;
}

size_t StepPlan::attention_workspace_bytes(int32_t n_heads, int32_t head_dim) const {
  return kernels::attention_workspace_bytes(static_cast<int32_t>(decode_.size()), n_heads, n_splits_, head_dim);
}

const kernels::SamplingConfig* StepPlan::configs() const { return at<kernels::SamplingConfig>(device_, at_.configs); }
const kernels::TokenCount* StepPlan::seen() const { return at<kernels::TokenCount>(device_, at_.seen); }
const int32_t* StepPlan::seen_offsets() const { return at<int32_t>(device_, at_.seen_offsets); }
const uint64_t* StepPlan::steps() const { return at<uint64_t>(device_, at_.steps); }

}  // namespace den::engine::cuda
