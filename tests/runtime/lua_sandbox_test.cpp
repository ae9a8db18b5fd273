// The agent sandbox, driven by Lua snippets: handlers and coroutines, the escape corpus (each
// refused with a clear error, the sandbox still usable after), the step deadline and memory
// cap with their sticky kills, and the JSON bridge in both directions.
#include "den/runtime/lua_sandbox.h"

// den::lua is private to den_runtime, so this target lacks its include directory; the headers
// are reached through their Debian location instead.
#include <lua5.4/lauxlib.h>
#include <lua5.4/lua.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "test_support.h"

using den::runtime::lua::push_json;
using den::runtime::lua::Sandbox;
using den::runtime::lua::SandboxLimits;
using den::runtime::lua::ScriptError;
using den::runtime::lua::to_json;

namespace {

namespace json = boost::json;
using Status = Sandbox::Coroutine::Status;
using Kind = ScriptError::Kind;

SandboxLimits test_limits() {
  SandboxLimits limits;
  limits.memory_bytes = 8 << 20;
  limits.step_seconds = 0.2;
  return limits;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

struct Result {
  Status status = Status::finished;
  Kind kind = Kind::error;
  std::string error;
  std::vector<json::value> values;
};

// Reads (and pops) what one resume left on the coroutine's stack.
Result collect(Sandbox::Coroutine& co, const Sandbox::Coroutine::Outcome& outcome) {
  Result result{outcome.status, outcome.kind, outcome.error, {}};
  for (int i = outcome.values; i >= 1; --i) result.values.push_back(to_json(co.thread(), -i, "result"));
  lua_pop(co.thread(), outcome.values);
  return result;
}

// Starts handler `name` with `args` in a new coroutine and runs it to its first yield or end.
Result call(Sandbox& sandbox, std::unique_ptr<Sandbox::Coroutine>& co, std::string_view name,
            const std::vector<json::value>& args = {}) {
  co = sandbox.new_coroutine();
  REQUIRE(sandbox.push_handler(name));
  lua_xmove(sandbox.state(), co->thread(), 1);
  for (const json::value& arg : args) push_json(co->thread(), arg);
  return collect(*co, co->resume(static_cast<int>(args.size())));
}

Result call(Sandbox& sandbox, std::string_view name, const std::vector<json::value>& args = {}) {
  std::unique_ptr<Sandbox::Coroutine> co;
  return call(sandbox, co, name, args);
}

// An agent whose handler `run` executes `body` (from line 3 of agent.lua) and whose handler
// `ok` returns 42, to see that the sandbox still works afterwards.
struct Agent {
  std::vector<std::string> log;
  Sandbox sandbox;

  explicit Agent(const std::string& body, SandboxLimits limits = test_limits())
      : sandbox(limits, [this](std::string_view line) { log.emplace_back(line); }) {
    sandbox.load("return {\n  run = function(...)\n" + body + "\n  end,\n  ok = function() return 42 end,\n}\n",
                 "agent.lua");
  }
  Result run(const std::vector<json::value>& args = {}) { return call(sandbox, "run", args); }
  bool still_works() {
    const Result result = call(sandbox, "ok");
    return result.status == Status::finished && result.values.size() == 1 && result.values[0] == 42;
  }
};

// The message Sandbox::load throws for `source`, or "(loaded)".
std::string load_error(const std::string& source, Kind* kind = nullptr) {
  Sandbox sandbox(test_limits(), nullptr);
  try {
    sandbox.load(source, "agent.lua");
  } catch (const ScriptError& error) {
    if (kind != nullptr) *kind = error.kind();
    return error.what();
  }
  return "(loaded)";
}

bool contains(const std::string& text, std::string_view part) { return text.find(part) != std::string::npos; }

// to_json of what `expression` evaluates to in a fresh sandbox, or the error message.
std::string json_of(const std::string& expression, std::string_view path = "state") {
  Sandbox sandbox(test_limits(), nullptr);
  sandbox.load("return { value = function() return " + expression + " end }", "values.lua");
  std::unique_ptr<Sandbox::Coroutine> co = sandbox.new_coroutine();
  REQUIRE(sandbox.push_handler("value"));
  lua_xmove(sandbox.state(), co->thread(), 1);
  const Sandbox::Coroutine::Outcome outcome = co->resume(0);
  REQUIRE(outcome.status == Status::finished);
  REQUIRE(outcome.values == 1);
  lua_State* thread = co->thread();
  const int top = lua_gettop(thread);
  try {
    return json::serialize(to_json(thread, -1, path));
  } catch (const ScriptError& error) {
    CHECK(lua_gettop(thread) == top);  // left as it was
    return error.what();
  }
}

}  // namespace

TEST_CASE("lua sandbox: a handler table loads and a handler runs") {
  std::vector<std::string> log;
  Sandbox sandbox(test_limits(), [&](std::string_view line) { log.emplace_back(line); });
  sandbox.load(R"lua(
    local greeting = "hello"
    local function shout(text) return string.upper(text) end
    return {
      greet = function(name)
        print("greeting", name, 3, nil, true)
        return greeting .. " " .. shout(name), #name
      end,
      version = 3,
    }
  )lua",
               "greeter.lua");
  const Result result = call(sandbox, "greet", {"ada"});
  REQUIRE(result.status == Status::finished);
  REQUIRE(result.values.size() == 2);
  CHECK(result.values[0] == "hello ADA");
  CHECK(result.values[1] == 3);
  REQUIRE(log.size() == 1);
  CHECK(log[0] == "greeting\tada\t3\tnil\ttrue");

