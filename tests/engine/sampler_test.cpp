// Sampler: greedy, reproducibility, each truncation rule and penalty, parameter validation.
#include <cmath>
#include <map>

#include "den/engine/sampler.h"
#include "test_support.h"

using namespace den::engine;

namespace {

std::vector<float> logits_of(std::initializer_list<float> v) { return v; }

SamplingParams plain(float temperature) {
  SamplingParams p;
  p.temperature = temperature;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.min_p = 0.0f;
  return p;
}

}  // namespace

TEST_CASE("temperature 0 is argmax, lowest id on ties") {
  Sampler s(plain(0.0f));
  auto l = logits_of({0.1f, 3.0f, -1.0f, 3.0f});
  CHECK(s.sample(l, {}) == 1);
  CHECK(argmax(logits_of({-5.0f, -5.0f})) == 0);
}

TEST_CASE("a seed gives the same tokens, another seed others") {
  std::mt19937 rng(9);
  const auto base = den::test::random_floats(rng, 1000, 2.0f);
  auto draw = [&](uint64_t seed) {
    SamplingParams p = plain(1.0f);
    p.seed = seed;
    Sampler s(p);
    std::vector<int32_t> out;
    for (int i = 0; i < 50; ++i) {
      auto l = base;
      out.push_back(s.sample(l, {}));
    }
    return out;
  };
  CHECK(draw(42) == draw(42));
  CHECK(draw(42) != draw(43));
}

TEST_CASE("sampling follows the softmax distribution") {
  SamplingParams p = plain(1.0f);
  p.seed = 5;
  Sampler s(p);
  const auto base = logits_of({0.0f, std::log(2.0f), std::log(5.0f), -100.0f});
  std::map<int32_t, int> counts;
  const int n = 40000;
  for (int i = 0; i < n; ++i) {
    auto l = base;
    ++counts[s.sample(l, {})];
  }
  CHECK(counts[3] == 0);
  CHECK(counts[0] / double(n) == doctest::Approx(1.0 / 8).epsilon(0.05));
  CHECK(counts[1] / double(n) == doctest::Approx(2.0 / 8).epsilon(0.05));
  CHECK(counts[2] / double(n) == doctest::Approx(5.0 / 8).epsilon(0.05));
}

TEST_CASE("top-k, top-p and min-p cut the candidates") {
  const auto base = logits_of({std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)});
  auto support = [&](SamplingParams p) {
    std::map<int32_t, int> seen;
    for (uint64_t seed = 0; seed < 400; ++seed) {
      p.seed = seed;
      Sampler s(p);
      auto l = base;
      ++seen[s.sample(l, {})];
    }
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
}

TEST_CASE("penalties lower the logits of tokens already seen") {
  SamplingParams p = plain(0.0f);
  p.repeat_penalty = 2.0f;
  Sampler s(p);
  auto l = logits_of({2.0f, 1.5f, -1.0f});
  const std::vector<int32_t> history = {0, 2};
  CHECK(s.sample(l, history) == 1);  // token 0 halved to 1.0
  CHECK(l[0] == 1.0f);
  CHECK(l[2] == -2.0f);  // negative logits are multiplied
  p = plain(0.0f);
  p.presence_penalty = 0.5f;
  p.frequency_penalty = 0.25f;
  Sampler s2(p);
  auto l2 = logits_of({2.0f, 1.5f});
  const std::vector<int32_t> twice = {0, 0};
  s2.sample(l2, twice);
  CHECK(l2[0] == doctest::Approx(2.0f - 0.5f - 0.5f));
}

TEST_CASE("out-of-range parameters are rejected with their name") {
  SamplingParams p;
  p.top_p = 0.0f;
  CHECK_THROWS_WITH_AS(Sampler{p}, doctest::Contains("top_p"), std::invalid_argument);
  p = SamplingParams{};
  p.temperature = -1.0f;
  CHECK_THROWS_WITH_AS(Sampler{p}, doctest::Contains("temperature"), std::invalid_argument);
}

TEST_CASE("log-probabilities") {
  const auto l = logits_of({0.0f, std::log(3.0f)});
  CHECK(token_logprob(l, 1) == doctest::Approx(std::log(0.75f)));
  const auto top = top_logprobs(l, 5);
  REQUIRE(top.size() == 2);
  CHECK(top[0].id == 1);
  CHECK(top[1].logprob == doctest::Approx(std::log(0.25f)));
}
