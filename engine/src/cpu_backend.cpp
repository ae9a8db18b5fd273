// The CPU reference backend. Every op is a kernels/ reference function; this file only
// sequences them over a batch and spreads rows, tokens and heads over the thread pool.
// Batch invariance holds because each output element is computed by the same function on the
// same inputs in the same order, whatever else the batch contains.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <initializer_list>
#include <string>

#include "den/engine/backend.h"
#include "den/engine/model.h"
#include "den/engine/thread_pool.h"
#include "den/kernels/attention.h"
#include "den/kernels/embedding.h"
#include "den/kernels/matmul.h"
#include "den/kernels/rmsnorm.h"
#include "den/kernels/rope.h"
#include "den/kernels/swiglu.h"

namespace den::engine {
namespace {

using kernels::WeightMatrix;

struct TokenSlot {
  int32_t sequence;
  int32_t position;
};

// One matrix of a group whose outputs are computed in a single parallel pass.
struct MatmulPart {
  const WeightMatrix* weights;
  float* out;  // [n_tokens, weights->n_out]
};

class CpuBackend final : public Backend {
 public:
  CpuBackend(const Model& model, int n_threads) : model_(model), pool_(n_threads) {
    const ModelConfig& c = model.config();
    const int64_t widest = std::max({c.n_embd, c.n_ff, c.q_dim()});
    dequant_scratch_.assign(static_cast<size_t>(pool_.size()), std::vector<float>(static_cast<size_t>(widest)));
    score_scratch_.resize(static_cast<size_t>(pool_.size()));
    inv_freq_ = kernels::rope_inverse_frequencies(
        c.n_rot, c.rope_base, kernels::RopeScaling{c.rope_freq_scale, c.rope_freq_factors});
  }

  std::string_view name() const override { return "cpu"; }
  kernels::DType kv_dtype() const override { return kernels::DType::f32; }
  bool kv_on_device() const override { return false; }

  using Backend::forward;
  void forward(std::span<const SequenceInput> batch, const kernels::PagedKvView& kv, StepOutput& out,
               KvArrival* arrival) override {
    validate_batch(batch, kv, model_, kernels::DType::f32, "cpu backend");
    const ModelConfig& c = model_.config();
    const int64_t n_embd = c.n_embd;

    slots_.clear();
    ids_.clear();
    int32_t max_position = 0;
    for (size_t s = 0; s < batch.size(); ++s) {
      for (size_t i = 0; i < batch[s].tokens.size(); ++i) {
        const int32_t position = batch[s].start_position + static_cast<int32_t>(i);
        slots_.push_back({static_cast<int32_t>(s), position});
        ids_.push_back(batch[s].tokens[i]);
        max_position = std::max(max_position, position);
      }
    }
    const auto n_tokens = static_cast<int64_t>(slots_.size());
    for (auto& scores : score_scratch_) scores.resize(static_cast<size_t>(max_position) + 1);
    sequences_.clear();
    for (const SequenceInput& s : batch) {
      sequences_.push_back({s.block_table, s.start_position + static_cast<int32_t>(s.tokens.size())});
    }

    resize(x_, n_tokens * n_embd);
    resize(xn_, n_tokens * n_embd);
    resize(q_, n_tokens * c.q_dim());
    resize(k_, n_tokens * c.kv_dim());
    resize(v_, n_tokens * c.kv_dim());
    resize(attn_, n_tokens * c.q_dim());
    resize(gate_, n_tokens * c.n_ff);
    resize(up_, n_tokens * c.n_ff);
    resize(residual_, n_tokens * n_embd);

    pool_.parallel_for(n_tokens, [&](int64_t begin, int64_t end, int) {
      kernels::embedding_gather_ref(model_.token_embd(), ids_.data() + begin, end - begin, x_.data() + begin * n_embd);
    });

    for (int32_t layer = 0; layer < c.n_layers; ++layer) {
      if (arrival != nullptr) arrival->before_layer(layer, nullptr);
      const LayerWeights& w = model_.layers()[static_cast<size_t>(layer)];
      norm_rows(w.attn_norm, n_tokens);
      matmul_group({{&w.attn_q, q_.data()}, {&w.attn_k, k_.data()}, {&w.attn_v, v_.data()}}, n_tokens);
      if (c.qkv_bias) add_qkv_bias(w, n_tokens);
      pool_.parallel_for(n_tokens, [&](int64_t begin, int64_t end, int) {
        for (int64_t t = begin; t < end; ++t) {
          const TokenSlot& slot = slots_[static_cast<size_t>(t)];
          kernels::rope_ref(q_.data() + t * c.q_dim(), c.n_heads, c.head_dim, c.n_rot, slot.position,
                            inv_freq_.data(), c.rope_style);
          kernels::rope_ref(k_.data() + t * c.kv_dim(), c.n_kv_heads, c.head_dim, c.n_rot, slot.position,
                            inv_freq_.data(), c.rope_style);
          kernels::kv_store_ref(kv, sequences_[static_cast<size_t>(slot.sequence)], layer, slot.position,
                                k_.data() + t * c.kv_dim(), v_.data() + t * c.kv_dim());
        }
      });
      attention(kv, layer, n_tokens);
      matmul_group({{&w.attn_output, residual_.data()}}, n_tokens, attn_.data());
      add_residual(n_tokens * n_embd);

      norm_rows(w.ffn_norm, n_tokens);
      matmul_group({{&w.ffn_gate, gate_.data()}, {&w.ffn_up, up_.data()}}, n_tokens);
      pool_.parallel_for(n_tokens, [&](int64_t begin, int64_t end, int) {
        kernels::swiglu_ref(gate_.data() + begin * c.n_ff, up_.data() + begin * c.n_ff, gate_.data() + begin * c.n_ff,
                            (end - begin) * c.n_ff);
      });
      matmul_group({{&w.ffn_down, residual_.data()}}, n_tokens, gate_.data());
      add_residual(n_tokens * n_embd);
    }

    compute_logits(batch, n_tokens, out);
  }

