// `den bench agents`: the `den serve` each policy runs in. This same executable is started with
// a YAML config written for the policy into a fresh temporary directory (its socket, its state
// directory, kv.* as the bench was asked), its output goes to a log file, and it is stopped with
// daemon/shutdown (SIGTERM, then SIGKILL, if it does not go).
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "bench_agents.h"
#include "den/runtime/client.h"

namespace den::runtime::cli::bench_agents {
namespace {

using Clock = std::chrono::steady_clock;

std::string yaml_quoted(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

std::string self_executable() {
  std::error_code ec;
  const auto path = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) throw std::runtime_error("bench agents: cannot find this executable (/proc/self/exe): " + ec.message());
  return path.string();
}

}  // namespace

std::optional<PolicySpec> policy_spec(std::string_view name) {
  if (name == "recompute") return PolicySpec{"recompute", KvPolicy::recompute, true, true};
  if (name == "hbm-only") return PolicySpec{"hbm-only", KvPolicy::hbm_only, true, true};
  if (name == "tiered") return PolicySpec{"tiered", KvPolicy::tiered, true, true};
  if (name == "tiered-no-cost-model") return PolicySpec{"tiered-no-cost-model", KvPolicy::tiered, false, true};
  if (name == "tiered-no-layerwise") return PolicySpec{"tiered-no-layerwise", KvPolicy::tiered, true, false};
  return std::nullopt;
}

std::vector<std::string> policy_names() {
  return {"recompute", "hbm-only", "tiered", "tiered-no-cost-model", "tiered-no-layerwise"};
}

std::string tail_of_file(const std::filesystem::path& path, int lines) {
  std::ifstream in(path);
  if (!in) return {};
  std::deque<std::string> last;
  for (std::string line; std::getline(in, line);) {
    last.push_back(std::move(line));
    if (static_cast<int>(last.size()) > lines) last.pop_front();
  }
  std::string out;
  for (const std::string& line : last) out += "  " + line + "\n";
  return out;
}

ManagedDaemon::ManagedDaemon(const DaemonSetup& setup, const PolicySpec& policy) {
  dir_ = setup.state_root / ("den-bench-agents-" + std::to_string(::getpid()) + "-" + policy.name);
  std::filesystem::remove_all(dir_);
  std::filesystem::create_directories(dir_);
  socket_ = (dir_ / "den.sock").string();
  if (socket_.size() >= 100) {
    throw std::runtime_error("bench agents: the socket path " + socket_ +
                             " is too long for a Unix socket: give a shorter --state-root");
  }
  log_ = (setup.log_dir.empty() ? dir_ : setup.log_dir) / ("daemon-" + policy.name + ".log");
  std::filesystem::remove(log_);

  std::ostringstream yaml;
  yaml << "# den bench agents, policy " << policy.name << "\n"
       << "model: " << yaml_quoted(setup.model) << "\n"
       << "backend: " << setup.backend << "\n"
       << "device: " << setup.device << "\n"
       << "threads: " << setup.threads << "\n"
       << "context: " << setup.context << "\n"
       << "socket: " << yaml_quoted(socket_) << "\n"
       << "state_dir: " << yaml_quoted((dir_ / "state").string()) << "\n"
       << "tool_socket: \"off\"\n"
       << "log_level: info\n"
       << "kv:\n"
       << "  block_tokens: " << setup.block_tokens << "\n"
       << "  hbm: " << setup.hbm << "\n"
       << "  dram: " << setup.dram << "\n"
       << "  ssd: " << setup.ssd << "\n"
       << "  policy: " << kv_policy_name(policy.policy) << "\n"
       << "  cost_model: " << (policy.cost_model ? "on" : "off") << "\n"
       << "  layerwise_wake: " << (policy.layerwise_wake ? "on" : "off") << "\n"
       << "limits:\n"
       << "  connections: " << setup.connections << "\n";
  config_text_ = yaml.str();
  const std::filesystem::path config_path = dir_ / "den.yaml";
  {
    std::ofstream out(config_path);
    out << config_text_;
    if (!out) throw std::runtime_error("bench agents: cannot write " + config_path.string());
  }

  // Everything the child needs is made before fork: after it, only async-signal-safe calls.
  const std::string exe = self_executable();
  std::vector<std::string> args = {exe, "serve", "--config", config_path.string()};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const int log_fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (log_fd < 0) throw std::runtime_error("bench agents: cannot create " + log_.string() + ": " + std::strerror(errno));
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid == 0) {
    // A bench killed by Ctrl-C must not leave its daemon running.
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(127);
    const int null_fd = ::open("/dev/null", O_RDONLY);
    if (null_fd >= 0) ::dup2(null_fd, 0);
    ::dup2(log_fd, 1);
    ::dup2(log_fd, 2);
    ::execv(exe.c_str(), argv.data());
    ::_exit(127);
  }
  const int fork_errno = errno;
  ::close(log_fd);
  if (pid < 0) throw std::runtime_error(std::string("bench agents: cannot start den serve: ") + std::strerror(fork_errno));
  pid_ = pid;

  const auto deadline = Clock::now() + std::chrono::duration<double>(setup.start_timeout_s);
  for (;;) {
    int status = 0;
    if (reap(false, status)) fail("den serve exited with status " + std::to_string(status) + " before it answered");
    if (daemon_listening(socket_)) {
      try {
        daemon_model(socket_);
        return;
      } catch (const std::exception&) {
        // Listening but not serving yet: keep waiting.
      }
    }
    if (Clock::now() > deadline) {
      fail("den serve did not answer on " + socket_ + " within " + std::to_string(static_cast<int>(setup.start_timeout_s)) +
           " s (--start-timeout)");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

void ManagedDaemon::fail(const std::string& what) {
  stop();
  keep_dir_ = true;  // the log may be in it; the next run removes it
  throw std::runtime_error("bench agents: " + what + "; its log is " + log_.string() + ", which ends with:\n" +
                           tail_of_file(log_, 20));
}

bool ManagedDaemon::reap(bool block, int& status) {
  if (pid_ <= 0) {
    status = exit_status_;
    return true;
  }
  int raw = 0;
  pid_t got;
  do {
    got = ::waitpid(pid_, &raw, block ? 0 : WNOHANG);
  } while (got < 0 && errno == EINTR);
  if (got == 0) return false;
  exit_status_ = got == pid_ ? (WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw)) : -1;
  pid_ = -1;
  status = exit_status_;
  return true;
}

int ManagedDaemon::stop() {
  int status = 0;
  if (reap(false, status)) return status;
  try {
    DaemonClient client(socket_);
    client.call("daemon/shutdown");
  } catch (const std::exception&) {
    ::kill(pid_, SIGTERM);  // the socket does not answer: the signal does the same
  }
  // A shutdown checkpoints what is left; the bench deleted its sessions, so this is quick.
  for (const auto& [signal, seconds] : {std::pair{SIGTERM, 60}, std::pair{SIGKILL, 10}}) {
    const auto deadline = Clock::now() + std::chrono::seconds(seconds);
    while (Clock::now() < deadline) {
      if (reap(false, status)) return status;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ::kill(pid_, signal);
  }
  reap(true, status);
  return -1;
}

void ManagedDaemon::kill() {
  int status = 0;
  if (reap(false, status)) return;
  ::kill(pid_, SIGKILL);
  reap(true, status);
  keep_dir_ = true;  // its log may be in it
}

ManagedDaemon::~ManagedDaemon() {
  stop();
  if (keep_dir_) return;
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

}  // namespace den::runtime::cli::bench_agents
