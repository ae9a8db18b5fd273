// libFuzzer target for the bridge between Lua values and JSON that carries agent state
// (runtime/src/lua_sandbox.cpp: to_json, push_json), and through it for the sandbox. Each input
// is tried in both directions, in a fresh sandbox:
// 1. JSON -> Lua -> JSON. The input parsed as JSON (at most 80 levels deep), pushed with
//    push_json and read back with to_json must give what lua_sandbox.h promises, which
//    `expected_round_trip` below spells out: nulls dropped from objects, trailing nulls dropped
//    from arrays and a null before a value refused (a hole), empty arrays as {}, integers past
//    INT64_MAX as floats, non-finite floats and more than 64 nested tables refused, the rest
//    unchanged, kinds included (an integer stays an integer, a float a float).
// 2. Lua -> JSON -> Lua -> JSON. The input run as a sandboxed chunk (as `return <input>` when
//    that compiles, as the Lua REPL does, else as it is) under the step and memory limits, as
//    an agent's handler; its first value, when to_json accepts it, pushed back and read again
//    must give the identical JSON.
// Both directions also check that to_json leaves the stack as it was. Run by scripts/fuzz.
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "den/runtime/lua_sandbox.h"
#include "fuzz_support.h"
#include "lua.h"

namespace {

namespace json = boost::json;
using den::runtime::lua::Sandbox;
using den::runtime::lua::SandboxLimits;
using den::runtime::lua::ScriptError;

constexpr int kMaxTableDepth = 64;  // to_json's documented limit
constexpr unsigned kMaxParseDepth = 80;

void require(bool condition, const char* what) { den::fuzz::require(condition, "lua_value_fuzz", what); }

// Equal values of equal kinds, doubles bit for bit; object members in any order.
bool identical(const json::value& a, const json::value& b) {
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case json::kind::double_: {
      const double x = a.get_double(), y = b.get_double();
      return std::memcmp(&x, &y, sizeof x) == 0;
    }
    case json::kind::array: {
      const json::array &x = a.get_array(), &y = b.get_array();
      if (x.size() != y.size()) return false;
      for (size_t i = 0; i < x.size(); ++i) {
        if (!identical(x[i], y[i])) return false;
      }
      return true;
    }
    case json::kind::object: {
      const json::object &x = a.get_object(), &y = b.get_object();
      if (x.size() != y.size()) return false;
      for (const auto& member : x) {
        const json::value* other = y.if_contains(member.key());
        if (other == nullptr || !identical(member.value(), *other)) return false;
      }
      return true;
    }
    default:
      return a == b;
  }
}

// What to_json(push_json(v)) gives according to lua_sandbox.h, or nullopt where to_json must
// refuse. `depth` counts the tables around v, v's own included when it is one (to_json allows
// 64).
std::optional<json::value> expected_round_trip(const json::value& v, int depth) {
  switch (v.kind()) {
    case json::kind::uint64:
      if (v.get_uint64() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return json::value(static_cast<double>(v.get_uint64()));
      }
      return json::value(static_cast<int64_t>(v.get_uint64()));
    case json::kind::double_:
      if (!std::isfinite(v.get_double())) return std::nullopt;
      return v;
    case json::kind::array: {
      if (depth > kMaxTableDepth) return std::nullopt;
      const json::array& array = v.get_array();
      size_t length = array.size();
      while (length > 0 && array[length - 1].is_null()) --length;
      if (length == 0) return json::value(json::object{});  // an empty table reads as {}
      json::array out;
      for (size_t i = 0; i < length; ++i) {
        if (array[i].is_null()) return std::nullopt;  // a hole
        std::optional<json::value> element = expected_round_trip(array[i], depth + 1);
        if (!element) return std::nullopt;
        out.push_back(std::move(*element));
      }
      return json::value(std::move(out));
    }
    case json::kind::object: {
      if (depth > kMaxTableDepth) return std::nullopt;
      json::object out;
      for (const auto& member : v.get_object()) {
        if (member.value().is_null()) continue;
        std::optional<json::value> value = expected_round_trip(member.value(), depth + 1);
        if (!value) return std::nullopt;
        out.emplace(member.key(), std::move(*value));
      }
      return json::value(std::move(out));
    }
    default:  // null (at the top only: containers handle theirs), bool, int64, string
      return v;
  }
}

// What to_json produces has a shape of its own: no null below the top, no empty array, finite
// floats, sorted object keys.
void check_to_json_shape(const json::value& v, bool top) {
  switch (v.kind()) {
    case json::kind::null:
      require(top, "to_json produced a null inside a container");
      return;
    case json::kind::double_:
      require(std::isfinite(v.get_double()), "to_json produced a non-finite number");
      return;
    case json::kind::uint64:
      require(false, "to_json produced an unsigned integer");
      return;
    case json::kind::array:
      require(!v.get_array().empty(), "to_json produced an empty array");
      for (const json::value& element : v.get_array()) check_to_json_shape(element, false);
      return;
    case json::kind::object: {
      std::string_view previous;
      bool first = true;
      for (const auto& member : v.get_object()) {
        require(first || previous < member.key(), "to_json's object keys are not sorted");
        previous = member.key();
        first = false;
        check_to_json_shape(member.value(), false);
      }
      return;
    }
    default:
      return;
  }
}

