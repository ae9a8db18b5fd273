// Small-batch matrix-vector products for decode (1 to 8 tokens), reading every weight once
// with 16-byte loads, fp32 accumulation, and the neighbouring element-wise work fused in so a
// decode layer is five launches instead of ten:
//   prologue: RMSNorm of a float input, each block computing the tokens' inverse RMS from the
//             rows it reads anyway (no separate norm kernel, no grid-wide step to share it);
//   epilogue: store; accumulate into the residual stream; SwiGLU of paired gate/up rows; or
//             bias + RoPE + KV store of paired Q/K rows (V rows go to the cache as they are).
// Every epilogue works on pairs of output rows (the pair it needs). One token (f16/bf16 weights,
// n_in up to 16,384): blocks of 256 threads own contiguous, equal ranges of pairs, each thread
// holding its slices of the input in registers while the weights stream past. Two to eight
// tokens, or f32 weights: each warp walks whole pairs, the input read through L1. CPU twin:
// gemv_ref, composed of the reference ops, so the GPU is checked against the same math the CPU
// backend runs.
#pragma once

#include <cstdint>

#include "den/kernels/cuda_stream.h"
#include "den/kernels/dtype.h"
#include "den/kernels/paged_kv.h"
#include "den/kernels/qkv_rope_store.h"

namespace den::kernels {

inline constexpr int32_t kGemvMaxTokens = 8;

enum class GemvEpilogue : uint8_t {
  store,       // y[t, r] = w_r . x_t                                   y: float [n_tokens, n_out]
  accumulate,  // y[t, r] += w_r . x_t                                  y: float [n_tokens, n_out]
  swiglu,      // rows r (gate) and n_out/2 + r (up): y[t, r] = silu(g) * u, y: weight type [n_tokens, n_out/2]
  rope_store,  // fused Q/K/V rows: bias, RoPE of Q and K, Q to y (weight type [n_tokens, q_dim]), K/V to pages
};

struct GemvInput {
  const void* x = nullptr;   // [*, n_in]: float when norm_weight is set, else the weight type
  const int32_t* rows = nullptr;  // token t reads x row rows[t] (null: row t)
  // [n_in]: RMSNorm first, norm_weight * (x_t / sqrt(mean(x_t^2) + eps)) (x must be float)
  const float* norm_weight = nullptr;
  float eps = 1e-5f;
  // The first layer's products, with norm_weight: x is the token-embedding table (weight type,
  // [n_vocab, n_in]) and token t's input its row embed_ids[row]; the first block also writes
  // that row, in float, to embed_out [*, n_in] (the residual stream), so no gather kernel
  // runs before. Only where gemv_gathers_embedding().
  const int32_t* embed_ids = nullptr;
  float* embed_out = nullptr;
};

// For the rope_store epilogue.
struct GemvRope {
  QkvShape shape;             // n_rot must equal head_dim
  const float* bias = nullptr;     // [q_dim + 2 kv_dim] or null
  const float* inv_freq = nullptr; // [n_rot / 2]
  PagedKvView kv;
  PagedBatch batch;           // token t of the product is token t of the batch
  int32_t layer = 0;
};

// CPU twin on host memory. rope (for rope_store) gives the host pool and per-token sequences.
struct GemvRopeRef {
  QkvShape shape;
  const float* bias = nullptr;
  const float* inv_freq = nullptr;
  PagedKvView kv;
  const PagedSequence* sequences = nullptr;
  const int32_t* token_seq = nullptr;
  const int32_t* token_pos = nullptr;
  int32_t layer = 0;
};
void gemv_ref(const void* weights, DType weight_type, int64_t n_in, int64_t n_out, const GemvInput& input,
              int32_t n_tokens, GemvEpilogue epilogue, void* y, const GemvRopeRef* rope);

// True when the product can run here: 1..8 tokens, n_in a multiple of the 16-byte vector.
bool gemv_supported(DType weight_type, int64_t n_in, int32_t n_tokens);
// True when the product can read its input from the embedding table (GemvInput::embed_ids):
// the single-token kernel (one token, half weights, rows of up to 16,384).
bool gemv_gathers_embedding(DType weight_type, int64_t n_in, int32_t n_tokens);

// weights: [n_out, n_in] in weight_type (device)
void gemv_cuda(const void* weights, DType weight_type, int64_t n_in, int64_t n_out, const GemvInput& input,
               int32_t n_tokens, GemvEpilogue epilogue, void* y, const GemvRope* rope, CudaStream stream);

}  // namespace den::kernels
