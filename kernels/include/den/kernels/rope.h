// Rotary position embedding applied in place to the heads of one token.
// Two pairings: interleaved (x[2i], x[2i+1]; GGUF "llama" after the converter's permute, and
// llama2.c) and NeoX (x[i], x[i + n_rot/2]; qwen2). Frequencies come precomputed so that
// Llama-3 scaling, linear scaling and per-dimension factors are all the caller's choice.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace den::kernels {

enum class RopeStyle : uint8_t { interleaved, neox };

struct RopeScaling {
  float freq_scale = 1.0f;                // linear scaling: positions multiplied by this
  std::span<const float> freq_factors;    // [n_rot / 2] divisors of each frequency, or empty
};

// inv_freq[i] = freq_scale / (base^(2i / n_rot) * factor[i]), computed in float as the
// Hugging Face reference does.
std::vector<float> rope_inverse_frequencies(int32_t n_rot, float base, const RopeScaling& scaling);

// x: [n_heads, head_dim], rotated in place over the first n_rot dims of each head.
// inv_freq: [n_rot / 2]
void rope_ref(float* x, int32_t n_heads, int32_t head_dim, int32_t n_rot, int32_t position,
              const float* inv_freq, RopeStyle style);

}  // namespace den::kernels
