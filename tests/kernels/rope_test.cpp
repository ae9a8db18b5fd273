// RoPE reference against the rotation written out in double precision, both pairings.
#include <cmath>

#include "den/kernels/rope.h"
#include "test_support.h"

using namespace den::kernels;

namespace {

void check_rope(RopeStyle style, int32_t head_dim, int32_t n_rot, float base) {
  std::mt19937 rng(5);
  const int32_t n_heads = 3;
  for (int32_t position : {0, 1, 17, 1000, 30000}) {
    CAPTURE(position);
    const auto x = den::test::random_floats(rng, static_cast<size_t>(n_heads * head_dim));
    auto y = x;
    const std::vector<float> inv_freq = rope_inverse_frequencies(n_rot, base, {});
    rope_ref(y.data(), n_heads, head_dim, n_rot, position, inv_freq.data(), style);
    for (int32_t h = 0; h < n_heads; ++h) {
      for (int32_t i = 0; i < n_rot / 2; ++i) {
        const int32_t a = style == RopeStyle::interleaved ? 2 * i : i;
        const int32_t b = style == RopeStyle::interleaved ? 2 * i + 1 : i + n_rot / 2;
        // The angle is formed in float as the references do; the rotation itself in double.
        const double theta = static_cast<double>(static_cast<float>(position) * inv_freq[static_cast<size_t>(i)]);
        const double xa = x[static_cast<size_t>(h * head_dim + a)], xb = x[static_cast<size_t>(h * head_dim + b)];
        const double ra = xa * std::cos(theta) - xb * std::sin(theta);
        const double rb = xa * std::sin(theta) + xb * std::cos(theta);
        REQUIRE(std::abs(y[static_cast<size_t>(h * head_dim + a)] - ra) < 2e-6 * (std::abs(xa) + std::abs(xb)) + 1e-7);
        REQUIRE(std::abs(y[static_cast<size_t>(h * head_dim + b)] - rb) < 2e-6 * (std::abs(xa) + std::abs(xb)) + 1e-7);
      }
      // Dimensions past n_rot are left alone.
      for (int32_t d = n_rot; d < head_dim; ++d) {
        REQUIRE(y[static_cast<size_t>(h * head_dim + d)] == x[static_cast<size_t>(h * head_dim + d)]);
      }
    }
  }
}

}  // namespace

TEST_CASE("rope_ref rotates adjacent pairs (interleaved)") { check_rope(RopeStyle::interleaved, 64, 64, 10000.0f); }
TEST_CASE("rope_ref rotates half-split pairs (NeoX)") { check_rope(RopeStyle::neox, 128, 128, 1000000.0f); }
TEST_CASE("rope_ref with partial rotation leaves the rest") { check_rope(RopeStyle::neox, 64, 32, 10000.0f); }

TEST_CASE("inverse frequencies follow base^(-2i/n) with factors and linear scale") {
  const std::vector<float> factors = {1.0f, 2.0f, 4.0f, 8.0f};
  const auto plain = rope_inverse_frequencies(8, 500000.0f, {});
  const auto scaled = rope_inverse_frequencies(8, 500000.0f, RopeScaling{0.5f, factors});
  for (int i = 0; i < 4; ++i) {
    CHECK(plain[static_cast<size_t>(i)] == doctest::Approx(std::pow(500000.0, -2.0 * i / 8)).epsilon(1e-6));
    CHECK(scaled[static_cast<size_t>(i)] ==
          doctest::Approx(plain[static_cast<size_t>(i)] / factors[static_cast<size_t>(i)] * 0.5f).epsilon(1e-6));
  }
}