 private:
  static void resize(std::vector<float>& v, int64_t n) {
    if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  }

  void norm_rows(const std::vector<float>& weight, int64_t n_tokens) {
    const int64_t n_embd = model_.config().n_embd;
    const float eps = model_.config().rms_eps;
    pool_.parallel_for(n_tokens, [&](int64_t begin, int64_t end, int) {
      kernels::rmsnorm_ref(x_.data() + begin * n_embd, weight.data(), xn_.data() + begin * n_embd, end - begin, n_embd,
                           eps);
    });
  }

  // Computes every part's outputs in one parallel pass over their concatenated rows, so a
  // group of small matrices (Q, K, V) still keeps every thread busy with one barrier.
  void matmul_group(std::initializer_list<MatmulPart> parts, int64_t n_tokens, const float* input = nullptr) {
    if (input == nullptr) input = xn_.data();
    int64_t total_rows = 0;
    for (const MatmulPart& p : parts) total_rows += p.weights->n_out;
    pool_.parallel_for(total_rows, [&](int64_t begin, int64_t end, int thread) {
      float* scratch = dequant_scratch_[static_cast<size_t>(thread)].data();
      int64_t part_start = 0;
      for (const MatmulPart& p : parts) {
        const int64_t part_end = part_start + p.weights->n_out;
        const int64_t lo = std::max(begin, part_start), hi = std::min(end, part_end);
        if (lo < hi) {
          kernels::matmul_rows_ref(*p.weights, input, n_tokens, p.out, p.weights->n_out, lo - part_start,
                                   hi - part_start, scratch);
        }
        part_start = part_end;
      }
    });
  }

  void add_qkv_bias(const LayerWeights& w, int64_t n_tokens) {
    const ModelConfig& c = model_.config();
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int32_t i = 0; i < c.q_dim(); ++i) q_[static_cast<size_t>(t * c.q_dim() + i)] += w.bias_q[static_cast<size_t>(i)];
      for (int32_t i = 0; i < c.kv_dim(); ++i) {
        k_[static_cast<size_t>(t * c.kv_dim() + i)] += w.bias_k[static_cast<size_t>(i)];
        v_[static_cast<size_t>(t * c.kv_dim() + i)] += w.bias_v[static_cast<size_t>(i)];
      }
    }
  }

