// `den serve`: loads the model, opens the session store, listens on the socket and runs until
// SIGTERM/SIGINT or daemon/shutdown, then stops accepting, cancels generations, checkpoints
// every session and exits. SIGHUP reloads the configuration file (what can change live).
#pragma once

#include <string>

#include "den/runtime/config.h"

namespace den::runtime {

// Returns the process exit code (0 after a clean shutdown). Throws std::runtime_error for
// what prevents starting (no model, socket taken, state directory locked by another daemon).
// `config_path` is re-read on SIGHUP ("" when the daemon runs on defaults and flags).
int run_daemon(const DaemonConfig& config, const std::string& config_path);

}  // namespace den::runtime