  CHECK_FALSE(sandbox.push_handler("missing"));
  CHECK_FALSE(sandbox.push_handler("version"));  // not a function
  CHECK(lua_gettop(sandbox.state()) == 0);
  CHECK_FALSE(sandbox.killed());
  CHECK(sandbox.memory_used() > 0);
  CHECK(sandbox.memory_used() < sandbox.limits().memory_bytes);
}

TEST_CASE("lua sandbox: yields carry values out and resume carries results in") {
  Sandbox sandbox(test_limits(), nullptr);
  sandbox.load(R"lua(
    return {
      ask = function(question)
        local answer = coroutine.yield("generate", question)
        local extra = coroutine.yield("tool", { doubled = answer * 2 })
        return answer + extra.value
      end,
    }
  )lua",
               "asker.lua");
  std::unique_ptr<Sandbox::Coroutine> co;
  Result step = call(sandbox, co, "ask", {"why?"});
  REQUIRE(step.status == Status::yielded);
  REQUIRE(step.values.size() == 2);
  CHECK(step.values[0] == "generate");
  CHECK(step.values[1] == "why?");

  push_json(co->thread(), 20);
  step = collect(*co, co->resume(1));
  REQUIRE(step.status == Status::yielded);
  REQUIRE(step.values.size() == 2);
  CHECK(step.values[0] == "tool");
  CHECK(step.values[1] == json::parse(R"({"doubled":40})"));

  push_json(co->thread(), json::parse(R"({"value":2})"));
  step = collect(*co, co->resume(1));
  REQUIRE(step.status == Status::finished);
  REQUIRE(step.values.size() == 1);
  CHECK(step.values[0] == 22);

  // Finished: resuming again is an error, not a crash.
  step = collect(*co, co->resume(0));
  CHECK(step.status == Status::failed);
  CHECK(contains(step.error, "cannot resume dead coroutine"));
}

TEST_CASE("lua sandbox: the step deadline is per resume") {
  // Each resume gets step_seconds afresh; time spent waiting on the host does not count.
  Sandbox sandbox(test_limits(), nullptr);
  sandbox.load("return { wait = function() for i = 1, 3 do coroutine.yield(i) end return 'done' end }", "waiter.lua");
  std::unique_ptr<Sandbox::Coroutine> co;
  Result step = call(sandbox, co, "wait");
  for (int i = 0; i < 3; ++i) {
    REQUIRE(step.status == Status::yielded);
    std::this_thread::sleep_for(std::chrono::milliseconds(120));
    step = collect(*co, co->resume(0));
  }
  REQUIRE(step.status == Status::finished);
  CHECK(step.values.at(0) == "done");
  CHECK_FALSE(sandbox.killed());
}

TEST_CASE("lua sandbox: load reports syntax and runtime errors with their place") {
  Kind kind = Kind::memory;
  const std::string syntax = load_error("return {\n  f = function( end\n}", &kind);
  CHECK(kind == Kind::error);
  CHECK(contains(syntax, "agent.lua:2:"));

  const std::string runtime = load_error("local function fail() error('boom') end\nfail()\nreturn {}", &kind);
  CHECK(kind == Kind::error);
  CHECK(contains(runtime, "agent.lua:1: boom"));
  CHECK(contains(runtime, "stack traceback"));

  CHECK(contains(load_error("return 3"), "agent.lua: the script must return a table of handlers (it returned a number value)"));
  CHECK(contains(load_error("\x1bLua\x54\x00\x19\x93\r\n\x1a\n"), "binary chunks are not allowed"));
  CHECK(load_error("return {}") == "(loaded)");
}

