// Where Den keeps things on disk by default (XDG base directories): the default model in the
// cache directory. The environment is read here and only here.
#pragma once

#include <string>

namespace den::runtime {

inline constexpr const char* kDefaultModelFile = "SmolLM2-135M-Instruct.Q4_1.gguf";

// $XDG_CACHE_HOME/den/models, else $HOME/.cache/den/models.
std::string models_directory();
// models_directory()/kDefaultModelFile
std::string default_model_path();
// The model to use: `requested` if non-empty, else the default model; throws
// std::runtime_error telling how to fetch it when it is missing.
std::string resolve_model_path(const std::string& requested);

}  // namespace den::runtime
