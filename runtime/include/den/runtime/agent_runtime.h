// Agents: Lua scripts that live in the daemon for weeks, each with its own session (its
// conversation and KV cache), a durable message queue, durable timers and durable state.
//
// One agent thread runs every agent's Lua code (each agent its own sandboxed lua_State); a
// handler runs in a coroutine, and a call that has to wait (generate, a tool call, sleep)
// yields until its completion is posted back to the agent thread. An agent handles one trigger
// at a time: an interrupted run first, then due timers, then queued messages.
//
// Durability (the durable-actor model of docs/ARCHITECTURE.md): messages are stored before
// they are acknowledged; every effect of a handler is journaled in the AgentStore under
// (run, seq) with its result; when the handler returns, its state, the message's ack and the
// journal's removal commit together. After a crash the run is `interrupted` and runs again:
// journaled effects return their recorded results instead of happening again.
#pragma once

#include <boost/json.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "den/engine/model.h"
#include "den/memory/session_manager.h"
#include "den/runtime/chat_turns.h"
#include "den/runtime/lua_sandbox.h"
#include "den/runtime/scheduler.h"
#include "den/runtime/session_claims.h"
#include "den/runtime/tools.h"

namespace den::runtime {

// A request about agents that cannot be done: unknown agent, name taken, script does not load.
class AgentError : public std::runtime_error {
 public:
  enum class Kind { not_found, exists, invalid, stopped };
  AgentError(Kind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

struct AgentRuntimeConfig {
  std::filesystem::path store_path;   // agents.sqlite
  lua::SandboxLimits limits;
  int32_t max_context = 0;            // tokens per session
  std::chrono::milliseconds tool_timeout{30000};
};

struct SpawnRequest {
  std::string name;
  std::string source;        // the Lua script
  std::string script_path;   // where it came from, for `agents/get`
  int32_t priority = 0;
  int64_t token_budget = 0;  // 0: unlimited
};

// What subscribers of an agent see: its replies, the text it generates as it comes, its log
// lines and its runs' ends. `event` is {"kind": "reply"|"text"|"log"|"run", ...}.
using AgentListener = std::function<void(const boost::json::object& event)>;

class AgentRuntime {
 public:
  AgentRuntime(AgentRuntimeConfig config, const engine::Model& model, memory::SessionManager& sessions,
               Scheduler& scheduler, const ChatTurns& chat, SessionClaims& claims, ToolRegistry* tools);
  ~AgentRuntime();  // stops the agent thread; runs cut off stay in the store and resume on the next start
  AgentRuntime(const AgentRuntime&) = delete;
  AgentRuntime& operator=(const AgentRuntime&) = delete;

  // Loads every agent, turns runs left running into interrupted ones (they run again), and
  // starts the agent thread. Timers that fell due meanwhile fire now.
  void start();

  // Creates the agent, its session and its store rows, loads its script (a script that does
  // not load is refused: nothing is created) and queues on_start. Returns the agent object.
  boost::json::object spawn(const SpawnRequest& request);
  boost::json::array list() const;
  boost::json::object get(std::string_view name) const;  // with recent runs, timers, queue length
  // Queues a message durably; returns its id (the acknowledgement).
  int64_t send(std::string_view name, std::string_view sender, const boost::json::value& body);
  // Replies to a message and whether its handler has finished (completed or failed).
  struct MessageState {
    std::vector<std::string> replies;
    bool handled = false;
    std::string status;  // queued | done | failed
  };
  MessageState message_state(int64_t message_id) const;
  // Calls `done` (on the agent thread, or at once) when the message's handler has finished.
  void when_handled(int64_t message_id, std::function<void(MessageState)> done);
  // Events of an agent until the returned id is unsubscribed.
  uint64_t subscribe(std::string_view name, AgentListener listener);
  void unsubscribe(uint64_t subscription);
  void stop(std::string_view name);    // no more handlers run (the current one finishes first)
  void remove(std::string_view name);  // stops it and forgets everything of it, its session too
  boost::json::array logs(std::string_view name, int64_t after_id, int32_t limit) const;
  boost::json::object stats() const;

  // Shutdown: no new handler starts; waits until none is between effects (a handler waiting on
  // a generation, tool or timer is left to be re-run after the restart).
  void shutdown();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace den::runtime