  void attention(const kernels::PagedKvView& kv, int32_t layer, int64_t n_tokens) {
    const ModelConfig& c = model_.config();
    const int32_t group = c.n_heads / c.n_kv_heads;
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    pool_.parallel_for(n_tokens * c.n_heads, [&](int64_t begin, int64_t end, int thread) {
      float* scores = score_scratch_[static_cast<size_t>(thread)].data();
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / c.n_heads;
        const auto head = static_cast<int32_t>(item % c.n_heads);
        const TokenSlot& slot = slots_[static_cast<size_t>(t)];
        const int64_t offset = t * c.q_dim() + int64_t{head} * c.head_dim;
        kernels::paged_attention_head_ref(kv, sequences_[static_cast<size_t>(slot.sequence)], layer, slot.position,
                                          head / group, q_.data() + offset, scale, attn_.data() + offset, scores);
      }
    });
  }

  void add_residual(int64_t n) {
    for (int64_t i = 0; i < n; ++i) x_[static_cast<size_t>(i)] += residual_[static_cast<size_t>(i)];
  }

  void compute_logits(std::span<const SequenceInput> batch, int64_t n_tokens, StepOutput& out) {
    const ModelConfig& c = model_.config();
    const int64_t n_embd = c.n_embd;
    // Rows whose logits were asked for, normalised into xn_ (compacted to the front).
    rows_.clear();
    out.first_row.assign(batch.size(), -1);
    int64_t t = 0;
    for (size_t s = 0; s < batch.size(); ++s) {
      const auto n = static_cast<int64_t>(batch[s].tokens.size());
      if (batch[s].logits != LogitsWanted::none) out.first_row[s] = static_cast<int32_t>(rows_.size());
      if (batch[s].logits == LogitsWanted::all) {
        for (int64_t i = 0; i < n; ++i) rows_.push_back(t + i);
      } else if (batch[s].logits != LogitsWanted::none) {
        rows_.push_back(t + n - 1);
      }
      t += n;
    }
    (void)n_tokens;
    const auto n_rows = static_cast<int64_t>(rows_.size());
    out.n_vocab = c.n_vocab;
    out.logits.resize(static_cast<size_t>(n_rows * c.n_vocab));
    if (n_rows == 0) {
      out.sampled.assign(batch.size(), SampledToken{});
      return;
    }
    pool_.parallel_for(n_rows, [&](int64_t begin, int64_t end, int) {
      for (int64_t r = begin; r < end; ++r) {
        kernels::rmsnorm_ref(x_.data() + rows_[static_cast<size_t>(r)] * n_embd, model_.output_norm().data(),
                             xn_.data() + r * n_embd, 1, n_embd, c.rms_eps);
      }
    });
    matmul_group({{&model_.output(), out.logits.data()}}, n_rows);
    sample_rows(batch, out);
  }

  // Sequences that asked for a sampled token get it from their (host) logits row.
  void sample_rows(std::span<const SequenceInput> batch, StepOutput& out) {
    out.sampled.assign(batch.size(), SampledToken{});
    for (size_t s = 0; s < batch.size(); ++s) {
      if (batch[s].logits != LogitsWanted::sample) continue;
      const auto row = static_cast<size_t>(out.first_row[s]);
      std::span<float> logits(out.logits.data() + row * static_cast<size_t>(out.n_vocab),
                              static_cast<size_t>(out.n_vocab));
      SampledToken& token = out.sampled[s];
      if (batch[s].want_logprob) raw_row_.assign(logits.begin(), logits.end());
      token.id = sample_token(logits, *batch[s].sampling, batch[s].history, batch[s].sample_step);
      if (batch[s].want_logprob) token.logprob = token_logprob(raw_row_, token.id);
    }
  }

  const Model& model_;
  ThreadPool pool_;
  std::vector<std::vector<float>> dequant_scratch_;  // per thread: one expanded weight row
  std::vector<std::vector<float>> score_scratch_;    // per thread: attention scores
  std::vector<float> inv_freq_;
  std::vector<TokenSlot> slots_;
  std::vector<int32_t> ids_;
  std::vector<kernels::PagedSequence> sequences_;
  std::vector<int64_t> rows_;
  std::vector<float> raw_row_;
  std::vector<float> x_, xn_, q_, k_, v_, attn_, gate_, up_, residual_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const Model& model, int n_threads) {
  return std::make_unique<CpuBackend>(model, n_threads);
}

}  // namespace den::engine
