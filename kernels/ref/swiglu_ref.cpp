// SwiGLU CPU reference (see den/kernels/swiglu.h).
#include <cmath>

#include "den/kernels/swiglu.h"

namespace den::kernels {

void swiglu_ref(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

}  // namespace den::kernels
