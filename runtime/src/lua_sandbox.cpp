// The agent sandbox declared in lua_sandbox.h: the capped allocator, the count hook with its
// sticky kill, the trimmed standard library and its guarded replacements, the read-only
// proxies, and the JSON bridge. Used by the agent runtime; tests/runtime/lua_sandbox_test.cpp.
#include "den/runtime/lua_sandbox.h"

// Lua is compiled as C++ (errors are C++ exceptions); Debian's luaconf.h gives the API C
// linkage on its own, so these are included directly and not through lua.hpp.
#include "lauxlib.h"
#include "lua.h"
#include "lualib.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <utility>
#include <vector>

namespace den::runtime::lua {
namespace {

namespace json = boost::json;
using Kind = ScriptError::Kind;

// Often enough that a runaway loop is caught within microseconds of its deadline, rarely
// enough that reading the clock costs nothing measurable.
constexpr int kHookInstructions = 1000;
constexpr int kMaxJsonDepth = 64;

// Registry keys: the registry is out of the agent's reach (no debug library).
constexpr const char* kEnvKey = "den.sandbox.env";             // the read-only globals proxy
constexpr const char* kFrozenKey = "den.sandbox.frozen";       // proxy -> label, weak keys
constexpr const char* kHostThreadsKey = "den.sandbox.threads"; // host coroutines, weak keys
constexpr const char* kGlobalsLabel = "globals";

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Sets the step deadline for one entry into Lua and restores the previous one after. A nested
// entry (the host resuming a coroutine from inside a binding) keeps the outer, earlier deadline.
class StepDeadline {
 public:
  StepDeadline(double& deadline, double step_seconds) : deadline_(deadline), saved_(deadline) {
    if (saved_ == 0) deadline_ = now_seconds() + step_seconds;
  }
  ~StepDeadline() { deadline_ = saved_; }
  StepDeadline(const StepDeadline&) = delete;
  StepDeadline& operator=(const StepDeadline&) = delete;

 private:
  double& deadline_;
  double saved_;
};

// Text of the error object at `index`, without calling metamethods or converting in place.
std::string error_text(lua_State* L, int index) {
  switch (lua_type(L, index)) {
    case LUA_TSTRING: {
      size_t length = 0;
      const char* text = lua_tolstring(L, index, &length);
      return std::string(text, length);
    }
    case LUA_TNUMBER:
      return lua_isinteger(L, index) ? std::to_string(lua_tointeger(L, index))
                                     : std::to_string(lua_tonumber(L, index));
    case LUA_TNONE:
      return "(no error object)";
    default:
      return std::string("(error object is a ") + luaL_typename(L, index) + " value)";
  }
}

// Offset of the first byte that breaks strict UTF-8 (overlong forms, surrogates and code
// points past U+10FFFF are refused, as JSON requires), or npos when the text is valid.
size_t invalid_utf8_at(std::string_view text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto lead = static_cast<unsigned char>(text[i]);
    if (lead < 0x80) {
      ++i;
      continue;
    }
    size_t length = 0;
    uint32_t code = 0, smallest = 0;
    if ((lead & 0xE0) == 0xC0) {
      length = 2, code = lead & 0x1F, smallest = 0x80;
    } else if ((lead & 0xF0) == 0xE0) {
      length = 3, code = lead & 0x0F, smallest = 0x800;
    } else if ((lead & 0xF8) == 0xF0) {
      length = 4, code = lead & 0x07, smallest = 0x10000;
    } else {
      return i;
    }
    if (i + length > text.size()) return i;
    for (size_t k = 1; k < length; ++k) {
      const auto next = static_cast<unsigned char>(text[i + k]);
      if ((next & 0xC0) != 0x80) return i;
      code = (code << 6) | (next & 0x3F);
    }
    if (code < smallest || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return i;
    i += length;
  }
  return std::string_view::npos;
}

// --- read-only proxies ----------------------------------------------------------------------
// A proxy is an empty table whose metatable reads through to the real table (__index), refuses
// writes (__newindex), iterates it (__pairs, without handing out the real table), measures it
// (__len) and hides itself (__metatable). The frozen set maps each proxy to a label for errors.

void push_frozen_set(lua_State* L) { lua_getfield(L, LUA_REGISTRYINDEX, kFrozenKey); }

// Pushes the real table behind the proxy at `index` (its metatable's __index), or nothing and
// returns false when `index` is not a proxy.
bool push_proxy_target(lua_State* L, int index, int frozen_set) {
  index = lua_absindex(L, index);
  lua_pushvalue(L, index);
  const bool is_proxy = lua_rawget(L, frozen_set) != LUA_TNIL;
  lua_pop(L, 1);
  if (!is_proxy || !lua_getmetatable(L, index)) return false;
  lua_pushliteral(L, "__index");
  lua_rawget(L, -2);
  lua_remove(L, -2);
  return true;
}

// Raises the read-only error for writing `key` into the frozen table at `table`.
[[noreturn]] void refuse_write(lua_State* L, int table, int key, int frozen_set) {
  lua_pushvalue(L, table);
  lua_rawget(L, frozen_set);
  const std::string label = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "a table";
  lua_pop(L, 1);
  const char* name = lua_type(L, key) == LUA_TSTRING ? lua_tostring(L, key) : luaL_tolstring(L, key, nullptr);
  if (label == kGlobalsLabel) {
    luaL_error(L, "cannot assign global '%s': globals are read-only: use local variables or ctx.state", name);
  }
  luaL_error(L, "cannot assign '%s' in %s: it is read-only", name, label.c_str());
  std::abort();  // luaL_error does not return
}

int proxy_newindex(lua_State* L) { refuse_write(L, 1, 2, lua_upvalueindex(1)); }

// The iterator __pairs hands out: next() over the proxied table, for proxies only.
int proxy_next(lua_State* L) {
  lua_settop(L, 2);
  if (!push_proxy_target(L, 1, lua_upvalueindex(1))) return luaL_error(L, "bad argument #1 to 'next' (a read-only table expected)");
  lua_pushvalue(L, 2);
  return lua_next(L, 3) ? 2 : 0;
}

int proxy_pairs(lua_State* L) {
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_pushcclosure(L, proxy_next, 1);
  lua_pushvalue(L, 1);
  lua_pushnil(L);
  return 3;
}

int proxy_len(lua_State* L) {
  lua_getmetatable(L, 1);
  lua_pushliteral(L, "__index");
  lua_rawget(L, -2);
  lua_pushinteger(L, static_cast<lua_Integer>(lua_rawlen(L, -1)));
  return 1;
}

// Pushes a new read-only proxy of the table at `target`, labelled for error messages.
void push_proxy(lua_State* L, int target, const char* label) {
  target = lua_absindex(L, target);
  push_frozen_set(L);
  const int frozen_set = lua_gettop(L);
  lua_createtable(L, 0, 0);
  lua_createtable(L, 0, 5);
  lua_pushvalue(L, target);
  lua_setfield(L, -2, "__index");
  lua_pushvalue(L, frozen_set);
  lua_pushcclosure(L, proxy_newindex, 1);
  lua_setfield(L, -2, "__newindex");
  lua_pushvalue(L, frozen_set);
  lua_pushcclosure(L, proxy_pairs, 1);
  lua_setfield(L, -2, "__pairs");
  lua_pushcfunction(L, proxy_len);
  lua_setfield(L, -2, "__len");
  lua_pushliteral(L, "read-only");
  lua_setfield(L, -2, "__metatable");
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_pushstring(L, label);
  lua_rawset(L, frozen_set);
  lua_remove(L, frozen_set);
}

void push_weak_keyed_table(lua_State* L) {
  lua_newtable(L);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "k");
  lua_setfield(L, -2, "__mode");
  lua_setmetatable(L, -2);
}

// --- library replacements that need no sandbox state -------------------------------------

// rawset, except on read-only proxies (it would otherwise plant fields in the empty proxy and
// shadow what it stands for). Upvalue 1: the frozen set.
int guarded_rawset(lua_State* L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_checkany(L, 2);
  luaL_checkany(L, 3);
  lua_pushvalue(L, 1);
  if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL) refuse_write(L, 1, 2, lua_upvalueindex(1));
  lua_settop(L, 3);
  lua_rawset(L, 1);
  return 1;
}

