// Sampling parameters as the user gives them, and their application to one row of logits on
// the host. The definition of sampling (penalties, temperature, top-k, top-p, min-p, a
// counter-based draw walked in id order) lives with its GPU twin in den/kernels/sampling.h.
// Used by the CPU backend, the CLI and tests.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "den/kernels/sampling.h"

namespace den::engine {

struct SamplingParams {
  float temperature = 0.8f;     // 0: greedy
  int32_t top_k = 40;           // 0: off
  float top_p = 0.95f;          // 1: off
  float min_p = 0.05f;          // 0: off
  float repeat_penalty = 1.0f;  // 1: off; >1 discourages tokens of the recent history
  int32_t repeat_last_n = 64;   // history window of all three penalties (-1: whole history)
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  uint64_t seed = 0;

  // Throws std::invalid_argument naming the parameter that is out of range.
  void validate() const;
  kernels::SamplingConfig config() const;
  bool penalties() const { return repeat_penalty != 1.0f || presence_penalty != 0.0f || frequency_penalty != 0.0f; }
};

struct TokenLogprob {
  int32_t id;
  float logprob;
};

// The distinct tokens of the penalty window of `history`, with their counts.
std::vector<kernels::TokenCount> penalty_counts(const SamplingParams& params, std::span<const int32_t> history);

// Samples draw number `step` from raw logits (modified in place).
int32_t sample_token(std::span<float> logits, const SamplingParams& params, std::span<const int32_t> history,
                     uint64_t step);

// log softmax of the raw logits at `id`, and the n most likely tokens with theirs.
float token_logprob(std::span<const float> logits, int32_t id);
std::vector<TokenLogprob> top_logprobs(std::span<const float> logits, int32_t n);

// Index of the largest logit (lowest index on ties).
int32_t argmax(std::span<const float> logits);

}  // namespace den::engine
