// CPU backend properties: batch invariance (bitwise), independence from block size and block
// placement, chunked prefill equal to one-token steps, and malformed batches rejected before
// any KV is written.
#include <algorithm>
#include <cstring>
#include <numeric>

#include "den/engine/backend.h"
#include "den/engine/model.h"
#include "den/memory/block_pool.h"
#include "test_support.h"

using namespace den;

namespace {

struct Harness {
  std::unique_ptr<engine::Model> model;
  std::unique_ptr<engine::Backend> backend;
  explicit Harness(int threads = 2) {
    model = engine::Model::load(test::stories_model());
    backend = engine::make_cpu_backend(*model, threads);
  }
};

std::vector<int32_t> random_tokens(std::mt19937& rng, int n) {
  std::uniform_int_distribution<int32_t> pick(3, 511);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = pick(rng);
  return t;
}

// Logits of the last token after feeding `tokens` in chunks of `chunk`, with a given block size
// and the sequence's blocks taken from a pool where other blocks were handed out first.
std::vector<float> run_sequence(Harness& h, const std::vector<int32_t>& tokens, int chunk, int block_tokens,
                                int blocks_taken_first) {
  memory::BlockPool pool(h.model->kv_layout(block_tokens, kernels::DType::f32), 64, memory::Placement::host, true);
  std::vector<int32_t> taken;
  for (int i = 0; i < blocks_taken_first; ++i) taken.push_back(*pool.allocate());
  memory::SequenceBlocks blocks(pool);
  engine::StepOutput out;
  for (size_t done = 0; done < tokens.size(); done += static_cast<size_t>(chunk)) {
    const size_t n = std::min(tokens.size() - done, static_cast<size_t>(chunk));
    REQUIRE(blocks.reserve(static_cast<int64_t>(done + n)));
    engine::SequenceInput in{std::span(tokens).subspan(done, n), static_cast<int32_t>(done), blocks.table(),
                             engine::LogitsWanted::last};
    h.backend->forward({&in, 1}, pool.view(), out);
  }
  return {out.logits.begin(), out.logits.end()};
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("logits do not depend on block size, block placement or prefill chunking") {
  DEN_SKIP_UNLESS(test::file_exists(test::stories_model()), "../shared/models/stories260K is absent");
  Harness h;
  std::mt19937 rng(21);
  const auto tokens = random_tokens(rng, 45);
  const auto reference = run_sequence(h, tokens, 45, 16, 0);
  CHECK(bitwise_equal(reference, run_sequence(h, tokens, 1, 16, 0)));
  CHECK(bitwise_equal(reference, run_sequence(h, tokens, 7, 4, 3)));
  CHECK(bitwise_equal(reference, run_sequence(h, tokens, 45, 32, 5)));
  Harness one_thread(1);
  CHECK(bitwise_equal(reference, run_sequence(one_thread, tokens, 45, 16, 0)));
}

TEST_CASE("a sequence's logits are bitwise the same alone and inside a mixed batch") {
  DEN_SKIP_UNLESS(test::file_exists(test::stories_model()), "../shared/models/stories260K is absent");
  Harness h;
  std::mt19937 rng(22);
  const auto a = random_tokens(rng, 20), b = random_tokens(rng, 9), c = random_tokens(rng, 31);
  const auto a_alone = run_sequence(h, a, 20, 16, 0);

  memory::BlockPool pool(h.model->kv_layout(16, kernels::DType::f32), 64, memory::Placement::host, true);
  memory::SequenceBlocks ba(pool), bb(pool), bc(pool);
  engine::StepOutput out;
  // c is mid-decode: prefill all but its last token first.
  REQUIRE(bc.reserve(31));
  engine::SequenceInput c_prefill{std::span(c).first(30), 0, bc.table(), engine::LogitsWanted::none};
  h.backend->forward({&c_prefill, 1}, pool.view(), out);
  // One step: b's full prefill, a's prefill (wanting all rows), c's decode token.
  REQUIRE(ba.reserve(20));
  REQUIRE(bb.reserve(9));
  const std::vector<engine::SequenceInput> batch = {
      {b, 0, bb.table(), engine::LogitsWanted::last},
      {a, 0, ba.table(), engine::LogitsWanted::all},
      {std::span(c).last(1), 30, bc.table(), engine::LogitsWanted::last},
  };
  h.backend->forward(batch, pool.view(), out);
  REQUIRE(out.first_row == std::vector<int32_t>{0, 1, 21});
  const auto row = out.row(1 + 19);
  CHECK(bitwise_equal(a_alone, std::vector<float>(row.begin(), row.end())));
  const auto c_alone = run_sequence(h, c, 31, 16, 0);
  const auto c_row = out.row(21);
  CHECK(bitwise_equal(c_alone, std::vector<float>(c_row.begin(), c_row.end())));
}

TEST_CASE("malformed batches are rejected before any KV is written") {
  DEN_SKIP_UNLESS(test::file_exists(test::stories_model()), "../shared/models/stories260K is absent");
  Harness h;
  memory::BlockPool pool(h.model->kv_layout(16, kernels::DType::f32), 4, memory::Placement::host, true);
  memory::SequenceBlocks blocks(pool);
  REQUIRE(blocks.reserve(16));
  const auto view = pool.view();
  const auto bytes = static_cast<size_t>(view.n_blocks * view.layout.block_bytes());
  std::vector<uint8_t> before(static_cast<const uint8_t*>(view.blocks), static_cast<const uint8_t*>(view.blocks) + bytes);
  engine::StepOutput out;
  auto rejects = [&](const engine::SequenceInput& good_then_bad, const char* what) {
    const std::vector<int32_t> ok_tokens = {1, 2};
    const std::vector<engine::SequenceInput> batch = {{ok_tokens, 0, blocks.table()}, good_then_bad};
    CHECK_THROWS_WITH_AS(h.backend->forward(batch, view, out), doctest::Contains(what), std::invalid_argument);
    CHECK(std::memcmp(before.data(), view.blocks, bytes) == 0);
  };
  const std::vector<int32_t> bad_token = {5, 512};
  rejects({bad_token, 0, blocks.table()}, "outside the vocabulary");
  const std::vector<int32_t> long_tokens(20, 5);
  rejects({long_tokens, 0, blocks.table()}, "needs 2 KV blocks");
  const std::vector<int32_t> foreign = {99};
  const std::vector<int32_t> one = {5};
  rejects({one, 0, foreign}, "outside the pool");
  rejects({std::span<const int32_t>{}, 0, blocks.table()}, "has no tokens");

  memory::BlockPool wrong(h.model->kv_layout(16, kernels::DType::bf16), 4, memory::Placement::host, false);
  engine::SequenceInput in{one, 0, blocks.table()};
  CHECK_THROWS_WITH_AS(h.backend->forward({&in, 1}, wrong.view(), out), doctest::Contains("layout"),
                       std::invalid_argument);
}
