// Model loading: hyper-parameters from GGUF metadata, weight views into the mapping, every
// shape checked against the hyper-parameters before anything runs.
#include "den/engine/model.h"

#include <xxhash.h>

#include <algorithm>
#include <stdexcept>

#include "den/kernels/dequantize.h"

namespace den::engine {
namespace {

class Loader {
 public:
  Loader(const GgufFile& file, std::string arch) : file_(file), arch_(std::move(arch)) {}

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("cannot load model '" + file_.path() + "': " + what);
  }

  std::string key(std::string_view suffix) const { return arch_ + "." + std::string(suffix); }

  int32_t positive(std::string_view suffix, std::optional<int64_t> fallback = std::nullopt) const {
    auto v = file_.get_int_opt(key(suffix));
    if (!v) v = fallback;
    if (!v) fail("required key '" + key(suffix) + "' is missing");
    if (*v <= 0 || *v > (int64_t{1} << 30)) {
      fail("key '" + key(suffix) + "' is " + std::to_string(*v) + ", expected a positive size");
    }
    return static_cast<int32_t>(*v);
  }

  const GgufTensor& tensor(const std::string& name, std::initializer_list<int64_t> dims) const {
    const GgufTensor* t = file_.find_tensor(name);
    if (t == nullptr) fail("tensor '" + name + "' is missing");
    if (!std::equal(t->dims.begin(), t->dims.end(), dims.begin(), dims.end())) {
      std::string expected = "[";
      for (int64_t d : dims) expected += (expected.size() > 1 ? ", " : "") + std::to_string(d);
      fail("tensor '" + name + "' has shape " + t->shape_string() + ", expected " + expected + "]");
    }
    return *t;
  }

  kernels::WeightMatrix matrix(const std::string& name, int64_t n_in, int64_t n_out) const {
    const GgufTensor& t = tensor(name, {n_in, n_out});
    return {t.type, t.data, n_in, n_out};
  }

  std::vector<float> vector(const std::string& name, int64_t n) const {
    const GgufTensor& t = tensor(name, {n});
    std::vector<float> out(static_cast<size_t>(n));
    kernels::dequantize_row_ref(t.type, t.data, out.data(), n);
    return out;
  }

  bool has(const std::string& name) const { return file_.find_tensor(name) != nullptr; }

