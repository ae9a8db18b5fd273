// Model loading: hyper-parameters from metadata, shape validation, fingerprints.
#include <cstring>

#include "den/engine/model.h"
#include "test_support.h"

using namespace den;

TEST_CASE("stories260K hyper-parameters") {
  DEN_SKIP_UNLESS(test::file_exists(test::stories_model()), "../shared/models/stories260K is absent");
  const auto m = engine::Model::load(test::stories_model());
  const engine::ModelConfig& c = m->config();
  CHECK(c.architecture == "llama");
  CHECK(c.n_vocab == 512);
  CHECK(c.n_embd == 64);
  CHECK(c.n_layers == 5);
  CHECK(c.n_heads == 8);
  CHECK(c.n_kv_heads == 4);
  CHECK(c.head_dim == 8);
  CHECK(c.n_ff == 172);
  CHECK_FALSE(c.tied_output);  // the GGUF carries output.weight (a copy of token_embd)
  CHECK(c.rope_style == kernels::RopeStyle::interleaved);
  CHECK(c.rms_eps == doctest::Approx(1e-5f));
  CHECK(m->kv_layout(16, kernels::DType::f32).block_bytes() == 5 * 2 * 16 * 4 * 8 * 4);
  // 260K parameters minus the 512 x 64 embedding table, plus the output head.
  CHECK(m->non_embedding_parameters() > 200000);
}

TEST_CASE("fingerprints identify the exact weights") {
  DEN_SKIP_UNLESS(test::file_exists(test::stories_model()), "../shared/models/stories260K is absent");
  const auto a = engine::Model::load(test::stories_model());
  const auto b = engine::Model::load(test::stories_model());
  CHECK(a->fingerprint() == b->fingerprint());
  test::TempDir dir;
  std::string bytes = test::read_file(test::stories_model());
  const auto* norm = a->file().find_tensor("output_norm.weight");
  bytes[static_cast<size_t>(norm->data - a->file().bytes().data())] ^= 1;  // one bit of one weight
  test::write_file(dir.file("changed.gguf"), bytes);
  CHECK(engine::Model::load(dir.file("changed.gguf"))->fingerprint() != a->fingerprint());
}

TEST_CASE("a vocabulary-only file is not a model, and says what is missing") {
  DEN_SKIP_UNLESS(test::file_exists(test::shared_path("tokenizers")), "../shared/tokenizers is absent");
  CHECK_THROWS_WITH(engine::Model::load(test::shared_path("tokenizers/ggml-vocab-gpt-2.gguf")),
                    doctest::Contains("architecture 'gpt2' is not supported"));
  CHECK_THROWS_WITH(engine::Model::load(test::shared_path("tokenizers/ggml-vocab-llama-spm.gguf")),
                    doctest::Contains("is missing"));
}