TEST_CASE("lua sandbox: absent libraries and functions fail clearly and the sandbox goes on") {
  const std::vector<std::pair<std::string, std::string>> corpus = {
      {"return os.execute('echo escaped')", "attempt to index a nil value (global 'os')"},
      {"return io.open('/etc/passwd')", "attempt to index a nil value (global 'io')"},
      {"return require('os')", "attempt to call a nil value (global 'require')"},
      {"return dofile('/etc/passwd')", "attempt to call a nil value (global 'dofile')"},
      {"return loadfile('/etc/passwd')", "attempt to call a nil value (global 'loadfile')"},
      {"return string.dump(function() end)", "attempt to call a nil value (field 'dump')"},
      {"return ('x'):dump()", "attempt to call a nil value (method 'dump')"},
      {"return debug.getinfo(1)", "attempt to index a nil value (global 'debug')"},
      {"return package.loaded", "attempt to index a nil value (global 'package')"},
      {"return warn('x')", "attempt to call a nil value (global 'warn')"},
  };
  for (const auto& [code, expected] : corpus) {
    CAPTURE(code);
    Agent agent(code);
    const Result result = agent.run();
    CHECK(result.status == Status::failed);
    CHECK(result.kind == Kind::error);
    CHECK(contains(result.error, "agent.lua:3: " + expected));
    CHECK(contains(result.error, "stack traceback"));
    CHECK_FALSE(agent.sandbox.killed());
    CHECK(agent.still_works());
  }
}

TEST_CASE("lua sandbox: load takes text only and gives an empty environment") {
  Agent agent("local code, mode, with_env = ...\n"
              "if with_env then return load(code, 'snippet', mode, _G)() end\n"
              "local f, err = load(code, 'snippet', mode)\n"
              "if not f then return 'refused', err end\n"
              "return f()");
  const auto run = [&](std::string code, std::string mode = "t", bool with_env = false) {
    return agent.run({json::value(code), json::value(mode), json::value(with_env)});
  };
  const std::string binary("\x1bLua\x54\x00\x19\x93\r\n\x1a\n\x04\x08\x08", 15);
  Result result = run(binary);
  REQUIRE(result.status == Status::finished);
  CHECK(result.values.at(0) == "refused");
  CHECK(result.values.at(1) == "load: binary chunks are not allowed in the sandbox (text only)");
  // A binary chunk made inside Lua, returned as load's own nil, message.
  result = run("return load(string.char(27) .. 'Lua' .. string.char(84, 0))", "t", true);
  REQUIRE(result.status == Status::finished);
  REQUIRE(result.values.size() == 2);
  CHECK(result.values[0].is_null());
  CHECK(result.values[1] == "load: binary chunks are not allowed in the sandbox (text only)");

  result = run("return 1", "b");
  REQUIRE(result.status == Status::finished);
  CHECK(result.values.at(0) == "refused");
  CHECK(contains(json::value_to<std::string>(result.values.at(1)), "binary chunks are not allowed"));

  result = run("return os, print, string");  // the default environment is empty
  REQUIRE(result.status == Status::finished);
  REQUIRE(result.values.size() == 3);
  CHECK(result.values[0].is_null());
  CHECK(result.values[1].is_null());
  CHECK(result.values[2].is_null());

  result = run("x = 5 return x");  // ... and the chunk's own to write
  REQUIRE(result.status == Status::finished);
  CHECK(result.values.at(0) == 5);

  result = run("return string.rep('ab', 2)", "t", true);  // an explicit environment is used
  REQUIRE(result.status == Status::finished);
  CHECK(result.values.at(0) == "abab");

  Agent reader("return load(function() return nil end)");
  result = reader.run();
  CHECK(result.status == Status::failed);
  CHECK(contains(result.error, "load: only source strings can be loaded in the sandbox (got a function)"));
  CHECK(reader.still_works());
}