// setmetatable, refusing __gc: Lua runs finalizers with hooks off, so a looping finalizer could
// never be stopped. The check happens where Lua decides finalization (at setmetatable time).
int guarded_setmetatable(lua_State* L) {
  const int type = lua_type(L, 2);
  luaL_checktype(L, 1, LUA_TTABLE);
  luaL_argexpected(L, type == LUA_TNIL || type == LUA_TTABLE, 2, "nil or table");
  if (luaL_getmetafield(L, 1, "__metatable") != LUA_TNIL) return luaL_error(L, "cannot change a protected metatable");
  if (type == LUA_TTABLE) {
    lua_pushliteral(L, "__gc");
    if (lua_rawget(L, 2) != LUA_TNIL) {
      return luaL_error(L, "setmetatable: __gc metamethods are not allowed in the sandbox (a finalizer cannot be interrupted)");
    }
  }
  lua_settop(L, 2);
  lua_setmetatable(L, 1);
  return 1;
}

// A message handler that appends the traceback (no metamethods: agent code could loop there).
int traceback_handler(lua_State* L) {
  const std::string message = error_text(L, 1);
  luaL_traceback(L, L, message.c_str(), 1);
  return 1;
}

}  // namespace

// --- glue that needs the Sandbox's private state --------------------------------------------

struct Sandbox::Internals {
  static Sandbox& of(lua_State* L) {
    void* sandbox = nullptr;
    lua_getallocf(L, &sandbox);
    return *static_cast<Sandbox*>(sandbox);
  }

  static std::string kill_message(const Sandbox& s) {
    char text[128];
    if (s.kill_kind_ == Kind::deadline) {
      std::snprintf(text, sizeof text, "agent killed: step deadline of %g s exceeded", s.limits_.step_seconds);
    } else if (s.limits_.memory_bytes % (size_t{1} << 20) == 0) {
      std::snprintf(text, sizeof text, "agent killed: memory limit of %zu MiB exceeded", s.limits_.memory_bytes >> 20);
    } else {
      std::snprintf(text, sizeof text, "agent killed: memory limit of %zu bytes exceeded", s.limits_.memory_bytes);
    }
    return text;
  }

  static Kind failure_kind(const Sandbox& s, int status) {
    if (s.killed_) return s.kill_kind_;
    return status == LUA_ERRMEM ? Kind::memory : Kind::error;
  }

  // The message of a failure, led by the kill reason when a limit caused it.
  static std::string failure_message(const Sandbox& s, std::string message) {
    if (s.killed_ && message.find("agent killed") == std::string::npos) return kill_message(s) + ": " + message;
    return message;
  }

  static void kill(Sandbox& s, Kind kind) {
    if (s.killed_) return;  // the first limit hit names the kill
    s.killed_ = true;
    s.kill_kind_ = kind;
  }

