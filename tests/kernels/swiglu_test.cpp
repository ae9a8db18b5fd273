// SwiGLU reference against double precision.
#include <cmath>

#include "den/kernels/swiglu.h"
#include "test_support.h"

TEST_CASE("swiglu_ref computes silu(gate) * up") {
  std::mt19937 rng(4);
  const auto gate = den::test::random_floats(rng, 1002, 4.0f);
  const auto up = den::test::random_floats(rng, 1002);
  std::vector<float> out(1002, std::nanf(""));
  den::kernels::swiglu_ref(gate.data(), up.data(), out.data(), 1002);
  for (size_t i = 0; i < out.size(); ++i) {
    const double g = gate[i];
    const double ref = g / (1.0 + std::exp(-g)) * up[i];
    REQUIRE(std::abs(out[i] - ref) <= 1e-6 * std::abs(ref) + 1e-7);
  }
}