// push_json under lua_pcall, as agent code runs it: a memory refusal becomes a Lua error rather
// than a panic. Returns false (and leaves nothing) when it failed.
bool push_protected(lua_State* L, const json::value& value) {
  if (!lua_checkstack(L, 3)) return false;
  lua_pushcfunction(L, [](lua_State* inner) -> int {
    const auto* pushed = static_cast<const json::value*>(lua_touserdata(inner, 1));
    lua_pop(inner, 1);
    den::runtime::lua::push_json(inner, *pushed);
    return 1;
  });
  lua_pushlightuserdata(L, const_cast<json::value*>(&value));
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    lua_pop(L, 1);
    return false;
  }
  return true;
}

// to_json of the value on top of L, or nullopt when it refuses; the stack must not change.
std::optional<json::value> read_top(lua_State* L) {
  const int top = lua_gettop(L);
  std::optional<json::value> result;
  try {
    result = den::runtime::lua::to_json(L, -1, "fuzz");
    check_to_json_shape(*result, true);
  } catch (const ScriptError& e) {
    require(std::string_view(e.what()).starts_with("fuzz"), "a to_json error does not name the path");
  }
  require(lua_gettop(L) == top, "to_json changed the stack");
  return result;
}

void json_to_lua_and_back(Sandbox& sandbox, std::string_view input) {
  json::parse_options options;
  options.max_depth = kMaxParseDepth;
  json::error_code ec;
  const json::value parsed = json::parse(json::string_view(input.data(), input.size()), ec, {}, options);
  if (ec) return;
  lua_State* L = sandbox.state();
  const int top = lua_gettop(L);
  if (!push_protected(L, parsed)) return;  // out of the sandbox's memory
  const std::optional<json::value> expected = expected_round_trip(parsed, 1);
  const std::optional<json::value> back = read_top(L);
  require(expected.has_value() == back.has_value(),
          expected ? "to_json refused what push_json made of valid JSON" : "to_json accepted what it must refuse");
  require(!expected || identical(*expected, *back), "the JSON round trip changed a value");
  lua_settop(L, top);
}

// The agent whose handler runs the input: load() with the sandbox's own (read-only) globals.
constexpr std::string_view kRunner = R"lua(
return {
  run = function(source)
    local chunk = load("return " .. source, "=input", "t", _ENV) or load(source, "=input", "t", _ENV)
    if chunk then return chunk() end
  end,
}
)lua";

// Lua's pattern matching runs in C, where the count hook cannot stop it (a documented limit of
// the sandbox, lua_sandbox.h): a pathological pattern would only report that limit again, so
// inputs naming these functions are left out.
bool names_pattern_matching(std::string_view input) {
  for (std::string_view name : {"find", "match", "gsub"}) {
    if (input.find(name) != std::string_view::npos) return true;
  }
  return false;
}

void lua_to_json_and_back(Sandbox& sandbox, std::string_view input) {
  if (names_pattern_matching(input)) return;
  lua_State* L = sandbox.state();
  try {
    sandbox.load(kRunner, "runner.lua");
  } catch (const ScriptError&) {
    return;  // no memory left for the runner
  }
  std::optional<json::value> first;
  {
    std::unique_ptr<Sandbox::Coroutine> co = sandbox.new_coroutine();
    lua_State* thread = co->thread();
    require(sandbox.push_handler("run"), "the runner has no handler");
    lua_xmove(L, thread, 1);
    lua_pushlstring(thread, input.data(), input.size());
    const Sandbox::Coroutine::Outcome outcome = co->resume(1);
    if (outcome.status == Sandbox::Coroutine::Status::failed || outcome.values == 0) return;
    lua_pop(thread, outcome.values - 1);  // the first value only
    first = read_top(thread);
    lua_pop(thread, 1);
  }
  if (!first) return;
  const int top = lua_gettop(L);
  if (!push_protected(L, *first)) return;
  const std::optional<json::value> second = read_top(L);
  require(second.has_value(), "to_json refused what push_json made of to_json's own output");
  require(identical(*first, *second), "Lua -> JSON -> Lua -> JSON changed the value");
  lua_settop(L, top);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  SandboxLimits limits;
  limits.memory_bytes = 16 << 20;
  limits.step_seconds = 0.05;  // a runaway loop costs the fuzzer little
  try {
    Sandbox sandbox(limits, [](std::string_view) {});
    json_to_lua_and_back(sandbox, input);
    lua_to_json_and_back(sandbox, input);
  } catch (const ScriptError& e) {
    // A limit hit outside agent code (a panic): the sandbox reports it, nothing is broken.
    require(e.kind() != ScriptError::Kind::error, e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lua_value_fuzz: unexpected exception: %s\n", e.what());
    std::abort();
  }
  return 0;
}