TEST_CASE("lua sandbox: globals and library tables are read-only") {
  const std::vector<std::pair<std::string, std::string>> corpus = {
      {"counter = 1", "cannot assign global 'counter': globals are read-only: use local variables or ctx.state"},
      {"_G.print = nil", "cannot assign global 'print': globals are read-only"},
      {"rawset(_G, 'counter', 1)", "cannot assign global 'counter': globals are read-only"},
      {"_ENV.counter = 1", "cannot assign global 'counter'"},
      {"setmetatable(_G, {})", "cannot change a protected metatable"},
      {"getmetatable('').__index = {}", "cannot assign '__index' in the string metatable: it is read-only"},
      {"getmetatable('').__index.rep = nil", "cannot assign 'rep' in the string library: it is read-only"},
      {"string.rep = function() return 'owned' end", "cannot assign 'rep' in the string library: it is read-only"},
      {"rawset(string, 'rep', print)", "cannot assign 'rep' in the string library: it is read-only"},
      {"math.pi = 3", "cannot assign 'pi' in the math library: it is read-only"},
      {"table.insert(math, 1)", "cannot assign '1' in the math library: it is read-only"},
      {"coroutine.yield = nil", "cannot assign 'yield' in the coroutine library"},
      {"setmetatable(string, {})", "cannot change a protected metatable"},
  };
  for (const auto& [code, expected] : corpus) {
    CAPTURE(code);
    Agent agent(code);
    const Result result = agent.run();
    CHECK(result.status == Status::failed);
    CHECK(result.kind == Kind::error);
    CHECK(contains(result.error, expected));
    CHECK_FALSE(agent.sandbox.killed());
    CHECK(agent.still_works());
  }
  // Nothing above changed anything: a fresh look at the libraries.
  Agent agent("return string.rep('a', 3), math.pi > 3, getmetatable('').__index == string, getmetatable(_G),"
              " _G._G == _G, ('x'):rep(2)");
  const Result result = agent.run();
  REQUIRE(result.status == Status::finished);
  CHECK(json::value(json::array(result.values.begin(), result.values.end())) ==
        json::parse(R"(["aaa", true, true, "read-only", true, "xx"])"));
}

TEST_CASE("lua sandbox: assigning a global at the top level of the script fails the load") {
  CHECK(contains(load_error("counter = 0\nreturn {}"), "agent.lua:1: cannot assign global 'counter': globals are read-only"));
  CHECK(contains(load_error("function helper() end\nreturn {}"), "cannot assign global 'helper'"));
  CHECK(load_error("local counter = 0\nlocal function helper() end\nreturn {}") == "(loaded)");
}

TEST_CASE("lua sandbox: pairs and rawset still work where they should") {
  Agent agent(R"lua(
    local names = 0
    for name in pairs(string) do names = names + 1 end
    local _, state = pairs(_G)
    local own = {}
    rawset(own, "a", 1)
    local seen_print = false
    for name, value in pairs(_G) do if name == "print" and value == print then seen_print = true end end
    return names > 10, state == _G, own.a, seen_print, #string
  )lua");
  const Result result = agent.run();
  REQUIRE(result.status == Status::finished);
  CHECK(json::value(json::array(result.values.begin(), result.values.end())) ==
        json::parse(R"([true, true, 1, true, 0])"));
}

TEST_CASE("lua sandbox: host globals are frozen by load and define_globals ends there") {
  Sandbox sandbox(test_limits(), nullptr);
  sandbox.define_globals([](lua_State* L) {
    lua_createtable(L, 0, 1);
    lua_pushinteger(L, 7);
    lua_setfield(L, -2, "version");
    lua_setfield(L, -2, "den");
  });
  sandbox.load(R"lua(
    return {
      read = function() return den.version end,
      write = function() den.version = 8 end,
    }
  )lua",
               "host.lua");
  CHECK(call(sandbox, "read").values.at(0) == 7);
  const Result write = call(sandbox, "write");
  CHECK(write.status == Status::failed);
  CHECK(contains(write.error, "cannot assign 'version' in the global table 'den': it is read-only"));
  CHECK(call(sandbox, "read").values.at(0) == 7);
  CHECK_THROWS_AS(sandbox.define_globals([](lua_State*) {}), std::logic_error);

  // A C++ exception in fill reaches the caller as itself.
  Sandbox other(test_limits(), nullptr);
  CHECK_THROWS_AS(other.define_globals([](lua_State*) { throw std::runtime_error("host bug"); }), std::runtime_error);
}

TEST_CASE("lua sandbox: collectgarbage allows only collect step count and isrunning") {
  for (const std::string option : {"stop", "restart", "setpause", "setstepmul", "incremental", "generational"}) {
    CAPTURE(option);
    Agent agent("collectgarbage('" + option + "')");
    const Result result = agent.run();
    CHECK(result.status == Status::failed);
    CHECK(contains(result.error, "collectgarbage('" + option + "') is not allowed in the sandbox"));
    CHECK(agent.still_works());
  }
  Agent agent("return collectgarbage('count') > 0, collectgarbage('step'), collectgarbage(), collectgarbage('isrunning')");
  const Result result = agent.run();
  REQUIRE(result.status == Status::finished);
  REQUIRE(result.values.size() == 4);
  CHECK(result.values[0] == true);
  CHECK(result.values[1].is_bool());
  CHECK(result.values[2] == 0);
  CHECK(result.values[3] == true);
}

