// sample_cuda against sample_ref on random rows: greedy and the top-k (<= 1024) regime must
// give the very same token; the threshold regime (no top-k, or a larger one) may differ only
// where rounding moves a threshold (a few rows in a thousand at most). Log-probabilities
// against token_logprob_ref.
#include "den/engine/sampler.h"
#include "den/kernels/sampling.h"
#include "gpu_support.h"

using namespace den;

namespace {

struct Case {
  const char* name;
  kernels::SamplingConfig config;
  bool exact;
};

}  // namespace

TEST_CASE("GPU sampling draws the reference's tokens") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(51);
  const std::vector<Case> cases = {
      {"greedy", {0.0f, 40, 0.95f, 0.05f, 1.0f, 0.0f, 0.0f, 1}, true},
      {"top-k 40, top-p 0.95, min-p 0.05", {0.8f, 40, 0.95f, 0.05f, 1.0f, 0.0f, 0.0f, 2}, true},
      {"top-k 1", {1.0f, 1, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 3}, true},
      {"top-k 1024, top-p 0.5", {1.3f, 1024, 0.5f, 0.0f, 1.0f, 0.0f, 0.0f, 4}, true},
      {"penalties, top-k 50", {0.7f, 50, 1.0f, 0.0f, 1.3f, 0.4f, 0.2f, 5}, true},
      {"full distribution", {1.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 6}, false},
      {"top-p 0.9 without top-k", {0.9f, 0, 0.9f, 0.0f, 1.0f, 0.0f, 0.0f, 7}, false},
      {"min-p 0.1 without top-k", {1.0f, 0, 1.0f, 0.1f, 1.0f, 0.0f, 0.0f, 8}, false},
  };
  for (int32_t n_vocab : {1002, 49152}) {
    for (const Case& c : cases) {
      const int32_t rows = 256;
      std::vector<float> logits = test::random_floats(rng, static_cast<size_t>(rows) * n_vocab, 3.0f);
      std::vector<kernels::SamplingConfig> configs(rows, c.config);
      std::vector<kernels::TokenCount> seen;
      std::vector<int32_t> offsets = {0};
      std::vector<uint64_t> steps;
      std::uniform_int_distribution<int32_t> pick(0, n_vocab - 1);
      for (int32_t r = 0; r < rows; ++r) {
        if (c.config.repeat_penalty != 1.0f) {
          for (int k = 0; k < 20; ++k) seen.push_back({pick(rng), 1 + k % 3});
          std::sort(seen.begin() + offsets.back(), seen.end(),
                    [](auto a, auto b) { return a.token < b.token; });
          seen.erase(std::unique(seen.begin() + offsets.back(), seen.end(),
                                 [](auto a, auto b) { return a.token == b.token; }),
                     seen.end());
        }
        offsets.push_back(static_cast<int32_t>(seen.size()));
        steps.push_back(static_cast<uint64_t>(r) * 7 + 3);
      }
      std::vector<int32_t> expected(rows);
      std::vector<float> expected_logprob(rows);
      for (int32_t r = 0; r < rows; ++r) {
        std::vector<float> row(logits.begin() + static_cast<ptrdiff_t>(r) * n_vocab,
                               logits.begin() + static_cast<ptrdiff_t>(r + 1) * n_vocab);
        const std::vector<float> raw = row;
        expected[static_cast<size_t>(r)] = kernels::sample_ref(
            row.data(), n_vocab, configs[static_cast<size_t>(r)],
            std::span(seen).subspan(static_cast<size_t>(offsets[static_cast<size_t>(r)]),
                                    static_cast<size_t>(offsets[static_cast<size_t>(r) + 1] - offsets[static_cast<size_t>(r)])),
            steps[static_cast<size_t>(r)]);
        expected_logprob[static_cast<size_t>(r)] =
            kernels::token_logprob_ref(raw.data(), n_vocab, expected[static_cast<size_t>(r)]);
      }
      const auto d_logits = test::to_device(logits), d_configs = test::to_device(configs),
                 d_seen = test::to_device(seen), d_offsets = test::to_device(offsets), d_steps = test::to_device(steps);
      kernels::DeviceBuffer tokens(rows * 4), logprobs(rows * 4);
      kernels::sample_cuda(d_logits.as<float>(), rows, n_vocab, d_configs.as<kernels::SamplingConfig>(),
                           d_seen.as<kernels::TokenCount>(), d_offsets.as<int32_t>(), d_steps.as<uint64_t>(),
                           tokens.as<int32_t>(), logprobs.as<float>(), nullptr);
      const auto got = test::to_host<int32_t>(tokens, rows);
      const auto got_logprob = test::to_host<float>(logprobs, rows);
      int mismatches = 0;
      double worst_logprob = 0.0;
      for (int32_t r = 0; r < rows; ++r) {
        if (got[static_cast<size_t>(r)] != expected[static_cast<size_t>(r)]) {
          ++mismatches;
          continue;
        }
        worst_logprob = std::max(worst_logprob, static_cast<double>(std::abs(got_logprob[static_cast<size_t>(r)] -
                                                                             expected_logprob[static_cast<size_t>(r)])));
      }
      MESSAGE(std::string(c.name) << ", vocabulary " << n_vocab << ": " << mismatches << " of " << rows
                     << " tokens differ; worst log-probability difference " << worst_logprob);
      if (c.exact) {
        CHECK(mismatches == 0);
      } else {
        CHECK(mismatches <= 3);
      }
      CHECK(worst_logprob < 1e-4);
    }
  }
}

