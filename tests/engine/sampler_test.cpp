// Sampling: greedy, reproducibility, each truncation rule and penalty, parameter validation.
// (The GPU kernel is checked against the same reference in tests/kernels/sampling_cuda_test.cpp.)
#include <cmath>
#include <map>
#include <set>

#include "den/engine/sampler.h"
#include "test_support.h"

using namespace den::engine;

namespace {

SamplingParams plain(float temperature, uint64_t seed = 0) {
  SamplingParams p;
  p.temperature = temperature;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.0f;
  p.seed = seed;
  return p;
}

int32_t draw(std::vector<float> logits, const SamplingParams& p, uint64_t step = 0,
             std::span<const int32_t> history = {}) {
  return sample_token(logits, p, history, step);
}

}  // namespace

TEST_CASE("temperature 0 is argmax, lowest id on ties") {
  CHECK(draw({0.1f, 3.0f, -1.0f, 3.0f}, plain(0.0f)) == 1);
  CHECK(argmax(std::vector<float>{-5.0f, -5.0f}) == 0);
}

TEST_CASE("a seed and step give the same token, other seeds or steps others") {
  std::mt19937 rng(9);
  const auto base = den::test::random_floats(rng, 1000, 2.0f);
  auto stream = [&](uint64_t seed) {
    std::vector<int32_t> out;
    for (uint64_t step = 0; step < 50; ++step) out.push_back(draw(base, plain(1.0f, seed), step));
    return out;
  };
  CHECK(stream(42) == stream(42));
  CHECK(stream(42) != stream(43));
  const auto s = stream(42);
  CHECK(std::set<int32_t>(s.begin(), s.end()).size() > 10);  // the steps differ
}

TEST_CASE("sampling follows the softmax distribution") {
  const std::vector<float> base = {0.0f, std::log(2.0f), std::log(5.0f), -100.0f};
  std::map<int32_t, int> counts;
  const int n = 40000;
  for (int i = 0; i < n; ++i) ++counts[draw(base, plain(1.0f, 5), static_cast<uint64_t>(i))];
  CHECK(counts[3] == 0);
  CHECK(counts[0] / double(n) == doctest::Approx(1.0 / 8).epsilon(0.05));
  CHECK(counts[1] / double(n) == doctest::Approx(2.0 / 8).epsilon(0.05));
  CHECK(counts[2] / double(n) == doctest::Approx(5.0 / 8).epsilon(0.05));
}

TEST_CASE("top-k, top-p and min-p cut the candidates") {
  const std::vector<float> base = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  auto support = [&](SamplingParams p) {
    std::map<int32_t, int> seen;
    for (uint64_t step = 0; step < 400; ++step) ++seen[draw(base, p, step)];
    return seen.size();
  };
  SamplingParams p = plain(1.0f);
  CHECK(support(p) == 4);
  p.top_k = 2;
  CHECK(support(p) == 2);
  p = plain(1.0f);
  p.top_p = 0.79f;  // 0.5 + 0.3 reaches it
  CHECK(support(p) == 2);
  p = plain(1.0f);
  p.min_p = 0.2f;  // keeps p >= 0.1: three tokens
  CHECK(support(p) == 3);
  // top-k ties: the lower id wins the last place.
  const std::vector<float> tied = {1.0f, 2.0f, 2.0f, 2.0f};
  p = plain(1.0f);
  p.top_k = 2;
  std::map<int32_t, int> seen;
  for (uint64_t step = 0; step < 200; ++step) ++seen[draw(tied, p, step)];
  CHECK(seen.size() == 2);
  CHECK(seen.count(1) == 1);
  CHECK(seen.count(2) == 1);
}

TEST_CASE("penalties lower the logits of tokens already seen, within the window") {
  SamplingParams p = plain(0.0f);
  p.repeat_penalty = 2.0f;
  std::vector<float> l = {2.0f, 1.5f, -1.0f};
  const std::vector<int32_t> history = {0, 2};
  CHECK(sample_token(l, p, history, 0) == 1);  // token 0 halved to 1.0
  CHECK(l[0] == 1.0f);
  CHECK(l[2] == -2.0f);  // negative logits are multiplied
  p = plain(0.0f);
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  std::vector<float> l2 = {2.0f, 1.5f};
  const std::vector<int32_t> twice = {0, 0};
  sample_token(l2, p, twice, 0);
  CHECK(l2[0] == doctest::Approx(2.0f - 0.5f - 0.5f));
  p.repeat_last_n = 1;
  const std::vector<int32_t> old_then_new = {0, 0, 1};
  const auto counts = penalty_counts(p, old_then_new);
  REQUIRE(counts.size() == 1);
  CHECK(counts[0].token == 1);
}

TEST_CASE("out-of-range parameters are rejected with their name") {
  SamplingParams p;
  p.top_p = 0.0f;
  CHECK_THROWS_WITH_AS(p.validate(), doctest::Contains("top_p"), std::invalid_argument);
  p = SamplingParams{};
  p.temperature = -1.0f;
  CHECK_THROWS_WITH_AS(p.validate(), doctest::Contains("temperature"), std::invalid_argument);
}

TEST_CASE("log-probabilities") {
  const std::vector<float> l = {0.0f, std::log(3.0f)};
  CHECK(token_logprob(l, 1) == doctest::Approx(std::log(0.75f)));
  const auto top = top_logprobs(l, 5);
  REQUIRE(top.size() == 2);
  CHECK(top[0].id == 1);
  CHECK(top[1].logprob == doctest::Approx(std::log(0.25f)));
}
