// dot_ref and matmul_rows_ref: accuracy against double precision, and the property the CPU
// backend's batch invariance rests on: a row's result does not depend on the other tokens.
#include <cmath>
#include <cstring>

#include "den/kernels/dequantize.h"
#include "den/kernels/half.h"
#include "den/kernels/matmul.h"
#include "den/kernels/quant_blocks.h"
#include "test_support.h"

using namespace den;

TEST_CASE("dot_ref is accurate for every length") {
  std::mt19937 rng(1);
  for (int64_t n : {1, 7, 15, 16, 17, 37, 64, 576, 1002, 4099}) {
    CAPTURE(n);
    const auto a = test::random_floats(rng, static_cast<size_t>(n));
    const auto b = test::random_floats(rng, static_cast<size_t>(n));
    double exact = 0.0, magnitude = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      exact += static_cast<double>(a[static_cast<size_t>(i)]) * b[static_cast<size_t>(i)];
      magnitude += std::abs(static_cast<double>(a[static_cast<size_t>(i)]) * b[static_cast<size_t>(i)]);
    }
    CHECK(std::abs(kernels::dot_ref(a.data(), b.data(), n) - exact) <= 1e-6 * magnitude + 1e-30);
  }
}

namespace {

// A random Q8_0 matrix of n_out rows of n_in.
std::vector<kernels::BlockQ8_0> random_q8_0(std::mt19937& rng, int64_t n_out, int64_t n_in) {
  std::vector<kernels::BlockQ8_0> blocks(static_cast<size_t>(n_out * n_in / kernels::kQk));
  std::uniform_int_distribution<int> q(-127, 127);
  std::uniform_real_distribution<float> d(0.001f, 0.02f);
  for (auto& b : blocks) {
    b.d = kernels::f32_to_fp16(d(rng));
    for (auto& v : b.qs) v = static_cast<int8_t>(q(rng));
  }
  return blocks;
}

}  // namespace

TEST_CASE("matmul_rows_ref: each output is the dot of the dequantized row, whatever the batch") {
  std::mt19937 rng(2);
  const int64_t n_in = 96, n_out = 37, n_tokens = 5;
  const auto blocks = random_q8_0(rng, n_out, n_in);
  const kernels::WeightMatrix w{kernels::TensorType::q8_0, blocks.data(), n_in, n_out};
  const auto x = test::random_floats(rng, static_cast<size_t>(n_tokens * n_in));
  std::vector<float> scratch(static_cast<size_t>(n_in));

  std::vector<float> batched(static_cast<size_t>(n_tokens * n_out), std::nanf(""));
  kernels::matmul_rows_ref(w, x.data(), n_tokens, batched.data(), n_out, 0, n_out, scratch.data());
  for (int64_t t = 0; t < n_tokens; ++t) {
    std::vector<float> single(static_cast<size_t>(n_out), std::nanf(""));
    // Rows in two ranges, as two threads would split them.
    kernels::matmul_rows_ref(w, x.data() + t * n_in, 1, single.data(), n_out, 0, 20, scratch.data());
    kernels::matmul_rows_ref(w, x.data() + t * n_in, 1, single.data(), n_out, 20, n_out, scratch.data());
    for (int64_t r = 0; r < n_out; ++r) {
      std::vector<float> row(static_cast<size_t>(n_in));
      kernels::dequantize_row_ref(w.type, &blocks[static_cast<size_t>(r * n_in / kernels::kQk)], row.data(), n_in);
      const float expected = kernels::dot_ref(row.data(), x.data() + t * n_in, n_in);
      REQUIRE(std::memcmp(&single[static_cast<size_t>(r)], &expected, sizeof(float)) == 0);
      REQUIRE(std::memcmp(&batched[static_cast<size_t>(t * n_out + r)], &expected, sizeof(float)) == 0);
    }
  }
}
