// `den serve` as a child process of a test: a private socket and state directory, readiness
// detected by connecting, SIGTERM-and-wait when it goes out of scope. Used by the daemon
// integration tests (tests/runtime/daemon_*_test.cpp) to drive the daemon through its socket.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

#include "test_support.h"

namespace den::test {

// The backend the daemon integration tests run on: $DEN_TEST_DAEMON_BACKEND (scripts/gpu-check
// daemon sets it to cuda), else cpu.
std::string test_daemon_backend();

class DaemonProcess {
 public:
  // Starts `den serve --socket DIR/den.sock --state-dir DIR/state <extra_args>` (DIR: a fresh
  // temporary directory; a --socket or --state-dir in extra_args replaces the default) and,
  // with wait_until_ready, waits until it accepts connections. Throws, with the daemon's log,
  // when it cannot start, exits first, or is not ready within kReadyTimeout.
  explicit DaemonProcess(std::vector<std::string> extra_args, bool wait_until_ready = true);
  // SIGTERM and wait (SIGKILL when it has not exited after kStopTimeout). Never throws.
  ~DaemonProcess();
  DaemonProcess(const DaemonProcess&) = delete;
  DaemonProcess& operator=(const DaemonProcess&) = delete;

  static constexpr std::chrono::seconds kReadyTimeout{30};
  static constexpr std::chrono::seconds kStopTimeout{30};

  const std::string& socket_path() const { return socket_path_; }
  const std::string& state_dir() const { return state_dir_; }
  // The temporary directory (for config files and the like); removed with this object.
  const std::filesystem::path& directory() const { return dir_.path(); }
  pid_t pid() const { return pid_; }  // -1 once it has exited and was waited for
  // True while the process runs (reaps it, recording its status, when it has exited).
  bool running();

  void wait_ready(std::chrono::seconds timeout = kReadyTimeout);
  void kill(int signal);
  // Waits for the process to end: its exit code, or 128 + the signal that killed it (as a
  // shell reports it). When it already ended, returns that status again. Throws when it still
  // runs after `timeout`.
  int wait_exit(std::chrono::seconds timeout = kStopTimeout);
  // SIGTERM, then wait_exit().
  int stop();
  // Stops it when running, starts it again with the same arguments and directories (the state
  // survives), and waits until it is ready.
  void restart();
  // What it wrote to stdout and stderr so far, across restarts (DIR/daemon.log).
  std::string log() const;

 private:
  void start();
  bool reap(bool block);

  TempDir dir_;
  std::vector<std::string> extra_args_;
  std::string socket_path_;
  std::string state_dir_;
  std::string log_path_;
  pid_t pid_ = -1;
  int exit_status_ = -1;
};

}  // namespace den::test
