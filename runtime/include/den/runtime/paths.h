// Where Den keeps things on disk by default (XDG base directories): the default model in the
// cache directory, the socket in the runtime directory, durable state in the state directory.
// The environment is read here and only here.
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

// The daemon's socket: `requested` if non-empty, else $DEN_SOCKET, else
// $XDG_RUNTIME_DIR/den/den.sock, else /tmp/den-$UID/den.sock. The daemon and the CLI both
// find it this way.
std::string socket_path(const std::string& requested);
// Durable state (SQLite store, SSD tier): `requested` if non-empty, else $XDG_STATE_HOME/den,
// else $HOME/.local/state/den.
std::string state_directory(const std::string& requested);

}  // namespace den::runtime