  // The kill rule for memory: an agent is killed when a memory error is raised in it. Lua answers
  // a refused allocation with an emergency collection (which only frees) and then asks for the
  // same block again; when that retry succeeds no error is raised and the agent goes on. A
  // refusal that is not retried (lauxlib's buffers call the allocator directly) or whose retry
  // is refused too is raised: the next allocation, or the next checkpoint (settle_refusal: the
  // hook, pcall, the host), kills. pcall therefore cannot keep an agent going at its cap.
  static void* allocate(void* ud, void* block, size_t old_size, size_t new_size) {
    Sandbox& s = *static_cast<Sandbox*>(ud);
    if (block == nullptr) old_size = 0;  // it is then the type of the new object
    if (new_size == 0) {
      std::free(block);
      s.used_bytes_ -= old_size;
      return nullptr;
    }
    const bool grows = new_size > old_size;
    const bool same_as_refused = s.memory_refused_ && block == s.refused_block_ &&
                                 old_size == s.refused_old_size_ && new_size == s.refused_new_size_;
    if (grows && s.used_bytes_ - old_size + new_size > s.limits_.memory_bytes) {
      if (s.memory_refused_) kill(s, Kind::memory);
      s.memory_refused_ = true;
      s.refused_block_ = block;
      s.refused_old_size_ = old_size;
      s.refused_new_size_ = new_size;
      return nullptr;
    }
    void* resized = std::realloc(block, new_size);
    if (resized == nullptr) return nullptr;
    s.used_bytes_ = s.used_bytes_ - old_size + new_size;
    if (grows && s.memory_refused_) {
      if (!same_as_refused) kill(s, Kind::memory);
      s.memory_refused_ = false;
    }
    return resized;
  }

  // A checkpoint: a refusal still pending here was never retried, so it was raised.
  static void settle_refusal(Sandbox& s) {
    if (!s.memory_refused_) return;
    s.memory_refused_ = false;
    kill(s, Kind::memory);
  }

  // Outside any protected call Lua would abort(); a ScriptError reaches the host instead.
  static int panic(lua_State* L) {
    Sandbox& s = of(L);
    settle_refusal(s);
    const std::string message = error_text(L, -1);
    lua_pop(L, 1);
    const Kind kind = s.killed_ ? s.kill_kind_ : message == "not enough memory" ? Kind::memory : Kind::error;
    throw ScriptError(kind, failure_message(s, "Lua error outside a protected call: " + message));
  }

  // Kills the agent once its step deadline is behind it, and raises while it is killed. `level`
  // names the function the message points at: 0 from the hook, 1 from a C function.
  static void check_limits(lua_State* L, int level) {
    Sandbox& s = of(L);
    settle_refusal(s);
    if (!s.killed_ && s.deadline_ > 0 && now_seconds() > s.deadline_) kill(s, Kind::deadline);
    if (s.killed_) {
      const std::string message = kill_message(s);
      luaL_where(L, level);
      lua_pushlstring(L, message.data(), message.size());
      lua_concat(L, 2);
      lua_error(L);
    }
  }

  // NOTE: an error raised inside a hook leaves that thread's hooks disabled until a pcall on it
  // catches the error (Lua restores them there). Hence, once killed: xpcall skips the agent's
  // message handler, coroutine.wrap/close and ~Coroutine do not run __close handlers of threads
  // that died from the kill: that agent code would run with no hook to stop it.
  static void count_hook(lua_State* L, lua_Debug*) { check_limits(L, 0); }

  // Runs fn in protected mode on L: a Lua error becomes a ScriptError, a C++ exception from fn
  // passes through (stopped at the Lua boundary and rethrown here). fn sees the `nargs` values
  // on top of L as its arguments and returns how many results it leaves (adjusted to nresults).
  static void run_protected(Sandbox& s, lua_State* L, int nargs, int nresults,
                            const std::function<int(lua_State*)>& fn) {
    struct Call {
      const std::function<int(lua_State*)>* fn;
      std::exception_ptr error;
    } call{&fn, nullptr};
    const auto trampoline = [](lua_State* inner) -> int {
      auto* pending = static_cast<Call*>(lua_touserdata(inner, 1));
      lua_remove(inner, 1);
      try {
        return (*pending->fn)(inner);
      } catch (const std::exception&) {  // never catch (...): Lua's own errors are exceptions too
        pending->error = std::current_exception();
        return 0;
      }
    };
    lua_pushcfunction(L, trampoline);
    lua_pushlightuserdata(L, &call);
    lua_rotate(L, -(nargs + 2), 2);
    const int status = lua_pcall(L, nargs + 1, nresults, 0);
    if (call.error) {
      if (status == LUA_OK) lua_pop(L, nresults);
      std::rethrow_exception(call.error);
    }
    if (status != LUA_OK) {
      settle_refusal(s);
      std::string message = error_text(L, -1);
      lua_pop(L, 1);
      throw ScriptError(failure_kind(s, status), failure_message(s, std::move(message)));
    }
  }

  // --- replacements that need the sandbox -----------------------------------------------

  // print: one call of the log callback per print, arguments joined by tabs.
  static int print(lua_State* L) {
    const int n = lua_gettop(L);
    luaL_Buffer line;
    luaL_buffinit(L, &line);
    for (int i = 1; i <= n; ++i) {
      if (i > 1) luaL_addchar(&line, '\t');
      luaL_tolstring(L, i, nullptr);
      luaL_addvalue(&line);
    }
    luaL_pushresult(&line);
    size_t length = 0;
    const char* text = lua_tolstring(L, -1, &length);
    Sandbox& s = of(L);
    bool failed = false;
    std::string failure;
    try {
      if (s.log_) s.log_(std::string_view(text, length));
    } catch (const std::exception& error) {
      failed = true;
      failure = error.what();
    }
    if (failed) return luaL_error(L, "print: the log refused the line: %s", failure.c_str());
    return 0;
  }

