// RoPE CPU reference (see den/kernels/rope.h).
#include <cmath>

#include "den/kernels/rope.h"

namespace den::kernels {

std::vector<float> rope_inverse_frequencies(int32_t n_rot, float base, const RopeScaling& scaling) {
  std::vector<float> inv_freq(static_cast<size_t>(n_rot / 2));
  for (int32_t i = 0; i < n_rot / 2; ++i) {
    float f = 1.0f / std::pow(base, static_cast<float>(2 * i) / static_cast<float>(n_rot));
    if (!scaling.freq_factors.empty()) f /= scaling.freq_factors[static_cast<size_t>(i)];
    inv_freq[static_cast<size_t>(i)] = f * scaling.freq_scale;
  }
  return inv_freq;
}

void rope_ref(float* x, int32_t n_heads, int32_t head_dim, int32_t n_rot, int32_t position, const float* inv_freq,
              RopeStyle style) {
  const int32_t half = n_rot / 2;
  for (int32_t i = 0; i < half; ++i) {
    const float theta = static_cast<float>(position) * inv_freq[i];
    const float c = std::cos(theta);
    const float s = std::sin(theta);
    for (int32_t h = 0; h < n_heads; ++h) {
      float* head = x + static_cast<int64_t>(h) * head_dim;
      float& a = style == RopeStyle::interleaved ? head[2 * i] : head[i];
      float& b = style == RopeStyle::interleaved ? head[2 * i + 1] : head[i + half];
      const float a0 = a, b0 = b;
      a = a0 * c - b0 * s;
      b = a0 * s + b0 * c;
    }
  }
}

}  // namespace den::kernels
