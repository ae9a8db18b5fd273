// Tiny random models of two architectures against Hugging Face transformers' logits (fixture
// from scripts/make-tiny-reference-models): Llama 3 RoPE scaling with GQA and an untied head,
// and qwen2 with QKV biases and NeoX RoPE.
#include <algorithm>
#include <cmath>

#include "den/engine/backend.h"
#include "den/engine/model.h"
#include "den/memory/block_pool.h"
#include "test_support.h"

using namespace den;

namespace {

void check_against_transformers(const std::string& name) {
  const auto model = engine::Model::load(test::fixture_path("tiny/" + name + ".gguf"));
  const std::string blob = test::read_file(test::fixture_path("tiny/" + name + ".logits.f32"));
  const std::vector<int32_t> tokens = {1,   403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395,
                                       317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265,
                                       282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432};
  const int32_t n_vocab = model->config().n_vocab;
  REQUIRE(blob.size() == tokens.size() * static_cast<size_t>(n_vocab) * 4);
  const auto* ref = reinterpret_cast<const float*>(blob.data());
  const auto backend = engine::make_cpu_backend(*model, 2);
  memory::BlockPool pool(model->kv_layout(16, kernels::DType::f32), 4, memory::Placement::host, true);
  memory::SequenceBlocks blocks(pool);
  REQUIRE(blocks.reserve(static_cast<int64_t>(tokens.size())));
  engine::SequenceInput in{tokens, 0, blocks.table(), engine::LogitsWanted::all};
  engine::StepOutput out;
  backend->forward({&in, 1}, pool.view(), out);
  for (size_t r = 0; r < tokens.size(); ++r) {
    const float* expected = ref + r * static_cast<size_t>(n_vocab);
    CAPTURE(r);
    CHECK(test::max_relative_error(out.row(r), [&](size_t v) { return expected[v]; }, static_cast<size_t>(n_vocab)) <
          1e-4);
  }
}

}  // namespace

TEST_CASE("tiny Llama 3 (rope_freqs scaling, GQA, untied head) matches transformers") {
  check_against_transformers("tiny-llama3");
}

TEST_CASE("tiny qwen2 (QKV bias, NeoX RoPE) matches transformers") { check_against_transformers("tiny-qwen2"); }
