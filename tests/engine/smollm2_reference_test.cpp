// SmolLM2-135M-Instruct against Hugging Face transformers run on the CPU in float32 from the
// same GGUF (fixture from scripts/make-smollm2-fixture): logits at every position within
// max |delta| / max |ref| < 1e-4.
#include <boost/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "den/engine/backend.h"
#include "den/engine/model.h"
#include "den/memory/block_pool.h"
#include "test_support.h"

using namespace den;

TEST_CASE("SmolLM2 logits match transformers at every position") {
  const auto model_path = test::default_model();
  DEN_SKIP_UNLESS(model_path, "the default model (SmolLM2) is not fetched: run scripts/fetch-model");
  const auto model = engine::Model::load(*model_path);
  const auto backend = engine::make_cpu_backend(*model, 0);
  const auto cases = boost::json::parse(test::read_file(test::fixture_path("smollm2/cases.json")));
  const std::string blob = test::read_file(test::fixture_path("smollm2/logits.bin"));
  REQUIRE(blob.compare(0, 8, "DENLOGIT") == 0);
  uint32_t n_cases = 0, n_vocab = 0;
  std::memcpy(&n_cases, blob.data() + 8, 4);
  std::memcpy(&n_vocab, blob.data() + 12, 4);
  REQUIRE(n_vocab == static_cast<uint32_t>(model->config().n_vocab));
  size_t at = 16;
  const auto& logit_cases = cases.at("logit_cases").as_array();
  REQUIRE(logit_cases.size() == n_cases);
  double worst = 0.0;
  for (const auto& c : logit_cases) {
    std::vector<int32_t> ids;
    for (const auto& id : c.at("ids").as_array()) ids.push_back(static_cast<int32_t>(id.as_int64()));
    uint32_t rows = 0;
    std::memcpy(&rows, blob.data() + at, 4);
    at += 4;
    REQUIRE(rows == ids.size());

    memory::BlockPool pool(model->kv_layout(16, kernels::DType::f32), 8, memory::Placement::host, true);
    memory::SequenceBlocks blocks(pool);
    REQUIRE(blocks.reserve(static_cast<int64_t>(ids.size())));
    engine::SequenceInput in{ids, 0, blocks.table(), engine::LogitsWanted::all};
    engine::StepOutput out;
    backend->forward({&in, 1}, pool.view(), out);

    for (uint32_t r = 0; r < rows; ++r) {
      float scale = 0.0f;
      std::memcpy(&scale, blob.data() + at, 4);
      at += 4;
      std::vector<int16_t> q(n_vocab);
      std::memcpy(q.data(), blob.data() + at, n_vocab * 2);
      at += n_vocab * 2;
      const double error =
          test::max_relative_error(out.row(r), [&](size_t v) { return q[v] * static_cast<double>(scale); }, n_vocab);
      CAPTURE(r);
      CHECK(error < 1e-4);
      worst = std::max(worst, error);
    }
  }
  MESSAGE("worst max|delta|/max|ref| over all positions: " << worst);
}
