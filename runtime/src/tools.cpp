// The MCP client for tool servers (ToolRegistry), as declared in tools.h; the reader of tool
// calls in model output is in tool_calls.cpp. The agent runtime uses both.
//
// Threads. Each server has one thread that does everything for it in a poll() loop: its
// child's stdout (JSON-RPC lines), stderr (logged), stdin (queued writes), the deadlines of its
// calls, starts and restarts. A dial-in server is the same loop over the two ends of one
// socket (a dup'ed fd for writing), with no stderr and no restarts. One listener thread
// accepts dial-ins. A server's protocol state thus has a single owner and no I/O
// happens under a lock; other threads only hand calls over and wake it (an eventfd). One
// completion thread per registry runs the callers' completions in order, holding no lock, so a
// completion may call() again. A call's completion is claimed by an atomic flag: whoever
// claims it first (reply, timeout, failure, cancel) posts it, everyone else does nothing.
#include "den/runtime/tools.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <utility>

#include "den/runtime/log.h"
#include "tool_arguments.h"
#include "unix_listener.h"

extern char** environ;

namespace den::runtime {
namespace {

namespace json = boost::json;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr const char* kProtocolVersion = "2025-06-18";
constexpr size_t kMaxLineBytes = 16 << 20;    // a longer stdout line is garbage
constexpr size_t kMaxLogLineBytes = 4096;     // stderr lines are cut here
constexpr size_t kJsonMaxDepth = 256;         // tool results nest deeper than Boost's default 32
constexpr milliseconds kStartTimeout{10000};  // spawn to the end of the first tools/list
constexpr milliseconds kExitPatience{500};    // stdout closed: the process is on its way out
constexpr milliseconds kClosePatience{100};   // stdin closed: a polite server exits now
constexpr milliseconds kTermGrace{2000};      // SIGTERM, then SIGKILL
constexpr milliseconds kFirstBackoff{500};    // after a failed start; doubles per failure
constexpr milliseconds kMaxBackoff{30000};
constexpr int kMaxListPages = 100;  // nextCursor loops end here
constexpr size_t kMaxDialIns = 64;  // connected dial-in servers; more are refused
constexpr int kUnknownStatus = -1;  // waitpid could not tell

std::string errno_text(int error) { return std::strerror(error); }

std::string_view trim(std::string_view s) {
  const auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  while (!s.empty() && space(s.front())) s.remove_prefix(1);
  while (!s.empty() && space(s.back())) s.remove_suffix(1);
  return s;
}

// The start of a line for a message: the whole of it is in the log at most.
std::string preview(std::string_view text, size_t max_bytes = 120) {
  if (text.size() <= max_bytes) return std::string(text);
  return std::string(text.substr(0, max_bytes)) + "...";
}

std::string describe_exit(int status) {
  if (status == kUnknownStatus) return "exited (status unknown)";
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    const char* name = ::strsignal(sig);
    return "was killed by signal " + std::to_string(sig) + (name ? std::string(" (") + name + ")" : "");
  }
  return "stopped (wait status " + std::to_string(status) + ")";
}

json::value parse_json(std::string_view text, json::error_code& ec) {
  json::parse_options options;
  options.max_depth = kJsonMaxDepth;
  return json::parse(text, ec, {}, options);
}

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

// A spawned server, leader of its own process group so that signals also reach the helpers
// it starts (an `npx` wrapper and its node). Reaped exactly once; the destructor kills and
// reaps one still running, so no zombie outlives its owner.
class ChildProcess {
 public:
  ChildProcess() = default;
  explicit ChildProcess(pid_t pid) : pid_(pid) {}
  ~ChildProcess() { kill_now(); }
  ChildProcess(ChildProcess&& other) noexcept : pid_(std::exchange(other.pid_, -1)) {}
  ChildProcess& operator=(ChildProcess&& other) noexcept {
    if (this != &other) {
      kill_now();
      pid_ = std::exchange(other.pid_, -1);
    }
    return *this;
  }

  bool running() const { return pid_ > 0; }

  // Gives it `patience` to exit by itself, then SIGTERM and kTermGrace, then SIGKILL. Returns
  // the wait status.
  int stop(milliseconds patience) {
    if (pid_ <= 0) return kUnknownStatus;
    if (auto status = wait_until(Clock::now() + patience)) return *status;
    signal_group(SIGTERM);
    if (auto status = wait_until(Clock::now() + kTermGrace)) return *status;
    signal_group(SIGKILL);
    return reap(true).value_or(kUnknownStatus);
  }

 private:
  void kill_now() {
    if (pid_ <= 0) return;
    signal_group(SIGKILL);
    reap(true);
  }

  // Only before the leader is reaped: afterwards its pid may name someone else.
  void signal_group(int sig) {
    if (::kill(-pid_, sig) != 0) ::kill(pid_, sig);
  }

  std::optional<int> wait_until(Clock::time_point deadline) {
    for (;;) {
      if (auto status = reap(false)) return status;
      if (Clock::now() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(milliseconds(5));
    }
  }

  std::optional<int> reap(bool block) {
    int status = 0;
    for (;;) {
      const pid_t r = ::waitpid(pid_, &status, block ? 0 : WNOHANG);
      if (r == pid_) break;
      if (r == 0) return std::nullopt;
      if (errno == EINTR) continue;
      // ECHILD: reaped elsewhere (SIGCHLD ignored); there is nothing left to wait for.
      status = kUnknownStatus;
      break;
    }
    pid_ = -1;
    return status;
  }

  pid_t pid_ = -1;
};

struct SpawnedServer {
  ChildProcess process;
  Fd stdin_fd, stdout_fd, stderr_fd;  // our ends, non-blocking and close-on-exec
};

// environ with `extra` added; an extra variable replaces one of the same name.
std::vector<std::string> environment_with(const std::vector<std::pair<std::string, std::string>>& extra) {
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e) {
    const std::string_view entry(*e);
    const std::string_view key = entry.substr(0, entry.find('='));
    const bool replaced = std::any_of(extra.begin(), extra.end(), [&](const auto& kv) { return kv.first == key; });
    if (!replaced) env.emplace_back(entry);
  }
  for (const auto& [key, value] : extra) env.push_back(key + "=" + value);
  return env;
}

// Throws std::runtime_error saying why the command cannot run.
SpawnedServer spawn_server(const ToolServerConfig& config) {
  if (config.command.empty()) throw std::runtime_error("its command is empty");
  const auto make_pipe = [](Fd& read_end, Fd& write_end) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed: " + errno_text(errno));
    read_end = Fd(fds[0]);
    write_end = Fd(fds[1]);
  };
  Fd in_read, in_write, out_read, out_write, err_read, err_write;
  make_pipe(in_read, in_write);
  make_pipe(out_read, out_write);
  make_pipe(err_read, err_write);

