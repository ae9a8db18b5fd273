// Tools for agents: MCP servers the daemon is a client of. Servers come from the config's
// `tools` list (spawned, JSON-RPC over their stdin/stdout, newline-delimited as MCP's stdio
// transport says). For each the daemon sends `initialize` and `notifications/initialized`,
// then `tools/list`, and lists again on `notifications/tools/list_changed`. Calls are
// `tools/call` with a timeout; a cancelled or timed-out call sends `notifications/cancelled`.
// A server that exits is restarted on the next call; its calls in flight fail with a clear
// error. Tools are named "<server>.<tool>" to agents.
//
// Servers may also dial in: listen() opens a Unix socket (tools.sock, next to den.sock) and
// each connection of the daemon's own user is a server spoken to the same way. Its name is the
// `serverInfo.name` it gives in initialize (made unique with "-2", "-3", …); when it hangs up
// its tools are gone and its calls in flight fail. Nothing restarts it: it dials again.
//
// Also here: tool calls as models write them (Hermes/ChatML `<tool_call>{…}</tool_call>`, as
// Qwen and SmolLM2 do, and Llama 3's bare JSON `{"name": …, "parameters": {…}}`).
#pragma once

#include <boost/json.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "den/runtime/config.h"

namespace den::runtime {

struct ToolInfo {
  std::string server;        // the config's name for the server
  std::string name;          // the server's name for the tool
  std::string qualified;     // "<server>.<name>": what agents call
  std::string description;
  boost::json::value input_schema;  // JSON Schema of the arguments, as the server gave it
};

// A tool's answer, as MCP shapes it: `content` items (text, image, …) and whether the tool
// itself reports an error.
struct ToolResult {
  boost::json::array content;
  bool is_error = false;
  boost::json::value structured;  // `structuredContent` when the server sent one, else null
  std::string text() const;       // the text items joined with newlines
};

// Why a call has no result: unknown tool, bad arguments (schema), timeout, the server exited
// or spoke garbage, cancelled. what() is meant for the agent (and its log).
class ToolError : public std::runtime_error {
 public:
  enum class Kind { unknown_tool, invalid_arguments, timeout, server_failed, protocol, cancelled };
  ToolError(Kind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

class ToolCall {
 public:
  virtual ~ToolCall() = default;
  virtual void cancel() = 0;  // the completion then reports ToolError::cancelled (unless it already ran)
};

class ToolRegistry {
 public:
  // Starts every server and lists its tools (a server that fails to start is logged and
  // retried on the next call; it does not stop the daemon).
  ToolRegistry(std::vector<ToolServerConfig> servers, std::chrono::milliseconds default_timeout);
  ~ToolRegistry();  // fails calls in flight (cancelled), ends the servers (stdin closed, SIGTERM, SIGKILL)
  ToolRegistry(const ToolRegistry&) = delete;
  ToolRegistry& operator=(const ToolRegistry&) = delete;

  // Accepts dial-in servers at `socket_path` from now on (mode 0600, connections of other
  // users refused). A stale socket file is replaced; a live one, or any other file, is an
  // error (std::runtime_error). The registry removes the file when it ends.
  void listen(const std::string& socket_path);
  const std::string& listen_path() const;  // "" until listen()

  std::vector<ToolInfo> list() const;

  // Calls a tool. `done` runs exactly once, on a registry thread: with the result, or with
  // the error (exception_ptr holding a ToolError). A timeout of zero uses the default.
  using Completion = std::function<void(std::optional<ToolResult> result, std::exception_ptr error)>;
  std::shared_ptr<ToolCall> call(std::string_view qualified_name, const boost::json::object& arguments,
                                 std::chrono::milliseconds timeout, Completion done);

  struct ServerStatus {
    std::string name;
    bool running = false;
    bool dialed_in = false;  // connected through listen()'s socket, not spawned from the config
    int32_t tools = 0;
    int64_t calls = 0, failures = 0, restarts = 0;
    std::string last_error;
  };
  std::vector<ServerStatus> status() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct ParsedToolCall {
  std::string name;
  boost::json::object arguments;
};
// Every well-formed tool call in a model's output, in order; malformed ones are skipped.
std::vector<ParsedToolCall> parse_tool_calls(std::string_view model_output);

}  // namespace den::runtime