  // collectgarbage: only the options that cannot change how the collector runs. A full
  // collection is C time the count hook does not see, so the deadline is checked after it.
  static int collectgarbage(lua_State* L) {
    const char* option = luaL_optstring(L, 1, "collect");
    if (std::strcmp(option, "count") == 0) {
      const int kib = lua_gc(L, LUA_GCCOUNT), rest = lua_gc(L, LUA_GCCOUNTB);
      lua_pushnumber(L, static_cast<lua_Number>(kib) + static_cast<lua_Number>(rest) / 1024);
      return 1;
    }
    if (std::strcmp(option, "collect") == 0) {
      lua_gc(L, LUA_GCCOLLECT);
      check_limits(L, 1);
      lua_pushinteger(L, 0);
      return 1;
    }
    if (std::strcmp(option, "step") == 0) {
      const auto kib = static_cast<int>(std::clamp<lua_Integer>(luaL_optinteger(L, 2, 0), 0, 1 << 20));
      const int finished_cycle = lua_gc(L, LUA_GCSTEP, kib);
      check_limits(L, 1);
      lua_pushboolean(L, finished_cycle);
      return 1;
    }
    if (std::strcmp(option, "isrunning") == 0) {
      lua_pushboolean(L, lua_gc(L, LUA_GCISRUNNING));
      return 1;
    }
    return luaL_error(L,
                      "collectgarbage('%s') is not allowed in the sandbox: only 'collect', 'step', "
                      "'count' and 'isrunning' are",
                      option);
  }

  // load: source strings only, text mode only, and a fresh empty environment unless one is given
  // (the default would be the real globals table).
  static int sandboxed_load(lua_State* L) {
    if (lua_type(L, 1) != LUA_TSTRING) {
      return luaL_error(L, "load: only source strings can be loaded in the sandbox (got a %s)", luaL_typename(L, 1));
    }
    size_t length = 0;
    const char* source = lua_tolstring(L, 1, &length);
    const char* chunk_name = luaL_optstring(L, 2, source);
    const char* mode = luaL_optstring(L, 3, "t");
    const bool has_env = !lua_isnone(L, 4);
    if (std::strchr(mode, 't') == nullptr || (length > 0 && source[0] == LUA_SIGNATURE[0])) {
      luaL_pushfail(L);
      lua_pushliteral(L, "load: binary chunks are not allowed in the sandbox (text only)");
      return 2;
    }
    if (luaL_loadbufferx(L, source, length, chunk_name, "t") != LUA_OK) {
      settle_refusal(of(L));
      if (of(L).killed_) return lua_error(L);
      luaL_pushfail(L);
      lua_insert(L, -2);
      return 2;
    }
    if (has_env) {
      lua_pushvalue(L, 4);
    } else {
      lua_newtable(L);
    }
    if (lua_setupvalue(L, -2, 1) == nullptr) lua_pop(L, 1);
    return 1;
  }

  // pcall and xpcall as in lbaselib.c (yieldable through the continuation), except that a
  // killed agent's error is raised again: the kill must reach the host.
  static int finish_pcall(lua_State* L, int status, lua_KContext extra) {
    if (status != LUA_OK && status != LUA_YIELD) {
      settle_refusal(of(L));
      if (of(L).killed_) return lua_error(L);
      lua_pushboolean(L, 0);
      lua_pushvalue(L, -2);
      return 2;
    }
    return lua_gettop(L) - static_cast<int>(extra);
  }

  static int pcall(lua_State* L) {
    luaL_checkany(L, 1);
    lua_pushboolean(L, 1);
    lua_insert(L, 1);
    const int status = lua_pcallk(L, lua_gettop(L) - 2, LUA_MULTRET, 0, 0, finish_pcall);
    return finish_pcall(L, status, 0);
  }

