// Sampler implementation. The generator is xoshiro256** seeded through splitmix64; uniform
// doubles take its top 53 bits. Both are fixed algorithms, so a seed means the same tokens
// on every machine and compiler (unlike std::uniform_real_distribution).
#include "den/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace den::engine {
namespace {

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

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

Sampler::Sampler(const SamplingParams& params) : params_(params) {
  params_.validate();
  uint64_t seed = params.seed;
  for (uint64_t& s : state_) s = splitmix64(seed);
}

uint64_t Sampler::next_random() {
  const uint64_t result = rotl(state_[1] * 5, 7) * 9;
  const uint64_t t = state_[1] << 17;
  state_[2] ^= state_[0];
  state_[3] ^= state_[1];
  state_[1] ^= state_[2];
  state_[0] ^= state_[3];
  state_[2] ^= t;
  state_[3] = rotl(state_[3], 45);
  return result;
}

double Sampler::uniform() { return static_cast<double>(next_random() >> 11) * 0x1.0p-53; }

int32_t argmax(std::span<const float> logits) {
  int32_t best = 0;
  for (size_t i = 1; i < logits.size(); ++i) {
    if (logits[i] > logits[static_cast<size_t>(best)]) best = static_cast<int32_t>(i);
  }
  return best;
}

int32_t Sampler::sample(std::span<float> logits, std::span<const int32_t> history) {
  const auto n_vocab = static_cast<int32_t>(logits.size());
  const SamplingParams& p = params_;

  // Penalties over the recent window.
  if (p.repeat_penalty != 1.0f || p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f) {
    const size_t window = p.repeat_last_n < 0 ? history.size()
                                              : std::min(history.size(), static_cast<size_t>(p.repeat_last_n));
    std::unordered_map<int32_t, int32_t> counts;
    for (size_t i = history.size() - window; i < history.size(); ++i) ++counts[history[i]];
    for (const auto& [id, count] : counts) {
      if (id < 0 || id >= n_vocab) continue;
      float& l = logits[static_cast<size_t>(id)];
      l = l > 0.0f ? l / p.repeat_penalty : l * p.repeat_penalty;
      l -= p.presence_penalty + p.frequency_penalty * static_cast<float>(count);
    }
  }
  if (p.temperature <= 0.0f) return argmax(logits);

  for (float& l : logits) l /= p.temperature;

  // Candidates sorted by logit, best first (stable on id for reproducibility).
  candidates_.resize(static_cast<size_t>(n_vocab));
  std::iota(candidates_.begin(), candidates_.end(), 0);
  auto better = [&](int32_t a, int32_t b) {
    const float la = logits[static_cast<size_t>(a)], lb = logits[static_cast<size_t>(b)];
    return la > lb || (la == lb && a < b);
  };
  size_t keep = candidates_.size();
  if (p.top_k > 0 && static_cast<size_t>(p.top_k) < keep) {
    keep = static_cast<size_t>(p.top_k);
    std::partial_sort(candidates_.begin(), candidates_.begin() + static_cast<ptrdiff_t>(keep), candidates_.end(),
                      better);
  } else {
    std::sort(candidates_.begin(), candidates_.end(), better);
  }
  candidates_.resize(keep);

  const float max_logit = logits[static_cast<size_t>(candidates_[0])];
  probabilities_.resize(keep);
  double sum = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    probabilities_[i] = std::exp(logits[static_cast<size_t>(candidates_[i])] - max_logit);
    sum += probabilities_[i];
  }
  // top-p: the smallest prefix whose mass reaches p.
  if (p.top_p < 1.0f) {
    double mass = 0.0;
    size_t n = 0;
    while (n < keep) {
      mass += probabilities_[n] / sum;
      ++n;
      if (mass >= p.top_p) break;
    }
    keep = n;
  }
  // min-p: drop tokens less likely than min_p times the best one (probabilities_[0] == 1).
  if (p.min_p > 0.0f) {
    size_t n = 1;
    while (n < keep && probabilities_[n] >= p.min_p) ++n;
    keep = n;
  }
  double total = 0.0;
  for (size_t i = 0; i < keep; ++i) total += probabilities_[i];
  const double target = uniform() * total;
  double acc = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    acc += probabilities_[i];
    if (target < acc) return candidates_[i];
  }
  return candidates_[keep - 1];
}

float token_logprob(std::span<const float> logits, int32_t id) {
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float l : logits) sum += std::exp(static_cast<double>(l - max_logit));
  return static_cast<float>(logits[static_cast<size_t>(id)] - max_logit - std::log(sum));
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
