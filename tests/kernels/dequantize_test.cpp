// Every weight format against the gguf Python package's dequantizer (fixture made by
// scripts/make-quant-fixture), and matrix rows against their dequantized form.
#include <algorithm>
#include <cmath>
#include <string>

#include "den/engine/gguf.h"
#include "den/kernels/dequantize.h"
#include "test_support.h"

using namespace den;

TEST_CASE("dequantize_row_ref matches the gguf reference for every format") {
  const engine::GgufFile file(test::fixture_path("quant_blocks.gguf"));
  int formats = 0;
  for (const char* name : {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}) {
    CAPTURE(name);
    const engine::GgufTensor* raw = file.find_tensor(std::string(name) + ".raw");
    const engine::GgufTensor* expected = file.find_tensor(std::string(name) + ".f32");
    REQUIRE(raw != nullptr);
    REQUIRE(expected != nullptr);
    REQUIRE(kernels::name(raw->type) == name);
    const int64_t n = raw->dims[0];
    const int64_t row_bytes = kernels::row_bytes(raw->type, n);
    for (int64_t r = 0; r < raw->rows(); ++r) {
      std::vector<float> out(static_cast<size_t>(n), std::nanf(""));
      kernels::dequantize_row_ref(raw->type, raw->data + r * row_bytes, out.data(), n);
      const auto* ref = reinterpret_cast<const float*>(expected->data) + r * n;
      float max_ref = 0.0f, max_err = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        REQUIRE(std::isfinite(out[static_cast<size_t>(i)]));
        max_ref = std::max(max_ref, std::abs(ref[i]));
        max_err = std::max(max_err, std::abs(out[static_cast<size_t>(i)] - ref[i]));
      }
      // The reference rounds d*q and +m separately where Den fuses them: a few ulps at most.
      CHECK(max_err <= 4e-7f * max_ref);
      CHECK(max_ref > 0.0f);
    }
    ++formats;
  }
  CHECK(formats == 7);
}