  // xpcall's message handler goes through this one (upvalue 1: the agent's handler).
  static int guarded_message_handler(lua_State* L) {
    if (of(L).killed_) return 1;  // the error object as it is
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);
    return 1;
  }

  static int xpcall(lua_State* L) {
    const int n = lua_gettop(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushvalue(L, 2);
    lua_pushcclosure(L, guarded_message_handler, 1);
    lua_replace(L, 2);
    lua_pushboolean(L, 1);
    lua_pushvalue(L, 1);
    lua_rotate(L, 3, 2);
    const int status = lua_pcallk(L, n - 2, LUA_MULTRET, 2, 2, finish_pcall);
    return finish_pcall(L, status, 2);
  }

  // coroutine.resume and coroutine.close wrap the originals (upvalue 1): they refuse the host's
  // handler coroutines (upvalue 2), whose yields are requests only the host may answer, and
  // raise a killed agent's error again instead of returning it.
  static int guarded_coroutine_call(lua_State* L, const char* what) {
    check_limits(L, 1);
    if (lua_type(L, 1) == LUA_TTHREAD) {
      lua_pushvalue(L, 1);
      if (lua_rawget(L, lua_upvalueindex(2)) != LUA_TNIL) {
        return luaL_error(L, "coroutine.%s: this is a handler's coroutine: only the host may %s it", what, what);
      }
      lua_pop(L, 1);
    }
    const int n = lua_gettop(L);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, n, LUA_MULTRET);
    if (lua_gettop(L) >= 2 && !lua_toboolean(L, 1)) {
      settle_refusal(of(L));
      if (of(L).killed_) {
        lua_settop(L, 2);
        return lua_error(L);
      }
    }
    return lua_gettop(L);
  }
  static int coroutine_resume(lua_State* L) { return guarded_coroutine_call(L, "resume"); }
  static int coroutine_close(lua_State* L) { return guarded_coroutine_call(L, "close"); }

  // coroutine.wrap as in lcorolib.c, except that a coroutine that died from the kill is not
  // reset (see the NOTE at count_hook). Upvalue 1: the coroutine.
  static int wrapped_call(lua_State* L) {
    lua_State* co = lua_tothread(L, lua_upvalueindex(1));
    const int nargs = lua_gettop(L);
    if (!lua_checkstack(co, nargs)) return luaL_error(L, "too many arguments to resume");
    lua_xmove(L, co, nargs);
    int results = 0;
    int status = lua_resume(co, L, nargs, &results);
    if (status == LUA_OK || status == LUA_YIELD) {
      if (!lua_checkstack(L, results + 1)) {
        lua_pop(co, results);
        return luaL_error(L, "too many results to resume");
      }
      lua_xmove(co, L, results);
      return results;
    }
    lua_xmove(co, L, 1);  // the error object
    settle_refusal(of(L));
    if (of(L).killed_) return lua_error(L);
    status = lua_status(co);
    if (status != LUA_OK && status != LUA_YIELD) {
      lua_pop(L, 1);
      status = lua_resetthread(co);  // closes its pending to-be-closed variables
      lua_xmove(co, L, 1);
    }
    if (status != LUA_ERRMEM && lua_type(L, -1) == LUA_TSTRING) {
      luaL_where(L, 1);
      lua_insert(L, -2);
      lua_concat(L, 2);
    }
    return lua_error(L);
  }

  static int coroutine_wrap(lua_State* L) {
    luaL_checktype(L, 1, LUA_TFUNCTION);
    lua_State* co = lua_newthread(L);
    lua_pushvalue(L, 1);
    lua_xmove(L, co, 1);
    lua_pushcclosure(L, wrapped_call, 1);
    return 1;
  }

  static void set_function(lua_State* L, int table, const char* name, lua_CFunction fn, int upvalues = 0) {
    lua_pushcclosure(L, fn, upvalues);
    lua_setfield(L, table, name);
  }

  // Builds the sandbox on a fresh state (run protected: it allocates).
  static int open(lua_State* L) {
    static constexpr luaL_Reg kLibraries[] = {
        {LUA_GNAME, luaopen_base},     {LUA_STRLIBNAME, luaopen_string}, {LUA_TABLIBNAME, luaopen_table},
        {LUA_MATHLIBNAME, luaopen_math}, {LUA_UTF8LIBNAME, luaopen_utf8},  {LUA_COLIBNAME, luaopen_coroutine}};
    for (const luaL_Reg& library : kLibraries) {
      luaL_requiref(L, library.name, library.func, 1);
      lua_pop(L, 1);
    }
    push_weak_keyed_table(L);
    lua_setfield(L, LUA_REGISTRYINDEX, kFrozenKey);
    push_weak_keyed_table(L);
    lua_setfield(L, LUA_REGISTRYINDEX, kHostThreadsKey);

    lua_pushglobaltable(L);
    const int globals = lua_gettop(L);
    for (const char* name : {"dofile", "loadfile", "require", "warn"}) {
      lua_pushnil(L);
      lua_setfield(L, globals, name);
    }
    set_function(L, globals, "print", print);
    set_function(L, globals, "collectgarbage", collectgarbage);
    set_function(L, globals, "load", sandboxed_load);
    set_function(L, globals, "pcall", pcall);
    set_function(L, globals, "xpcall", xpcall);
    set_function(L, globals, "setmetatable", guarded_setmetatable);
    push_frozen_set(L);
    set_function(L, globals, "rawset", guarded_rawset, 1);

    lua_getfield(L, globals, LUA_STRLIBNAME);
    lua_pushnil(L);
    lua_setfield(L, -2, "dump");
    lua_pop(L, 1);

    lua_getfield(L, globals, LUA_COLIBNAME);
    const int coroutine = lua_gettop(L);
    static constexpr luaL_Reg kGuarded[] = {{"resume", coroutine_resume}, {"close", coroutine_close}};
    for (const luaL_Reg& guarded : kGuarded) {
      lua_getfield(L, coroutine, guarded.name);
      lua_getfield(L, LUA_REGISTRYINDEX, kHostThreadsKey);
      set_function(L, coroutine, guarded.name, guarded.func, 2);
    }
    set_function(L, coroutine, "wrap", coroutine_wrap);
    lua_pop(L, 1);

    // The real library tables stay reachable only through the string metatable's __index
    // (for method calls) and the host's registry; the agent sees proxies.
    for (const char* name : {LUA_STRLIBNAME, LUA_TABLIBNAME, LUA_MATHLIBNAME, LUA_UTF8LIBNAME, LUA_COLIBNAME}) {
      lua_getfield(L, globals, name);
      push_proxy(L, -1, ("the " + std::string(name) + " library").c_str());
      lua_setfield(L, globals, name);
      lua_pop(L, 1);
    }

    // getmetatable("") answers a read-only view whose __index is the string library proxy, as
    // in plain Lua; the real metatable (and the real string table) stay out of reach.
    lua_pushliteral(L, "");
    lua_getmetatable(L, -1);
    lua_createtable(L, 0, 1);
    lua_getfield(L, globals, LUA_STRLIBNAME);
    lua_setfield(L, -2, "__index");
    push_proxy(L, -1, "the string metatable");
    lua_setfield(L, -3, "__metatable");
    lua_pop(L, 3);

    push_proxy(L, globals, kGlobalsLabel);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, kEnvKey);
    lua_setfield(L, globals, LUA_GNAME);  // _G is the proxy too
    lua_pop(L, 1);
    return 0;
  }

  // Replaces each table the host put in the globals with a read-only proxy (top level only).
  static int freeze_host_globals(lua_State* L) {
    lua_pushglobaltable(L);
    const int globals = lua_gettop(L);
    push_frozen_set(L);
    const int frozen_set = lua_gettop(L);
    std::vector<std::string> names;
    lua_pushnil(L);
    while (lua_next(L, globals)) {
      if (lua_type(L, -2) == LUA_TSTRING && lua_type(L, -1) == LUA_TTABLE) {
        lua_pushvalue(L, -1);
        if (lua_rawget(L, frozen_set) == LUA_TNIL) names.emplace_back(lua_tostring(L, -3));
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
    }
    for (const std::string& name : names) {
      lua_getfield(L, globals, name.c_str());
      push_proxy(L, -1, ("the global table '" + name + "'").c_str());
      lua_setfield(L, globals, name.c_str());
      lua_pop(L, 1);
    }
    return 0;
  }

  static std::string traceback(Sandbox& s, lua_State* thread, const std::string& message) {
    std::string text = message;
    try {
      run_protected(s, s.L_, 0, 0, [&](lua_State* L) {
        luaL_traceback(L, thread, message.c_str(), 0);
        size_t length = 0;
        const char* chars = lua_tolstring(L, -1, &length);
        text.assign(chars, length);
        return 0;
      });
    } catch (const ScriptError&) {
      // No memory left for the traceback: the message alone says enough.
    }
    return text;
  }
};

