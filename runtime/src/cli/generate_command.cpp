// `den generate` and `den chat`: local generation on one model, no daemon.
//   generate: stdout carries only the continuation and one newline (or the generated ids with
//             --ids); logs and timings go to stderr.
//   chat:     an interactive conversation with the model's chat template; the KV of earlier
//             turns is reused, only each new turn is prefilled.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <thread>

#include "commands.h"
#include "den/engine/chat_template.h"
#include "den/engine/model.h"
#include "den/runtime/local_generator.h"
#include "den/runtime/paths.h"

namespace den::runtime::cli {
namespace {

struct CommonOptions {
  std::string model;
  std::string backend = "cpu";
  int device = 0;
  int threads = 0;
  int32_t context = 0;  // 0: the model's, capped at 4096
  int32_t block_tokens = 16;
};

void add_common(CLI::App& cmd, CommonOptions& o) {
  cmd.add_option("-m,--model", o.model, "GGUF model file (default: the fetched default model)");
  cmd.add_option("--backend", o.backend, "Decoder backend")->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd.add_option("--device", o.device, "CUDA device (with --backend cuda)")->capture_default_str();
  cmd.add_option("-t,--threads", o.threads, "CPU threads (default: one per hardware thread)");
  cmd.add_option("--ctx", o.context, "Context length in tokens (default: the model's, at most 4096)")
      ->check(CLI::Range(1, 1 << 24));
  cmd.add_option("--block-tokens", o.block_tokens, "Tokens per KV block")->check(CLI::Range(1, 4096))->capture_default_str();
}

struct Session {
  std::unique_ptr<engine::Model> model;
  std::unique_ptr<engine::Backend> backend;
  std::unique_ptr<LocalGenerator> generator;
};

Session open_session(const CommonOptions& o) {
  Session s;
  s.model = engine::Model::load(resolve_model_path(o.model));
  s.backend = engine::make_backend(o.backend, *s.model, o.threads, o.device);
  const int32_t context = o.context > 0 ? o.context : std::min(s.model->config().n_ctx_train, 4096);
  s.generator = std::make_unique<LocalGenerator>(*s.model, *s.backend, o.block_tokens, context);
  return s;
}

void write_stdout(std::string_view text) {
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
}

void report_timings(const GenerationResult& r) {
  const double decode_rate = r.decode_seconds > 0 ? static_cast<double>(r.tokens.size()) / r.decode_seconds : 0.0;
  const double prefill_tokens = r.prompt_tokens - r.reused_tokens;
  const double prefill_rate = r.prefill_seconds > 0 ? prefill_tokens / r.prefill_seconds : 0.0;
  std::fprintf(stderr, "prompt: %d tokens (%d reused), prefill %.1f ms (%.1f tok/s); generated %zu tokens in %.1f ms (%.1f tok/s); stop: %s\n",
               r.prompt_tokens, r.reused_tokens, r.prefill_seconds * 1e3, prefill_rate, r.tokens.size(),
               r.decode_seconds * 1e3, decode_rate, std::string(stop_reason_name(r.reason)).c_str());
}

struct GenerateOptions {
  CommonOptions common;
  std::string prompt;
  int32_t n_tokens = 128;
  bool ids = false;
  bool no_bos = false;
  std::vector<std::string> stop;
  int32_t logprobs = -1;
  engine::SamplingParams sampling;
  bool seed_given = false;
};

void run_generate(GenerateOptions& o) {
  finalize_seed(o.sampling, o.seed_given);
  Session s = open_session(o.common);
  const engine::Tokenizer& tok = s.model->tokenizer();
  std::vector<int32_t> context = tok.encode(o.prompt, tok.add_bos_by_default() && !o.no_bos, false);
  if (context.empty() && tok.bos()) context.push_back(*tok.bos());  // an empty prompt starts a document

  GenerationOptions g;
  g.max_new_tokens = o.n_tokens;
  g.sampling = o.sampling;
  g.stop = o.stop;
  g.top_logprobs = o.logprobs;
  GenerationResult r = s.generator->generate(context, g, o.ids ? std::function<void(std::string_view)>{} : write_stdout);
  if (o.ids) {
    std::string line;
    for (const GeneratedToken& t : r.tokens) line += (line.empty() ? "" : " ") + std::to_string(t.id);
    write_stdout(line);
  }
  write_stdout("\n");
  if (o.logprobs >= 0) {
    for (const GeneratedToken& t : r.tokens) {
      std::fprintf(stderr, "logprob %d %.6f", t.id, t.logprob);
      for (const engine::TokenLogprob& alt : t.top) std::fprintf(stderr, " %d:%.6f", alt.id, alt.logprob);
      std::fprintf(stderr, "\n");
    }
  }
  report_timings(r);
}

struct ChatOptions {
  CommonOptions common;
  std::string system;
  std::string template_name;
  int32_t n_tokens = 512;
  bool verbose = false;
  engine::SamplingParams sampling;
  bool seed_given = false;
};

void run_chat(ChatOptions& o) {
  finalize_seed(o.sampling, o.seed_given);
  Session s = open_session(o.common);
  const engine::Tokenizer& tok = s.model->tokenizer();
  const engine::ChatTemplate chat =
      o.template_name.empty()
          ? engine::ChatTemplate::for_model(s.model->file().get_string_opt("tokenizer.chat_template"), tok)
          : engine::ChatTemplate::by_name(o.template_name);
  const bool interactive = ::isatty(STDIN_FILENO) != 0;
  if (interactive) {
    std::fprintf(stderr, "den chat: %s (%s template). Type a message; /reset starts over, /exit or Ctrl-D ends.\n",
                 s.model->config().name.c_str(), std::string(chat.name()).c_str());
  }
  std::vector<engine::ChatMessage> messages;
  if (!o.system.empty()) messages.push_back({"system", o.system});
  GenerationOptions g;
  g.max_new_tokens = o.n_tokens;
  g.sampling = o.sampling;
  std::string line;
  for (;;) {
    if (interactive) {
      std::fputs("> ", stdout);
      std::fflush(stdout);
    }
    if (!std::getline(std::cin, line)) break;
    if (line == "/exit" || line == "/quit") break;
    if (line == "/reset") {
      messages.resize(o.system.empty() ? 0 : 1);
      continue;
    }
    if (line.empty()) continue;
    messages.push_back({"user", line});
    const std::vector<int32_t> context = chat.tokenize(tok, messages, true);
    GenerationResult r = s.generator->generate(context, g, write_stdout);
    write_stdout("\n");
    messages.push_back({"assistant", r.text});
    if (o.verbose) report_timings(r);
    if (r.reason == StopReason::context_full) {
      std::fprintf(stderr, "den chat: the context is full; /reset to start a new conversation\n");
    }
  }
}

}  // namespace

void add_generate_command(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* cmd = app.add_subcommand("generate", "Continue a prompt with a model (stdout: the continuation only)");
  add_common(*cmd, o->common);
  cmd->add_option("-p,--prompt", o->prompt, "Prompt text (tokenized as the model's tokenizer does)");
  cmd->add_option("-n,--n-tokens", o->n_tokens, "New tokens to generate at most")->check(CLI::Range(0, 1 << 24))
      ->capture_default_str();
  cmd->add_flag("--ids", o->ids, "Print the generated token ids instead of text");
  cmd->add_flag("--no-bos", o->no_bos, "Do not prepend BOS even if the model asks for it");
  cmd->add_option("--stop", o->stop, "Stop when this text appears (repeatable)");
  cmd->add_option("--logprobs", o->logprobs, "Print each token's log-probability and the N most likely (stderr)")
      ->check(CLI::Range(0, 100));
  add_sampling_options(*cmd, o->sampling, o->seed_given);
  cmd->callback([o] { run_generate(*o); });
}

void add_chat_command(CLI::App& app) {
  auto o = std::make_shared<ChatOptions>();
  CLI::App* cmd = app.add_subcommand("chat", "Chat with a model in the terminal, using its chat template");
  add_common(*cmd, o->common);
  cmd->add_option("--system", o->system, "System prompt");
  cmd->add_option("--template", o->template_name, "Chat template: chatml, llama3, llama2 (default: the model's)");
  cmd->add_option("-n,--n-tokens", o->n_tokens, "Longest answer in tokens")->check(CLI::Range(1, 1 << 24))
      ->capture_default_str();
  cmd->add_flag("-v,--verbose", o->verbose, "Print timings after each answer (stderr)");
  add_sampling_options(*cmd, o->sampling, o->seed_given);
  cmd->callback([o] { run_chat(*o); });
}

}  // namespace den::runtime::cli
