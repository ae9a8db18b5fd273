// A decoder-only transformer loaded from GGUF: hyper-parameters (ModelConfig) and weight views
// into the memory-mapped file (Model). Architectures: `llama` (Llama 2/3, SmolLM2, TinyLlama,
// Mistral without sliding window) and `qwen2` (QKV bias, NeoX RoPE).
// Used by the backends (weights), the memory manager (KV layout, fingerprint) and the CLI.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "den/engine/gguf.h"
#include "den/engine/tokenizer.h"
#include "den/kernels/matmul.h"
#include "den/kernels/paged_kv.h"
#include "den/kernels/rope.h"

namespace den::engine {

struct ModelConfig {
  std::string architecture;  // GGUF general.architecture
  std::string name;          // general.name, or the file name
  int32_t n_vocab = 0;
  int32_t n_embd = 0;
  int32_t n_layers = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t n_ff = 0;
  int32_t n_ctx_train = 0;
  int32_t n_rot = 0;  // dims rotated by RoPE per head
  float rms_eps = 1e-5f;
  float rope_base = 10000.0f;
  kernels::RopeStyle rope_style = kernels::RopeStyle::interleaved;
  float rope_freq_scale = 1.0f;
  std::vector<float> rope_freq_factors;  // [n_rot / 2] or empty (Llama 3 scaling)
  bool qkv_bias = false;
  bool tied_output = false;  // output head shares token_embd

  int32_t q_dim() const { return n_heads * head_dim; }
  int32_t kv_dim() const { return n_kv_heads * head_dim; }
};

struct LayerWeights {
  std::vector<float> attn_norm;  // [n_embd]
  kernels::WeightMatrix attn_q;  // [q_dim rows, n_embd]
  kernels::WeightMatrix attn_k;  // [kv_dim rows, n_embd]
  kernels::WeightMatrix attn_v;  // [kv_dim rows, n_embd]
  std::vector<float> bias_q, bias_k, bias_v;  // qwen2 only
  kernels::WeightMatrix attn_output;  // [n_embd rows, q_dim]
  std::vector<float> ffn_norm;        // [n_embd]
  kernels::WeightMatrix ffn_gate;     // [n_ff rows, n_embd]
  kernels::WeightMatrix ffn_up;       // [n_ff rows, n_embd]
  kernels::WeightMatrix ffn_down;     // [n_embd rows, n_ff]
};

class Model {
 public:
  // Opens and validates a GGUF model file (shapes, types, hyper-parameters). Throws
  // std::runtime_error naming the file and what is wrong.
  static std::unique_ptr<Model> load(const std::string& path);

  const ModelConfig& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  const GgufFile& file() const { return *file_; }
  const std::string& path() const { return file_->path(); }

  const kernels::WeightMatrix& token_embd() const { return token_embd_; }
  const kernels::WeightMatrix& output() const { return output_; }
  const std::vector<float>& output_norm() const { return output_norm_; }
  const std::vector<LayerWeights>& layers() const { return layers_; }

  // Identifies the exact weights: KV computed by another model is never reused.
  uint64_t fingerprint() const { return fingerprint_; }

  // KV layout of this model for a given block size and element type.
  kernels::KvLayout kv_layout(int32_t block_tokens, kernels::DType dtype) const;

  // Bytes of every weight read to produce one token (output head included, embedding table
  // excluded): the numerator of the decode bandwidth floor.
  int64_t weight_bytes_per_token() const;
  // Parameters outside the embedding table (for model FLOPs = 2 x this x tokens).
  int64_t non_embedding_parameters() const;

 private:
  Model() = default;

  std::unique_ptr<GgufFile> file_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ModelConfig config_;
  kernels::WeightMatrix token_embd_;
  kernels::WeightMatrix output_;
  std::vector<float> output_norm_;
  std::vector<LayerWeights> layers_;
  uint64_t fingerprint_ = 0;
};

}  // namespace den::engine