// --- Sandbox ----------------------------------------------------------------------------------

Sandbox::Sandbox(SandboxLimits limits, std::function<void(std::string_view line)> log)
    : limits_(limits), log_(std::move(log)) {
  L_ = lua_newstate(&Internals::allocate, this);
  if (L_ == nullptr) {
    throw ScriptError(Kind::memory, "cannot create a Lua state within the memory limit of " +
                                        std::to_string(limits_.memory_bytes) + " bytes");
  }
  lua_atpanic(L_, &Internals::panic);
  try {
    Internals::run_protected(*this, L_, 0, 0, &Internals::open);
  } catch (...) {
    lua_close(L_);
    L_ = nullptr;
    throw;
  }
  lua_sethook(L_, &Internals::count_hook, LUA_MASKCOUNT, kHookInstructions);
}

Sandbox::~Sandbox() {
  if (L_ != nullptr) lua_close(L_);
}

void Sandbox::define_globals(const std::function<void(lua_State*)>& fill) {
  if (globals_frozen_) throw std::logic_error("Sandbox::define_globals: the globals are frozen once load() ran");
  Internals::run_protected(*this, L_, 0, 0, [&](lua_State* L) {
    lua_pushglobaltable(L);
    fill(L);
    return 0;
  });
}

void Sandbox::load(std::string_view source, std::string_view chunk_name) {
  if (killed_) throw ScriptError(kill_kind_, Internals::kill_message(*this));
  const std::string name(chunk_name);
  if (!source.empty() && source[0] == LUA_SIGNATURE[0]) {
    throw ScriptError(Kind::error, name + ": binary chunks are not allowed in the sandbox: load Lua source text");
  }
  if (!globals_frozen_) {
    Internals::run_protected(*this, L_, 0, 0, &Internals::freeze_host_globals);
    globals_frozen_ = true;
  }

  const int top = lua_gettop(L_);
  lua_pushcfunction(L_, traceback_handler);
  // "=name" makes messages read "agent.lua:3: ..." rather than [string "agent.lua"]:3:.
  const std::string lua_chunk_name = name.starts_with('=') || name.starts_with('@') ? name : "=" + name;
  int status = luaL_loadbufferx(L_, source.data(), source.size(), lua_chunk_name.c_str(), "t");
  if (status == LUA_OK) {
    lua_getfield(L_, LUA_REGISTRYINDEX, kEnvKey);
    lua_setupvalue(L_, -2, 1);
    StepDeadline step(deadline_, limits_.step_seconds);
    status = lua_pcall(L_, 0, 1, top + 1);
  }
  if (status != LUA_OK) {
    Internals::settle_refusal(*this);
    std::string message = error_text(L_, -1);
    lua_settop(L_, top);
    throw ScriptError(Internals::failure_kind(*this, status), Internals::failure_message(*this, std::move(message)));
  }
  if (!lua_istable(L_, -1)) {
    const std::string type = luaL_typename(L_, -1);
    lua_settop(L_, top);
    throw ScriptError(Kind::error, name + ": the script must return a table of handlers (it returned a " + type + " value)");
  }
  Internals::run_protected(*this, L_, 1, 0, [this](lua_State* L) {
    luaL_unref(L, LUA_REGISTRYINDEX, handlers_ref_);
    handlers_ref_ = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
  });
  lua_settop(L_, top);
}

