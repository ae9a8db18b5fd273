// A listening Unix socket file the daemon owns: den.sock (server.cpp) and tools.sock
// (tools.cpp). Internal to runtime/.
#pragma once

#include <sys/types.h>

#include <string>

namespace den::runtime {

struct UnixListener {
  int fd = -1;      // listening, close-on-exec; the caller owns it
  ino_t inode = 0;  // of the socket file, so that only our own file is removed
};

// Listens at `path`, born mode 0600. A stale socket file (no one accepts on it) is replaced;
// a live one is an error that says `live_hint`, any other file one that says `other_hint`.
// Throws std::runtime_error.
UnixListener listen_unix(const std::string& path, const std::string& live_hint, const std::string& other_hint);

// Removes `path` if it is still the socket file with `inode` (another daemon may have
// replaced it since).
void unlink_if_ours(const std::string& path, ino_t inode);

}  // namespace den::runtime
