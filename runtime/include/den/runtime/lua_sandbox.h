// The sandbox one agent's Lua code runs in: PUC Lua 5.4 built as C++ (errors unwind C++
// frames), one lua_State per agent. Only base (minus dofile/loadfile/require and friends),
// string (minus dump), table, math, utf8 and coroutine are there; `load` takes text only and
// gives the chunk an empty environment; the globals table and the string metatable are
// read-only; a count hook stops code that runs past its step deadline (and keeps stopping it:
// the kill is sticky, pcall cannot swallow it); an allocator cap stops memory bombs the same
// way: a memory error raised in agent code kills that agent (a refusal that Lua's emergency
// collection resolves raises nothing and kills nothing).
//
// Agent handlers run in coroutines (`start` / `resume`): a binding that must wait (generate,
// a tool call, sleep) yields a request to the host, which resumes the coroutine with the
// result later. Every entry into Lua is protected and errors carry a traceback.
//
// Plain values cross the boundary as JSON (ctx.state, messages, effect results): nil, booleans,
// integers, finite floats, UTF-8 strings, arrays (keys 1..n) and objects (string keys).
//
// What agent code sees, in detail:
// - The chunk runs with a read-only proxy as _ENV (and _G): assigning a global fails, at the
//   top level of the script too, so helpers are `local function`s. The library tables (string,
//   table, math, utf8, coroutine) and each table the host put in the globals are read-only
//   proxies as well; pairs() and # work on them. rawset refuses every such proxy (it stays
//   usable on the agent's own tables); getmetatable("") is a read-only view.
// - Absent: dofile, loadfile, require, warn, string.dump, and the os, io, debug and package
//   libraries. `load` takes source strings only and gives the chunk a fresh empty environment
//   unless one is passed. collectgarbage allows "collect", "step", "count" and "isrunning".
//   setmetatable refuses __gc (Lua runs finalizers with hooks off: a loop there is unstoppable).
// - pcall, xpcall, coroutine.resume, coroutine.wrap and coroutine.close re-raise once the agent
//   is killed (and run no more agent code: no xpcall handler, no __close of a killed thread);
//   coroutine.resume/close refuse the host's handler coroutines (see new_coroutine).
// - Not covered: a C function that runs long without executing Lua instructions (a
//   pathological string.find pattern on a long subject) is not interrupted by the count hook.
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
// Integers stay integers, floats stay floats; an empty table becomes {} (an empty object);
// object keys come out sorted. Metatables are ignored (raw access), and the stack is left as it
// was, also when it throws.
boost::json::value to_json(lua_State* L, int index, std::string_view path = "value");
// Pushes the JSON value as a Lua value (objects and arrays become fresh tables). Lua tables
// cannot hold nil: a null member is left out, a null array element leaves a hole (so `#` of
// such an array is unreliable). Integers past INT64_MAX become floats. Allocation failures are
// Lua errors; outside a protected call they reach the host as ScriptError (kind memory).
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
  // still writable. `fill` receives the state with the globals table on top of the stack; it
  // runs protected (a Lua error becomes ScriptError, a C++ exception passes through). Tables
  // it stores in the globals are replaced by read-only proxies when load() first runs (top
  // level only: bindings that keep the original table as an upvalue still see the original).
  // Throws std::logic_error after load().
  void define_globals(const std::function<void(lua_State*)>& fill);

  // Runs the agent's source (text only; binary chunks are refused) under the step deadline. It
  // must return a table (the handlers), kept in the registry. Freezes the globals first, so the
  // script's own top level cannot assign globals either. Loading again replaces the handlers.
  // Throws ScriptError (at once when the agent is killed).
  void load(std::string_view source, std::string_view chunk_name);
  // Pushes handler `name` (a function) onto state() and returns true, or pushes nothing and
  // returns false. The lookup is raw: no metamethod of the agent's table runs.
  bool push_handler(std::string_view name);

  // A coroutine running one handler call. The host pushes the function and its arguments onto
  // thread() and calls resume(nargs); each resume runs until the handler yields, returns or
  // fails. A yield leaves the yielded values on thread()'s stack for the host to read (and pop);
  // resume() is then called again with the results pushed. Agent code cannot resume or close
  // it (coroutine.resume/close refuse), but a binding that yields from inside a coroutine the
  // agent made itself yields to the agent, not to the host. Destroy every Coroutine before its
  // Sandbox; destroying a suspended one runs its pending __close handlers under the deadline.
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
  // Creates a coroutine (with the count hook). Throws ScriptError when memory is exhausted.
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
  bool globals_frozen_ = false;  // load() ran: define_globals is over
  // The last refused allocation, until Lua's retry of it succeeds (see the allocator).
  bool memory_refused_ = false;
  const void* refused_block_ = nullptr;
  size_t refused_old_size_ = 0;
  size_t refused_new_size_ = 0;
};

}  // namespace den::runtime::lua
