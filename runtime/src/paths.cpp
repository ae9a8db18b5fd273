// Default locations (XDG base directories).
#include "den/runtime/paths.h"

#include <cstdlib>
#include <filesystem>
#include <stdexcept>

namespace den::runtime {

std::string models_directory() {
  const char* cache = std::getenv("XDG_CACHE_HOME");
  if (cache != nullptr && cache[0] == '/') return std::string(cache) + "/den/models";
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

}  // namespace den::runtime
