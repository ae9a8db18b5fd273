// Host side of sampling: parameter validation, the penalty window, log-probabilities.
#include "den/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <stdexcept>
#include <string>

namespace den::engine {
namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("invalid sampling parameter: " + what);
}

}  // namespace

void SamplingParams::validate() const {
  require(std::isfinite(temperature) && temperature >= 0.0f, "temperature must be >= 0");
  require(top_k >= 0, "top_k must be >= 0 (0 disables it)");
  require(top_p > 0.0f && top_p <= 1.0f, "top_p must be in (0, 1]");
  require(min_p >= 0.0f && min_p < 1.0f, "min_p must be in [0, 1)");
  require(std::isfinite(repeat_penalty) && repeat_penalty > 0.0f, "repeat_penalty must be > 0");
  require(repeat_last_n >= -1, "repeat_last_n must be >= -1");
  require(std::isfinite(presence_penalty), "presence_penalty must be finite");
  require(std::isfinite(frequency_penalty), "frequency_penalty must be finite");
}

kernels::SamplingConfig SamplingParams::config() const {
  return {temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty, frequency_penalty, seed};
}

std::vector<kernels::TokenCount> penalty_counts(const SamplingParams& params, std::span<const int32_t> history) {
  std::vector<kernels::TokenCount> out;
  if (!params.penalties()) return out;
  const size_t window = params.repeat_last_n < 0 ? history.size()
                                                 : std::min(history.size(), static_cast<size_t>(params.repeat_last_n));
  std::map<int32_t, int32_t> counts;
  for (size_t i = history.size() - window; i < history.size(); ++i) ++counts[history[i]];
  for (const auto& [token, count] : counts) out.push_back({token, count});
  return out;
}

int32_t sample_token(std::span<float> logits, const SamplingParams& params, std::span<const int32_t> history,
                     uint64_t step) {
  const auto seen = penalty_counts(params, history);
  return kernels::sample_ref(logits.data(), static_cast<int32_t>(logits.size()), params.config(), seen, step);
}

int32_t argmax(std::span<const float> logits) {
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[static_cast<size_t>(best)]) best = static_cast<int32_t>(i);
  }
  return best;
}

float token_logprob(std::span<const float> logits, int32_t id) {
  return kernels::token_logprob_ref(logits.data(), static_cast<int32_t>(logits.size()), id);
}

std::vector<TokenLogprob> top_logprobs(std::span<const float> logits, int32_t n) {
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float l : logits) sum += std::exp(static_cast<double>(l - max_logit));
  const float log_sum = static_cast<float>(std::log(sum));
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  const size_t k = std::min(ids.size(), static_cast<size_t>(std::max(n, 0)));
  std::partial_sort(ids.begin(), ids.begin() + static_cast<ptrdiff_t>(k), ids.end(), [&](int32_t a, int32_t b) {
    return logits[static_cast<size_t>(a)] > logits[static_cast<size_t>(b)] ||
           (logits[static_cast<size_t>(a)] == logits[static_cast<size_t>(b)] && a < b);
  });
  std::vector<TokenLogprob> out;
  for (size_t i = 0; i < k; ++i) out.push_back({ids[i], logits[static_cast<size_t>(ids[i])] - max_logit - log_sum});
  return out;
}

}  // namespace den::engine
