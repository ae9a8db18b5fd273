// fp16 / bf16 conversions against the compiler's own _Float16 arithmetic and exact rules.
#include <bit>
#include <cmath>
#include <limits>

#include "den/kernels/half.h"
#include "test_support.h"

using namespace den::kernels;

TEST_CASE("fp16 to float32 is exact for all 65536 values") {
  for (uint32_t h = 0; h < 65536; ++h) {
    const auto half = static_cast<uint16_t>(h);
    const float expected = static_cast<float>(std::bit_cast<_Float16>(half));
    const float got = fp16_to_f32(half);
    if (std::isnan(expected)) {
      CHECK(std::isnan(got));
    } else {
      REQUIRE(std::bit_cast<uint32_t>(got) == std::bit_cast<uint32_t>(expected));
    }
  }
}

TEST_CASE("float32 to fp16 rounds to nearest even like the compiler") {
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits;
  int checked = 0;
  for (int i = 0; i < 2000000; ++i) {
    const float f = std::bit_cast<float>(bits(rng));
    if (std::isnan(f)) continue;
    const auto expected = std::bit_cast<uint16_t>(static_cast<_Float16>(f));
    REQUIRE(f32_to_fp16(f) == expected);
    ++checked;
  }
  // Edges: halfway cases, the largest half, overflow, the smallest subnormal.
  for (float f : {65504.0f, 65519.99f, 65520.0f, 1e-8f, 2.98e-8f, 5.96e-8f, 6.1e-5f, -0.0f, 1.0f + 1.0f / 2048}) {
    CHECK(f32_to_fp16(f) == std::bit_cast<uint16_t>(static_cast<_Float16>(f)));
  }
  CHECK(checked > 1000000);
}

TEST_CASE("bf16 conversions: exact widening, round-to-nearest-even narrowing") {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = bf16_to_f32(static_cast<uint16_t>(b));
    CHECK(std::bit_cast<uint32_t>(f) == b << 16);
  }
  CHECK(f32_to_bf16(1.0f) == 0x3f80);
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3f808000u)) == 0x3f80);  // tie -> even
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3f818000u)) == 0x3f82);  // tie -> even (up)
  CHECK(f32_to_bf16(std::bit_cast<float>(0x3f808001u)) == 0x3f81);
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
}
