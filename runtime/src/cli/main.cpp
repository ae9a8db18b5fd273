// `den`: one executable, many subcommands. Errors end as one line on stderr and exit code 1
// (2 for command-line usage errors).
#include <cstdio>
#include <exception>

#include "commands.h"

int main(int argc, char** argv) {
  CLI::App app{"Den: a runtime for long-lived LLM agents on one GPU box", "den"};
  app.set_version_flag("--version", std::string("den ") + DEN_VERSION);
  app.require_subcommand(1);
  app.fallthrough(false);
  den::runtime::cli::add_generate_command(app);
  den::runtime::cli::add_chat_command(app);
  den::runtime::cli::add_tokenize_command(app);
  den::runtime::cli::add_model_commands(app);
  den::runtime::cli::add_bench_commands(app);
  den::runtime::cli::add_serve_command(app);
  den::runtime::cli::add_sessions_commands(app);
  den::runtime::cli::add_agent_commands(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "den: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
