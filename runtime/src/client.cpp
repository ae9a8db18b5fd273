// The blocking JSON-RPC client of the daemon's Unix socket (client.h): one connection, one call
// at a time, notifications handed to the caller while it waits. Used by the `den` CLI (sessions,
// stats, generate and chat through the daemon) and by the integration tests.
#include "den/runtime/client.h"

#include "den/runtime/json_rpc.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace den::runtime {

namespace json = boost::json;

namespace {

// Owns a socket until it is handed over with release(), so every failure path closes it.
class OwnedFd {
 public:
  explicit OwnedFd(int fd) : fd_(fd) {}
  ~OwnedFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  OwnedFd(const OwnedFd&) = delete;
  OwnedFd& operator=(const OwnedFd&) = delete;
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_;
};

std::string unavailable_message(const std::string& path) {
  return "no daemon at " + path + ": start one with 'den serve'";
}

enum class ConnectResult { connected, nobody_listens, failed };

// Connects a new socket to `path`; on anything but success the socket is closed again and
// `error` holds errno.
ConnectResult connect_unix(const std::string& path, OwnedFd& out, int& error) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof address.sun_path) {
    error = ENAMETOOLONG;
    return ConnectResult::failed;
  }
  std::memcpy(address.sun_path, path.data(), path.size());
  OwnedFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) {
    error = errno;
    return ConnectResult::failed;
  }
  int rc;
  do {
    rc = ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address);
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    error = errno;
    // ENOENT: no socket file; ECONNREFUSED: a stale file nobody listens on; ENOTDIR: a path
    // component is a file. All three mean "no daemon here".
    return error == ENOENT || error == ECONNREFUSED || error == ENOTDIR ? ConnectResult::nobody_listens
                                                                        : ConnectResult::failed;
  }
  out.reset(fd.release());
  return ConnectResult::connected;
}

std::string quoted(const json::value& v) {
  if (const json::string* s = v.if_string()) return "'" + std::string(*s) + "'";
  return json::serialize(v);
}

// data[key] when data is an object holding it, else nullptr.
const json::value* field(const json::value& data, std::string_view key) {
  const json::object* object = data.if_object();
  return object != nullptr ? object->if_contains(key) : nullptr;
}

}  // namespace

DaemonClient::DaemonClient(const std::string& socket_path) : path_(socket_path) {
  OwnedFd fd(-1);
  int error = 0;
  switch (connect_unix(path_, fd, error)) {
    case ConnectResult::connected:
      fd_ = fd.release();
      return;
    case ConnectResult::nobody_listens:
      throw DaemonUnavailable(unavailable_message(path_));
    case ConnectResult::failed:
      throw DaemonUnavailable("cannot connect to the daemon at " + path_ + ": " + std::strerror(error));
  }
}

DaemonClient::~DaemonClient() {
  if (fd_ >= 0) ::close(fd_);
}

void DaemonClient::throw_closed() const {
  throw DaemonUnavailable("the daemon at " + path_ + " closed the connection");
}

void DaemonClient::send_all(std::string_view bytes) {
  while (!bytes.empty()) {
    // MSG_NOSIGNAL: a daemon that went away must give EPIPE here, not kill us with SIGPIPE.
    const ssize_t sent = ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR) continue;
      if (errno == EPIPE || errno == ECONNRESET) throw_closed();
      throw DaemonUnavailable("cannot write to the daemon at " + path_ + ": " + std::strerror(errno));
    }
    bytes.remove_prefix(static_cast<size_t>(sent));
  }
}

void DaemonClient::send_raw(std::string_view bytes) { send_all(bytes); }

DaemonClient::LineStatus DaemonClient::next_line(std::string& line, std::chrono::milliseconds timeout) {
  using Clock = std::chrono::steady_clock;
  const bool forever = timeout.count() < 0;
  const Clock::time_point deadline = Clock::now() + (forever ? std::chrono::milliseconds(0) : timeout);
  size_t scanned = 0;  // bytes of buffer_ already known to hold no newline
  for (;;) {
    const size_t newline = buffer_.find('\n', scanned);
    if (newline != std::string::npos) {
      line.assign(buffer_, 0, newline);
      buffer_.erase(0, newline + 1);
      return LineStatus::line;
    }
    scanned = buffer_.size();

    int wait_ms = -1;
    if (!forever) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
      if (left.count() <= 0) return LineStatus::timed_out;
      wait_ms = static_cast<int>(std::min<int64_t>(left.count(), 1 << 30));
    }
    pollfd p{fd_, POLLIN, 0};
    const int ready = ::poll(&p, 1, wait_ms);
    if (ready < 0) {
      if (errno == EINTR) continue;  // a signal (Ctrl-C handled elsewhere): keep waiting
      throw DaemonUnavailable("cannot read from the daemon at " + path_ + ": " + std::strerror(errno));
    }
    if (ready == 0) continue;  // the deadline check above returns

    char chunk[65536];
    const ssize_t got = ::recv(fd_, chunk, sizeof chunk, 0);
    if (got < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      if (errno == ECONNRESET) return LineStatus::closed;
      throw DaemonUnavailable("cannot read from the daemon at " + path_ + ": " + std::strerror(errno));
    }
    if (got == 0) return LineStatus::closed;  // an unterminated last line is not a message
    buffer_.append(chunk, static_cast<size_t>(got));
  }
}

std::optional<std::string> DaemonClient::read_line(std::chrono::milliseconds timeout) {
  std::string line;
  if (next_line(line, timeout) != LineStatus::line) return std::nullopt;
  return line;
}