TEST_CASE("lua sandbox: setmetatable refuses finalizers") {
  Agent agent("setmetatable({}, { __gc = function() while true do end end })");
  const Result result = agent.run();
  CHECK(result.status == Status::failed);
  CHECK(contains(result.error, "__gc metamethods are not allowed in the sandbox"));
  CHECK(agent.still_works());

  Agent plain("local t = setmetatable({}, { __index = function(_, k) return k .. '!' end }) return t.hi");
  CHECK(plain.run().values.at(0) == "hi!");
}

TEST_CASE("lua sandbox: pcall xpcall and coroutine.wrap behave as usual while the agent lives") {
  Agent agent(R"lua(
    local ok, message = pcall(error, "oops", 0)
    local xok, handled = xpcall(error, function(m) return "handled: " .. m end, "bad", 0)
    local gen = coroutine.wrap(function(a) local b = coroutine.yield(a + 1) return b * 2 end)
    local first = gen(1)
    local wrapped_ok, wrapped_error = pcall(coroutine.wrap(function() error("inner", 0) end))
    return ok, message, xok, handled, first, gen(5), wrapped_ok, wrapped_error
  )lua");
  const Result result = agent.run();
  REQUIRE(result.status == Status::finished);
  CHECK(json::value(json::array(result.values.begin(), result.values.end())) ==
        json::parse(R"([false, "oops", false, "handled: bad", 2, 10, false, "inner"])"));
}

TEST_CASE("lua sandbox: an endless loop hits the deadline and stays killed") {
  Agent agent("while true do end");
  auto start = std::chrono::steady_clock::now();
  Result result = agent.run();
  CHECK(seconds_since(start) < 1.0);
  CHECK(result.status == Status::failed);
  CHECK(result.kind == Kind::deadline);
  CHECK(contains(result.error, "agent.lua:3: agent killed: step deadline of 0.2 s exceeded"));
  CHECK(contains(result.error, "stack traceback"));
  CHECK(agent.sandbox.killed());

  // Sticky: the next call fails at once, without running.
  start = std::chrono::steady_clock::now();
  result = call(agent.sandbox, "ok");
  CHECK(seconds_since(start) < 0.1);
  CHECK(result.status == Status::failed);
  CHECK(result.kind == Kind::deadline);
  CHECK(contains(result.error, "agent killed: step deadline"));
  try {
    agent.sandbox.load("return {}", "again.lua");
    FAIL("load on a killed sandbox succeeded");
  } catch (const ScriptError& error) {
    CHECK(error.kind() == Kind::deadline);
  }

  // Other agents are not affected.
  Agent other("return 1");
  CHECK(other.still_works());
}

TEST_CASE("lua sandbox: pcall xpcall and coroutines cannot keep a killed agent alive") {
  const std::vector<std::string> corpus = {
      "while true do pcall(function() while true do end end) end",
      "local ok = pcall(function() while true do end end) return 'survived'",
      "while true do xpcall(function() while true do end end, function(m) return m end) end",
      "while true do xpcall(function() while true do end end, function(m) while true do end end) end",
      "while true do coroutine.resume(coroutine.create(function() while true do end end)) end",
      "while true do pcall(coroutine.wrap(function() while true do end end)) end",
      "local co = coroutine.create(function() local x <close> = setmetatable({}, { __close = function() while true do end end }) coroutine.yield() end)\n"
      "coroutine.resume(co) while true do coroutine.close(co) end",
      // Threads that die from the kill must not run their close handlers (hooks are off there).
      "coroutine.wrap(function() local x <close> = setmetatable({}, { __close = function() while true do end end }) while true do end end)()",
      "local x <close> = setmetatable({}, { __close = function() while true do end end }) while true do end",
  };
  for (const std::string& code : corpus) {
    CAPTURE(code);
    Agent agent(code);
    const auto start = std::chrono::steady_clock::now();
    const Result result = agent.run();
    CHECK(seconds_since(start) < 1.0);
    CHECK(result.status == Status::failed);
    CHECK(result.kind == Kind::deadline);
    CHECK(contains(result.error, "agent killed: step deadline of 0.2 s exceeded"));
    CHECK(agent.sandbox.killed());
  }
}

