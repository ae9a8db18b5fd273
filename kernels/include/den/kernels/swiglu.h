// SwiGLU activation: out = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
#pragma once

#include <cstdint>

namespace den::kernels {

// gate, up, out: [n] (out may alias gate)
void swiglu_ref(const float* gate, const float* up, float* out, int64_t n);

}  // namespace den::kernels
