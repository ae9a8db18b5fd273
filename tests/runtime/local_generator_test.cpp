// LocalGenerator: KV reuse across calls gives the same tokens as starting over; stop rules.
#include "den/engine/model.h"
#include "den/runtime/local_generator.h"
#include "test_support.h"

using namespace den;

namespace {

runtime::GenerationOptions greedy(int32_t n) {
  runtime::GenerationOptions o;
  o.max_new_tokens = n;
  o.sampling.temperature = 0.0f;
  return o;
}

}  // namespace

TEST_CASE("continuing a conversation reuses the common prefix and changes nothing") {
  DEN_SKIP_UNLESS(test::file_exists(test::stories_model()), "../shared/models/stories260K is absent");
  const auto model = engine::Model::load(test::stories_model());
  const auto backend = engine::make_cpu_backend(*model, 2);
  const auto& tok = model->tokenizer();
  const auto first = tok.encode("Once upon a time", true, false);

  runtime::LocalGenerator reused(*model, *backend, 16, 512);
  const auto r1 = reused.generate(first, greedy(10));
  std::vector<int32_t> second = first;
  for (const auto& t : r1.tokens) second.push_back(t.id);
  for (int32_t id : tok.encode(" Then", false, false)) second.push_back(id);
  const auto r2 = reused.generate(second, greedy(12));
  CHECK(r2.reused_tokens == static_cast<int32_t>(first.size() + r1.tokens.size() - 1));

  runtime::LocalGenerator fresh(*model, *backend, 16, 512);
  const auto r3 = fresh.generate(second, greedy(12));
  CHECK(r3.reused_tokens == 0);
  REQUIRE(r2.tokens.size() == r3.tokens.size());
  for (size_t i = 0; i < r2.tokens.size(); ++i) CHECK(r2.tokens[i].id == r3.tokens[i].id);
  CHECK(r2.text == r3.text);
}

TEST_CASE("stop strings, the context limit and log-probabilities") {
  DEN_SKIP_UNLESS(test::file_exists(test::stories_model()), "../shared/models/stories260K is absent");
  const auto model = engine::Model::load(test::stories_model());
  const auto backend = engine::make_cpu_backend(*model, 2);
  const std::vector<int32_t> bos = {1};

  runtime::LocalGenerator gen(*model, *backend, 16, 512);
  auto options = greedy(64);
  options.stop = {"Lily"};
  const auto stopped = gen.generate(bos, options);
  CHECK(stopped.reason == runtime::StopReason::stop_string);
  CHECK(stopped.text == "Once upon a time, there was a little girl named ");

  runtime::LocalGenerator small(*model, *backend, 16, 20);
  const auto full = small.generate(bos, greedy(100));
  CHECK(full.reason == runtime::StopReason::context_full);
  CHECK(small.history().size() == 20);

  auto with_logprobs = greedy(3);
  with_logprobs.top_logprobs = 2;
  const auto lp = gen.generate(bos, with_logprobs);
  REQUIRE(lp.tokens.size() == 3);
  CHECK(lp.tokens[0].logprob < 0.0f);
  REQUIRE(lp.tokens[0].top.size() == 2);
  CHECK(lp.tokens[0].top[0].id == lp.tokens[0].id);  // greedy picks the most likely
  CHECK(lp.tokens[0].top[0].logprob == doctest::Approx(lp.tokens[0].logprob));

  CHECK_THROWS_WITH(gen.generate({}, greedy(1)), doctest::Contains("empty context"));
  const std::vector<int32_t> too_long(600, 5);
  CHECK_THROWS_WITH(gen.generate(too_long, greedy(1)), doctest::Contains("more than the context"));
}
