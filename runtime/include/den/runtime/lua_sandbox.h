// The sandbox one agent's Lua code runs in: PUC Lua 5.4 built as C++ (errors unwind C++
// frames), one lua_State per agent. Only base (minus dofile/loadfile/require and friends),
// string (minus dump), table, math, utf8 and coroutine are there; `load` takes text only and
// gives the chunk an empty environment; the globals table and the string metatable are
// read-only; a count hook stops code that runs past its step deadline (and keeps stopping it:
// the kill is sticky, pcall cannot swallow it); an allocator cap turns memory bombs into
// "not enough memory" errors for that agent only.
//
// Agent handlers run in coroutines (`start` / `resume`): a binding that must wait (generate,
// a tool call, sleep) yields a request to the host, which resumes the coroutine with the
// result later. Every entry into Lua is protected and errors carry a traceback.
//
// Plain values cross the boundary as JSON (ctx.state, messages, effect results): nil, booleans,
// integers, finite floats, UTF-8 strings, arrays (keys 1..n) and objects (string keys).
#pragma once

#include <boost/json.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>

struct lua_State;

namespace den::runtime::lua {

// Agent code failed: a syntax or runtime error, a sandbox refusal, or a limit. what() is the
// message with a traceback when there is one.
class ScriptError : public std::runtime_error {
 public:
  enum class Kind { error, memory, deadline };
  ScriptError(Kind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

struct SandboxLimits {
  size_t memory_bytes = 64 << 20;  // every allocation of this lua_State together
  double step_seconds = 2.0;       // wall time one resume may run before the agent is killed
};

// Converts the Lua value at `index` to JSON. Throws ScriptError naming the path
// ("state.items[3].f: a function cannot be stored") for functions, userdata, threads, cycles,
// NaN/inf, non-UTF-8 strings, mixed or sparse tables, and nesting deeper than 64.
boost::json::value to_json(lua_State* L, int index, std::string_view path = "value");
// Pushes the JSON value as a Lua value (objects and arrays become fresh tables).
void push_json(lua_State* L, const boost::json::value& value);

class Sandbox {
 public:
  // `print` output of the agent (and errors it logs) goes to `log`.
  Sandbox(SandboxLimits limits, std::function<void(std::string_view line)> log);
  ~Sandbox();
  Sandbox(const Sandbox&) = delete;
  Sandbox& operator=(const Sandbox&) = delete;

  lua_State* state() { return L_; }

  // Before load(): lets the host add its own globals (e.g. `den`) while the globals table is
  // still writable. `fill` receives the state with the globals table on top of the stack.
  void define_globals(const std::function<void(lua_State*)>& fill);

  // Runs the agent's source (text only; binary chunks are refused) under the step deadline. It
  // must return a table (the handlers), kept in the registry. Freezes the globals afterwards.
  // Throws ScriptError.
  void load(std::string_view source, std::string_view chunk_name);
  // Pushes handler `name` (a function) and returns true, or pushes nothing and returns false.
  bool push_handler(std::string_view name);

  // A coroutine running one handler call. The host pushes the function and its arguments onto
  // thread() and calls resume(nargs); each resume runs until the handler yields, returns or
  // fails. A yield leaves the yielded values on thread()'s stack for the host to read (and pop);
  // resume() is then called again with the results pushed.
  class Coroutine {
   public:
    enum class Status { yielded, finished, failed };
    struct Outcome {
      Status status = Status::finished;
      int values = 0;            // yielded or returned values on thread()'s stack
      std::string error;         // with traceback, when failed
      ScriptError::Kind kind = ScriptError::Kind::error;
    };
    lua_State* thread() const { return co_; }
    Outcome resume(int nargs);
    ~Coroutine();
    Coroutine(const Coroutine&) = delete;
    Coroutine& operator=(const Coroutine&) = delete;

   private:
    friend class Sandbox;
    Coroutine(Sandbox& sandbox, lua_State* co, int registry_ref) : sandbox_(sandbox), co_(co), ref_(registry_ref) {}
    Sandbox& sandbox_;
    lua_State* co_;
    int ref_;  // keeps the thread alive
  };
  std::unique_ptr<Coroutine> new_coroutine();

  // True once a limit killed this agent (sticky: every later resume fails at once).
  bool killed() const { return killed_; }
  size_t memory_used() const { return used_bytes_; }
  const SandboxLimits& limits() const { return limits_; }

 private:
  struct Internals;  // allocator and hook glue
  friend struct Internals;
  SandboxLimits limits_;
  std::function<void(std::string_view)> log_;
  lua_State* L_ = nullptr;
  size_t used_bytes_ = 0;
  bool killed_ = false;
  ScriptError::Kind kill_kind_ = ScriptError::Kind::error;
  double deadline_ = 0;  // steady-clock seconds; 0 = no step running
  int handlers_ref_ = -1;
};

}  // namespace den::runtime::lua
