// RMSNorm reference against double precision.
#include <algorithm>
#include <cmath>

#include "den/kernels/rmsnorm.h"
#include "test_support.h"

TEST_CASE("rmsnorm_ref matches the formula in double precision") {
  std::mt19937 rng(3);
  for (int64_t n : {1, 37, 576, 1002}) {
    const int64_t rows = 3;
    const auto x = den::test::random_floats(rng, static_cast<size_t>(rows * n), 3.0f);
    const auto w = den::test::random_floats(rng, static_cast<size_t>(n));
    std::vector<float> y(x.size(), std::nanf(""));
    den::kernels::rmsnorm_ref(x.data(), w.data(), y.data(), rows, n, 1e-5f);
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0.0;
      for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[static_cast<size_t>(r * n + i)]) * x[static_cast<size_t>(r * n + i)];
      const double inv = 1.0 / std::sqrt(ss / static_cast<double>(n) + 1e-5);
      for (int64_t i = 0; i < n; ++i) {
        const double ref = w[static_cast<size_t>(i)] * x[static_cast<size_t>(r * n + i)] * inv;
        REQUIRE(std::abs(y[static_cast<size_t>(r * n + i)] - ref) <= 1e-5 * std::abs(ref) + 1e-6);
      }
    }
  }
  // In place (y aliases x) gives the same result.
  auto x = den::test::random_floats(rng, 64);
  const auto w = den::test::random_floats(rng, 64);
  std::vector<float> y(64);
  den::kernels::rmsnorm_ref(x.data(), w.data(), y.data(), 1, 64, 1e-6f);
  den::kernels::rmsnorm_ref(x.data(), w.data(), x.data(), 1, 64, 1e-6f);
  CHECK(x == y);
}

TEST_CASE("residual_rmsnorm_ref adds the parts in order, then normalizes the new rows") {
  std::mt19937 rng(4);
  const int64_t rows = 3, n = 37;
  const int32_t n_parts = 3;
  const auto x = den::test::random_floats(rng, static_cast<size_t>(rows * n), 3.0f);
  const auto parts = den::test::random_floats(rng, static_cast<size_t>(n_parts * rows * n), 3.0f);
  const auto w = den::test::random_floats(rng, static_cast<size_t>(n));
  auto sum = x;
  for (size_t i = 0; i < sum.size(); ++i) sum[i] = ((sum[i] + parts[i]) + parts[sum.size() + i]) + parts[2 * sum.size() + i];
  std::vector<float> want(x.size());
  den::kernels::rmsnorm_ref(sum.data(), w.data(), want.data(), rows, n, 1e-5f);

  auto got_x = x;
  std::vector<float> got_y(x.size(), std::nanf(""));
  den::kernels::residual_rmsnorm_ref(parts.data(), n_parts, got_x.data(), w.data(), got_y.data(), rows, n, 1e-5f);
  CHECK(got_x == sum);
  CHECK(got_y == want);
  // Without norm weights: the add alone, the output untouched.
  auto add_x = x;
  std::vector<float> untouched(x.size(), 7.0f);
  den::kernels::residual_rmsnorm_ref(parts.data(), n_parts, add_x.data(), nullptr, untouched.data(), rows, n, 1e-5f);
  CHECK(add_x == sum);
  CHECK(std::all_of(untouched.begin(), untouched.end(), [](float v) { return v == 7.0f; }));
}
