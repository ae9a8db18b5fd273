// CPU reference dequantizers, one per block format; the CUDA dequantizers are tested against
// them. The formats the CPU backend meets most (Q8_0, Q4_0, Q4_1, F16, BF16) have an AVX2 path
// next to the portable one; both compute the same floats (same single-rounding fma), so the
// result never depends on the machine.
#include <cmath>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DEN_DEQUANT_AVX2 1
#endif

#include "den/kernels/dequantize.h"
#include "den/kernels/half.h"
#include "den/kernels/quant_blocks.h"

namespace den::kernels {
namespace {

#ifdef DEN_DEQUANT_AVX2
// 16 nibbles of `raw` (low halves, then high halves) to 32 floats d * q + m.
inline void store_nibbles(__m128i raw, __m256 d, __m256 m, int offset_q, float* out) {
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(raw, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
  const __m128i off = _mm_set1_epi8(static_cast<char>(offset_q));
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int k = 0; k < 4; ++k) {
    const __m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[k]), _mm256_cvtepu8_epi32(off));
    _mm256_storeu_ps(out + 8 * k, _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q), m));
  }
}
#endif

void dequantize_q8_0(const BlockQ8_0* blocks, float* dst, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const float d = fp16_to_f32(blocks[b].d);
#ifdef DEN_DEQUANT_AVX2
    const __m256 vd = _mm256_set1_ps(d);
    for (int k = 0; k < 4; ++k) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blocks[b].qs + 8 * k));
      _mm256_storeu_ps(dst + b * kQk + 8 * k, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8))));
    }
#else
    for (int j = 0; j < kQk; ++j) dst[b * kQk + j] = d * static_cast<float>(blocks[b].qs[j]);
#endif
  }
}

void dequantize_q4_0(const BlockQ4_0* blocks, float* dst, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const float d = fp16_to_f32(blocks[b].d);
    float* out = dst + b * kQk;
#ifdef DEN_DEQUANT_AVX2
    // d * (q - 8) + 0: the fma adds an exact zero, so it rounds once, like the scalar product.
    store_nibbles(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks[b].qs)), _mm256_set1_ps(d),
                  _mm256_setzero_ps(), 8, out);
#else
    for (int j = 0; j < kQk / 2; ++j) {
      out[j] = d * static_cast<float>((blocks[b].qs[j] & 0x0f) - 8);
      out[j + kQk / 2] = d * static_cast<float>((blocks[b].qs[j] >> 4) - 8);
    }
#endif
  }
}

void dequantize_q4_1(const BlockQ4_1* blocks, float* dst, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const float d = fp16_to_f32(blocks[b].d);
    const float m = fp16_to_f32(blocks[b].m);
    float* out = dst + b * kQk;
#ifdef DEN_DEQUANT_AVX2
    store_nibbles(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks[b].qs)), _mm256_set1_ps(d),
                  _mm256_set1_ps(m), 0, out);
#else
    for (int j = 0; j < kQk / 2; ++j) {
      out[j] = std::fma(d, static_cast<float>(blocks[b].qs[j] & 0x0f), m);
      out[j + kQk / 2] = std::fma(d, static_cast<float>(blocks[b].qs[j] >> 4), m);
    }
#endif
  }
}

// Sub-block j's 6-bit scale and min from the 12 packed bytes of a Q4_K super-block.
void q4_k_scale_min(int j, const uint8_t* packed, uint8_t& scale, uint8_t& min) {
  if (j < 4) {
    scale = packed[j] & 63;
    min = packed[j + 4] & 63;
  } else {
    scale = static_cast<uint8_t>((packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4));
    min = static_cast<uint8_t>((packed[j + 4] >> 4) | ((packed[j] >> 6) << 4));
  }
}

void dequantize_q4_k(const BlockQ4_K* blocks, float* dst, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const BlockQ4_K& block = blocks[b];
    const float d = fp16_to_f32(block.d);
    const float dmin = fp16_to_f32(block.dmin);
    float* out = dst + b * kQkK;
    const uint8_t* q = block.qs;
    // Each 32 bytes of qs hold two sub-blocks: low nibbles, then high nibbles.
    for (int pair = 0; pair < 4; ++pair) {
      uint8_t sc_lo, m_lo, sc_hi, m_hi;
      q4_k_scale_min(2 * pair, block.scales, sc_lo, m_lo);
      q4_k_scale_min(2 * pair + 1, block.scales, sc_hi, m_hi);
      const float d_lo = d * sc_lo, min_lo = dmin * m_lo;
      const float d_hi = d * sc_hi, min_hi = dmin * m_hi;
      for (int l = 0; l < 32; ++l) out[l] = d_lo * static_cast<float>(q[l] & 0x0f) - min_lo;
      for (int l = 0; l < 32; ++l) out[32 + l] = d_hi * static_cast<float>(q[l] >> 4) - min_hi;
      out += 64;
      q += 32;
    }
  }
}

void dequantize_q6_k(const BlockQ6_K* blocks, float* dst, int64_t n_blocks) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const BlockQ6_K& block = blocks[b];
    const float d = fp16_to_f32(block.d);
    float* out = dst + b * kQkK;
    const uint8_t* ql = block.ql;
    const uint8_t* qh = block.qh;
    const int8_t* sc = block.scales;
    // Two halves of 128 elements; each uses 64 bytes of ql, 32 of qh and 8 scales.
    for (int half = 0; half < 2; ++half) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        out[l] = d * static_cast<float>(sc[is] * q1);
        out[l + 32] = d * static_cast<float>(sc[is + 2] * q2);
        out[l + 64] = d * static_cast<float>(sc[is + 4] * q3);
        out[l + 96] = d * static_cast<float>(sc[is + 6] * q4);
      }
      out += 128;
      ql += 64;
      qh += 32;
      sc += 8;
    }
  }
}

}  // namespace

void dequantize_row_ref(TensorType type, const void* src, float* dst, int64_t n) {
  switch (type) {
    case TensorType::f32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case TensorType::f16: {
      const auto* h = static_cast<const uint16_t*>(src);
      int64_t i = 0;
#ifdef DEN_DEQUANT_AVX2
      for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
      }
#endif
      for (; i < n; ++i) dst[i] = fp16_to_f32(h[i]);
      return;
    }
    case TensorType::bf16: {
      const auto* h = static_cast<const uint16_t*>(src);
      int64_t i = 0;
#ifdef DEN_DEQUANT_AVX2
      for (; i + 8 <= n; i += 8) {
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
      }
#endif
      for (; i < n; ++i) dst[i] = bf16_to_f32(h[i]);
      return;
    }
    case TensorType::q8_0:
      return dequantize_q8_0(static_cast<const BlockQ8_0*>(src), dst, n / kQk);
    case TensorType::q4_0:
      return dequantize_q4_0(static_cast<const BlockQ4_0*>(src), dst, n / kQk);
    case TensorType::q4_1:
      return dequantize_q4_1(static_cast<const BlockQ4_1*>(src), dst, n / kQk);
    case TensorType::q4_k:
      return dequantize_q4_k(static_cast<const BlockQ4_K*>(src), dst, n / kQkK);
    case TensorType::q6_k:
      return dequantize_q6_k(static_cast<const BlockQ6_K*>(src), dst, n / kQkK);
  }
}

}  // namespace den::kernels