bool Sandbox::push_handler(std::string_view name) {
  if (handlers_ref_ < 0) return false;
  // Raw access: the handlers table is the agent's, and a metamethod would run agent code here,
  // outside any deadline.
  Internals::run_protected(*this, L_, 0, 1, [&](lua_State* L) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, handlers_ref_);
    lua_pushlstring(L, name.data(), name.size());
    lua_rawget(L, -2);
    return 1;
  });
  if (lua_type(L_, -1) == LUA_TFUNCTION) return true;
  lua_pop(L_, 1);
  return false;
}

std::unique_ptr<Sandbox::Coroutine> Sandbox::new_coroutine() {
  lua_State* thread = nullptr;
  int ref = LUA_NOREF;
  Internals::run_protected(*this, L_, 0, 0, [&](lua_State* L) {
    thread = lua_newthread(L);
    // Threads inherit their creator's hook, but this one must not depend on where it came from.
    lua_sethook(thread, &Internals::count_hook, LUA_MASKCOUNT, kHookInstructions);
    lua_getfield(L, LUA_REGISTRYINDEX, kHostThreadsKey);
    lua_pushvalue(L, -2);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
  });
  return std::unique_ptr<Coroutine>(new Coroutine(*this, thread, ref));
}

Sandbox::Coroutine::Outcome Sandbox::Coroutine::resume(int nargs) {
  Sandbox& s = sandbox_;
  Outcome outcome;
  if (s.killed_) {
    lua_pop(co_, nargs);
    outcome.status = Status::failed;
    outcome.kind = s.kill_kind_;
    outcome.error = Internals::kill_message(s);
    return outcome;
  }
  int results = 0;
  int status;
  {
    StepDeadline step(s.deadline_, s.limits_.step_seconds);
    status = lua_resume(co_, s.L_, nargs, &results);
  }
  if (status == LUA_OK || status == LUA_YIELD) {
    outcome.status = status == LUA_YIELD ? Status::yielded : Status::finished;
    outcome.values = results;
    return outcome;
  }
  Internals::settle_refusal(s);
  outcome.status = Status::failed;
  outcome.kind = Internals::failure_kind(s, status);
  const std::string message = Internals::failure_message(s, error_text(co_, -1));
  outcome.error = Internals::traceback(s, co_, message);
  lua_pop(co_, 1);
  return outcome;
}

Sandbox::Coroutine::~Coroutine() {
  // A coroutine left suspended (or dead by an error) may hold to-be-closed variables: closing
  // runs their __close handlers, which is agent code, hence the deadline. A killed agent runs
  // no more code (and its thread may have hooks off: see the NOTE at count_hook).
  if (lua_status(co_) != LUA_OK && !sandbox_.killed_) {
    StepDeadline step(sandbox_.deadline_, sandbox_.limits_.step_seconds);
#if LUA_VERSION_RELEASE_NUM >= 50406
    lua_closethread(co_, sandbox_.L_);
#else
    lua_resetthread(co_);
#endif
  }
  luaL_unref(sandbox_.L_, LUA_REGISTRYINDEX, ref_);
}

// --- JSON -------------------------------------------------------------------------------------

namespace {

// Converts one Lua value; `path_` names where it is for the error messages.
class JsonReader {
 public:
  JsonReader(lua_State* L, std::string_view root) : L_(L), path_(root) {}

