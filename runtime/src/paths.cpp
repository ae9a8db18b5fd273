// Default locations (XDG base directories).
#include "den/runtime/paths.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <stdexcept>

namespace den::runtime {

namespace {

// An environment variable's value when set to an absolute path (the XDG rule: relative values
// are ignored).
const char* absolute_env(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] == '/' ? value : nullptr;
}

}  // namespace

std::string models_directory() {
  if (const char* cache = absolute_env("XDG_CACHE_HOME")) return std::string(cache) + "/den/models";
  const char* home = std::getenv("HOME");
  return std::string(home != nullptr ? home : "/tmp") + "/.cache/den/models";
}

std::string default_model_path() { return models_directory() + "/" + kDefaultModelFile; }

std::string resolve_model_path(const std::string& requested) {
  if (!requested.empty()) return requested;
  std::string path = default_model_path();
  if (!std::filesystem::exists(path)) {
    throw std::runtime_error("no model given (-m) and the default model is not fetched yet (" + path +
                             "); run scripts/fetch-model, or pass -m MODEL.gguf");
  }
  return path;
}


std::string socket_path(const std::string& requested) {
  if (!requested.empty()) return requested;
  const char* env = std::getenv("DEN_SOCKET");
  if (env != nullptr && env[0] != '\0') return env;
  if (const char* runtime = absolute_env("XDG_RUNTIME_DIR")) return std::string(runtime) + "/den/den.sock";
  return "/tmp/den-" + std::to_string(::getuid()) + "/den.sock";
}

std::string state_directory(const std::string& requested) {
  if (!requested.empty()) return requested;
  if (const char* state = absolute_env("XDG_STATE_HOME")) return std::string(state) + "/den";
  const char* home = std::getenv("HOME");
  return std::string(home != nullptr ? home : "/tmp") + "/.local/state/den";
}

}  // namespace den::runtime
