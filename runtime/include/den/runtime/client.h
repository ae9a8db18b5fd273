// A blocking client of the daemon's socket: what the `den` CLI and the integration tests use.
// One request at a time per client; notifications that arrive while a call runs are handed to
// the caller's callback in order.
#pragma once

#include <boost/json.hpp>

#include <chrono>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

namespace den::runtime {

// The daemon answered with a JSON-RPC error.
class RpcCallError : public std::runtime_error {
 public:
  RpcCallError(int code, const std::string& message, boost::json::value data)
      : std::runtime_error(message), code_(code), data_(std::move(data)) {}
  int code() const { return code_; }
  const boost::json::value& data() const { return data_; }

 private:
  int code_;
  boost::json::value data_;
};

// No daemon listens at the path (or the connection broke). what() says what to do, e.g.
// "no daemon at /run/user/1000/den/den.sock: start one with 'den serve'".
class DaemonUnavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class DaemonClient {
 public:
  // Connects to `socket_path` (resolve it with paths.h's socket_path first). Throws
  // DaemonUnavailable when nothing listens there.
  explicit DaemonClient(const std::string& socket_path);
  ~DaemonClient();
  DaemonClient(const DaemonClient&) = delete;
  DaemonClient& operator=(const DaemonClient&) = delete;

  using NotificationHandler = std::function<void(std::string_view method, const boost::json::object& params)>;

  // Sends a request and waits for its response; returns `result` or throws RpcCallError.
  // Notifications received meanwhile go to on_notification (in arrival order).
  boost::json::value call(std::string_view method, const boost::json::object& params = {},
                          const NotificationHandler& on_notification = {});
  // The id the next call() will use: stream and progress notifications name it as `request`.
  int64_t next_id() const { return next_id_; }
  // Sends raw bytes (tests: malformed input) and reads one line back (nullopt on EOF/timeout).
  void send_raw(std::string_view bytes);
  std::optional<std::string> read_line(std::chrono::milliseconds timeout);
  const std::string& socket_path() const { return path_; }

 private:
  enum class LineStatus { line, closed, timed_out };
  // Takes the next complete line out of buffer_ (reading as needed) into `line`; a negative
  // timeout waits forever.
  LineStatus next_line(std::string& line, std::chrono::milliseconds timeout);
  void send_all(std::string_view bytes);
  [[noreturn]] void throw_closed() const;

  std::string path_;
  int fd_ = -1;  // owned: closed by the destructor
  int64_t next_id_ = 1;
  std::string buffer_;  // received bytes not yet returned as lines
};

// True when a daemon answers at the path (connect succeeds).
bool daemon_listening(const std::string& socket_path);

// One line for a person: what the daemon refused and what to do about it, from the error's code
// and data (e.g. -32000: "no session 'foo' (den sessions ls lists them)"). The CLI's error lines.
std::string describe_for_user(const RpcCallError& error);

}  // namespace den::runtime
