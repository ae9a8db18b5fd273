// The model's weights on the device in the compute type: f32 models stay f32, f16 stay f16,
// everything else (bf16 and the quantized formats, dequantized on the host) becomes bf16.
// Q, K, V are concatenated into one matrix and gate, up into another, so each is one product.
// Private to the CUDA backend.
#pragma once

#include <vector>

#include "den/engine/model.h"
#include "den/kernels/cuda_resources.h"
#include "den/kernels/dtype.h"

namespace den::engine::cuda {

struct DeviceLayer {
  kernels::DeviceBuffer attn_norm;  // [n_embd] f32
  kernels::DeviceBuffer qkv;        // [q_dim + 2 kv_dim, n_embd]
  kernels::DeviceBuffer qkv_bias;   // [q_dim + 2 kv_dim] f32, qwen2 only
  kernels::DeviceBuffer attn_output;  // [n_embd, q_dim]
  kernels::DeviceBuffer ffn_norm;   // [n_embd] f32
  kernels::DeviceBuffer gate_up;    // [2 n_ff, n_embd]: gate rows, then up rows
  kernels::DeviceBuffer down;       // [n_embd, n_ff]
};

struct DeviceWeights {
  kernels::DType type = kernels::DType::bf16;
  kernels::DeviceBuffer token_embd;   // [n_vocab, n_embd]
  kernels::DeviceBuffer output;       // [n_vocab, n_embd], empty when tied to token_embd
  kernels::DeviceBuffer output_norm;  // [n_embd] f32
  kernels::DeviceBuffer inv_freq;     // [n_rot / 2] f32
  std::vector<DeviceLayer> layers;
  int64_t bytes = 0;

  const void* output_matrix() const { return output.get() != nullptr ? output.get() : token_embd.get(); }
};

// The compute type for a model (from its largest tensors' type).
kernels::DType compute_type_of(const Model& model);

// Uploads every weight, converting on the host with `n_threads` threads.
DeviceWeights upload_weights(const Model& model, kernels::DType type, cudaStream_t stream, int n_threads);

}  // namespace den::engine::cuda