TEST_CASE("argmax_cuda picks greedy sample_ref's token, lowest id on ties, over many blocks a row") {
  DEN_SKIP_WITHOUT_GPU();
  std::mt19937 rng(53);
  const kernels::SamplingConfig greedy{0.0f, 0, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0};
  for (int32_t n_vocab : {1, 37, 1002, 49152, 128256}) {
    for (int32_t rows : {1, 5}) {
      std::vector<float> logits = test::random_floats(rng, static_cast<size_t>(rows) * n_vocab, 3.0f);
      std::uniform_int_distribution<int32_t> pick(0, n_vocab - 1);
      for (int32_t r = 0; r < rows; ++r) {
        float* row = logits.data() + static_cast<ptrdiff_t>(r) * n_vocab;
        if (r % 2 == 1) {  // ties for the top, far apart (different blocks) and neighbours
          for (int k = 0; k < 4; ++k) row[pick(rng)] = 7.5f;
          if (n_vocab > 1) row[n_vocab - 1] = row[n_vocab - 2] = 7.5f;
        }
        if (r == 4) std::fill(row, row + n_vocab, -INFINITY);  // nothing better than -inf: id 0
      }
      std::vector<int32_t> expected(static_cast<size_t>(rows));
      for (int32_t r = 0; r < rows; ++r) {
        std::vector<float> row(logits.begin() + static_cast<ptrdiff_t>(r) * n_vocab,
                               logits.begin() + static_cast<ptrdiff_t>(r + 1) * n_vocab);
        expected[static_cast<size_t>(r)] = kernels::sample_ref(row.data(), n_vocab, greedy, {}, 0);
      }
      const auto d_logits = test::to_device(logits);
      kernels::DeviceBuffer tokens(static_cast<size_t>(rows) * 4), workspace(kernels::argmax_workspace_bytes(rows));
      kernels::check(cudaMemset(workspace.get(), 0, workspace.bytes()));
      for (int launch = 0; launch < 2; ++launch) {  // twice: the counters return to zero
        kernels::check(cudaMemset(tokens.get(), 0xff, tokens.bytes()));
        kernels::argmax_cuda(d_logits.as<float>(), rows, n_vocab, tokens.as<int32_t>(), workspace.get(), nullptr);
        CHECK(test::to_host<int32_t>(tokens, static_cast<size_t>(rows)) == expected);
      }
    }
  }
}