  std::vector<std::string> env = environment_with(config.env);
  std::vector<char*> envp, argv;
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<std::string> args = config.command;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in_read.get(), STDIN_FILENO);
  posix_spawn_file_actions_adddup2(&actions, out_write.get(), STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, err_write.get(), STDERR_FILENO);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  // The daemon ignores SIGPIPE and this thread blocks it; neither must reach the server.
  sigset_t none, defaults;
  sigemptyset(&none);
  sigemptyset(&defaults);
  for (int sig : {SIGPIPE, SIGINT, SIGTERM, SIGHUP}) sigaddset(&defaults, sig);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setpgroup(&attr, 0);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  pid_t pid = -1;
  const int rc = ::posix_spawnp(&pid, argv[0], &actions, &attr, argv.data(), envp.data());
  posix_spawnattr_destroy(&attr);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error("cannot run '" + config.command[0] + "': " + errno_text(rc));

  SpawnedServer spawned{ChildProcess(pid), std::move(in_write), std::move(out_read), std::move(err_read)};
  for (const Fd* fd : {&spawned.stdin_fd, &spawned.stdout_fd, &spawned.stderr_fd})
    ::fcntl(fd->get(), F_SETFL, ::fcntl(fd->get(), F_GETFL) | O_NONBLOCK);
  return spawned;
}

// Runs completions on one thread in the order they were posted, holding no lock while one
// runs. shutdown() runs what is still queued, then joins.
class CompletionQueue {
 public:
  CompletionQueue() : thread_([this] { run(); }) {}
  ~CompletionQueue() { shutdown(); }
  CompletionQueue(const CompletionQueue&) = delete;
  CompletionQueue& operator=(const CompletionQueue&) = delete;

  void post(std::function<void()> task) {
    {
      std::lock_guard lock(mu_);
      if (!drained_) {
        queue_.push_back(std::move(task));
        cv_.notify_one();
        return;
      }
    }
    // Only a call outliving its registry gets here: late is better than never.
    run_task(task);
  }