TEST_CASE("lua sandbox: a loop at the top level of the script is stopped too") {
  Kind kind = Kind::error;
  const auto start = std::chrono::steady_clock::now();
  CHECK(contains(load_error("while true do end", &kind), "agent killed: step deadline"));
  CHECK(kind == Kind::deadline);
  CHECK(seconds_since(start) < 1.0);
}

TEST_CASE("lua sandbox: memory bombs are killed with kind memory") {
  const std::vector<std::string> corpus = {
      "return string.rep('x', 1e9)",
      "local t = {} local i = 0 while true do i = i + 1 t[i] = { i } end",
      "local ok, err = pcall(string.rep, 'x', 1e9) return 'survived', err",
      "local parts = {} while true do local ok, s = pcall(string.rep, 'y', 1e6 + #parts) parts[#parts + 1] = s end",
      "return table.concat({ string.rep('z', 3e6), string.rep('z', 3e6), string.rep('z', 3e6) })",
  };
  for (const std::string& code : corpus) {
    CAPTURE(code);
    SandboxLimits limits = test_limits();
    limits.step_seconds = 5;  // the cap, not the clock, must stop these
    Agent agent(code, limits);
    const Result result = agent.run();
    CHECK(result.status == Status::failed);
    CHECK(result.kind == Kind::memory);
    CHECK(contains(result.error, "agent killed: memory limit of 8 MiB exceeded"));
    CHECK(agent.sandbox.killed());
    CHECK(agent.sandbox.memory_used() <= limits.memory_bytes);
    const Result next = call(agent.sandbox, "ok");
    CHECK(next.status == Status::failed);
    CHECK(next.kind == Kind::memory);
  }
  Kind kind = Kind::error;
  CHECK(contains(load_error("local s = string.rep('x', 1e9) return {}", &kind), "memory limit"));
  CHECK(kind == Kind::memory);
}

TEST_CASE("lua sandbox: garbage churn at the cap is not a kill") {
  // With the collector stopped (by the host: agents may not), garbage fills the cap again and
  // again; each time Lua's emergency collection makes room and the agent goes on.
  SandboxLimits limits = test_limits();
  limits.step_seconds = 5;
  Agent agent(R"lua(
    local keep = {}
    for i = 1, 40 do keep[i] = string.rep(string.char(65 + i % 26), 100000 + i) end
    for i = 1, 1000 do
      local garbage = {}
      for j = 1, 1000 do garbage[j] = j end
    end
    return #keep
  )lua",
              limits);
  lua_gc(agent.sandbox.state(), LUA_GCSTOP);
  const Result result = agent.run();
  CHECK(result.status == Status::finished);
  CHECK(result.error == "");
  CHECK(result.values.at(0) == 40);
  CHECK_FALSE(agent.sandbox.killed());
}

TEST_CASE("lua sandbox: a cap too small for Lua itself is refused at construction") {
  SandboxLimits limits;
  limits.memory_bytes = 2048;
  try {
    Sandbox sandbox(limits, nullptr);
    FAIL("constructed within 2 KiB");
  } catch (const ScriptError& error) {
    CHECK(error.kind() == Kind::memory);
  }
}

TEST_CASE("lua sandbox: memory_used drops after a collection") {
  Sandbox sandbox(test_limits(), nullptr);
  sandbox.load(R"lua(
    local junk = {}
    for i = 1, 20000 do junk[i] = { i, tostring(i) } end
    junk = nil
    return { collect = function() collectgarbage() return collectgarbage("count") end }
  )lua",
               "junk.lua");
  const size_t before = sandbox.memory_used();
  const Result result = call(sandbox, "collect");
  REQUIRE(result.status == Status::finished);
  const size_t after = sandbox.memory_used();
  CHECK(after + 500'000 < before);
  // collectgarbage("count") agrees with the allocator's count (KiB, within the coroutine made).
  CHECK(result.values.at(0).as_double() * 1024 == doctest::Approx(static_cast<double>(after)).epsilon(0.05));
}

