// Sampling CPU reference (the definition is in den/kernels/sampling.h).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "den/kernels/sampling.h"

namespace den::kernels {

int32_t sample_ref(float* logits, int32_t n_vocab, const SamplingConfig& c, std::span<const TokenCount> seen,
                   uint64_t step) {
  for (const TokenCount& s : seen) {
    if (s.token >= 0 && s.token < n_vocab && s.count > 0) logits[s.token] = penalized(logits[s.token], s.count, c);
  }
  if (c.temperature <= 0.0f) {
    int32_t best = 0;
    for (int32_t i = 1; i < n_vocab; ++i) {
      if (logits[i] > logits[best]) best = i;
    }
    return best;
  }
  for (int32_t i = 0; i < n_vocab; ++i) logits[i] /= c.temperature;

  auto better = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  std::vector<int32_t> order(static_cast<size_t>(n_vocab));
  std::iota(order.begin(), order.end(), 0);
  size_t kept = order.size();
  const bool need_order = (c.top_k > 0 && c.top_k < n_vocab) || c.top_p < 1.0f;
  if (c.top_k > 0 && c.top_k < n_vocab) {
    kept = static_cast<size_t>(c.top_k);
    std::partial_sort(order.begin(), order.begin() + static_cast<ptrdiff_t>(kept), order.end(), better);
  } else if (need_order) {
    std::sort(order.begin(), order.end(), better);
  } else {
    std::nth_element(order.begin(), order.begin(), order.end(), better);  // only the best is needed
  }
  const float max_logit = logits[order[0]];
  auto weight = [&](int32_t id) { return std::exp(static_cast<double>(logits[id] - max_logit)); };
  if (c.top_p < 1.0f) {
    double total = 0.0;
    for (size_t i = 0; i < kept; ++i) total += weight(order[i]);
    double mass = 0.0;
    size_t n = 0;
    while (n < kept) {
      mass += weight(order[n++]);
      if (mass >= static_cast<double>(c.top_p) * total) break;
    }
    kept = n;
  }
  // The kept set, as a mask, then min-p (relative to the best token's weight, which is 1).
  std::vector<uint8_t> keep(static_cast<size_t>(n_vocab), 0);
  for (size_t i = 0; i < kept; ++i) keep[static_cast<size_t>(order[i])] = 1;
  double total = 0.0;
  for (int32_t id = 0; id < n_vocab; ++id) {
    if (!keep[static_cast<size_t>(id)]) continue;
    if (c.min_p > 0.0f && weight(id) < static_cast<double>(c.min_p)) {
      keep[static_cast<size_t>(id)] = 0;
      continue;
    }
    total += weight(id);
  }
  const double target = sampling_uniform(c.seed, step) * total;
  double acc = 0.0;
  int32_t last = order[0];
  for (int32_t id = 0; id < n_vocab; ++id) {
    if (!keep[static_cast<size_t>(id)]) continue;
    acc += weight(id);
    last = id;
    if (target < acc) return id;
  }
  return last;
}

float token_logprob_ref(const float* logits, int32_t n_vocab, int32_t token) {
  const float max_logit = *std::max_element(logits, logits + n_vocab);
  double sum = 0.0;
  for (int32_t i = 0; i < n_vocab; ++i) sum += std::exp(static_cast<double>(logits[i] - max_logit));
  return static_cast<float>(logits[token] - max_logit - std::log(sum));
}

}  // namespace den::kernels
