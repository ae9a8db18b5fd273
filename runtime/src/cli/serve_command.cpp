// `den serve`: the daemon. The configuration file comes first, then the flags override it.
#include <cstdlib>
#include <functional>
#include <memory>

#include "commands.h"
#include "den/runtime/config.h"
#include "den/runtime/daemon.h"

namespace den::runtime::cli {
namespace {

struct ServeOptions {
  std::string config_path;
  std::string model, backend, socket, state_dir, log_level;
  int device = -1, threads = -1;
  int32_t context = -1;
};

// The file's configuration with the flags applied over it (again on every SIGHUP).
DaemonConfig make_config(const ServeOptions& o) {
  DaemonConfig config = o.config_path.empty() ? DaemonConfig{} : load_config(o.config_path);
  if (!o.model.empty()) config.model = o.model;
  if (!o.backend.empty()) config.backend = o.backend;
  if (o.device >= 0) config.device = o.device;
  if (o.threads >= 0) config.threads = o.threads;
  if (o.context >= 0) config.context = o.context;
  if (!o.socket.empty()) config.socket = o.socket;
  if (!o.state_dir.empty()) config.state_dir = o.state_dir;
  if (!o.log_level.empty()) {
    for (LogLevel level : {LogLevel::debug, LogLevel::info, LogLevel::warn, LogLevel::error}) {
      if (log_level_name(level) == o.log_level) config.log_level = level;
    }
  }
  return config;
}

void run_serve(const ServeOptions& o) {
  std::function<DaemonConfig()> reload;
  if (!o.config_path.empty()) reload = [o] { return make_config(o); };
  const int code = run_daemon(make_config(o), reload);
  if (code != 0) std::exit(code);
}

}  // namespace

void add_serve_command(CLI::App& app) {
  auto o = std::make_shared<ServeOptions>();
  CLI::App* cmd = app.add_subcommand("serve", "Run the daemon: sessions and agents behind a local socket (docs/PROTOCOL.md)");
  cmd->add_option("-c,--config", o->config_path, "YAML configuration file (docs/CONFIG.md)");
  cmd->add_option("-m,--model", o->model, "GGUF model file (default: the fetched default model)");
  cmd->add_option("--backend", o->backend, "Decoder backend (default: auto = cuda when a device is usable)")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  cmd->add_option("--device", o->device, "CUDA device")->check(CLI::Range(0, 64));
  cmd->add_option("-t,--threads", o->threads, "CPU backend threads (0: one per hardware thread)")->check(CLI::Range(0, 1024));
  cmd->add_option("--ctx", o->context, "Context length per session (0: the model's)")->check(CLI::Range(0, 1 << 24));
  cmd->add_option("--socket", o->socket, "Socket path (default: $DEN_SOCKET, $XDG_RUNTIME_DIR/den/den.sock, /tmp/den-$UID/den.sock)");
  cmd->add_option("--state-dir", o->state_dir, "Sessions and KV checkpoints (default: $XDG_STATE_HOME/den)");
  cmd->add_option("--log-level", o->log_level, "debug, info, warn or error")->check(CLI::IsMember({"debug", "info", "warn", "error"}));
  cmd->callback([o] { run_serve(*o); });
}

}  // namespace den::runtime::cli