 private:
  const GgufFile& file_;
  std::string arch_;
};

uint64_t fingerprint_of(const GgufFile& file) {
  // Header, metadata and tensor table in full, plus the first and last 4 KiB of every tensor:
  // any re-quantisation, fine-tune or shape change moves it, and it costs no full read of a
  // multi-gigabyte file at every start.
  XXH3_state_t* state = XXH3_createState();
  if (state == nullptr) throw std::bad_alloc();
  XXH3_64bits_reset(state);
  XXH3_64bits_update(state, file.bytes().data(), file.header_bytes());
  constexpr int64_t kEdge = 4096;
  for (const GgufTensor& t : file.tensors()) {
    XXH3_64bits_update(state, t.data, static_cast<size_t>(std::min(kEdge, t.n_bytes)));
    if (t.n_bytes > kEdge) XXH3_64bits_update(state, t.data + t.n_bytes - kEdge, kEdge);
  }
  const uint64_t size = file.file_bytes();
  XXH3_64bits_update(state, &size, sizeof size);
  const uint64_t h = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return h;
}

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& path) {
  std::unique_ptr<Model> m(new Model());
  m->file_ = std::make_unique<GgufFile>(path);
  const GgufFile& f = *m->file_;
  ModelConfig& c = m->config_;

  c.architecture = std::string(f.get_string("general.architecture"));
  if (c.architecture != "llama" && c.architecture != "qwen2") {
    throw std::runtime_error("cannot load model '" + path + "': architecture '" + c.architecture +
                             "' is not supported (supported: llama, qwen2)");
  }
  const Loader load(f, c.architecture);
  c.name = std::string(f.get_string_opt("general.name").value_or(path.substr(path.find_last_of('/') + 1)));
  if (f.get_int_opt(load.key("expert_count")).value_or(0) > 0) {
    load.fail("mixture-of-experts models are not supported");
  }

  c.n_embd = load.positive("embedding_length");
  c.n_layers = load.positive("block_count");
  c.n_ff = load.positive("feed_forward_length");
  c.n_heads = load.positive("attention.head_count");
  c.n_kv_heads = load.positive("attention.head_count_kv", c.n_heads);
  c.n_ctx_train = load.positive("context_length");
  if (c.n_embd % c.n_heads != 0 && !f.find(load.key("attention.key_length"))) {
    load.fail("embedding length " + std::to_string(c.n_embd) + " is not a multiple of the head count " +
              std::to_string(c.n_heads));
  }
  c.head_dim = load.positive("attention.key_length", c.n_embd / c.n_heads);
  if (load.positive("attention.value_length", c.head_dim) != c.head_dim) {
    load.fail("different key and value head sizes are not supported");
  }
  if (c.head_dim > kernels::kMaxHeadDim || c.head_dim % 2 != 0) {
    load.fail("head size " + std::to_string(c.head_dim) + " is not supported (even, at most " +
              std::to_string(kernels::kMaxHeadDim) + ")");
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    load.fail(std::to_string(c.n_heads) + " attention heads cannot be grouped over " + std::to_string(c.n_kv_heads) +
              " KV heads");
  }
  c.n_rot = load.positive("rope.dimension_count", c.head_dim);
  if (c.n_rot > c.head_dim || c.n_rot % 2 != 0) {
    load.fail("rope.dimension_count " + std::to_string(c.n_rot) + " must be even and at most the head size");
  }
  c.rms_eps = static_cast<float>(f.get_float_opt(load.key("attention.layer_norm_rms_epsilon")).value_or(1e-5));
  if (!(c.rms_eps > 0.0f && c.rms_eps < 1.0f)) load.fail("RMSNorm epsilon " + std::to_string(c.rms_eps) + " is out of range");
  c.rope_base = static_cast<float>(f.get_float_opt(load.key("rope.freq_base")).value_or(10000.0));
  if (!(c.rope_base > 1.0f)) load.fail("rope.freq_base " + std::to_string(c.rope_base) + " must be above 1");
  c.rope_style = c.architecture == "qwen2" ? kernels::RopeStyle::neox : kernels::RopeStyle::interleaved;
  c.qkv_bias = c.architecture == "qwen2";

  const std::string scaling(f.get_string_opt(load.key("rope.scaling.type")).value_or("none"));
  const double factor = f.get_float_opt(load.key("rope.scaling.factor")).value_or(1.0);
  if (scaling == "linear") {
    if (!(factor > 0.0)) load.fail("rope.scaling.factor must be positive");
    c.rope_freq_scale = static_cast<float>(1.0 / factor);
  } else if (scaling != "none" && scaling != "llama3") {
    load.fail("RoPE scaling '" + scaling + "' is not supported (supported: none, linear, llama3)");
  }
  // Llama 3 frequency scaling arrives as per-dimension divisors in rope_freqs.weight.
  if (load.has("rope_freqs.weight")) c.rope_freq_factors = load.vector("rope_freqs.weight", c.n_rot / 2);

  m->tokenizer_ = std::make_unique<Tokenizer>(f);
  c.n_vocab = m->tokenizer_->n_vocab();
  if (auto declared = f.get_int_opt(load.key("vocab_size")); declared && *declared != c.n_vocab) {
    load.fail(load.key("vocab_size") + " is " + std::to_string(*declared) + " but the vocabulary has " +
              std::to_string(c.n_vocab) + " tokens");
  }

  m->token_embd_ = load.matrix("token_embd.weight", c.n_embd, c.n_vocab);
  m->output_norm_ = load.vector("output_norm.weight", c.n_embd);
  c.tied_output = !load.has("output.weight");
  m->output_ = c.tied_output ? m->token_embd_ : load.matrix("output.weight", c.n_embd, c.n_vocab);

  m->layers_.resize(static_cast<size_t>(c.n_layers));
  for (int32_t i = 0; i < c.n_layers; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    LayerWeights& l = m->layers_[static_cast<size_t>(i)];
    l.attn_norm = load.vector(p + "attn_norm.weight", c.n_embd);
    l.attn_q = load.matrix(p + "attn_q.weight", c.n_embd, c.q_dim());
    l.attn_k = load.matrix(p + "attn_k.weight", c.n_embd, c.kv_dim());
    l.attn_v = load.matrix(p + "attn_v.weight", c.n_embd, c.kv_dim());
    if (c.qkv_bias) {
      l.bias_q = load.vector(p + "attn_q.bias", c.q_dim());
      l.bias_k = load.vector(p + "attn_k.bias", c.kv_dim());
      l.bias_v = load.vector(p + "attn_v.bias", c.kv_dim());
    }
    l.attn_output = load.matrix(p + "attn_output.weight", c.q_dim(), c.n_embd);
    l.ffn_norm = load.vector(p + "ffn_norm.weight", c.n_embd);
    l.ffn_gate = load.matrix(p + "ffn_gate.weight", c.n_embd, c.n_ff);
    l.ffn_up = load.matrix(p + "ffn_up.weight", c.n_embd, c.n_ff);
    l.ffn_down = load.matrix(p + "ffn_down.weight", c.n_ff, c.n_embd);
  }
  m->fingerprint_ = fingerprint_of(f);
  return m;
}

kernels::KvLayout Model::kv_layout(int32_t block_tokens, kernels::DType dtype) const {
  return {config_.n_layers, config_.n_kv_heads, config_.head_dim, block_tokens, dtype};
}

namespace {
int64_t matrix_bytes(const kernels::WeightMatrix& w) { return kernels::row_bytes(w.type, w.n_in) * w.n_out; }
int64_t matrix_params(const kernels::WeightMatrix& w) { return w.n_in * w.n_out; }
}  // namespace

int64_t Model::weight_bytes_per_token() const {
  int64_t bytes = matrix_bytes(output_) + static_cast<int64_t>(output_norm_.size() * sizeof(float));
  for (const LayerWeights& l : layers_) {
    for (const auto* w : {&l.attn_q, &l.attn_k, &l.attn_v, &l.attn_output, &l.ffn_gate, &l.ffn_up, &l.ffn_down}) {
      bytes += matrix_bytes(*w);
    }
    bytes += static_cast<int64_t>((l.attn_norm.size() + l.ffn_norm.size() + l.bias_q.size() + l.bias_k.size() +
                                   l.bias_v.size()) * sizeof(float));
  }
  return bytes;
}

int64_t Model::non_embedding_parameters() const {
  // The output head counts even when tied to the embedding table: it is a full matrix product
  // per token, unlike the embedding lookup.
  int64_t params = matrix_params(output_) + static_cast<int64_t>(output_norm_.size());
  for (const LayerWeights& l : layers_) {
    for (const auto* w : {&l.attn_q, &l.attn_k, &l.attn_v, &l.attn_output, &l.ffn_gate, &l.ffn_up, &l.ffn_down}) {
      params += matrix_params(*w);
    }
    params += static_cast<int64_t>(l.attn_norm.size() + l.ffn_norm.size() + l.bias_q.size() + l.bias_k.size() +
                                   l.bias_v.size());
  }
  return params;
}

}  // namespace den::engine
