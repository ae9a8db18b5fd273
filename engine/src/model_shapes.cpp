// Model shapes and the random-weight model writer.
#include "den/engine/model_shapes.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numbers>
#include <stdexcept>
#include <thread>

#include "den/engine/gguf.h"
#include "den/engine/gguf_writer.h"
#include "den/kernels/half.h"

namespace den::engine {
namespace {

const std::vector<ModelShape>& shapes() {
  static const std::vector<ModelShape> all = {
      {"tiny", 512, 64, 2, 4, 2, 128, 2048, 10000.0f, 1e-5f, true, std::nullopt},
      {"llama-3.2-1b", 128256, 2048, 16, 32, 8, 8192, 131072, 500000.0f, 1e-5f, true,
       Llama3RopeScaling{32.0f, 1.0f, 4.0f, 8192}},
      {"llama-3.1-8b", 128256, 4096, 32, 32, 8, 14336, 131072, 500000.0f, 1e-5f, false,
       Llama3RopeScaling{8.0f, 1.0f, 4.0f, 8192}},
  };
  return all;
}

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Approximately N(0, 1): sum of four 16-bit uniforms, centred and scaled to unit variance.
inline float approx_normal(uint64_t r) {
  const float sum = static_cast<float>((r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48));
  constexpr float kScale = 1.7320508f / 65536.0f;  // sqrt(3) / 2^16: variance of U(0,1) is 1/12
  return (sum - 2.0f * 65535.5f) * kScale;
}

void encode_value(kernels::TensorType type, float value, uint8_t* out) {
  switch (type) {
    case kernels::TensorType::f32:
      std::memcpy(out, &value, 4);
      return;
    case kernels::TensorType::f16: {
      const uint16_t h = kernels::f32_to_fp16(value);
      std::memcpy(out, &h, 2);
      return;
    }
    case kernels::TensorType::bf16: {
      const uint16_t h = kernels::f32_to_bf16(value);
      std::memcpy(out, &h, 2);
      return;
    }
    default:
      throw std::invalid_argument("random models are written in f32, f16 or bf16 only");
  }
}

struct TensorPlan {
  std::string name;
  std::vector<int64_t> dims;
  kernels::TensorType type;
  float mean;  // 0 for weights, 1 for norms
  std::vector<float> fixed;  // exact values (rope_freqs), else empty
};

void synthetic_vocabulary(GgufWriter& w, int32_t n_vocab) {
  // A SentencePiece-style vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then pieces made
  // of letters so that text round-trips through byte fallback and merges.
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<int32_t> types = {2, 3, 3};
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    tokens.emplace_back(buf);
    types.push_back(6);
  }
  const std::string letters = "abcdefghijklmnopqrstuvwxyz";
  for (int64_t i = 0; static_cast<int32_t>(tokens.size()) < n_vocab; ++i) {
    std::string piece = "\xe2\x96\x81";  // word-initial marker
    int64_t k = i;
    do {
      piece += letters[static_cast<size_t>(k % 26)];
      k /= 26;
    } while (k > 0);
    tokens.push_back(piece);
    types.push_back(1);
  }
  std::vector<float> scores(tokens.size(), 0.0f);
  for (size_t i = 259; i < scores.size(); ++i) scores[i] = -static_cast<float>(i);
  w.set_string("tokenizer.ggml.model", "llama");
  w.set_string_array("tokenizer.ggml.tokens", std::move(tokens));
  w.set_f32_array("tokenizer.ggml.scores", std::move(scores));
  w.set_i32_array("tokenizer.ggml.token_type", std::move(types));
  w.set_u32("tokenizer.ggml.bos_token_id", 1);
  w.set_u32("tokenizer.ggml.eos_token_id", 2);
  w.set_u32("tokenizer.ggml.unknown_token_id", 0);
}

void copied_vocabulary(GgufWriter& w, const GgufFile& vocab, int32_t n_vocab) {
  const auto tokens = vocab.get_string_array("tokenizer.ggml.tokens");
  if (static_cast<int64_t>(tokens.size()) != n_vocab) {
    throw std::invalid_argument("vocabulary '" + vocab.path() + "' has " + std::to_string(tokens.size()) +
                                " tokens but the shape needs " + std::to_string(n_vocab));
  }
  for (const auto& [key, value] : vocab.metadata()) {
    if (key.starts_with("tokenizer.")) w.copy_key(vocab, key);
  }
}

}  // namespace

const ModelShape& model_shape(std::string_view name) {
  for (const ModelShape& s : shapes()) {
    if (s.name == name) return s;
  }
  std::string known;
  for (const std::string& n : model_shape_names()) known += (known.empty() ? "" : ", ") + n;
  throw std::invalid_argument("unknown model shape '" + std::string(name) + "' (known: " + known + ")");
}

std::vector<std::string> model_shape_names() {
  std::vector<std::string> names;
  for (const ModelShape& s : shapes()) names.push_back(s.name);
  return names;
}

std::vector<float> llama3_rope_factors(const Llama3RopeScaling& s, int32_t n_rot, float base) {
  const double low_freq_wavelen = s.original_context / s.low_freq_factor;
  const double high_freq_wavelen = s.original_context / s.high_freq_factor;
  std::vector<float> factors;
  for (int32_t i = 0; i < n_rot; i += 2) {
    const double freq = 1.0 / std::pow(static_cast<double>(base), static_cast<double>(i) / n_rot);
    const double wavelen = 2.0 * std::numbers::pi / freq;
    double factor;
    if (wavelen < high_freq_wavelen) {
      factor = 1.0;
    } else if (wavelen > low_freq_wavelen) {
      factor = s.factor;
    } else {
      const double smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      factor = 1.0 / ((1.0 - smooth) / s.factor + smooth);
    }
    factors.push_back(static_cast<float>(factor));
  }
  return factors;
}