json::value DaemonClient::call(std::string_view method, const json::object& params,
                               const NotificationHandler& on_notification) {
  const int64_t id = next_id_++;
  json::object request;
  request["jsonrpc"] = "2.0";
  request["id"] = id;
  request["method"] = method;
  request["params"] = params;
  send_all(json::serialize(request) + "\n");

  std::string line;
  for (;;) {
    if (next_line(line, std::chrono::milliseconds(-1)) != LineStatus::line) throw_closed();
    json::error_code ec;
    json::value message = json::parse(line, ec);
    json::object* object = ec ? nullptr : message.if_object();
    if (object == nullptr) {
      throw std::runtime_error("the daemon at " + path_ + " sent something that is not a JSON-RPC message: " +
                               line.substr(0, 200));
    }
    const json::value* message_id = object->if_contains("id");
    if (message_id == nullptr || message_id->is_null()) {
      const json::value* notified = object->if_contains("method");
      if (on_notification && notified != nullptr && notified->is_string()) {
        static const json::object kNoParams;
        const json::value* notified_params = object->if_contains("params");
        on_notification(notified->as_string(),
                        notified_params != nullptr && notified_params->is_object() ? notified_params->as_object()
                                                                                  : kNoParams);
      }
      continue;
    }
    const auto answered = message_id->to_number<int64_t>(ec);
    // Another id answers an earlier call whose caller gave up (an exception in its handler).
    if (ec || answered != id) continue;

    if (const json::value* error = object->if_contains("error")) {
      int code = rpc::internal_error;
      std::string text = "unknown error";
      json::value data = nullptr;
      if (const json::object* e = error->if_object()) {
        if (const json::value* c = e->if_contains("code")) code = static_cast<int>(c->to_number<int64_t>(ec));
        if (const json::value* m = e->if_contains("message"); m != nullptr && m->is_string()) {
          text = std::string(m->as_string());
        }
        if (const json::value* d = e->if_contains("data")) data = *d;
      }
      throw RpcCallError(code, text, std::move(data));
    }
    if (json::value* result = object->if_contains("result")) return std::move(*result);
    return nullptr;
  }
}

bool daemon_listening(const std::string& socket_path) {
  OwnedFd fd(-1);
  int error = 0;
  return connect_unix(socket_path, fd, error) == ConnectResult::connected;
}

std::string describe_for_user(const RpcCallError& error) {
  const json::value& data = error.data();
  const json::value* session = field(data, "session");
  const std::string who = session != nullptr ? quoted(*session) : std::string("the session");
  switch (error.code()) {
    case rpc::session_not_found:
      return "no session " + who + " (den sessions ls lists them)";
    case rpc::session_exists: {
      const json::value* name = field(data, "name");
      return "the session name " + (name != nullptr ? quoted(*name) + " " : std::string()) +
             "is taken or invalid: " + error.what() + " (den sessions ls lists the names in use)";
    }
    case rpc::session_busy:
      return "session " + who + " is busy (another request is generating on it or moving it); try again when it is done";
    case rpc::cancelled:
      return "the request was cancelled";
    case rpc::context_full: {
      const json::value* tokens = field(data, "tokens");
      const json::value* context = field(data, "context");
      std::string sizes;
      if (tokens != nullptr && context != nullptr) {
        sizes = " (" + json::serialize(*tokens) + " tokens, context " + json::serialize(*context) + ")";
      }
      return "the context is full" + sizes + ": continue in a new session";
    }
    case rpc::storage_error: {
      const json::value* needed = field(data, "needed_bytes");
      return std::string("the daemon could not write the session: ") + error.what() +
             (needed != nullptr ? " (" + json::serialize(*needed) + " bytes needed)" : std::string()) +
             "; free space in its state directory";
    }
    case rpc::shutting_down:
      return "the daemon is shutting down; start it again with 'den serve'";
    case rpc::limit_exceeded:
      return std::string("a daemon limit was exceeded: ") + error.what() + " (limits are set in the daemon's config)";
    case rpc::unsupported:
      return std::string("not supported by this daemon's configuration: ") + error.what();
    // The agent errors' messages name the agent already ("no agent 'x'"); `data.agent` may too.
    case rpc::agent_not_found:
      return std::string(error.what()) + " (den agent ps lists the agents)";
    case rpc::agent_exists:
      return std::string(error.what()) + ": pick another --name, or delete the old one first (den agent rm NAME)";
    case rpc::agent_invalid:
      return std::string(error.what()) + " (fix it and spawn again; agents/README.md describes the Lua API)";
    case rpc::agent_stopped: {
      // The agent's name: data.agent, else the first quoted word of the message.
      const json::value* agent = field(data, "agent");
      std::string name = agent != nullptr && agent->is_string() ? std::string(agent->as_string()) : std::string();
      const std::string_view message = error.what();
      if (const size_t open = message.find('\''); name.empty() && open != std::string_view::npos) {
        const size_t close = message.find('\'', open + 1);
        if (close != std::string_view::npos) name = std::string(message.substr(open + 1, close - open - 1));
      }
      if (name.empty()) return std::string(error.what()) + " (the agent takes no messages now)";
      return std::string(error.what()) + ": stopped and failed agents take no messages (den agent get " + name +
             " says why; den agent rm " + name + " and spawn it again)";
    }
    default:
      return std::string("the daemon refused the request: ") + error.what() + " (error " +
             std::to_string(error.code()) + ")";
  }
}

}  // namespace den::runtime
