// Token sampling on the host: repetition / presence / frequency penalties, temperature,
// top-k, top-p, min-p, in that order (temperature first, as the Hugging Face reference does),
// then a draw from a seeded generator whose sequence is the same on every platform.
// Temperature 0 is greedy (lowest id wins ties). Used by the CLI and the scheduler.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace den::engine {

struct SamplingParams {
  float temperature = 0.8f;  // 0: greedy
  int32_t top_k = 40;        // 0: off
  float top_p = 0.95f;       // 1: off
  float min_p = 0.05f;       // 0: off
  float repeat_penalty = 1.0f;  // 1: off; >1 discourages tokens of the recent history
  int32_t repeat_last_n = 64;   // history window of all three penalties (-1: whole history)
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  uint64_t seed = 0;

  // Throws std::invalid_argument naming the parameter that is out of range.
  void validate() const;
};

struct TokenLogprob {
  int32_t id;
  float logprob;
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  // logits: [n_vocab] raw model output (modified in place: penalties and temperature).
  // history: tokens so far (prompt and generated), for the penalties.
  int32_t sample(std::span<float> logits, std::span<const int32_t> history);

  const SamplingParams& params() const { return params_; }

 private:
  uint64_t next_random();
  double uniform();  // [0, 1)

  SamplingParams params_;
  uint64_t state_[4];
  std::vector<int32_t> candidates_;
  std::vector<float> probabilities_;
};

// log softmax of the raw logits at `id`, and the n most likely tokens with theirs.
float token_logprob(std::span<const float> logits, int32_t id);
std::vector<TokenLogprob> top_logprobs(std::span<const float> logits, int32_t n);

// Index of the largest logit (lowest index on ties).
int32_t argmax(std::span<const float> logits);

}  // namespace den::engine
