// `den serve`: loads the model, opens the session store, listens on the socket and runs until
// SIGTERM/SIGINT or daemon/shutdown, then stops accepting, cancels generations, checkpoints
// every session and exits. SIGHUP reloads the configuration file (what can change live).
#pragma once

#include <functional>
#include <string>

#include "den/runtime/config.h"

namespace den::runtime {

// Returns the process exit code (0 after a clean shutdown). Throws std::runtime_error for
// what prevents starting (no model, socket taken, state directory locked by another daemon).
// `reload` makes the configuration again on SIGHUP (the file re-read, the command-line flags
// applied over it); empty when there is no file to re-read.
int run_daemon(const DaemonConfig& config, const std::function<DaemonConfig()>& reload);

}  // namespace den::runtime
