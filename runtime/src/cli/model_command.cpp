// `den model info` and `den model new`.
#include <unistd.h>

#include <cstdio>
#include <map>
#include <memory>
#include <string>

#include "client_output.h"
#include "commands.h"
#include "den/engine/chat_template.h"
#include "den/engine/gguf.h"
#include "den/engine/model.h"
#include "den/engine/model_shapes.h"
#include "den/engine/tokenizer.h"
#include "den/runtime/paths.h"

namespace den::runtime::cli {
namespace {

void run_info(const std::string& requested) {
  const std::string path = resolve_model_path(requested);
  const engine::GgufFile file(path);
  std::printf("file          %s (%s, GGUF v%u, %zu tensors, %zu metadata keys)\n", path.c_str(),
              human_bytes(static_cast<double>(file.file_bytes()), 2).c_str(), file.version(), file.tensors().size(),
              file.metadata().size());
  std::map<std::string, int> type_counts;
  for (const engine::GgufTensor& t : file.tensors()) ++type_counts[std::string(kernels::name(t.type))];
  if (!type_counts.empty()) {
    std::string types;
    for (const auto& [name, count] : type_counts) types += name + " x" + std::to_string(count) + "  ";
    std::printf("tensor types  %s\n", types.c_str());
  }
  if (file.tensors().empty()) {
    const engine::Tokenizer tok(file);
    std::printf("vocabulary    %d tokens, %s tokenizer%s%s (vocabulary-only file)\n", tok.n_vocab(),
                tok.model() == engine::Tokenizer::Model::spm ? "SentencePiece-BPE" : "byte-level BPE",
                tok.pre_tokenizer_name().empty() ? "" : ", pre-tokenizer ",
                std::string(tok.pre_tokenizer_name()).c_str());
    return;
  }
  const auto model = engine::Model::load(path);
  const engine::ModelConfig& c = model->config();
  const engine::Tokenizer& tok = model->tokenizer();
  std::printf("name          %s\n", c.name.c_str());
  std::printf("architecture  %s: %d layers, embedding %d, FFN %d, %d heads / %d KV heads of %d, context %d\n",
              c.architecture.c_str(), c.n_layers, c.n_embd, c.n_ff, c.n_heads, c.n_kv_heads, c.head_dim,
              c.n_ctx_train);
  std::printf("rope          base %g, %d dims, %s pairs%s%s\n", c.rope_base, c.n_rot,
              c.rope_style == kernels::RopeStyle::neox ? "NeoX" : "interleaved",
              c.rope_freq_factors.empty() ? "" : ", Llama 3 frequency factors",
              c.rope_freq_scale != 1.0f ? ", linear scaling" : "");
  std::printf("parameters    %.1f M outside the embedding table (output head %s)\n",
              static_cast<double>(model->non_embedding_parameters()) / 1e6, c.tied_output ? "tied" : "separate");
  std::printf("per token     %s of weights read\n",
              human_bytes(static_cast<double>(model->weight_bytes_per_token()), 2).c_str());
  std::printf("KV per token  %s (float32), %s (bf16)\n",
              human_bytes(static_cast<double>(model->kv_layout(1, kernels::DType::f32).block_bytes()), 2).c_str(),
              human_bytes(static_cast<double>(model->kv_layout(1, kernels::DType::bf16).block_bytes()), 2).c_str());
  std::printf("vocabulary    %d tokens, %s%s%s; BOS %s, add BOS %s\n", tok.n_vocab(),
              tok.model() == engine::Tokenizer::Model::spm ? "SentencePiece-BPE" : "byte-level BPE",
              tok.pre_tokenizer_name().empty() ? "" : ", pre-tokenizer ",
              std::string(tok.pre_tokenizer_name()).c_str(),
              tok.bos() ? std::to_string(*tok.bos()).c_str() : "none", tok.add_bos_by_default() ? "yes" : "no");
  const auto chat = engine::ChatTemplate::for_model(file.get_string_opt("tokenizer.chat_template"), tok);
  std::printf("chat template %s%s\n", std::string(chat.name()).c_str(),
              chat.default_system_prompt().empty() ? "" : " (with a default system prompt)");
  std::printf("fingerprint   %016llx\n", static_cast<unsigned long long>(model->fingerprint()));
}

struct NewOptions {
  std::string shape;
  std::string vocab;
  std::string dtype = "bf16";
  uint64_t seed = 0;
  std::string output;
  int threads = 0;
};

void run_new(const NewOptions& o) {
  const engine::ModelShape& shape = engine::model_shape(o.shape);
  engine::RandomModelOptions options;
  options.dtype = o.dtype == "f32" ? kernels::TensorType::f32
                  : o.dtype == "f16" ? kernels::TensorType::f16
                                     : kernels::TensorType::bf16;
  options.seed = o.seed;
  options.n_threads = o.threads;
  std::unique_ptr<engine::GgufFile> vocab;
  if (!o.vocab.empty()) {
    vocab = std::make_unique<engine::GgufFile>(o.vocab);
    options.vocab = vocab.get();
  }
  // A TTY gets a percentage updated in place; a log gets one line per tenth.
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  int last_shown = -1;
  options.progress = [&](uint64_t done, uint64_t total) {
    const int percent = static_cast<int>(100 * done / total);
    const int shown = tty ? percent : percent / 10;
    if (shown == last_shown) return;
    last_shown = shown;
    std::fprintf(stderr, tty ? "\rwriting %s: %3d%% of %s" : "writing %s: %d%% of %s\n", o.output.c_str(), percent,
                 human_bytes(static_cast<double>(total), 2).c_str());
  };
  engine::write_random_model(shape, options, o.output);
  if (tty) std::fprintf(stderr, "\n");
  std::fprintf(stderr, "wrote %s: random-weight %s shape, %s\n", o.output.c_str(), shape.name.c_str(),
               o.dtype.c_str());
}

}  // namespace

void add_model_commands(CLI::App& app) {
  CLI::App* model = app.add_subcommand("model", "Inspect or create model files");
  model->require_subcommand(1);

  auto info_path = std::make_shared<std::string>();
  CLI::App* info = model->add_subcommand("info", "Describe a GGUF model or vocabulary file");
  info->add_option("MODEL", *info_path, "GGUF file (default: the fetched default model)");
  info->callback([info_path] { run_info(*info_path); });

  auto o = std::make_shared<NewOptions>();
  CLI::App* create = model->add_subcommand("new", "Write a random-weight GGUF of a real model's shape (for benchmarks)");
  std::string shapes;
  create->add_option("--shape", o->shape, "Model shape")->required()->check(CLI::IsMember(engine::model_shape_names()));
  create->add_option("--vocab", o->vocab, "Copy the tokenizer of this GGUF (its size must match the shape)");
  create->add_option("--dtype", o->dtype, "Weight type")->check(CLI::IsMember({"f16", "bf16", "f32"}))->capture_default_str();
  create->add_option("--seed", o->seed, "Random seed")->capture_default_str();
  create->add_option("-o,--output", o->output, "Output file")->required();
  create->add_option("-t,--threads", o->threads, "Threads generating weights (default: all)");
  create->callback([o] { run_new(*o); });
}

}  // namespace den::runtime::cli