void write_random_model(const ModelShape& shape, const RandomModelOptions& options, const std::string& path) {
  using kernels::TensorType;
  if (options.dtype != TensorType::f32 && options.dtype != TensorType::f16 && options.dtype != TensorType::bf16) {
    throw std::invalid_argument("random models are written in f32, f16 or bf16 only");
  }
  const int32_t head_dim = shape.n_embd / shape.n_heads;
  GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.set_string("general.name", "den-random-" + shape.name);
  w.set_u32("llama.context_length", static_cast<uint32_t>(shape.n_ctx));
  w.set_u32("llama.embedding_length", static_cast<uint32_t>(shape.n_embd));
  w.set_u32("llama.block_count", static_cast<uint32_t>(shape.n_layers));
  w.set_u32("llama.feed_forward_length", static_cast<uint32_t>(shape.n_ff));
  w.set_u32("llama.attention.head_count", static_cast<uint32_t>(shape.n_heads));
  w.set_u32("llama.attention.head_count_kv", static_cast<uint32_t>(shape.n_kv_heads));
  w.set_u32("llama.rope.dimension_count", static_cast<uint32_t>(head_dim));
  w.set_f32("llama.rope.freq_base", shape.rope_base);
  w.set_f32("llama.attention.layer_norm_rms_epsilon", shape.rms_eps);
  w.set_u32("llama.vocab_size", static_cast<uint32_t>(shape.n_vocab));
  if (options.vocab != nullptr) {
    copied_vocabulary(w, *options.vocab, shape.n_vocab);
  } else {
    synthetic_vocabulary(w, shape.n_vocab);
  }

  std::vector<TensorPlan> plan;
  const TensorType dt = options.dtype;
  plan.push_back({"token_embd.weight", {shape.n_embd, shape.n_vocab}, dt, 0.0f, {}});
  if (shape.llama3_scaling) {
    plan.push_back({"rope_freqs.weight", {head_dim / 2}, TensorType::f32, 0.0f,
                    llama3_rope_factors(*shape.llama3_scaling, head_dim, shape.rope_base)});
  }
  const int64_t q_dim = int64_t{shape.n_heads} * head_dim, kv_dim = int64_t{shape.n_kv_heads} * head_dim;
  for (int32_t l = 0; l < shape.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    plan.push_back({p + "attn_norm.weight", {shape.n_embd}, TensorType::f32, 1.0f, {}});
    plan.push_back({p + "attn_q.weight", {shape.n_embd, q_dim}, dt, 0.0f, {}});
    plan.push_back({p + "attn_k.weight", {shape.n_embd, kv_dim}, dt, 0.0f, {}});
    plan.push_back({p + "attn_v.weight", {shape.n_embd, kv_dim}, dt, 0.0f, {}});
    plan.push_back({p + "attn_output.weight", {q_dim, shape.n_embd}, dt, 0.0f, {}});
    plan.push_back({p + "ffn_norm.weight", {shape.n_embd}, TensorType::f32, 1.0f, {}});
    plan.push_back({p + "ffn_gate.weight", {shape.n_embd, shape.n_ff}, dt, 0.0f, {}});
    plan.push_back({p + "ffn_up.weight", {shape.n_embd, shape.n_ff}, dt, 0.0f, {}});
    plan.push_back({p + "ffn_down.weight", {shape.n_ff, shape.n_embd}, dt, 0.0f, {}});
  }
  plan.push_back({"output_norm.weight", {shape.n_embd}, TensorType::f32, 1.0f, {}});
  if (!shape.tied_output) plan.push_back({"output.weight", {shape.n_embd, shape.n_vocab}, dt, 0.0f, {}});
  for (const TensorPlan& t : plan) w.add_tensor(t.name, t.type, t.dims);

  const int n_threads = options.n_threads > 0 ? options.n_threads
                                              : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  w.write(
      path,
      [&](size_t index, int64_t first_row, std::span<uint8_t> bytes) {
        const TensorPlan& t = plan[index];
        const int64_t row_elements = t.dims[0];
        const int64_t elem_bytes = kernels::traits(t.type).block_bytes;
        const auto n_rows = static_cast<int64_t>(bytes.size()) / (row_elements * elem_bytes);
        // Each row draws from its own stream (seed, tensor, row): the file does not depend on
        // chunking or thread count.
        auto fill_rows = [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            uint64_t state = options.seed ^ (static_cast<uint64_t>(index) << 40) ^ static_cast<uint64_t>(first_row + r);
            splitmix64(state);
            uint8_t* out = bytes.data() + r * row_elements * elem_bytes;
            for (int64_t e = 0; e < row_elements; ++e) {
              const float value = !t.fixed.empty() ? t.fixed[static_cast<size_t>(e)]
                                                   : t.mean + 0.02f * approx_normal(splitmix64(state));
              encode_value(t.type, value, out + e * elem_bytes);
            }
          }
        };
        if (n_rows < 64 || n_threads == 1) {
          fill_rows(0, n_rows);
          return;
        }
        std::vector<std::thread> workers;
        for (int k = 0; k < n_threads; ++k) {
          const int64_t r0 = n_rows * k / n_threads, r1 = n_rows * (k + 1) / n_threads;
          workers.emplace_back(fill_rows, r0, r1);
        }
        for (std::thread& th : workers) th.join();
      },
      options.progress);
}

}  // namespace den::engine
