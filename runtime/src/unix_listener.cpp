#include "unix_listener.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace den::runtime {
namespace {

bool someone_listens(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const bool ok = ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}

}  // namespace

UnixListener listen_unix(const std::string& path, const std::string& live_hint, const std::string& other_hint) {
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path)
    throw std::runtime_error("socket path " + path + " is longer than the " + std::to_string(sizeof addr.sun_path - 1) +
                             " bytes a Unix socket allows");
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) throw std::runtime_error(path + " exists and is not a socket: " + other_hint);
    if (someone_listens(path)) throw std::runtime_error(live_hint);
    ::unlink(path.c_str());  // stale: left by a daemon that did not exit cleanly
  }
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("cannot listen at " + path + ": " + std::strerror(errno));
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const mode_t old_mask = ::umask(0177);  // the socket is born 0600
  const int rc = ::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  int error = rc == 0 ? 0 : errno;
  ::umask(old_mask);
  if (error == 0 && ::listen(fd, SOMAXCONN) != 0) error = errno;
  if (error != 0) {
    ::close(fd);
    throw std::runtime_error("cannot listen at " + path + ": " + std::strerror(error));
  }
  ::chmod(path.c_str(), 0600);
  UnixListener listener{fd, 0};
  if (::lstat(path.c_str(), &st) == 0) listener.inode = st.st_ino;
  return listener;
}

void unlink_if_ours(const std::string& path, ino_t inode) {
  if (inode == 0) return;
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && st.st_ino == inode) ::unlink(path.c_str());
}

}  // namespace den::runtime