  json::value read(int index, int depth) {
    switch (lua_type(L_, index)) {
      case LUA_TNIL:
        return nullptr;
      case LUA_TBOOLEAN:
        return json::value(lua_toboolean(L_, index) != 0);
      case LUA_TNUMBER: {
        if (lua_isinteger(L_, index)) return json::value(static_cast<std::int64_t>(lua_tointeger(L_, index)));
        const double number = lua_tonumber(L_, index);
        if (std::isnan(number)) fail("NaN cannot be stored");
        if (std::isinf(number)) fail("an infinite number cannot be stored");
        return json::value(number);
      }
      case LUA_TSTRING: {
        size_t length = 0;
        const char* chars = lua_tolstring(L_, index, &length);
        const std::string_view text(chars, length);
        if (const size_t bad = invalid_utf8_at(text); bad != std::string_view::npos) {
          fail("a string that is not valid UTF-8 cannot be stored (bad byte at offset " + std::to_string(bad) + ")");
        }
        return json::value(json::string(text));
      }
      case LUA_TTABLE:
        return read_table(index, depth);
      case LUA_TFUNCTION:
        fail("a function cannot be stored");
      case LUA_TTHREAD:
        fail("a coroutine cannot be stored");
      default:
        fail(std::string("a ") + luaL_typename(L_, index) + " cannot be stored");
    }
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { throw ScriptError(Kind::error, path_ + ": " + what); }

  json::value read_table(int index, int depth) {
    if (depth > kMaxJsonDepth) fail("tables nested deeper than " + std::to_string(kMaxJsonDepth) + " levels cannot be stored");
    const void* identity = lua_topointer(L_, index);
    if (std::find(open_tables_.begin(), open_tables_.end(), identity) != open_tables_.end()) {
      fail("a table that contains itself (a cycle) cannot be stored");
    }
    if (!lua_checkstack(L_, 4)) fail("the Lua stack is exhausted");

    // First pass: the shape, from the keys alone.
    lua_Integer integer_keys = 0, string_keys = 0;
    lua_Integer smallest = std::numeric_limits<lua_Integer>::max(), largest = 0;
    lua_pushnil(L_);
    while (lua_next(L_, index)) {
      const int key_type = lua_type(L_, -2);
      if (key_type == LUA_TSTRING) {
        ++string_keys;
      } else if (key_type == LUA_TNUMBER && lua_isinteger(L_, -2)) {
        const lua_Integer key = lua_tointeger(L_, -2);
        ++integer_keys;
        smallest = std::min(smallest, key);
        largest = std::max(largest, key);
      } else if (key_type == LUA_TNUMBER) {
        fail("a table with a fractional number key cannot be stored (keys must be strings, or 1..n for an array)");
      } else {
        fail(std::string("a table with a ") + luaL_typename(L_, -2) +
             " key cannot be stored (keys must be strings, or 1..n for an array)");
      }
      lua_pop(L_, 1);
    }
    if (integer_keys > 0 && string_keys > 0) {
      fail("a table with both integer and string keys cannot be stored (use an array 1..n or string keys)");
    }
    if (integer_keys > 0 && (smallest < 1 || largest != integer_keys)) {
      const lua_Integer stray = smallest < 1 ? smallest : largest;
      fail("an array must have the keys 1..n without holes (found key " + std::to_string(stray) + " among " +
           std::to_string(integer_keys) + " entries)");
    }

    open_tables_.push_back(identity);
    const size_t path_length = path_.size();
    json::value result;
    if (integer_keys > 0) {
      json::array& array = result.emplace_array();
      array.reserve(static_cast<size_t>(integer_keys));
      for (lua_Integer i = 1; i <= integer_keys; ++i) {
        lua_rawgeti(L_, index, i);
        path_ += "[" + std::to_string(i) + "]";
        array.push_back(read(lua_gettop(L_), depth + 1));
        path_.resize(path_length);
        lua_pop(L_, 1);
      }
    } else {
      // Sorted keys: the same table always gives the same JSON (lua_next order is arbitrary).
      std::vector<std::pair<std::string, json::value>> members;
      lua_pushnil(L_);
      while (lua_next(L_, index)) {
        size_t length = 0;
        const char* chars = lua_tolstring(L_, -2, &length);  // a string already: no conversion
        std::string key(chars, length);
        if (invalid_utf8_at(key) != std::string_view::npos) fail("a key that is not valid UTF-8 cannot be stored");
        append_key(key);
        members.emplace_back(std::move(key), read(lua_gettop(L_), depth + 1));
        path_.resize(path_length);
        lua_pop(L_, 1);
      }
      std::sort(members.begin(), members.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      json::object& object = result.emplace_object();
      object.reserve(members.size());
      for (auto& [key, value] : members) object.emplace(key, std::move(value));
    }
    open_tables_.pop_back();
    return result;
  }

  // `.name` for identifiers, `["any key"]` otherwise.
  void append_key(const std::string& key) {
    const bool identifier = !key.empty() && !std::isdigit(static_cast<unsigned char>(key[0])) &&
                            std::all_of(key.begin(), key.end(), [](char c) {
                              return std::isalnum(static_cast<unsigned char>(c)) || c == '_';
                            });
    if (identifier) {
      path_ += "." + key;
      return;
    }
    path_ += "[\"";
    for (char c : key) path_ += c == '"' ? std::string("\\\"") : std::string(1, c);
    path_ += "\"]";
  }

  lua_State* L_;
  std::string path_;
  std::vector<const void*> open_tables_;  // the tables being read, outermost first
};

}  // namespace

json::value to_json(lua_State* L, int index, std::string_view path) {
  const int top = lua_gettop(L);
  JsonReader reader(L, path);
  try {
    return reader.read(lua_absindex(L, index), 1);
  } catch (const std::exception&) {  // the reader raises no Lua errors, only these
    lua_settop(L, top);
    throw;
  }
}

void push_json(lua_State* L, const json::value& value) {
  switch (value.kind()) {
    case json::kind::null:
      lua_pushnil(L);
      return;
    case json::kind::bool_:
      lua_pushboolean(L, value.get_bool());
      return;
    case json::kind::int64:
      lua_pushinteger(L, value.get_int64());
      return;
    case json::kind::uint64: {
      // Only values past INT64_MAX come as uint64; Lua has no integer for them.
      const std::uint64_t number = value.get_uint64();
      if (number <= static_cast<std::uint64_t>(std::numeric_limits<lua_Integer>::max())) {
        lua_pushinteger(L, static_cast<lua_Integer>(number));
      } else {
        lua_pushnumber(L, static_cast<lua_Number>(number));
      }
      return;
    }
    case json::kind::double_:
      lua_pushnumber(L, value.get_double());
      return;
    case json::kind::string: {
      const json::string& text = value.get_string();
      lua_pushlstring(L, text.data(), text.size());
      return;
    }
    case json::kind::array: {
      const json::array& array = value.get_array();
      luaL_checkstack(L, 2, "JSON nested too deeply");
      lua_createtable(L, static_cast<int>(std::min<size_t>(array.size(), std::numeric_limits<int>::max())), 0);
      for (size_t i = 0; i < array.size(); ++i) {
        if (array[i].is_null()) continue;  // a hole: Lua tables cannot hold nil
        push_json(L, array[i]);
        lua_rawseti(L, -2, static_cast<lua_Integer>(i + 1));
      }
      return;
    }
    case json::kind::object: {
      const json::object& object = value.get_object();
      luaL_checkstack(L, 3, "JSON nested too deeply");
      lua_createtable(L, 0, static_cast<int>(std::min<size_t>(object.size(), std::numeric_limits<int>::max())));
      for (const auto& member : object) {
        if (member.value().is_null()) continue;
        lua_pushlstring(L, member.key().data(), member.key().size());
        push_json(L, member.value());
        lua_rawset(L, -3);
      }
      return;
    }
  }
}

}  // namespace den::runtime::lua