TEST_CASE("lua sandbox: agent code cannot resume or close the host's coroutines") {
  Sandbox sandbox(test_limits(), nullptr);
  sandbox.load(R"lua(
    local parked
    return {
      park = function() parked = coroutine.running() return coroutine.yield("waiting") end,
      hijack = function() return coroutine.resume(parked, "forged") end,
      close = function() return coroutine.close(parked) end,
    }
  )lua",
               "hijack.lua");
  std::unique_ptr<Sandbox::Coroutine> parked;
  REQUIRE(call(sandbox, parked, "park").status == Status::yielded);
  Result hijack = call(sandbox, "hijack");
  CHECK(hijack.status == Status::failed);
  CHECK(contains(hijack.error, "coroutine.resume: this is a handler's coroutine: only the host may resume it"));
  Result close = call(sandbox, "close");
  CHECK(close.status == Status::failed);
  CHECK(contains(close.error, "only the host may close it"));
  // The parked coroutine is untouched and answers the host.
  push_json(parked->thread(), "real");
  const Result resumed = collect(*parked, parked->resume(1));
  REQUIRE(resumed.status == Status::finished);
  CHECK(resumed.values.at(0) == "real");
}

TEST_CASE("lua sandbox: destroying a suspended coroutine runs its close handlers") {
  Agent agent(R"lua(
    local guard <close> = setmetatable({}, { __close = function() print("closed") end })
    coroutine.yield()
  )lua");
  std::unique_ptr<Sandbox::Coroutine> co;
  REQUIRE(call(agent.sandbox, co, "run").status == Status::yielded);
  CHECK(agent.log.empty());
  co.reset();
  CHECK(agent.log == std::vector<std::string>{"closed"});
  CHECK(agent.still_works());
}

TEST_CASE("lua sandbox: a looping close handler of an abandoned coroutine is stopped") {
  Agent agent("local guard <close> = setmetatable({}, { __close = function() while true do end end })\n"
              "coroutine.yield()");
  std::unique_ptr<Sandbox::Coroutine> co;
  REQUIRE(call(agent.sandbox, co, "run").status == Status::yielded);
  const auto start = std::chrono::steady_clock::now();
  co.reset();
  CHECK(seconds_since(start) < 1.0);
  CHECK(agent.sandbox.killed());
  CHECK(call(agent.sandbox, "ok").kind == Kind::deadline);
}

TEST_CASE("lua sandbox: to_json keeps integers floats and shapes") {
  const json::value value = json::parse(json_of(
      R"({ name = "x", n = 3, f = 1.5, two = 2.0, list = { 1, 2, 3 }, nested = { a = { b = true } }, empty = {},
           shared = (function() local s = { 1 } return { s, s } end)(), ["key with spaces"] = -1 })"));
  CHECK(value == json::parse(R"({"empty":{},"f":1.5,"key with spaces":-1,"list":[1,2,3],"n":3,"name":"x",
                                 "nested":{"a":{"b":true}},"shared":[[1],[1]],"two":2.0})"));
  CHECK(value.at("n").is_int64());
  CHECK(value.at("two").is_double());
  CHECK(value.at("f").is_double());
  // Keys come out sorted, so a table always serializes the same way.
  CHECK(json_of("{ b = 1, a = 2, c = 3 }") == R"({"a":2,"b":1,"c":3})");
  CHECK(json_of("{}") == "{}");  // an empty table is an empty object
  CHECK(json_of("nil") == "null");
  CHECK(json_of("'h\\u{E9}llo \\u{1F600}'") == "\"h\xC3\xA9llo \xF0\x9F\x98\x80\"");
  CHECK(json_of("math.maxinteger") == "9223372036854775807");
}