  void shutdown() {
    {
      std::lock_guard lock(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }

 private:
  static void run_task(const std::function<void()>& task) {
    try {
      task();
    } catch (const std::exception& e) {
      log_error("a tool call's completion threw", {{"error", e.what()}});
    } catch (...) {
      log_error("a tool call's completion threw", {{"error", "unknown exception"}});
    }
  }

  void run() {
    std::unique_lock lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) {  // stopping, and everything ran
        drained_ = true;
        return;
      }
      auto task = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      run_task(task);
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  bool drained_ = false;  // the thread is done: post() runs tasks itself
  std::thread thread_;    // last: starts once the rest exists
};

class ToolServer;

class PendingCall final : public ToolCall {
 public:
  PendingCall(std::string qualified, std::string tool, json::object arguments, milliseconds timeout,
              ToolRegistry::Completion done, std::shared_ptr<CompletionQueue> completions)
      : qualified(std::move(qualified)),
        tool(std::move(tool)),
        arguments(std::move(arguments)),
        timeout(timeout),
        deadline(Clock::now() + timeout),
        done_(std::move(done)),
        completions_(std::move(completions)) {}

  void cancel() override;

  // Claims the completion and posts it; false when someone else claimed it first.
  bool finish(std::optional<ToolResult> result, std::exception_ptr error) {
    if (finished_.exchange(true)) return false;
    completions_->post([done = std::move(done_), result = std::move(result), error]() mutable {
      if (done) done(std::move(result), error);
    });
    return true;
  }
  bool fail(ToolError::Kind kind, const std::string& message) {
    return finish(std::nullopt, std::make_exception_ptr(ToolError(kind, message)));
  }
  bool finished() const { return finished_.load(); }

  const std::string qualified;  // "<server>.<tool>"
  const std::string tool;
  const json::object arguments;
  const milliseconds timeout;
  const Clock::time_point deadline;
  std::weak_ptr<ToolServer> server;  // set before the call is handed to it

 private:
  std::atomic<bool> finished_{false};
  ToolRegistry::Completion done_;  // moved out by the one finish() that wins
  std::shared_ptr<CompletionQueue> completions_;
};

std::string tool_names(const std::vector<ToolInfo>& tools) {
  if (tools.empty()) return "(none)";
  std::string names;
  constexpr size_t kMaxNames = 40;
  for (size_t i = 0; i < tools.size() && i < kMaxNames; ++i) names += (i ? ", " : "") + tools[i].qualified;
  if (tools.size() > kMaxNames) names += " and " + std::to_string(tools.size() - kMaxNames) + " more";
  return names;
}

// Unknown tool or bad arguments, checked against a server's listing.
std::optional<ToolError> check_call(const std::string& server, const std::vector<ToolInfo>& tools,
                                    const PendingCall& call) {
  const auto tool = std::find_if(tools.begin(), tools.end(), [&](const ToolInfo& t) { return t.name == call.tool; });
  if (tool == tools.end())
    return ToolError(ToolError::Kind::unknown_tool,
                     "unknown tool '" + call.qualified + "'; tool server '" + server + "' has: " + tool_names(tools));
  if (auto problem = argument_problem(tool->input_schema, call.arguments))
    return ToolError(ToolError::Kind::invalid_arguments,
                     "invalid arguments for tool '" + call.qualified + "': " + *problem);
  return std::nullopt;
}

std::optional<ToolResult> parse_tool_result(const json::value& value, std::string& why) {
  const json::object* object = value.if_object();
  if (!object) {
    why = "the result is " + std::string(json_type_name(value)) + ", not an object";
    return std::nullopt;
  }
  const json::value* content = object->if_contains("content");
  if (!content || !content->is_array()) {
    why = "the result has no 'content' array";
    return std::nullopt;
  }
  ToolResult result;
  result.content = content->get_array();
  if (const json::value* is_error = object->if_contains("isError"))
    result.is_error = is_error->is_bool() && is_error->get_bool();
  if (const json::value* structured = object->if_contains("structuredContent")) result.structured = *structured;
  return result;
}

// "code -32602: Unknown tool" from a JSON-RPC error object.
std::string rpc_error_text(const json::value& error, int64_t* code_out = nullptr) {
  const json::object* e = error.if_object();
  if (!e) return json::serialize(error);
  int64_t code = 0;
  if (const json::value* c = e->if_contains("code"); c && c->is_int64()) code = c->get_int64();
  if (code_out) *code_out = code;
  std::string message = "error " + std::to_string(code);
  if (const json::value* m = e->if_contains("message"); m && m->is_string())
    message += ": " + std::string(m->get_string());
  return message;
}

// Server names in use. Configured names are reserved for good; a dial-in claims one when it
// initializes and gives it back when it hangs up, so one that reconnects gets its name again.
class NameBook {
 public:
  explicit NameBook(std::set<std::string> reserved) : taken_(std::move(reserved)) {}

  // `wanted` cut to the characters a server name may have; "-2", "-3", … added when taken.
  std::string claim(std::string_view wanted) {
    std::string base;
    for (char c : wanted.substr(0, 64)) {
      const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
      base += ok ? c : '_';
    }
    if (base.empty()) base = "remote";
    std::lock_guard lock(mu_);
    std::string name = base;
    for (int n = 2; taken_.count(name); ++n) name = base + "-" + std::to_string(n);
    taken_.insert(name);
    return name;
  }
  void release(const std::string& name) {
    std::lock_guard lock(mu_);
    taken_.erase(name);
  }

 private:
  std::mutex mu_;
  std::set<std::string> taken_;
};

// One server: a configured one (its process restarted as needed) or one that dialed in (its
// connection; gone for good when it hangs up), its listing and its calls.
class ToolServer {
 public:
  explicit ToolServer(ToolServerConfig config)
      : config_(std::move(config)), wake_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)), name_(config_.name) {
    if (!wake_fd_) throw std::runtime_error("tool server '" + config_.name + "': eventfd failed: " + errno_text(errno));
  }
  // A dial-in: `connection` is the accepted socket (non-blocking, close-on-exec). Until its
  // initialize names it, it goes by `label` and cannot be called.
  ToolServer(Fd connection, std::string label, std::shared_ptr<NameBook> names)
      : dialed_in_(true),
        wake_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)),
        name_(std::move(label)),
        names_(std::move(names)),
        connection_(std::move(connection)) {
    if (!wake_fd_) throw std::runtime_error("dial-in tool server: eventfd failed: " + errno_text(errno));
  }
  ~ToolServer() {
    request_stop();
    join();
  }
  ToolServer(const ToolServer&) = delete;
  ToolServer& operator=(const ToolServer&) = delete;

  std::string name() const {
    std::lock_guard lock(mu_);
    return name_;
  }
  // Whether calls may be addressed to it: not a dial-in that is unnamed yet or gone.
  bool callable() const {
    std::lock_guard lock(mu_);
    return !gone_ && (!dialed_in_ || named_);
  }
  bool gone() const {
    std::lock_guard lock(mu_);
    return gone_;
  }

  void start() {
    thread_ = std::thread([this] { run(); });
  }
  void request_stop() {
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
    }
    wake();
  }
  void join() {
    if (thread_.joinable()) thread_.join();
  }

  // Until the first start succeeded or failed (or `deadline`).
  void wait_first_start(Clock::time_point deadline) {
    std::unique_lock lock(mu_);
    started_cv_.wait_until(lock, deadline, [&] { return first_start_done_; });
  }

  void wake() {
    const uint64_t one = 1;
    [[maybe_unused]] const ssize_t n = ::write(wake_fd_.get(), &one, sizeof one);  // full counter: already awake
  }

  // Any thread. Refuses at once what the last listing can tell is wrong; the rest goes to the
  // server thread.
  void submit(const std::shared_ptr<PendingCall>& call) {
    std::optional<ToolError> refusal;
    {
      std::lock_guard lock(mu_);
      ++calls_;
      if (stopping_) {
        refusal = ToolError(ToolError::Kind::cancelled,
                            "tool call '" + call->qualified + "' was cancelled: the tool registry is shutting down");
      } else if (gone_) {
        refusal = ToolError(ToolError::Kind::server_failed,
                            "tool '" + call->qualified + "' is unavailable: " + who() + " disconnected");
        ++failures_;
      } else if (listed_) {
        refusal = check_call(name_, tools_, *call);
        if (refusal) ++failures_;
      }
      if (!refusal) incoming_.push_back(call);
    }
    if (refusal) {
      call->finish(std::nullopt, std::make_exception_ptr(*refusal));
    } else {
      wake();
    }
  }

  std::vector<ToolInfo> tools() const {
    std::lock_guard lock(mu_);
    return tools_;
  }

  ToolRegistry::ServerStatus status() const {
    std::lock_guard lock(mu_);
    ToolRegistry::ServerStatus s;
    s.name = name_;
    s.running = running_;
    s.dialed_in = dialed_in_;
    s.tools = static_cast<int32_t>(tools_.size());
    s.calls = calls_;
    s.failures = failures_;
    s.restarts = restarts_;
    s.last_error = last_error_;
    return s;
  }

 private:
  enum class Phase { stopped, initializing, ready };  // ready: initialized and listed
  enum class RequestKind { initialize, list, call };
  struct Request {
    RequestKind kind;
    std::shared_ptr<PendingCall> call;  // for RequestKind::call
  };

  std::string who() const { return "tool server '" + name_ + "'"; }

  void run() {
    // A write to a server that closed its stdin must give EPIPE here, not end the process.
    sigset_t pipe_signal;
    sigemptyset(&pipe_signal);
    sigaddset(&pipe_signal, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_signal, nullptr);

    guarded([&] { launch(); });
    for (;;) {
      {
        std::lock_guard lock(mu_);
        if (stopping_ || gone_) break;
        for (auto& call : incoming_) waiting_.push_back(std::move(call));
        incoming_.clear();
      }
      guarded([&] { step(); });
    }
    shut_down();
  }

  // The thread's boundary: an exception (allocation, a JSON surprise) ends the process and
  // fails its calls rather than the daemon.
  template <typename F>
  void guarded(F&& f) {
    try {
      f();
    } catch (const std::exception& e) {
      log_error("tool server thread failed", {{"server", name_}, {"error", e.what()}});
      try {
        end_process(ToolError::Kind::server_failed, std::string("failed inside den: ") + e.what(), kClosePatience);
      } catch (...) {
      }
    }
  }

  void step() {
    const auto now = Clock::now();
    expire(now);
    if (phase_ == Phase::stopped && !waiting_.empty()) {
      if (now < refuse_until_) {
        refuse_waiting(now);
      } else {
        launch();
      }
    }
    if (phase_ == Phase::initializing && now >= start_deadline_)
      end_process(
          ToolError::Kind::server_failed,
          "did not complete initialize and tools/list within " + std::to_string(kStartTimeout.count() / 1000) + " s",
          kClosePatience);
    if (phase_ == Phase::ready) dispatch_waiting();
    wait_for_io();
  }

  // Calls cancelled by their caller are dropped (and the server told); calls past their
  // deadline fail with timeout (and the server is told as well).
  void expire(Clock::time_point now) {
    for (auto it = waiting_.begin(); it != waiting_.end();) {
      const auto& call = *it;
      if (!call->finished() && now >= call->deadline)
        fail_call(*call, ToolError::Kind::timeout,
                  "tool '" + call->qualified + "' timed out after " + std::to_string(call->timeout.count()) +
                      " ms while " + who() + " was starting");
      it = call->finished() ? waiting_.erase(it) : std::next(it);
    }
    for (auto it = requests_.begin(); it != requests_.end();) {
      const auto& call = it->second.call;
      if (it->second.kind != RequestKind::call) {
        ++it;
        continue;
      }
      if (call->finished()) {
        send_cancelled(it->first, "cancelled by the caller");
      } else if (now >= call->deadline) {
        fail_call(
            *call, ToolError::Kind::timeout,
            "tool '" + call->qualified + "' did not answer within " + std::to_string(call->timeout.count()) + " ms");
        send_cancelled(it->first, "timed out after " + std::to_string(call->timeout.count()) + " ms");
      } else {
        ++it;
        continue;
      }
      it = requests_.erase(it);
    }
  }

  void refuse_waiting(Clock::time_point now) {
    const auto wait_ms = std::chrono::duration_cast<milliseconds>(refuse_until_ - now).count();
    char next_try[32];
    std::snprintf(next_try, sizeof next_try, "%.1f s", static_cast<double>(wait_ms) / 1000.0);
    const std::string times =
        start_failures_in_row_ == 1 ? "once" : std::to_string(start_failures_in_row_) + " times in a row";
    for (const auto& call : waiting_)
      fail_call(*call, ToolError::Kind::server_failed,
                "tool '" + call->qualified + "' is unavailable: " + who() + " failed to start " + times +
                    " (last: " + last_start_failure_ + "); next try in " + next_try);
    waiting_.clear();
  }

  void dispatch_waiting() {
    while (!waiting_.empty()) {
      std::shared_ptr<PendingCall> call = std::move(waiting_.front());
      waiting_.pop_front();
      if (call->finished()) continue;
      // tools_ is written only by this thread, so reading it here needs no lock.
      if (auto problem = check_call(name_, tools_, *call)) {
        fail_call(*call, problem->kind(), problem->what());
        continue;
      }
      send_request(RequestKind::call, "tools/call", json::object{{"name", call->tool}, {"arguments", call->arguments}},
                   call);
    }
  }

  void fail_call(PendingCall& call, ToolError::Kind kind, const std::string& message) {
    if (call.fail(kind, message) && kind != ToolError::Kind::cancelled) {
      std::lock_guard lock(mu_);
      ++failures_;
    }
  }

  void mark_first_start_done() {
    std::lock_guard lock(mu_);
    if (first_start_done_) return;
    first_start_done_ = true;
    started_cv_.notify_all();
  }

  void launch() {
    if (dialed_in_) return attach_connection();
    ++starts_;
    log_info(starts_ == 1 ? "starting tool server" : "restarting tool server",
             {{"server", name_}, {"command", command_text()}});
    if (starts_ > 1) {
      std::lock_guard lock(mu_);
      ++restarts_;
    }
    phase_ = Phase::initializing;
    start_deadline_ = Clock::now() + kStartTimeout;
    try {
      SpawnedServer spawned = spawn_server(config_);
      child_ = std::move(spawned.process);
      stdin_ = std::move(spawned.stdin_fd);
      stdout_ = std::move(spawned.stdout_fd);
      stderr_ = std::move(spawned.stderr_fd);
    } catch (const std::runtime_error& e) {
      end_process(ToolError::Kind::server_failed, e.what(), kClosePatience);
      return;
    }
    to_server_.clear();
    written_ = 0;
    from_server_.clear();
    log_line_.clear();
    last_log_line_.clear();
    listing_in_progress_ = relist_ = false;
    {
      std::lock_guard lock(mu_);
      running_ = true;
    }
    send_initialize();
  }

  void send_initialize() {
    send_request(RequestKind::initialize, "initialize",
                 json::object{{"protocolVersion", kProtocolVersion},
                              {"capabilities", json::object{}},
                              {"clientInfo", {{"name", "den"}, {"version", DEN_VERSION}}}});
  }

  // A dial-in's one "start": the socket is its stdin and stdout.
  void attach_connection() {
    phase_ = Phase::initializing;
    start_deadline_ = Clock::now() + kStartTimeout;
    if (!connection_) return end_process(ToolError::Kind::server_failed, "has no connection", kClosePatience);
    stdin_ = Fd(::fcntl(connection_.get(), F_DUPFD_CLOEXEC, 0));
    if (!stdin_) return end_process(ToolError::Kind::server_failed, "dup failed: " + errno_text(errno), kClosePatience);
    stdout_ = std::move(connection_);
    {
      std::lock_guard lock(mu_);
      running_ = true;
    }
    send_initialize();
  }

  std::string command_text() const {
    std::string text;
    for (const auto& arg : config_.command) text += (text.empty() ? "" : " ") + arg;
    return text;
  }

  // Ends the process if there is one (stdin closed, `patience`, SIGTERM, SIGKILL) and fails
  // what was in flight with `kind`. An empty `reason` becomes how the process exited. A
  // failure while starting also fails the calls waiting for the start and backs off.
  void end_process(ToolError::Kind kind, std::string reason, milliseconds patience) {
    const bool was_starting = phase_ == Phase::initializing;
    stdin_.reset();
    to_server_.clear();
    written_ = 0;
    if (child_.running()) {
      const std::string exit = describe_exit(child_.stop(patience));
      if (reason.empty()) reason = exit;
    }
    if (reason.empty()) reason = dialed_in_ ? "hung up" : "ended";
    if (stderr_) read_log();  // what it said last, now that it is gone
    if (!log_line_.empty()) emit_log_line();
    if (!last_log_line_.empty() && kind == ToolError::Kind::server_failed)
      reason += " (its last log line: '" + preview(last_log_line_, 200) + "')";
    stdout_.reset();
    stderr_.reset();
    from_server_.clear();
    phase_ = Phase::stopped;

    const std::string message = who() + " " + reason;
    if (dialed_in_) {
      log_info("dial-in tool server gone", {{"server", name_}, {"reason", reason}});
    } else {
      log_warn(was_starting ? "tool server failed to start" : "tool server failed",
               {{"server", name_}, {"error", reason}});
    }
    const char* after = dialed_in_ ? "; it must dial in again" : "; it restarts on the next call";
    for (auto& [id, request] : requests_) {
      if (request.kind == RequestKind::call)
        fail_call(*request.call, kind, "tool '" + request.call->qualified + "' failed: " + message + after);
    }
    requests_.clear();
    if (dialed_in_) {
      // Nothing restarts it: its calls fail now and the loop ends (run() sees gone_).
      for (const auto& call : waiting_)
        fail_call(*call, ToolError::Kind::server_failed, "tool '" + call->qualified + "' is unavailable: " + message);
      waiting_.clear();
      std::lock_guard lock(mu_);
      running_ = false;
      gone_ = true;
      tools_.clear();
      last_error_ = reason;
      return;
    }
    if (was_starting) {
      ++start_failures_in_row_;
      last_start_failure_ = reason;
      const auto backoff =
          std::min<milliseconds>(kFirstBackoff * (1 << std::min(start_failures_in_row_ - 1, 10)), kMaxBackoff);
      refuse_until_ = Clock::now() + backoff;
      for (const auto& call : waiting_)
        fail_call(*call, ToolError::Kind::server_failed,
                  "tool '" + call->qualified + "' is unavailable: " + who() + " failed to start: " + reason);
      waiting_.clear();
    }
    {
      std::lock_guard lock(mu_);
      running_ = false;
      last_error_ = (was_starting ? "failed to start: " : "") + reason;
    }
    if (was_starting) mark_first_start_done();
  }

  void shut_down() {
    std::vector<std::shared_ptr<PendingCall>> incoming;
    {
      std::lock_guard lock(mu_);
      incoming.swap(incoming_);
    }
    const auto cancel = [&](PendingCall& call) {
      if (gone_) {
        fail_call(call, ToolError::Kind::server_failed, "tool '" + call.qualified + "' is unavailable: " + who() + " hung up");
      } else {
        fail_call(call, ToolError::Kind::cancelled,
                  "tool call '" + call.qualified + "' was cancelled: the tool registry is shutting down");
      }
    };
    for (const auto& call : incoming) cancel(*call);
    for (const auto& call : waiting_) cancel(*call);
    for (const auto& [id, request] : requests_)
      if (request.kind == RequestKind::call) cancel(*request.call);
    waiting_.clear();
    requests_.clear();
    stdin_.reset();  // a polite server exits on EOF
    if (child_.running()) child_.stop(kClosePatience);
    stdout_.reset();
    stderr_.reset();
    {
      std::lock_guard lock(mu_);
      running_ = false;
    }
    if (dialed_in_ && named_) names_->release(name_);
    mark_first_start_done();
  }

  void wait_for_io() {
    pollfd fds[4];
    nfds_t n = 0;
    fds[n++] = {wake_fd_.get(), POLLIN, 0};
    const int err_at = stderr_ ? static_cast<int>(n) : -1;
    if (stderr_) fds[n++] = {stderr_.get(), POLLIN, 0};
    const int in_at = stdin_ && written_ < to_server_.size() ? static_cast<int>(n) : -1;
    if (in_at >= 0) fds[n++] = {stdin_.get(), POLLOUT, 0};
    const int out_at = stdout_ ? static_cast<int>(n) : -1;
    if (stdout_) fds[n++] = {stdout_.get(), POLLIN, 0};

    const int rc = ::poll(fds, n, poll_timeout_ms());
    if (rc <= 0) return;  // timeout or EINTR: the next step looks at the clock
    if (fds[0].revents) {
      uint64_t count;
      [[maybe_unused]] const ssize_t r = ::read(wake_fd_.get(), &count, sizeof count);
    }
    // stdout last: its EOF ends the process and closes the other two.
    if (err_at >= 0 && fds[err_at].revents) read_log();
    if (in_at >= 0 && fds[in_at].revents) flush_writes();
    if (out_at >= 0 && fds[out_at].revents) read_messages();
  }

  int poll_timeout_ms() const {
    std::optional<Clock::time_point> next;
    const auto consider = [&](Clock::time_point t) {
      if (!next || t < *next) next = t;
    };
    for (const auto& call : waiting_) consider(call->deadline);
    for (const auto& [id, request] : requests_)
      if (request.kind == RequestKind::call) consider(request.call->deadline);
    if (phase_ == Phase::initializing) consider(start_deadline_);
    if (!next) return -1;
    const auto left = std::chrono::ceil<milliseconds>(*next - Clock::now()).count();
    return static_cast<int>(std::clamp<int64_t>(left, 0, 60000));
  }

  // ---- writing

  int64_t send_request(RequestKind kind, std::string_view method, json::object params,
                       std::shared_ptr<PendingCall> call = nullptr) {
    const int64_t id = next_id_++;
    requests_.emplace(id, Request{kind, std::move(call)});
    write_message(json::object{{"jsonrpc", "2.0"}, {"id", id}, {"method", method}, {"params", std::move(params)}});
    return id;
  }

  void send_cancelled(int64_t id, const std::string& reason) {
    write_message(json::object{{"jsonrpc", "2.0"},
                               {"method", "notifications/cancelled"},
                               {"params", {{"requestId", id}, {"reason", reason}}}});
  }

  void write_message(const json::object& message) {
    if (!stdin_) return;
    to_server_ += json::serialize(message);
    to_server_ += '\n';
    flush_writes();
  }

  void flush_writes() {
    while (stdin_ && written_ < to_server_.size()) {
      const ssize_t n = ::write(stdin_.get(), to_server_.data() + written_, to_server_.size() - written_);
      if (n > 0) {
        written_ += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      // EPIPE: it closed its stdin; the EOF on its stdout will say how it ended. The SIGPIPE
      // this write raised is pending on this thread (blocked): take it.
      const int error = errno;
      sigset_t pipe_signal;
      sigemptyset(&pipe_signal);
      sigaddset(&pipe_signal, SIGPIPE);
      const timespec no_wait{};
      ::sigtimedwait(&pipe_signal, nullptr, &no_wait);
      log_debug("tool server closed its stdin", {{"server", name_}, {"error", errno_text(error)}});
      stdin_.reset();
    }
    if (written_ == to_server_.size()) {
      to_server_.clear();
      written_ = 0;
    } else if (written_ > (1 << 20) && written_ > to_server_.size() / 2) {
      to_server_.erase(0, written_);
      written_ = 0;
    }
  }

  // ---- reading stderr

  void read_log() {
    char buf[8192];
    for (int reads = 0; reads < 64 && stderr_; ++reads) {
      const ssize_t n = ::read(stderr_.get(), buf, sizeof buf);
      if (n > 0) {
        std::string_view chunk(buf, static_cast<size_t>(n));
        for (size_t newline; (newline = chunk.find('\n')) != std::string_view::npos; chunk.remove_prefix(newline + 1)) {
          append_log(chunk.substr(0, newline));
          emit_log_line();
        }
        append_log(chunk);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      if (!log_line_.empty()) emit_log_line();
      stderr_.reset();  // EOF (or an error): nothing more to hear
    }
  }

  void append_log(std::string_view part) {
    log_line_.append(part.substr(0, kMaxLogLineBytes - std::min(kMaxLogLineBytes, log_line_.size())));
  }

  void emit_log_line() {
    const std::string_view line = trim(log_line_);
    if (!line.empty()) {
      log_info("tool server log", {{"server", name_}, {"line", std::string(line)}});
      last_log_line_ = std::string(line);
    }
    log_line_.clear();
  }

  // ---- reading stdout

  void read_messages() {
    char buf[65536];
    for (int reads = 0; reads < 64 && stdout_; ++reads) {
      const ssize_t n = ::read(stdout_.get(), buf, sizeof buf);
      if (n > 0) {
        const size_t old_size = from_server_.size();
        from_server_.append(buf, static_cast<size_t>(n));
        take_lines(old_size);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      end_process(ToolError::Kind::server_failed, n == 0 ? "" : "stdout read failed: " + errno_text(errno),
                  kExitPatience);
    }
  }

  // Handles the complete lines in from_server_; `scanned` bytes are known to hold no newline.
  void take_lines(size_t scanned) {
    size_t start = 0;
    for (size_t newline; stdout_ && (newline = from_server_.find('\n', scanned)) != std::string::npos;) {
      std::string line = from_server_.substr(start, newline - start);
      start = scanned = newline + 1;
      handle_line(line);
    }
    if (!stdout_) return;  // the process ended on the way
    from_server_.erase(0, start);
    if (from_server_.size() > kMaxLineBytes) {
      log_warn("tool server sent an overlong line", {{"server", name_}, {"start", preview(from_server_)}});
      end_process(ToolError::Kind::protocol, "sent a line longer than " + std::to_string(kMaxLineBytes >> 20) + " MiB",
                  kClosePatience);
    }
  }

  void handle_line(std::string_view line) {
    line = trim(line);
    if (line.empty()) return;
    json::error_code ec;
    json::value message = parse_json(line, ec);
    if (ec || !message.is_object()) {
      log_warn("tool server sent garbage", {{"server", name_}, {"line", preview(line, 1000)}});
      end_process(ToolError::Kind::protocol,
                  std::string("sent a line that is not a JSON-RPC message") + (ec ? " (" + ec.message() + ")" : "") +
                      ": '" + preview(line) + "'",
                  kClosePatience);
      return;
    }
    json::object& m = message.get_object();
    const json::value* method = m.if_contains("method");
    const json::value* id = m.if_contains("id");
    if (method && method->is_string()) {
      const json::value* params = m.if_contains("params");
      if (id) {
        answer_request(*id, method->get_string());
      } else {
        on_notification(method->get_string(), params ? *params : json::value());
      }
    } else if (id && (m.contains("result") || m.contains("error"))) {
      on_response(*id, m);
    } else {
      log_warn("tool server sent a message that is neither a request nor a response",
               {{"server", name_}, {"line", preview(line, 1000)}});
    }
  }

  // Requests from the server to us: den offers no sampling, roots or elicitation.
  void answer_request(const json::value& id, std::string_view method) {
    if (method == "ping") {
      write_message(json::object{{"jsonrpc", "2.0"}, {"id", id}, {"result", json::object{}}});
      return;
    }
    log_debug("tool server asked for a method den does not offer",
              {{"server", name_}, {"method", std::string(method)}});
    write_message(json::object{{"jsonrpc", "2.0"},
                               {"id", id},
                               {"error", {{"code", -32601}, {"message", "Method not found: " + std::string(method)}}}});
  }

  void on_notification(std::string_view method, const json::value& params) {
    if (method == "notifications/tools/list_changed") {
      log_info("tool server's tools changed", {{"server", name_}});
      if (listing_in_progress_) {
        relist_ = true;
      } else if (phase_ == Phase::ready) {
        start_listing();
      }
    } else if (method == "notifications/message") {
      const json::object* p = params.if_object();
      const json::value* level = p ? p->if_contains("level") : nullptr;
      const json::value* data = p ? p->if_contains("data") : nullptr;
      log_info("tool server message",
               {{"server", name_},
                {"level", level && level->is_string() ? std::string(level->get_string()) : ""},
                {"data", data ? (data->is_string() ? std::string(data->get_string()) : json::serialize(*data)) : ""}});
    } else {
      log_debug("tool server notification", {{"server", name_}, {"method", std::string(method)}});
    }
  }

  void on_response(const json::value& id, json::object& message) {
    json::error_code ec;
    const auto key = id.to_number<int64_t>(ec);
    const auto it = ec ? requests_.end() : requests_.find(key);
    if (it == requests_.end()) {
      // A reply to a call that timed out or was cancelled: expected, and dropped.
      log_debug("tool server replied to no pending request", {{"server", name_}, {"id", json::serialize(id)}});
      return;
    }
    Request request = std::move(it->second);
    requests_.erase(it);
    const json::value* error = message.if_contains("error");
    const json::value* result = message.if_contains("result");
    const json::value none;
    if (!result) result = &none;
    switch (request.kind) {
      case RequestKind::initialize: return on_initialize_reply(error, *result);
      case RequestKind::list: return on_list_reply(error, *result);
      case RequestKind::call: return on_call_reply(*request.call, error, *result);
    }
  }

  void on_initialize_reply(const json::value* error, const json::value& result) {
    if (error)
      return end_process(ToolError::Kind::server_failed, "refused initialize: " + rpc_error_text(*error),
                         kClosePatience);
    const json::object* r = result.if_object();
    if (!r)
      return end_process(ToolError::Kind::protocol, "answered initialize without a result object", kClosePatience);
    std::string version = "?", info;
    if (const json::value* v = r->if_contains("protocolVersion"); v && v->is_string()) version = v->get_string();
    if (const json::value* s = r->if_contains("serverInfo"); s && s->is_object()) {
      for (const char* key : {"name", "version"})
        if (const json::value* v = s->get_object().if_contains(key); v && v->is_string())
          info += (info.empty() ? "" : " ") + std::string(v->get_string());
    }
    if (dialed_in_ && !named_) {
      std::string wanted;
      if (const json::value* s = r->if_contains("serverInfo"); s && s->is_object())
        if (const json::value* n = s->get_object().if_contains("name"); n && n->is_string()) wanted = n->get_string();
      std::string name = names_->claim(wanted);
      log_info("tool server dialed in", {{"connection", name_}, {"server", name}});
      std::lock_guard lock(mu_);
      name_ = std::move(name);
      named_ = true;
    }
    // Older protocol versions are fine: initialize, tools/list and tools/call are the same.
    log_info("tool server initialized", {{"server", name_}, {"protocol", version}, {"server_info", info}});
    write_message(json::object{{"jsonrpc", "2.0"}, {"method", "notifications/initialized"}});
    start_listing();
  }

  void start_listing() {
    listing_.clear();
    list_pages_ = 0;
    listing_in_progress_ = true;
    send_request(RequestKind::list, "tools/list", json::object{});
  }

  void on_list_reply(const json::value* error, const json::value& result) {
    const json::object* r = result.if_object();
    const json::value* tools = r ? r->if_contains("tools") : nullptr;
    if (error || !tools || !tools->is_array()) {
      listing_in_progress_ = false;
      const std::string why =
          error ? "refused tools/list: " + rpc_error_text(*error) : "answered tools/list without a 'tools' array";
      if (phase_ == Phase::initializing) {
        end_process(error ? ToolError::Kind::server_failed : ToolError::Kind::protocol, why, kClosePatience);
      } else {
        log_warn("tool server listing failed; keeping the previous list", {{"server", name_}, {"error", why}});
      }
      return;
    }
    for (const json::value& tool : tools->get_array()) listing_.push_back(tool);
    const json::value* cursor = r->if_contains("nextCursor");
    if (cursor && cursor->is_string() && !cursor->get_string().empty() && ++list_pages_ < kMaxListPages) {
      send_request(RequestKind::list, "tools/list", json::object{{"cursor", cursor->get_string()}});
      return;
    }
    commit_listing();
  }

  void commit_listing() {
    std::vector<ToolInfo> infos;
    for (const json::value& tool : listing_) {
      const json::object* t = tool.if_object();
      const json::value* name = t ? t->if_contains("name") : nullptr;
      if (!name || !name->is_string() || name->get_string().empty()) {
        log_warn("tool server listed a tool without a name; skipped",
                 {{"server", name_}, {"tool", preview(json::serialize(tool))}});
        continue;
      }
      ToolInfo info;
      info.server = name_;
      info.name = name->get_string();
      info.qualified = name_ + "." + info.name;
      if (const json::value* d = t->if_contains("description"); d && d->is_string()) info.description = d->get_string();
      const json::value* schema = t->if_contains("inputSchema");
      info.input_schema = schema && schema->is_object() ? *schema : json::value(json::object{{"type", "object"}});
      infos.push_back(std::move(info));
    }
    listing_.clear();
    listing_in_progress_ = false;
    log_info("tool server listed its tools", {{"server", name_}, {"tools", tool_names(infos)}});
    {
      std::lock_guard lock(mu_);
      tools_ = std::move(infos);
      listed_ = true;
    }
    if (phase_ == Phase::initializing) {
      phase_ = Phase::ready;
      start_failures_in_row_ = 0;
      mark_first_start_done();
    }
    if (relist_) {
      relist_ = false;
      start_listing();
    }
  }

  void on_call_reply(PendingCall& call, const json::value* error, const json::value& result) {
    if (call.finished()) return;  // cancelled an instant ago
    if (error) {
      int64_t code = 0;
      const std::string text = rpc_error_text(*error, &code);
      // -32602 (invalid params) is how MCP servers refuse unknown tools and bad arguments.
      fail_call(call, code == -32602 ? ToolError::Kind::invalid_arguments : ToolError::Kind::server_failed,
                "tool '" + call.qualified + "' failed: " + who() + " answered " + text);
      return;
    }
    std::string why;
    if (auto parsed = parse_tool_result(result, why)) {
      call.finish(std::move(parsed), nullptr);
    } else {
      fail_call(call, ToolError::Kind::protocol,
                "tool '" + call.qualified + "': " + who() + " sent a malformed result: " + why);
    }
  }

  const ToolServerConfig config_;  // empty for a dial-in
  const bool dialed_in_ = false;
  Fd wake_fd_;  // eventfd: new calls, cancels, stop

  // Guards what other threads read or hand over.
  mutable std::mutex mu_;
  std::condition_variable started_cv_;
  std::vector<std::shared_ptr<PendingCall>> incoming_;
  bool stopping_ = false;
  bool first_start_done_ = false;
  std::string name_;              // written by the server thread only (under mu_)
  bool named_ = false;            // a dial-in's initialize gave it its name
  bool gone_ = false;             // a dial-in hung up (or broke): it is never used again
  std::vector<ToolInfo> tools_;  // written by the server thread only
  bool listed_ = false;
  bool running_ = false;
  int64_t calls_ = 0, failures_ = 0, restarts_ = 0;
  std::string last_error_;

  // The server thread's alone.
  std::shared_ptr<NameBook> names_;  // dial-ins: where their name comes from
  Fd connection_;                    // a dial-in's socket until launch() takes it
  Phase phase_ = Phase::stopped;
  ChildProcess child_;
  Fd stdin_, stdout_, stderr_;
  std::string to_server_;  // queued for its stdin; [0, written_) is sent
  size_t written_ = 0;
  std::string from_server_;  // stdout bytes short of a newline
  std::string log_line_, last_log_line_;
  std::map<int64_t, Request> requests_;               // in flight, by JSON-RPC id
  std::deque<std::shared_ptr<PendingCall>> waiting_;  // until the server is ready
  json::array listing_;                               // tools/list pages so far
  int list_pages_ = 0;
  bool listing_in_progress_ = false, relist_ = false;
  int64_t next_id_ = 1;
  int starts_ = 0, start_failures_in_row_ = 0;
  std::string last_start_failure_;
  Clock::time_point start_deadline_, refuse_until_;
  std::thread thread_;
};

void PendingCall::cancel() {
  if (!fail(ToolError::Kind::cancelled, "tool call '" + qualified + "' was cancelled")) return;
  // The server thread sees the call finished, drops it and sends notifications/cancelled.
  if (auto s = server.lock()) s->wake();
}

}  // namespace

std::string ToolResult::text() const {
  std::string out;
  bool first = true;
  for (const json::value& item : content) {
    const json::object* o = item.if_object();
    const json::value* type = o ? o->if_contains("type") : nullptr;
    const json::value* text = o ? o->if_contains("text") : nullptr;
    if (!type || *type != "text" || !text || !text->is_string()) continue;
    if (!first) out += '\n';
    out += text->get_string();
    first = false;
  }
  return out;
}

struct ToolRegistry::Impl {
  milliseconds default_timeout{30000};
  std::shared_ptr<CompletionQueue> completions = std::make_shared<CompletionQueue>();
  std::shared_ptr<NameBook> names;

  mutable std::mutex mu;  // guards servers: dial-ins come and go
  mutable std::vector<std::shared_ptr<ToolServer>> servers;  // mutable: lookups drop the dial-ins that hung up

  // The dial-in socket, once listen() opened it.
  std::string listen_path;
  ino_t listen_inode = 0;
  Fd listen_fd, listener_wake;
  std::thread listener;
  int64_t dial_ins = 0;  // connections accepted so far, for their labels

  ~Impl() {
    if (listener.joinable()) {
      const uint64_t one = 1;
      [[maybe_unused]] const ssize_t n = ::write(listener_wake.get(), &one, sizeof one);
      listener.join();
    }
    unlink_if_ours(listen_path, listen_inode);
    std::vector<std::shared_ptr<ToolServer>> all;
    {
      std::lock_guard lock(mu);
      all.swap(servers);
    }
    // All servers stop at once (each may take kTermGrace), then the last completions run.
    for (auto& server : all) server->request_stop();
    for (auto& server : all) server->join();
    completions->shutdown();
  }

  // A snapshot without the dial-ins that hung up (dropped here, their threads joined outside the lock).
  std::vector<std::shared_ptr<ToolServer>> live_servers() const {
    std::vector<std::shared_ptr<ToolServer>> live, gone;
    {
      std::lock_guard lock(mu);
      for (auto it = servers.begin(); it != servers.end();) {
        if ((*it)->gone()) {
          gone.push_back(std::move(*it));
          it = servers.erase(it);
        } else {
          live.push_back(*it++);
        }
      }
    }
    return live;  // `gone` ends here: each destructor joins a thread that has already left its loop
  }

  std::shared_ptr<ToolServer> find(std::string_view name) const {
    for (const auto& server : live_servers())
      if (server->callable() && server->name() == name) return server;
    return nullptr;
  }

  void accept_dial_ins() {
    for (;;) {
      pollfd fds[2] = {{listen_fd.get(), POLLIN, 0}, {listener_wake.get(), POLLIN, 0}};
      if (::poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        log_error("tool socket: poll failed; no more dial-ins", {{"error", errno_text(errno)}});
        return;
      }
      if (fds[1].revents) return;
      Fd connection(::accept4(listen_fd.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
      if (!connection) {
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          log_warn("tool socket: cannot accept a dial-in now", {{"error", errno_text(errno)}});
          std::this_thread::sleep_for(milliseconds(100));
        }
        continue;  // EINTR, EAGAIN, ECONNABORTED: the next one
      }
      try {
        admit(std::move(connection));
      } catch (const std::exception& e) {
        log_error("tool socket: dial-in not admitted", {{"error", e.what()}});
      }
    }
  }

  void admit(Fd connection) {
    ucred peer{};
    socklen_t size = sizeof peer;
    if (::getsockopt(connection.get(), SOL_SOCKET, SO_PEERCRED, &peer, &size) != 0 || peer.uid != ::geteuid()) {
      log_warn("tool socket: refused a dial-in of another user",
               {{"uid", std::to_string(peer.uid)}, {"pid", std::to_string(peer.pid)}});
      return;
    }
    size_t connected = 0;
    for (const auto& server : live_servers()) connected += server->status().dialed_in ? 1 : 0;
    const std::string label = "dial-in#" + std::to_string(++dial_ins);
    if (connected >= kMaxDialIns) {
      log_warn("tool socket: refused a dial-in, too many connected",
               {{"connection", label}, {"pid", std::to_string(peer.pid)}, {"limit", std::to_string(kMaxDialIns)}});
      return;
    }
    log_info("tool socket: dial-in connected", {{"connection", label}, {"pid", std::to_string(peer.pid)}});
    auto server = std::make_shared<ToolServer>(std::move(connection), label, names);
    {
      std::lock_guard lock(mu);
      servers.push_back(server);
    }
    server->start();
  }
};

ToolRegistry::ToolRegistry(std::vector<ToolServerConfig> servers, milliseconds default_timeout)
    : impl_(std::make_unique<Impl>()) {
  if (default_timeout.count() > 0) impl_->default_timeout = default_timeout;
  std::set<std::string> configured;
  for (const auto& config : servers) configured.insert(config.name);
  impl_->names = std::make_shared<NameBook>(std::move(configured));
  for (auto& config : servers) impl_->servers.push_back(std::make_shared<ToolServer>(std::move(config)));
  for (auto& server : impl_->servers) server->start();
  // The servers start side by side; each gives up by itself after kStartTimeout.
  const auto deadline = Clock::now() + kStartTimeout + std::chrono::seconds(1);
  for (auto& server : impl_->servers) server->wait_first_start(deadline);
}

ToolRegistry::~ToolRegistry() = default;

void ToolRegistry::listen(const std::string& socket_path) {
  if (impl_->listener.joinable()) throw std::logic_error("ToolRegistry::listen called twice");
  Fd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake) throw std::runtime_error("tool socket: eventfd failed: " + errno_text(errno));
  const UnixListener listener =
      listen_unix(socket_path, "another daemon's tool servers dial in at " + socket_path,
                  "remove it or set tool_socket to another path (or off)");
  impl_->listen_fd = Fd(listener.fd);
  impl_->listen_inode = listener.inode;
  impl_->listen_path = socket_path;
  impl_->listener_wake = std::move(wake);
  impl_->listener = std::thread([impl = impl_.get()] { impl->accept_dial_ins(); });
  log_info("tool servers may dial in", {{"socket", socket_path}});
}

const std::string& ToolRegistry::listen_path() const { return impl_->listen_path; }

std::vector<ToolInfo> ToolRegistry::list() const {
  std::vector<ToolInfo> all;
  for (const auto& server : impl_->live_servers()) {
    auto tools = server->tools();
    std::move(tools.begin(), tools.end(), std::back_inserter(all));
  }
  return all;
}

std::shared_ptr<ToolCall> ToolRegistry::call(std::string_view qualified_name, const json::object& arguments,
                                             milliseconds timeout, Completion done) {
  if (timeout.count() <= 0) timeout = impl_->default_timeout;
  // Server names have no dots (the config says so); tool names may.
  const size_t dot = qualified_name.find('.');
  const std::string_view server_name =
      dot == std::string_view::npos ? std::string_view() : qualified_name.substr(0, dot);
  const std::string_view tool = dot == std::string_view::npos ? qualified_name : qualified_name.substr(dot + 1);
  auto call = std::make_shared<PendingCall>(std::string(qualified_name), std::string(tool), arguments, timeout,
                                            std::move(done), impl_->completions);
  std::shared_ptr<ToolServer> server = server_name.empty() ? nullptr : impl_->find(server_name);
  if (!server) {
    call->fail(ToolError::Kind::unknown_tool,
               "unknown tool '" + std::string(qualified_name) +
                   "' (tools are named <server>.<tool>); known tools: " + tool_names(list()));
    return call;
  }
  call->server = server;
  server->submit(call);
  return call;
}

std::vector<ToolRegistry::ServerStatus> ToolRegistry::status() const {
  std::vector<ServerStatus> all;
  for (const auto& server : impl_->live_servers()) all.push_back(server->status());
  return all;
}

}  // namespace den::runtime
