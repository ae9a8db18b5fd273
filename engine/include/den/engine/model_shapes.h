// Shapes of real models, and random-weight GGUF files of those shapes for benchmarks
// (`den model new`). Weights ~ N(0, 0.02) (Irwin-Hall sum of four uniforms: cheap, bounded,
// close to normal), norm weights 1 + N(0, 0.02); deterministic for a seed, whatever the
// thread count.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "den/kernels/tensor_type.h"

namespace den::engine {

class GgufFile;

struct Llama3RopeScaling {
  float factor;
  float low_freq_factor;
  float high_freq_factor;
  int32_t original_context;
};

struct ModelShape {
  std::string name;
  int32_t n_vocab;
  int32_t n_embd;
  int32_t n_layers;
  int32_t n_heads;
  int32_t n_kv_heads;
  int32_t n_ff;
  int32_t n_ctx;
  float rope_base;
  float rms_eps;
  bool tied_output;
  std::optional<Llama3RopeScaling> llama3_scaling;
};

// "tiny", "llama-3.2-1b", "llama-3.1-8b"; throws std::invalid_argument listing them.
const ModelShape& model_shape(std::string_view name);
std::vector<std::string> model_shape_names();

// Per-dimension frequency divisors of Llama 3 scaling (the rope_freqs tensor of GGUF files).
std::vector<float> llama3_rope_factors(const Llama3RopeScaling& scaling, int32_t n_rot, float base);

struct RandomModelOptions {
  kernels::TensorType dtype = kernels::TensorType::bf16;  // f32, f16 or bf16
  uint64_t seed = 0;
  const GgufFile* vocab = nullptr;  // copy its tokenizer, else a synthetic one
  int n_threads = 0;
  std::function<void(uint64_t done, uint64_t total)> progress;
};

void write_random_model(const ModelShape& shape, const RandomModelOptions& options, const std::string& path);

}  // namespace den::engine