TEST_CASE("lua sandbox: to_json refuses what JSON cannot hold, naming the path") {
  const std::vector<std::pair<std::string, std::string>> refusals = {
      {"{ items = { 1, 2, { f = print } } }", "state.items[3].f: a function cannot be stored"},
      {"{ co = coroutine.create(print) }", "state.co: a coroutine cannot be stored"},
      {"(function() local t = { a = {} } t.a.back = t return t end)()",
       "state.a.back: a table that contains itself (a cycle) cannot be stored"},
      {"{ x = 0/0 }", "state.x: NaN cannot be stored"},
      {"{ x = 1/0 }", "state.x: an infinite number cannot be stored"},
      {"{ x = -1/0 }", "state.x: an infinite number cannot be stored"},
      {"{ s = '\\xff' }", "state.s: a string that is not valid UTF-8 cannot be stored (bad byte at offset 0)"},
      {"{ s = 'ok\\xc0\\x80' }", "state.s: a string that is not valid UTF-8 cannot be stored (bad byte at offset 2)"},
      {"{ s = '\\xed\\xa0\\x80' }", "state.s: a string that is not valid UTF-8"},  // a surrogate
      {"{ s = '\\xf4\\x90\\x80\\x80' }", "state.s: a string that is not valid UTF-8"},  // past U+10FFFF
      {"{ s = 'cut \\xe2\\x82' }", "state.s: a string that is not valid UTF-8 cannot be stored (bad byte at offset 4)"},
      {"{ ['\\xff'] = 1 }", "state: a key that is not valid UTF-8 cannot be stored"},
      {"{ 1, 2, x = 3 }", "state: a table with both integer and string keys cannot be stored"},
      {"{ [1] = 1, [3] = 3 }", "state: an array must have the keys 1..n without holes (found key 3 among 2 entries)"},
      {"{ [0] = 'zero', [1] = 'one' }", "state: an array must have the keys 1..n without holes (found key 0 among 2 entries)"},
      {"{ [true] = 1 }", "state: a table with a boolean key cannot be stored"},
      {"{ [1.5] = 1 }", "state: a table with a fractional number key cannot be stored"},
      {"{ list = { [{}] = 1 } }", "state.list: a table with a table key cannot be stored"},
      {"{ ['a b'] = { f = print } }", "state[\"a b\"].f: a function cannot be stored"},
      {"{ 1, { 2, { ok = 1, bad = print } } }", "state[2][2].bad: a function cannot be stored"},
  };
  for (const auto& [expression, expected] : refusals) {
    CAPTURE(expression);
    CHECK(contains(json_of(expression), expected));
  }
  CHECK(json_of("print", "value") == "value: a function cannot be stored");
}

TEST_CASE("lua sandbox: to_json allows 64 levels of nesting and no more") {
  const auto nested = [](int levels) { return "(function() local t = 0 for i = 1, " + std::to_string(levels) + " do t = { t } end return t end)()"; };
  CHECK(json_of(nested(64)).starts_with("[[[["));
  CHECK(contains(json_of(nested(65)), "tables nested deeper than 64 levels cannot be stored"));
}

TEST_CASE("lua sandbox: to_json refuses userdata and leaves the stack as it was") {
  Sandbox sandbox(test_limits(), nullptr);
  lua_State* L = sandbox.state();
  lua_createtable(L, 0, 1);
  lua_newuserdatauv(L, 16, 0);
  lua_setfield(L, -2, "handle");
  const int top = lua_gettop(L);
  try {
    to_json(L, -1, "effect");
    FAIL("userdata converted");
  } catch (const ScriptError& error) {
    CHECK(std::string(error.what()) == "effect.handle: a userdata cannot be stored");
    CHECK(error.kind() == Kind::error);
  }
  CHECK(lua_gettop(L) == top);
  lua_settop(L, 0);
}

TEST_CASE("lua sandbox: push_json round trips and its documented losses") {
  Sandbox sandbox(test_limits(), nullptr);
  lua_State* L = sandbox.state();
  const auto round_trip = [&](const json::value& value) {
    push_json(L, value);
    json::value back = to_json(L, -1);
    lua_pop(L, 1);
    return back;
  };
  const json::value document =
      json::parse(R"({"a":[1,2.5,"x",true,{"k":"v"}],"c":{},"d":-7,"e":"h\u00e9llo","f":[[1],[2,[3]]],"g":0.0})");
  CHECK(round_trip(document) == document);
  CHECK(round_trip(document).at("d").is_int64());
  CHECK(round_trip(document).at("g").is_double());
  CHECK(round_trip(json::array{}) == json::object{});  // an empty array comes back as {}
  CHECK(round_trip(json::parse(R"({"gone":null,"kept":1})")) == json::parse(R"({"kept":1})"));
  CHECK(round_trip(json::parse("18446744073709551615")).is_double());
  CHECK(round_trip(json::parse("9223372036854775807")) == INT64_MAX);
  CHECK(round_trip(nullptr).is_null());
  // A null inside an array leaves a hole, which to_json then refuses.
  push_json(L, json::parse("[1,null,3]"));
  CHECK_THROWS_WITH_AS(to_json(L, -1), "value: an array must have the keys 1..n without holes (found key 3 among 2 entries)",
                       ScriptError);
  lua_settop(L, 0);

  // What a handler sees of pushed values.
  Agent agent("local v = ... return math.type(v.n), math.type(v.f), v.list[2], v.name");
  const Result result = agent.run({json::parse(R"({"n":1,"f":1.0,"list":[10,20],"name":"ada"})")});
  REQUIRE(result.status == Status::finished);
  CHECK(json::value(json::array(result.values.begin(), result.values.end())) ==
        json::parse(R"(["integer","float",20,"ada"])"));
}
