// The oracle no one here wrote: llama2.c's greedy output for stories260K, token for token,
// through the engine alone (block pool, backend, argmax).
#include "den/engine/backend.h"
#include "den/engine/model.h"
#include "den/engine/sampler.h"
#include "den/memory/block_pool.h"
#include "test_support.h"

using namespace den;

TEST_CASE("stories260K greedy decoding reproduces llama2.c's 64 tokens") {
  DEN_SKIP_UNLESS(test::file_exists(test::stories_model()), "../shared/models/stories260K is absent");
  const test::StoriesOracle oracle = test::stories_oracle();
  REQUIRE(oracle.ids.size() == 64);
  const auto model = engine::Model::load(test::stories_model());
  const auto backend = engine::make_cpu_backend(*model, 2);
  memory::BlockPool pool(model->kv_layout(16, kernels::DType::f32), 8, memory::Placement::host, true);
  memory::SequenceBlocks blocks(pool);
  std::vector<int32_t> ids;
  int32_t token = *model->tokenizer().bos();
  engine::StepOutput out;
  for (int32_t pos = 0; pos < 64; ++pos) {
    REQUIRE(blocks.reserve(pos + 1));
    engine::SequenceInput in{std::span<const int32_t>(&token, 1), pos, blocks.table()};
    backend->forward({&in, 1}, pool.view(), out);
    token = engine::argmax(out.row(0));
    ids.push_back(token);
  }
  CHECK(ids == oracle.ids);
  engine::TokenStreamDecoder decoder(model->tokenizer(), *model->tokenizer().bos());
  std::string text;
  for (int32_t id : ids) text += decoder.push(id);
  CHECK(text + decoder.flush() + "\n" == oracle.stdout_text);
}
