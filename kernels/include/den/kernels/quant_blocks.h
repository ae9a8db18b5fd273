// Byte layouts of the quantized block formats (as GGUF/ggml defines them).
// Exposes one struct per format; used by the dequantizers (CPU and CUDA) and the tests.
#pragma once

#include <cstdint>

namespace den::kernels {

inline constexpr int kQk = 32;    // elements per block of the legacy formats
inline constexpr int kQkK = 256;  // elements per super-block of the k-quants

// w = d * q, q in [-128, 127]
struct BlockQ8_0 {
  uint16_t d;  // fp16 scale
  int8_t qs[kQk];
};
// w = d * (q - 8), q a nibble; element j < 16 in the low nibble of qs[j], j >= 16 in the high one
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[kQk / 2];
};
// w = d * q + m, nibble order as Q4_0
struct BlockQ4_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[kQk / 2];
};
// 8 sub-blocks of 32 with 6-bit scales and mins packed in `scales`;
// w = d * scale_j * q - dmin * min_j
struct BlockQ4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qs[kQkK / 2];
};
// 16 sub-blocks of 16 with int8 scales; 6-bit q = 4 low bits (ql) + 2 high bits (qh), offset 32;
// w = d * scale_j * (q - 32)
struct BlockQ6_K {
  uint8_t ql[kQkK / 2];
  uint8_t qh[kQkK / 4];
  int8_t scales[kQkK / 16];
  uint16_t d;
};

static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ6_K) == 210);

}  // namespace den::kernels
