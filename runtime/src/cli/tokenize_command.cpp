// `den tokenize`: all of stdin, byte for byte, to token ids on one line. Works on
// vocabulary-only GGUF files (no weights needed).
#include <cstdio>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>

#include "commands.h"
#include "den/engine/gguf.h"
#include "den/engine/tokenizer.h"
#include "den/runtime/paths.h"

namespace den::runtime::cli {
namespace {

struct TokenizeOptions {
  std::string model;
  bool bos = false;
  bool parse_special = false;
};

std::string read_all_stdin() {
  std::string text;
  char buffer[1 << 16];
  for (;;) {
    const size_t n = std::fread(buffer, 1, sizeof buffer, stdin);
    text.append(buffer, n);
    if (n < sizeof buffer) {
      if (std::ferror(stdin)) throw std::runtime_error("cannot read stdin");
      break;
    }
  }
  return text;
}

void run_tokenize(const TokenizeOptions& o) {
  const engine::GgufFile file(resolve_model_path(o.model));
  const engine::Tokenizer tokenizer(file);
  const std::string text = read_all_stdin();
  const std::vector<int32_t> ids = tokenizer.encode(text, o.bos, o.parse_special);
  std::string line;
  for (int32_t id : ids) line += (line.empty() ? "" : " ") + std::to_string(id);
  line += '\n';
  std::fwrite(line.data(), 1, line.size(), stdout);
}

}  // namespace

void add_tokenize_command(CLI::App& app) {
  auto o = std::make_shared<TokenizeOptions>();
  CLI::App* cmd = app.add_subcommand("tokenize", "Tokenize stdin (byte-exact) and print the ids on one line");
  cmd->add_option("-m,--model", o->model, "GGUF model or vocabulary file (default: the fetched default model)");
  cmd->add_flag("--bos", o->bos, "Prepend BOS");
  cmd->add_flag("--parse-special", o->parse_special, "Match special-token text (e.g. <|im_start|>) as those tokens");
  cmd->callback([o] { run_tokenize(*o); });
}

}  // namespace den::runtime::cli
