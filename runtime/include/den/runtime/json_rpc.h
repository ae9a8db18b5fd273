// JSON-RPC 2.0 over newline-delimited JSON (MCP's stdio framing), the wire format of the
// daemon's socket: framing with a bounded line length, parsing with a bounded nesting depth
// (both enforced before anything grows with the input), typed access to params with errors
// that name the parameter, and the serialisation of responses, errors and notifications.
// Transport-free, so the parser can be fuzzed (tests/fuzz/request_parser_fuzz.cpp).
#pragma once

#include <boost/json.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace den::runtime::rpc {

namespace json = boost::json;

// Standard JSON-RPC codes and Den's own (-32000..-32099), documented in docs/PROTOCOL.md.
enum ErrorCode : int {
  parse_error = -32700,
  invalid_request = -32600,
  method_not_found = -32601,
  invalid_params = -32602,
  internal_error = -32603,
  session_not_found = -32000,
  session_exists = -32001,     // the name is taken
  session_busy = -32002,       // another request is generating on / moving the session
  cancelled = -32003,
  context_full = -32004,       // the prompt does not fit the context
  storage_error = -32005,      // a checkpoint/hibernate could not be written (data: needed bytes)
  shutting_down = -32006,
  limit_exceeded = -32007,     // line too long, too deep, too many connections/sessions
  unsupported = -32008,        // e.g. hibernate to ssd without an SSD tier
  request_timeout = -32009,    // a line was not completed in time
  session_refused = -32010,    // the memory manager refused (pinned session hibernated, no room to pin, ...)
  agent_not_found = -32011,
  agent_exists = -32012,       // the name is taken
  agent_invalid = -32013,      // the name is invalid or the script does not load
  agent_stopped = -32014,      // stopped or failed agents take no messages
};

// An error to send back. `data` is null or an object with details.
class Error : public std::runtime_error {
 public:
  Error(int code, const std::string& message, json::value data = nullptr)
      : std::runtime_error(message), code_(code), data_(std::move(data)) {}
  int code() const { return code_; }
  const json::value& data() const { return data_; }

 private:
  int code_;
  json::value data_;
};

struct Limits {
  size_t max_line_bytes = 4 << 20;
  int32_t max_depth = 64;
};

// A parsed request: a call (has an id) or a notification (no id: no response is sent).
struct Request {
  json::value id;             // string or integer; null for a notification
  bool notification = false;
  std::string method;
  json::object params;        // {} when absent; positional (array) params are refused
};

// Parses one line (without its newline). On failure throws Error with parse_error,
// invalid_request, invalid_params (positional params) or limit_exceeded; `error_id` (when given) receives the request's id if it
// could be read, so the error can still be correlated.
Request parse_request(std::string_view line, const Limits& limits, json::value* error_id = nullptr);

// Splits a byte stream into lines ending in '\n' (a '\r' before it is dropped; empty lines are
// reported too). A line longer than max_line_bytes is not buffered: its bytes are discarded up
// to the next newline and one `oversized` line is reported in its place.
class LineFramer {
 public:
  explicit LineFramer(size_t max_line_bytes) : max_line_bytes_(max_line_bytes) {}
  struct Line {
    std::string text;
    bool oversized = false;
    size_t bytes = 0;  // length of the line as received, '\r' included (also for an oversized one)
  };
  // Feeds received bytes; returns the lines they completed.
  std::vector<Line> push(std::string_view bytes);
  // Bytes of the current incomplete line (0 between lines).
  size_t pending_bytes() const { return partial_bytes_; }
  // Memory held for the current line: O(max_line_bytes) however long the line grows.
  size_t buffer_capacity_bytes() const { return partial_.capacity(); }

 private:
  size_t max_line_bytes_;
  std::string partial_;
  size_t partial_bytes_ = 0;
  bool discarding_ = false;
};

// Serialised messages, each ending in '\n' and always valid JSON in valid UTF-8: infinities
// and NaN are written as null, bytes of invalid UTF-8 inside strings as U+FFFD.
std::string response(const json::value& id, const json::value& result);
std::string error_response(const json::value& id, int code, std::string_view message,
                           const json::value& data = nullptr);
std::string error_response(const json::value& id, const Error& error);
std::string notification(std::string_view method, const json::value& params);

// Typed params. Every accessor throws Error(invalid_params) naming the key and the expected
// type or range; unknown keys are refused by check_known (so typos do not pass silently).
// A member set to null counts as absent. Integers may come as doubles with an integral value
// (5.0), never as booleans.
class Params {
 public:
  explicit Params(const json::object& params) : params_(params) {}
  bool has(std::string_view key) const;
  std::string string(std::string_view key) const;  // required
  std::optional<std::string> optional_string(std::string_view key) const;
  int64_t integer(std::string_view key, int64_t fallback, int64_t min, int64_t max) const;
  std::optional<int64_t> optional_integer(std::string_view key, int64_t min, int64_t max) const;
  double number(std::string_view key, double fallback, double min, double max) const;
  bool boolean(std::string_view key, bool fallback) const;
  std::vector<std::string> strings(std::string_view key) const;  // absent: empty
  std::vector<int32_t> int32s(std::string_view key, int32_t min, int32_t max) const;
  const json::array* optional_array(std::string_view key) const;
  void check_known(std::initializer_list<std::string_view> keys) const;
  const json::object& raw() const { return params_; }

 private:
  const json::object& params_;
};

}  // namespace den::runtime::rpc
