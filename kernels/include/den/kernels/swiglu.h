// SwiGLU activation: out = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
#pragma once

#include <cstdint>

#include "den/kernels/cuda_stream.h"
#include "den/kernels/dtype.h"

namespace den::kernels {

// gate, up, out: [n] (out may alias gate)
void swiglu_ref(const float* gate, const float* up, float* out, int64_t n);

// On the device, over the output of the fused gate/up product: row t holds n_ff gate values
// then n_ff up values; out row t gets n_ff values in `out_type`.
// gate_up: [n_tokens, 2 * n_ff] float  out: [n_tokens, n_ff] out_type
void swiglu_cuda(const float* gate_up, void* out, DType out_type, int64_t n_tokens, int64_t n_ff, CudaStream stream);

}  // namespace den::kernels
