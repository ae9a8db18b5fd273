// The `den serve` child process of the integration tests (daemon_process.h).
#include "daemon_process.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "den/runtime/client.h"

extern char** environ;

namespace den::test {

namespace {

// The value following `flag` in args, or `fallback`.
std::string flag_value(const std::vector<std::string>& args, const std::string& flag, const std::string& fallback) {
  const auto at = std::find(args.begin(), args.end(), flag);
  return at != args.end() && at + 1 != args.end() ? *(at + 1) : fallback;
}

int shell_status(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }

}  // namespace

std::string test_daemon_backend() {
  const char* backend = std::getenv("DEN_TEST_DAEMON_BACKEND");
  return backend != nullptr && backend[0] != '\0' ? backend : "cpu";
}

DaemonProcess::DaemonProcess(std::vector<std::string> extra_args, bool wait_until_ready)
    : extra_args_(std::move(extra_args)),
      socket_path_(flag_value(extra_args_, "--socket", dir_.file("den.sock"))),
      state_dir_(flag_value(extra_args_, "--state-dir", dir_.file("state"))),
      log_path_(dir_.file("daemon.log")) {
  start();
  if (wait_until_ready) {
    try {
      wait_ready();
    } catch (...) {
      // The destructor does not run for a constructor that throws: end the child here.
      if (running()) {
        ::kill(pid_, SIGKILL);
        reap(true);
      }
      throw;
    }
  }
}

DaemonProcess::~DaemonProcess() {
  if (!running()) return;
  ::kill(pid_, SIGTERM);
  try {
    wait_exit(kStopTimeout);
  } catch (const std::exception&) {
    ::kill(pid_, SIGKILL);
    reap(true);
  }
}

void DaemonProcess::start() {
  std::vector<std::string> args = {den_binary(), "serve"};
  if (std::find(extra_args_.begin(), extra_args_.end(), "--socket") == extra_args_.end()) {
    args.insert(args.end(), {"--socket", socket_path_});
  }
  if (std::find(extra_args_.begin(), extra_args_.end(), "--state-dir") == extra_args_.end()) {
    args.insert(args.end(), {"--state-dir", state_dir_});
  }
  args.insert(args.end(), extra_args_.begin(), extra_args_.end());
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, args[0].c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error("cannot start " + args[0] + ": " + std::strerror(rc));
  pid_ = pid;
  exit_status_ = -1;
}

bool DaemonProcess::reap(bool block) {
  if (pid_ <= 0) return true;
  int status = 0;
  pid_t got;
  do {
    got = ::waitpid(pid_, &status, block ? 0 : WNOHANG);
  } while (got < 0 && errno == EINTR);
  if (got == 0) return false;
  exit_status_ = got == pid_ ? shell_status(status) : -1;
  pid_ = -1;
  return true;
}

bool DaemonProcess::running() { return !reap(false); }

void DaemonProcess::wait_ready(std::chrono::seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (runtime::daemon_listening(socket_path_)) return;
    if (!running()) {
      throw std::runtime_error("den serve exited with status " + std::to_string(exit_status_) +
                               " before accepting connections; its output:\n" + log());
    }
    if (std::chrono::steady_clock::now() > deadline) {
      throw std::runtime_error("den serve did not accept connections on " + socket_path_ + " within " +
                               std::to_string(timeout.count()) + " s; its output:\n" + log());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void DaemonProcess::kill(int signal) {
  if (running()) ::kill(pid_, signal);
}

int DaemonProcess::wait_exit(std::chrono::seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (running()) {
    if (std::chrono::steady_clock::now() > deadline) {
      throw std::runtime_error("den serve (pid " + std::to_string(pid_) + ") still runs after " +
                               std::to_string(timeout.count()) + " s");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return exit_status_;
}

int DaemonProcess::stop() {
  kill(SIGTERM);
  return wait_exit();
}

void DaemonProcess::restart() {
  if (running()) stop();
  start();
  wait_ready();
}

std::string DaemonProcess::log() const {
  return file_exists(log_path_) ? read_file(log_path_) : std::string();
}

}  // namespace den::test
