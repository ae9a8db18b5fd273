// The agent thread: triggers -> handler runs in coroutines -> effects (journaled) -> commit.
#include "den/runtime/agent_runtime.h"

#include "lauxlib.h"
#include "lua.h"

#include <boost/asio.hpp>

#include <algorithm>
#include <chrono>
#include <deque>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>

#include "den/engine/tokenizer.h"
#include "den/memory/failpoints.h"
#include "den/runtime/agent_store.h"
#include "den/runtime/log.h"
#include "den/runtime/names.h"

namespace den::runtime {
namespace asio = boost::asio;
namespace json = boost::json;

namespace {

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string handler_for(std::string_view trigger) {
  if (trigger == "start") return "on_start";
  if (trigger == "message") return "on_message";
  if (trigger == "timer") return "on_timer";
  return "on_context_full";
}

// Runs f, turning a C++ exception into a Lua error (never let one cross into Lua's frames).
template <typename F>
int lua_guarded(lua_State* L, F&& f) {
  std::string error;
  try {
    return f();
  } catch (const std::exception& e) {
    error = e.what();
  }
  lua_pushlstring(L, error.data(), error.size());
  return lua_error(L);
}

std::string opt_string(lua_State* L, int table, const char* key, std::string fallback) {
  lua_getfield(L, table, key);
  if (lua_isstring(L, -1)) fallback = lua_tostring(L, -1);
  lua_pop(L, 1);
  return fallback;
}

double opt_number(lua_State* L, int table, const char* key, double fallback) {
  lua_getfield(L, table, key);
  if (lua_isnumber(L, -1)) fallback = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return fallback;
}

bool opt_bool(lua_State* L, int table, const char* key, bool fallback) {
  lua_getfield(L, table, key);
  if (lua_isboolean(L, -1)) fallback = lua_toboolean(L, -1) != 0;
  lua_pop(L, 1);
  return fallback;
}

}  // namespace

struct AgentRuntime::Impl {
  struct Run {
    RunRecord record;
    std::unique_ptr<lua::Sandbox::Coroutine> co;
    std::map<int32_t, JournalEntry> journal;  // recorded before a restart
    int32_t next_seq = 0;
    int ctx_ref = LUA_NOREF;
    bool waiting = false;
    std::string waiting_on;       // the effect the handler waits for ("tool", "generate", ...)
    double waiting_since = 0;     // unix time it started waiting
    std::shared_ptr<GenerateHandle> generation;
    std::shared_ptr<ToolCall> tool_call;
  };
  struct Agent {
    Impl* impl = nullptr;
    AgentRecord record;
    std::unique_ptr<lua::Sandbox> sandbox;
    std::unique_ptr<Run> run;
    std::deque<RunRecord> interrupted;  // to re-run, oldest first
    bool context_full_handled = false;  // on_context_full ran for the current fullness
    int32_t context_checked_length = -1;  // the history length the default policy left
    double pump_retry_seconds = 0;  // after a run could not be begun: the wait before the next try
    // A run whose handler is done but whose end the store has not taken yet: tried again (1 s,
    // doubling to 30 s) before the agent starts anything else.
    struct Ending {
      RunRecord record;
      bool ok = true;
      std::string state_json, error;
      bool logged = false;  // a failed run's log line is written once
    };
    std::optional<Ending> ending;
    double end_retry_seconds = 0;
  };

  AgentRuntimeConfig config;
  const engine::Model& model;
  memory::SessionManager& sessions;
  Scheduler& scheduler;
  const ChatTurns& chat;
  SessionClaims& claims;
  ToolRegistry* tools;
  AgentStore store;

  asio::io_context io;
  asio::executor_work_guard<asio::io_context::executor_type> work{io.get_executor()};
  asio::steady_timer timer_wakeup{io};
  asio::thread_pool blocking{2};  // history saves and checkpoints, off the agent thread
  std::thread thread;
  bool shutting_down = false;     // agent thread

  std::map<int64_t, std::unique_ptr<Agent>> agents;  // agent thread

  mutable std::mutex listeners_mutex;
  std::map<int64_t, std::map<uint64_t, AgentListener>> listeners;  // agent -> subscription -> listener
  std::map<uint64_t, int64_t> subscription_agent;
  uint64_t next_subscription = 1;
  struct Waiting {
    int64_t agent = 0;
    std::vector<std::function<void(MessageState)>> callbacks;
  };
  std::map<int64_t, Waiting> handled_waiters;  // message -> who waits for its handler to finish

  std::atomic<int64_t> runs_completed{0}, runs_failed{0}, effects_replayed{0};

  Impl(AgentRuntimeConfig c, const engine::Model& m, memory::SessionManager& s, Scheduler& sch, const ChatTurns& ch,
       SessionClaims& cl, ToolRegistry* t)
      : config(std::move(c)), model(m), sessions(s), scheduler(sch), chat(ch), claims(cl), tools(t), store(config.store_path) {}

  // Runs f on the agent thread and waits for its result (API calls from other threads).
  // Held while an API call waits for the agent thread, so shutdown cannot stop the thread
  // under it.
  std::mutex api_mutex;
  template <typename F>
  auto on_agent_thread(F&& f) -> decltype(f()) {
    using R = decltype(f());
    std::lock_guard lock(api_mutex);
    if (shutting_down_flag.load()) throw AgentError(AgentError::Kind::stopped, "the daemon is shutting down");
    std::packaged_task<R()> task(std::forward<F>(f));
    auto result = task.get_future();
    asio::post(io, [&task] { task(); });
    return result.get();
  }

  Agent& agent_by_name(std::string_view name) {
    for (auto& [id, a] : agents) {
      if (a->record.name == name) return *a;
    }
    throw AgentError(AgentError::Kind::not_found, "no agent '" + std::string(name) + "'");
  }

  void emit(int64_t agent, json::object event) {
    std::vector<AgentListener> targets;
    {
      std::lock_guard lock(listeners_mutex);
      auto it = listeners.find(agent);
      if (it == listeners.end()) return;
      for (auto& [sub, listener] : it->second) targets.push_back(listener);
    }
    for (auto& listener : targets) listener(event);
  }

  void agent_log(Agent& a, std::string_view level, std::string_view text) {
    try {
      store.append_log(a.record.id, level, text);
    } catch (const std::exception& e) {
      log_warn("agent log not stored", {{"agent", a.record.name}, {"error", e.what()}});
    }
    emit(a.record.id, {{"kind", "log"}, {"agent", a.record.name}, {"level", level}, {"text", text}});
  }

  // --- sandboxes and the Lua API --------------------------------------------------------------

  std::unique_ptr<lua::Sandbox> make_sandbox(Agent& a) {
    auto sandbox = std::make_unique<lua::Sandbox>(config.limits, [this, &a](std::string_view line) {
      agent_log(a, "info", line);
    });
    sandbox->define_globals([&](lua_State* L) { define_den_global(L, a); });
    sandbox->load(a.record.source, a.record.name);
    return sandbox;
  }

  static Agent& agent_of(lua_State* L) { return *static_cast<Agent*>(lua_touserdata(L, lua_upvalueindex(1))); }

  // The agent of a binding that is an effect: only inside a handler, and from the handler's own
  // coroutine (a yield from a coroutine the agent made would go to the agent, not to the host).
  static Agent& handler_agent_of(lua_State* L) {
    Agent& a = agent_of(L);
    if (!a.run || !a.run->co) luaL_error(L, "this call is only possible inside a handler (on_start, on_message, ...)");
    if (a.run->co->thread() != L) {
      luaL_error(L, "effects (generate, tool calls, sleep, send, ...) must be called from the handler itself, "
                    "not from a coroutine it created");
    }
    return a;
  }

  static void set_function(lua_State* L, Agent& a, const char* name, lua_CFunction f) {
    lua_pushlightuserdata(L, &a);
    lua_pushcclosure(L, f, 1);
    lua_setfield(L, -2, name);
  }

  // The global `den` (globals table on top of the stack).
  void define_den_global(lua_State* L, Agent& a) {
    lua_newtable(L);
    set_function(L, a, "now", &l_now);
    set_function(L, a, "parse_tool_calls", &l_parse_tool_calls);
    lua_newtable(L);
    set_function(L, a, "list", &l_tools_list);
    set_function(L, a, "call", &l_tools_call);
    lua_setfield(L, -2, "tools");
    lua_setfield(L, -2, "den");
  }

  // ctx for one run: {name, state, session = {...methods}, send, reply, sleep, schedule, log}.
  void push_ctx(lua_State* L, Agent& a, const json::value& state) {
    lua_newtable(L);
    lua_pushstring(L, a.record.name.c_str());
    lua_setfield(L, -2, "name");
    lua::push_json(L, state.is_object() ? state : json::value(json::object{}));
    lua_setfield(L, -2, "state");
    lua_newtable(L);  // session
    lua_pushstring(L, ("s-" + std::to_string(a.record.session)).c_str());
    lua_setfield(L, -2, "id");
    set_function(L, a, "append", &l_session_append);
    set_function(L, a, "generate", &l_session_generate);
    set_function(L, a, "length", &l_session_length);
    set_function(L, a, "fork", &l_session_fork);
    set_function(L, a, "pin", &l_session_pin);
    set_function(L, a, "unpin", &l_session_unpin);
    set_function(L, a, "checkpoint", &l_session_checkpoint);
    set_function(L, a, "compact", &l_session_compact);
    lua_setfield(L, -2, "session");
    set_function(L, a, "send", &l_send);
    set_function(L, a, "reply", &l_reply);
    set_function(L, a, "sleep", &l_sleep);
    set_function(L, a, "schedule", &l_schedule);
    set_function(L, a, "log", &l_log);
  }

  // The journal: an effect's entry when the run recorded it before a restart.
  static const JournalEntry* replayed(Agent& a, int32_t seq, std::string_view kind) {
    auto it = a.run->journal.find(seq);
    if (it == a.run->journal.end()) return nullptr;
    if (it->second.kind != kind) {
      throw std::runtime_error("replay diverged: effect " + std::to_string(seq) + " was a " + it->second.kind +
                               " before the restart and is a " + std::string(kind) + " now (handlers must be deterministic)");
    }
    ++a.impl->effects_replayed;
    return &it->second;
  }

  // A handler waits: the effect's completion resumes it on the agent thread.
  static int yield_for_effect(lua_State* L, Agent& a, std::string_view effect) {
    a.run->waiting = true;
    a.run->waiting_on = effect;
    a.run->waiting_since = unix_now();
    return lua_yield(L, 0);
  }

  // Resumes the agent's run with values pushed by `push` (on the agent thread).
  void resume_run(int64_t agent_id, int64_t run_id, std::function<int(lua_State*)> push) {
    asio::post(io, [this, agent_id, run_id, push = std::move(push)] {
      auto it = agents.find(agent_id);
      if (it == agents.end() || !it->second->run || it->second->run->record.id != run_id) return;  // removed
      if (shutting_down) return;  // left for the restart to re-run
      Agent& a = *it->second;
      a.run->waiting = false;
      lua_State* co = a.run->co->thread();
      int n = 0;
      try {
        n = push(co);
      } catch (const std::exception& e) {
        lua_pushnil(co);
        lua_pushstring(co, e.what());
        n = 2;
      }
      step_run(a, n);
    });
  }

  static int l_now(lua_State* L) {
    Agent& a = handler_agent_of(L);
    return lua_guarded(L, [&] {
      const int32_t seq = a.run->next_seq++;
      double now = unix_now();
      if (const JournalEntry* e = replayed(a, seq, "now"); e && e->result_json) {
        now = json::parse(*e->result_json).to_number<double>();
      } else {
        a.impl->store.journal_intent(a.run->record.id, seq, "now", "{}");
        a.impl->store.journal_result(a.run->record.id, seq, json::serialize(json::value(now)));
      }
      lua_pushnumber(L, now);
      return 1;
    });
  }

  static int l_parse_tool_calls(lua_State* L) {
    const char* text = luaL_checkstring(L, 1);
    return lua_guarded(L, [&] {
      json::array calls;
      for (const ParsedToolCall& c : parse_tool_calls(text)) calls.push_back(json::object{{"name", c.name}, {"arguments", c.arguments}});
      lua::push_json(L, calls);
      return 1;
    });
  }

  static int l_tools_list(lua_State* L) {
    Agent& a = agent_of(L);
    return lua_guarded(L, [&] {
      json::array list;
      if (a.impl->tools != nullptr) {
        for (const ToolInfo& t : a.impl->tools->list()) {
          list.push_back(json::object{{"name", t.qualified}, {"description", t.description}, {"input_schema", t.input_schema}});
        }
      }
      lua::push_json(L, list);
      return 1;
    });
  }

  // den.tools.call(name, args) -> result {text, content, is_error} | nil, error
  static int l_tools_call(lua_State* L) {
    Agent& a = handler_agent_of(L);
    const std::string name = luaL_checkstring(L, 1);
    return lua_guarded(L, [&]() -> int {
      json::object args;
      if (!lua_isnoneornil(L, 2)) {
        const json::value v = lua::to_json(L, 2, "arguments");
        if (!v.is_object()) throw std::invalid_argument("den.tools.call: arguments must be a table with string keys");
        args = v.as_object();
      }
      Impl& impl = *a.impl;
      const int32_t seq = a.run->next_seq++;
      const JournalEntry* e = replayed(a, seq, "tool");
      if (e && e->result_json) return push_tool_result(L, json::parse(*e->result_json));
      if (!e) impl.store.journal_intent(a.run->record.id, seq, "tool", json::serialize(json::object{{"name", name}}));
      if (impl.tools == nullptr) {
        const json::value result = json::object{{"error", "no tools are configured (the config's tools list is empty)"}};
        impl.store.journal_result(a.run->record.id, seq, json::serialize(result));
        return push_tool_result(L, result);
      }
      const int64_t agent_id = a.record.id, run_id = a.run->record.id;
      const memory::SessionId session = a.record.session;
      a.run->tool_call = impl.tools->call(name, args, impl.config.tool_timeout,
                                          [&impl, agent_id, run_id, seq](std::optional<ToolResult> result, std::exception_ptr error) {
        json::value recorded;
        if (result) {
          recorded = json::object{{"text", result->text()}, {"content", result->content}, {"is_error", result->is_error}};
        } else {
          try {
            std::rethrow_exception(error);
          } catch (const std::exception& failure) {
            recorded = json::object{{"error", failure.what()}};
          }
        }
        asio::post(impl.io, [&impl, agent_id, run_id, seq, recorded] {
          if (impl.shutting_down) return;
          try {
            impl.store.journal_result(run_id, seq, json::serialize(recorded));
          } catch (const std::exception& failure) {
            log_error("tool result not journaled", {{"error", failure.what()}});
          }
          impl.resume_run(agent_id, run_id, [recorded](lua_State* co) { return push_tool_result(co, recorded); });
        });
      });
      // A call that keeps the agent waiting lets its KV go down a tier meanwhile.
      impl.demote_while_waiting(session, std::chrono::seconds(1), run_id, agent_id);
      return yield_for_effect(L, a, "tool");
    });
  }

  static int push_tool_result(lua_State* L, const json::value& recorded) {
    const json::object& o = recorded.as_object();
    if (const json::value* err = o.if_contains("error")) {
      lua_pushnil(L);
      lua_pushstring(L, std::string(err->as_string()).c_str());
      return 2;
    }
    lua::push_json(L, recorded);
    return 1;
  }

  // After `after`, if the run still waits, its session's KV moves to DRAM (when there is one).
  void demote_while_waiting(memory::SessionId session, std::chrono::milliseconds after, int64_t run_id, int64_t agent_id) {
    auto timer = std::make_shared<asio::steady_timer>(io, after);
    timer->async_wait([this, timer, session, run_id, agent_id](boost::system::error_code ec) {
      if (ec || shutting_down) return;
      auto it = agents.find(agent_id);
      if (it == agents.end() || !it->second->run || it->second->run->record.id != run_id || !it->second->run->waiting) return;
      if (sessions.stats().dram_capacity == 0) return;
      if (!claims.try_claim(session, "hibernating")) return;
      try {
        auto op = sessions.hibernate(session, memory::Tier::dram);
        asio::post(blocking, [this, op, session] {
          op->wait();
          claims.release(session);
        });
      } catch (const std::exception&) {
        claims.release(session);  // pinned, busy, no room: it stays where it is
      }
    });
  }

  static int l_session_length(lua_State* L) {
    Agent& a = agent_of(L);
    return lua_guarded(L, [&] {
      lua_pushinteger(L, a.impl->sessions.info(a.record.session).tokens);
      return 1;
    });
  }

  // ctx.session:append(role, content) or ctx.session:append{role=..., content=...}
  static int l_session_append(lua_State* L) {
    Agent& a = handler_agent_of(L);
    std::vector<engine::ChatMessage> messages;
    if (lua_istable(L, 2)) {
      messages.push_back({opt_string(L, 2, "role", "user"), opt_string(L, 2, "content", "")});
    } else {
      messages.push_back({luaL_checkstring(L, 2), luaL_checkstring(L, 3)});
    }
    return lua_guarded(L, [&] {
      Impl& impl = *a.impl;
      const int32_t seq = a.run->next_seq++;
      const JournalEntry* e = replayed(a, seq, "append");
      if (e && e->result_json) return 0;
      const memory::SessionId id = a.record.session;
      // Room is made (compaction, itself durable) before the intent is journaled, so that the
      // intent's length is one the history has: a crash between the two replays the append on
      // the compacted history. (Journaled first, a replay asked to keep more tokens than the
      // compacted history held, and the run failed.) `first` keeps the tokenization the same.
      std::vector<int32_t> tokens;
      if (e) {
        const json::object intent = json::parse(e->intent_json).as_object();
        const int32_t length = static_cast<int32_t>(intent.at("length").to_number<int64_t>());
        impl.sessions.truncate(id, length);
        const json::value* first = intent.if_contains("first");
        tokens = impl.chat.tokens(messages, first != nullptr ? first->as_bool() : length == 0, false);
      } else {
        const int32_t current = impl.sessions.info(id).tokens;
        tokens = impl.chat.tokens(messages, current == 0, false);
        if (current + static_cast<int64_t>(tokens.size()) > impl.config.max_context) {
          impl.compact(a, static_cast<int32_t>(tokens.size()));
        }
        impl.store.journal_intent(a.run->record.id, seq, "append",
                                  json::serialize(json::object{{"length", impl.sessions.info(id).tokens},
                                                               {"first", current == 0}}));
      }
      impl.sessions.append(id, tokens);
      impl.sessions.save_history(id);
      impl.store.journal_result(a.run->record.id, seq, json::serialize(json::object{{"length", impl.sessions.info(id).tokens}}));
      return 0;
    });
  }

  // ctx.session:generate{max_tokens, temperature, top_k, top_p, stop, raw, stream} -> text, info
  static int l_session_generate(lua_State* L) {
    Agent& a = handler_agent_of(L);
    GenerationOptions options;
    options.max_new_tokens = 256;
    options.sampling.temperature = 0.7f;
    options.sampling.seed = static_cast<uint64_t>(-1);
    bool raw = false, stream = true;
    if (lua_istable(L, 2)) {
      options.max_new_tokens = static_cast<int32_t>(opt_number(L, 2, "max_tokens", options.max_new_tokens));
      options.sampling.temperature = static_cast<float>(opt_number(L, 2, "temperature", options.sampling.temperature));
      options.sampling.top_k = static_cast<int32_t>(opt_number(L, 2, "top_k", options.sampling.top_k));
      options.sampling.top_p = static_cast<float>(opt_number(L, 2, "top_p", options.sampling.top_p));
      lua_getfield(L, 2, "seed");
      if (lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 0) options.sampling.seed = static_cast<uint64_t>(lua_tointeger(L, -1));
      lua_pop(L, 1);
      raw = opt_bool(L, 2, "raw", false);
      stream = opt_bool(L, 2, "stream", true);
      lua_getfield(L, 2, "stop");
      if (lua_istable(L, -1)) {
        for (lua_Integer i = 1; lua_rawgeti(L, -1, i) == LUA_TSTRING; ++i) {
          options.stop.emplace_back(lua_tostring(L, -1));
          lua_pop(L, 1);
        }
        lua_pop(L, 1);
      }
      lua_pop(L, 1);
    }
    return lua_guarded(L, [&]() -> int {
      Impl& impl = *a.impl;
      options.sampling.validate();
      if (options.max_new_tokens < 1) throw std::invalid_argument("generate: max_tokens must be at least 1");
      const int32_t seq = a.run->next_seq++;
      // Without a seed, one derived from the run and the effect: a replay draws the same tokens.
      if (options.sampling.seed == static_cast<uint64_t>(-1)) {
        options.sampling.seed = static_cast<uint64_t>(a.run->record.id) * 1000003u + static_cast<uint64_t>(seq);
      }
      const JournalEntry* e = replayed(a, seq, "generate");
      if (e && e->result_json) return push_generation(L, json::parse(*e->result_json));
      const memory::SessionId id = a.record.session;
      if (a.record.token_budget > 0 && a.record.tokens_used >= a.record.token_budget) {
        throw std::runtime_error("token budget exhausted (" + std::to_string(a.record.tokens_used) + " of " +
                                 std::to_string(a.record.token_budget) + " tokens used)");
      }
      if (e) impl.sessions.truncate(id, static_cast<int32_t>(json::parse(e->intent_json).at("length").to_number<int64_t>()));
      const std::vector<int32_t>& prompt = raw ? std::vector<int32_t>{} : impl.chat.assistant_prompt();
      const int32_t needed = static_cast<int32_t>(prompt.size()) + options.max_new_tokens + 1;
      if (impl.sessions.info(id).tokens + needed > impl.config.max_context) impl.compact(a, needed);
      const int32_t before = impl.sessions.info(id).tokens;
      if (!e) impl.store.journal_intent(a.run->record.id, seq, "generate", json::serialize(json::object{{"length", before}}));
      impl.sessions.append(id, prompt);
      options.max_new_tokens = std::min(options.max_new_tokens, impl.config.max_context - impl.sessions.info(id).tokens);
      impl.start_generation(a, seq, std::move(options), raw ? std::vector<int32_t>{} : impl.chat.assistant_closing(), stream, before);
      return yield_for_effect(L, a, "generate");
    });
  }

  static int push_generation(lua_State* L, const json::value& recorded) {
    const json::object& o = recorded.as_object();
    lua_pushstring(L, std::string(o.at("text").as_string()).c_str());
    lua::push_json(L, recorded);
    return 2;
  }

  void start_generation(Agent& a, int32_t seq, GenerationOptions options, std::vector<int32_t> closing, bool stream,
                        int32_t length_before) {
    const int64_t agent_id = a.record.id, run_id = a.run->record.id;
    const memory::SessionId session = a.record.session;
    if (!claims.try_claim(session, "generating")) {
      // A client holds the session (a generate or checkpoint of its own): try again shortly.
      auto timer = std::make_shared<asio::steady_timer>(io, std::chrono::milliseconds(20));
      timer->async_wait([this, timer, agent_id, run_id, seq, options, closing, stream, length_before](boost::system::error_code) {
        auto it = agents.find(agent_id);
        if (it == agents.end() || !it->second->run || it->second->run->record.id != run_id || shutting_down) return;
        start_generation(*it->second, seq, options, closing, stream, length_before);
      });
      return;
    }
    GenerateJob job;
    job.session = session;
    job.options = std::move(options);
    job.max_context = config.max_context;
    job.closing_tokens = std::move(closing);
    job.priority = a.record.priority;
    const std::string agent_name = a.record.name;
    if (stream) {
      job.on_text = [this, agent_id, agent_name](std::string_view text) {
        emit(agent_id, {{"kind", "text"}, {"agent", agent_name}, {"text", text}});
      };
    }
    job.on_done = [this, agent_id, run_id, seq, session, length_before](GenerateOutcome outcome) {
      claims.release(session);
      if (outcome.reason == FinishReason::cancelled && shutting_down_flag.load()) return;  // re-run after the restart
      // Durable before it is journaled: the history, then (so a restart recomputes nothing) the KV.
      asio::post(blocking, [this, agent_id, run_id, seq, session, length_before, outcome = std::move(outcome)] {
        json::value recorded;
        try {
          sessions.save_history(session);
          if (outcome.reason != FinishReason::failed) sessions.checkpoint(session)->wait();
          const int64_t used = sessions.info(session).tokens - length_before;
          recorded = json::object{{"text", outcome.text},
                                  {"finish_reason", std::string(finish_reason_name(outcome.reason))},
                                  {"tokens", static_cast<int64_t>(outcome.tokens.size())},
                                  {"tokens_used", used}};
          if (outcome.reason == FinishReason::failed) recorded.as_object()["error"] = outcome.error;
          if (shutting_down_flag.load()) return;
          store.journal_result(run_id, seq, json::serialize(recorded));
          store.add_tokens_used(agent_id, used);
        } catch (const std::exception& e) {
          // The handler hears of it (nil, error) rather than waiting forever for a result; the
          // journal holds no result, so a restart runs the generation again.
          log_error("generation result not recorded", {{"error", e.what()}});
          const std::string error = std::string("generation result not recorded: ") + e.what();
          resume_run(agent_id, run_id, [error](lua_State* co) {
            lua_pushnil(co);
            lua_pushstring(co, error.c_str());
            return 2;
          });
          return;
        }
        asio::post(io, [this, agent_id, recorded] {
          auto it = agents.find(agent_id);
          if (it != agents.end()) it->second->record.tokens_used += recorded.at("tokens_used").to_number<int64_t>();
        });
        resume_run(agent_id, run_id, [recorded](lua_State* co) { return push_generation(co, recorded); });
      });
    };
    a.run->generation = scheduler.submit(std::move(job));
  }

  std::atomic<bool> shutting_down_flag{false};  // readable off the agent thread

  // The context is nearly full: keep the first turn (the system prompt) and the most recent
  // turns, cut at turn boundaries, so that `room` more tokens fit. The kept prefix keeps its
  // KV; the recent turns are recomputed at their new positions.
  void compact(Agent& a, int32_t room) {
    const memory::SessionId id = a.record.session;
    const std::vector<int32_t> tokens = sessions.tokens(id);
    const std::vector<int32_t>& end_of_turn = chat.assistant_closing();
    std::vector<size_t> boundaries;  // positions right after a turn's end
    if (!end_of_turn.empty()) {
      for (size_t i = 0; i + end_of_turn.size() <= tokens.size(); ++i) {
        if (std::equal(end_of_turn.begin(), end_of_turn.end(), tokens.begin() + static_cast<ptrdiff_t>(i))) {
          boundaries.push_back(i + end_of_turn.size());
        }
      }
    }
    // The first turn (the system prompt) stays, unless it is itself most of the context.
    size_t keep_front = boundaries.empty() ? 0 : boundaries.front();
    if (keep_front > static_cast<size_t>(config.max_context / 2)) keep_front = 0;
    const auto budget = static_cast<size_t>(std::max<int64_t>(0, config.max_context / 2 - room));
    size_t cut = tokens.size() > budget ? tokens.size() - budget : keep_front;
    // Start the kept tail at a turn boundary; keep at least the last whole turn.
    auto next = std::lower_bound(boundaries.begin(), boundaries.end(), cut);
    cut = next != boundaries.end() ? *next : tokens.size();
    if (cut >= tokens.size()) {
      auto last_start = std::lower_bound(boundaries.begin(), boundaries.end(), tokens.size());
      if (last_start != boundaries.begin()) cut = *std::prev(last_start);
    }
    cut = std::max(cut, keep_front);
    std::vector<int32_t> tail(tokens.begin() + static_cast<ptrdiff_t>(cut), tokens.end());
    sessions.truncate(id, static_cast<int32_t>(keep_front));
    sessions.append(id, tail);
    sessions.save_history(id);
    memory::failpoint("agents.after_compact");
    agent_log(a, "info", "context nearly full: kept the first turn (" + std::to_string(keep_front) +
                             " tokens) and the last " + std::to_string(tail.size()) + " of " +
                             std::to_string(tokens.size()) + " tokens");
  }

  // ctx.session:compact([keep_tokens]): the default context policy, now: the first turn and
  // the most recent turns that fit in keep_tokens (default half the context).
  static int l_session_compact(lua_State* L) {
    Agent& a = handler_agent_of(L);
    const lua_Integer keep = luaL_optinteger(L, 2, a.impl->config.max_context / 2);
    return lua_guarded(L, [&] {
      a.impl->compact(a, static_cast<int32_t>(std::max<lua_Integer>(0, a.impl->config.max_context / 2 - keep)));
      lua_pushinteger(L, a.impl->sessions.info(a.record.session).tokens);
      return 1;
    });
  }

  static int l_session_fork(lua_State* L) {
    Agent& a = handler_agent_of(L);
    const std::string name = luaL_optstring(L, 2, "");
    return lua_guarded(L, [&] {
      Impl& impl = *a.impl;
      const int32_t seq = a.run->next_seq++;
      if (const JournalEntry* e = replayed(a, seq, "fork"); e && e->result_json) {
        lua_pushstring(L, std::string(json::parse(*e->result_json).as_string()).c_str());
        return 1;
      }
      if (!replayed(a, seq, "fork")) impl.store.journal_intent(a.run->record.id, seq, "fork", "{}");
      const memory::SessionId id = impl.sessions.fork(a.record.session, name);
      impl.sessions.save_history(id);
      const std::string ref = "s-" + std::to_string(id);
      impl.store.journal_result(a.run->record.id, seq, json::serialize(json::value(ref)));
      lua_pushstring(L, ref.c_str());
      return 1;
    });
  }

  static int l_session_pin(lua_State* L) {
    Agent& a = agent_of(L);
    return lua_guarded(L, [&] {
      a.impl->sessions.pin(a.record.session);
      return 0;
    });
  }

  static int l_session_unpin(lua_State* L) {
    Agent& a = agent_of(L);
    return lua_guarded(L, [&] {
      a.impl->sessions.unpin(a.record.session);
      return 0;
    });
  }

  static int l_session_checkpoint(lua_State* L) {
    Agent& a = handler_agent_of(L);
    return lua_guarded(L, [&]() -> int {
      Impl& impl = *a.impl;
      const int64_t agent_id = a.record.id, run_id = a.run->record.id;
      const memory::SessionId session = a.record.session;
      // Idempotent: a replay checkpoints again (a current checkpoint costs nothing).
      asio::post(impl.blocking, [&impl, agent_id, run_id, session] {
        std::string error;
        try {
          impl.sessions.checkpoint(session)->wait_or_throw();
        } catch (const std::exception& e) {
          error = e.what();
        }
        impl.resume_run(agent_id, run_id, [error](lua_State* co) {
          if (error.empty()) {
            lua_pushboolean(co, 1);
            return 1;
          }
          lua_pushnil(co);
          lua_pushstring(co, error.c_str());
          return 2;
        });
      });
      return yield_for_effect(L, a, "checkpoint");
    });
  }

  // ctx:send(agent_name, msg)
  static int l_send(lua_State* L) {
    Agent& a = handler_agent_of(L);
    const std::string to = luaL_checkstring(L, 2);
    luaL_checkany(L, 3);
    return lua_guarded(L, [&] {
      const json::value body = lua::to_json(L, 3, "message");
      Impl& impl = *a.impl;
      const int32_t seq = a.run->next_seq++;
      const Agent& target = impl.agent_by_name(to);
      const int64_t id = impl.store.journaled_send(a.run->record.id, seq, target.record.id, "agent:" + a.record.name,
                                                   json::serialize(body));
      const int64_t target_id = target.record.id;
      asio::post(impl.io, [&impl, target_id] { impl.pump_agent(target_id); });
      lua_pushinteger(L, id);
      return 1;
    });
  }

  // ctx:reply(msg, text)
  static int l_reply(lua_State* L) {
    Agent& a = handler_agent_of(L);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_getfield(L, 2, "id");
    const lua_Integer message_id = luaL_checkinteger(L, -1);
    lua_pop(L, 1);
    const std::string text = luaL_checkstring(L, 3);
    return lua_guarded(L, [&] {
      Impl& impl = *a.impl;
      const int32_t seq = a.run->next_seq++;
      const bool again = replayed(a, seq, "reply") != nullptr;
      const int64_t id = impl.store.journaled_reply(a.run->record.id, seq, message_id, a.record.id, text);
      if (!again) {
        impl.emit(a.record.id, {{"kind", "reply"}, {"agent", a.record.name}, {"message", message_id}, {"text", text}, {"reply", id}});
      }
      return 0;
    });
  }

  // ctx:sleep(seconds): durable; a restart resumes the wait where it was.
  static int l_sleep(lua_State* L) {
    Agent& a = handler_agent_of(L);
    const double seconds = luaL_checknumber(L, 2);
    return lua_guarded(L, [&]() -> int {
      Impl& impl = *a.impl;
      if (!(seconds >= 0) || seconds > 366.0 * 86400) throw std::invalid_argument("sleep: seconds must be in [0, 1 year]");
      const int32_t seq = a.run->next_seq++;
      const JournalEntry* e = replayed(a, seq, "sleep");
      if (e && e->result_json) return 0;
      double wake_at = unix_now() + seconds;
      if (e) {
        wake_at = json::parse(e->intent_json).at("wake_at").to_number<double>();
      } else {
        impl.store.journal_intent(a.run->record.id, seq, "sleep", json::serialize(json::object{{"wake_at", wake_at}}));
      }
      const int64_t agent_id = a.record.id, run_id = a.run->record.id;
      const double wait = std::max(0.0, wake_at - unix_now());
      auto timer = std::make_shared<asio::steady_timer>(impl.io, std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                                                      std::chrono::duration<double>(wait)));
      timer->async_wait([&impl, timer, agent_id, run_id, seq](boost::system::error_code ec) {
        if (ec || impl.shutting_down) return;
        try {
          impl.store.journal_result(run_id, seq, "{}");
        } catch (const std::exception&) {
          return;  // the run was removed
        }
        impl.resume_run(agent_id, run_id, [](lua_State*) { return 0; });
      });
      if (wait >= 5) impl.demote_while_waiting(a.record.session, std::chrono::milliseconds(100), run_id, agent_id);
      if (wait >= 2) impl.prefetch_at(a.record.session, wait - 1.0);
      return yield_for_effect(L, a, "sleep");
    });
  }

  void prefetch_at(memory::SessionId session, double seconds) {
    auto timer = std::make_shared<asio::steady_timer>(
        io, std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(seconds)));
    timer->async_wait([this, timer, session](boost::system::error_code ec) {
      if (ec || shutting_down) return;
      try {
        sessions.prefetch(session);
      } catch (const std::exception&) {
      }
    });
  }

  // ctx:schedule(seconds | {at = unix_time}, payload) -> timer id
  static int l_schedule(lua_State* L) {
    Agent& a = handler_agent_of(L);
    double due = 0;
    if (lua_istable(L, 2)) {
      due = opt_number(L, 2, "at", 0);
    } else {
      due = unix_now() + luaL_checknumber(L, 2);
    }
    return lua_guarded(L, [&] {
      const json::value payload = lua_isnoneornil(L, 3) ? json::value(nullptr) : lua::to_json(L, 3, "payload");
      Impl& impl = *a.impl;
      const int32_t seq = a.run->next_seq++;
      const int64_t id = impl.store.journaled_timer(a.run->record.id, seq, a.record.id, due, json::serialize(payload));
      asio::post(impl.io, [&impl] { impl.arm_timers(); });
      lua_pushinteger(L, id);
      return 1;
    });
  }

  // ctx.log(...) or ctx:log(...): one line in the agent's log.
  static int l_log(lua_State* L) {
    Agent& a = agent_of(L);
    const int n = lua_gettop(L);
    std::string line;
    for (int i = 1; i <= n; ++i) {
      if (i == 1 && lua_istable(L, 1)) continue;  // called as ctx:log(...)
      if (!line.empty()) line += ' ';
      line += luaL_tolstring(L, i, nullptr);
      lua_pop(L, 1);
    }
    return lua_guarded(L, [&] {
      // A replay (effects still coming from the journal) already logged this before the restart.
      const bool replaying = a.run && !a.run->journal.empty() && a.run->next_seq <= a.run->journal.rbegin()->first;
      if (!replaying) a.impl->agent_log(a, "info", line);
      return 0;
    });
  }

  // --- runs -----------------------------------------------------------------------------------

  // Sets the run up (its journal, the handler, ctx and its arguments) and steps it. A run that
  // cannot be set up fails like a handler that raised: recorded, answered, and the agent goes on
  // to its next trigger (otherwise it would hold a run that never steps, and stop for good).
  void start_run(Agent& a, RunRecord record) {
    auto run = std::make_unique<Run>();
    run->record = std::move(record);
    a.run = std::move(run);
    lua_State* L = a.sandbox->state();
    const int top = lua_gettop(L);
    // The handler's arguments pushed on its coroutine: their count, or none without a handler.
    auto set_up = [&]() -> std::optional<int> {
      for (JournalEntry& e : store.journal(a.run->record.id)) a.run->journal[e.seq] = std::move(e);
      memory::failpoint("agents.start_run");
      if (!a.sandbox->push_handler(handler_for(a.run->record.trigger))) return std::nullopt;
      a.run->co = a.sandbox->new_coroutine();
      lua_State* co = a.run->co->thread();
      lua_xmove(L, co, 1);  // the handler
      json::value state = json::parse(a.record.state_json);
      push_ctx(co, a, state);
      lua_pushvalue(co, -1);
      a.run->ctx_ref = luaL_ref(co, LUA_REGISTRYINDEX);
      int nargs = 1;
      if (a.run->record.trigger == "message") {
        const std::optional<MessageRecord> m = store.message(a.run->record.message_id);
        json::object msg{{"id", a.run->record.message_id}, {"from", m ? m->sender : ""}};
        const json::value body = m ? json::parse(m->body_json) : json::value(nullptr);
        msg["body"] = body;
        if (body.is_string()) {
          msg["text"] = body;
        } else if (body.is_object() && body.as_object().contains("text")) {
          msg["text"] = body.at("text");
        }
        lua::push_json(co, msg);
        ++nargs;
      } else if (a.run->record.trigger == "timer") {
        json::value payload = nullptr;
        for (const TimerRecord& t : store.timers(a.record.id)) {
          if (t.id == a.run->record.timer_id) payload = json::parse(t.payload_json);
        }
        lua::push_json(co, payload);
        ++nargs;
      }
      return nargs;
    };
    std::optional<int> nargs;
    try {
      nargs = set_up();
    } catch (const std::exception& e) {
      lua_settop(L, top);
      finish_run(a, false, std::string("the run could not start: ") + e.what());
      return;
    }
    if (!nargs) {
      finish_run(a, true, "");  // nothing to do for this trigger
      return;
    }
    step_run(a, *nargs);
  }

  void step_run(Agent& a, int nargs) {
    const lua::Sandbox::Coroutine::Outcome outcome = a.run->co->resume(nargs);
    if (outcome.status == lua::Sandbox::Coroutine::Status::yielded) {
      lua_pop(a.run->co->thread(), outcome.values);
      if (!a.run->waiting) {
        // A bare coroutine.yield from the handler: nothing to wait for, go on.
        asio::post(io, [this, id = a.record.id, run_id = a.run->record.id] {
          auto it = agents.find(id);
          if (it != agents.end() && it->second->run && it->second->run->record.id == run_id) step_run(*it->second, 0);
        });
      }
      return;
    }
    if (outcome.status == lua::Sandbox::Coroutine::Status::failed) {
      finish_run(a, false, outcome.error);
      return;
    }
    finish_run(a, true, "");
  }

  void finish_run(Agent& a, bool ok, std::string error) {
    std::string state_json = a.record.state_json;
    if (ok && a.run->ctx_ref != LUA_NOREF) {
      lua_State* L = a.sandbox->state();
      lua_rawgeti(L, LUA_REGISTRYINDEX, a.run->ctx_ref);
      lua_getfield(L, -1, "state");
      try {
        memory::failpoint("agents.serialize_state");
        state_json = json::serialize(lua::to_json(L, -1, "ctx.state"));
      } catch (const std::exception& e) {
        ok = false;
        error = e.what();
      }
      lua_pop(L, 2);
    }
    a.ending = Agent::Ending{a.run->record, ok, std::move(state_json), std::move(error)};
    if (a.run->ctx_ref != LUA_NOREF) luaL_unref(a.sandbox->state(), LUA_REGISTRYINDEX, a.run->ctx_ref);
    a.run.reset();
    end_run(a);
  }

  // Commits the end of the agent's finished run; once the store has it, tells listeners and
  // waiters, checkpoints, and lets the agent go on. A store that fails is tried again in place
  // (the message would otherwise wait for a restart to replay the run).
  void end_run(Agent& a) {
    Agent::Ending& e = *a.ending;
    try {
      memory::failpoint("agents.end_run");
      if (e.ok) {
        store.complete_run(e.record.id, e.state_json);
        a.record.state_json = e.state_json;
        ++runs_completed;
      } else {
        // The log line first: a client that sees the run failed (a send with wait, answered the
        // moment the status flips) reads the log next and must find why.
        if (!e.logged) agent_log(a, "error", handler_for(e.record.trigger) + " failed: " + e.error);
        e.logged = true;
        store.fail_run(e.record.id, e.error);
        ++runs_failed;
        // The operator's log too: a failed run leaves its trigger handled but its effect undone.
        log_warn("agent run failed", {{"agent", a.record.name}, {"run", std::to_string(e.record.id)},
                                      {"trigger", e.record.trigger}, {"error", e.error}});
      }
    } catch (const std::exception& ex) {
      a.end_retry_seconds = std::clamp(a.end_retry_seconds * 2, 1.0, 30.0);
      log_error("agent run not committed", {{"agent", a.record.name},
                                             {"run", std::to_string(e.record.id)},
                                             {"error", ex.what()},
                                             {"retry_in_s", std::to_string(a.end_retry_seconds)}});
      const int64_t id = a.record.id;
      auto timer = std::make_shared<asio::steady_timer>(
          io, std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                  std::chrono::duration<double>(a.end_retry_seconds)));
      timer->async_wait([this, timer, id](boost::system::error_code ec) {
        if (ec || shutting_down) return;
        auto it = agents.find(id);
        if (it != agents.end() && it->second->ending) end_run(*it->second);
      });
      return;
    }
    a.end_retry_seconds = 0;
    const Agent::Ending done = std::move(e);
    a.ending.reset();
    if (a.sandbox->killed()) {
      // A limit killed the state: the agent goes on in a fresh one.
      try {
        a.sandbox = make_sandbox(a);
      } catch (const std::exception& ex) {
        store.set_agent_status(a.record.id, "failed", ex.what());
        a.record.status = "failed";
      }
    }
    emit(a.record.id, {{"kind", "run"},
                       {"agent", a.record.name},
                       {"run", done.record.id},
                       {"trigger", done.record.trigger},
                       {"status", done.ok ? "completed" : "failed"},
                       {"error", done.error}});
    if (done.record.trigger == "message") notify_handled(done.record.message_id);
    // Between runs the KV of the conversation is written down (its tokens are durable already).
    if (done.ok) {
      try {
        sessions.checkpoint(a.record.session);
      } catch (const std::exception&) {
      }
    }
    const int64_t id = a.record.id;
    asio::post(io, [this, id] { pump_agent(id); });
  }

  void notify_handled(int64_t message_id) {
    std::vector<std::function<void(MessageState)>> waiters;
    {
      std::lock_guard lock(listeners_mutex);
      auto it = handled_waiters.find(message_id);
      if (it == handled_waiters.end()) return;
      waiters = std::move(it->second.callbacks);
      handled_waiters.erase(it);
    }
    const MessageState state = message_state_of(message_id);
    for (auto& w : waiters) w(state);
  }

  // Answers the waiters whose message will not be handled now (its agent was stopped or
  // deleted, or the daemon stops): `status` says why. `agent` 0: every agent.
  void release_waiters(int64_t agent, int64_t except_message, const std::string& status) {
    std::vector<std::pair<int64_t, std::function<void(MessageState)>>> released;
    {
      std::lock_guard lock(listeners_mutex);
      for (auto it = handled_waiters.begin(); it != handled_waiters.end();) {
        if ((agent == 0 || it->second.agent == agent) && it->first != except_message) {
          for (auto& cb : it->second.callbacks) released.emplace_back(it->first, std::move(cb));
          it = handled_waiters.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (auto& [message, cb] : released) {
      MessageState state;
      state.status = status;
      try {
        for (const ReplyRecord& r : store.replies_to(message)) state.replies.push_back(r.text);
      } catch (const std::exception&) {
      }
      cb(state);
    }
  }

  MessageState message_state_of(int64_t message_id) const {
    MessageState s;
    const std::optional<MessageRecord> m = store.message(message_id);
    if (!m) throw AgentError(AgentError::Kind::not_found, "no message " + std::to_string(message_id));
    s.status = m->status;
    s.handled = m->status != "queued";
    for (const ReplyRecord& r : store.replies_to(message_id)) s.replies.push_back(r.text);
    return s;
  }

  // Starts the agent's next run if it is idle: an interrupted one, a due timer, a message.
  void pump_agent(int64_t id) {
    if (shutting_down) return;
    auto it = agents.find(id);
    if (it == agents.end()) return;
    Agent& a = *it->second;
    if (a.run || a.ending || a.record.status != "active" || !a.sandbox) return;
    try {
      if (!a.interrupted.empty()) {
        RunRecord r = a.interrupted.front();
        a.interrupted.pop_front();
        log_info("agent run resumes after a restart", {{"agent", a.record.name}, {"run", std::to_string(r.id)},
                                                         {"trigger", r.trigger}});
        start_run(a, std::move(r));
        return;
      }
      for (const TimerRecord& t : store.due_timers(unix_now())) {
        if (t.agent != id) continue;
        const int64_t run = begin_run(a, "timer", 0, t.id);
        start_run(a, *store.run(run));
        return;
      }
      if (std::optional<MessageRecord> m = store.next_queued_message(id)) {
        const int64_t run = begin_run(a, "message", m->id, 0);
        start_run(a, *store.run(run));
        return;
      }
      // Idle: when the conversation nears the context, on_context_full (or the default policy).
      const int32_t length = sessions.info(a.record.session).tokens;
      // Once per length: a policy that could not shrink it is not tried again and again.
      if (length > config.max_context * 3 / 4 && length != a.context_checked_length) {
        // The agent's own policy first; if the context is still that full after it, the default.
        if (!a.context_full_handled && a.sandbox->push_handler("on_context_full")) {
          lua_pop(a.sandbox->state(), 1);
          a.context_full_handled = true;
          const int64_t run = begin_run(a, "context_full", 0, 0);
          start_run(a, *store.run(run));
        } else {
          a.context_full_handled = false;
          compact(a, 0);
          a.context_checked_length = sessions.info(a.record.session).tokens;
        }
      } else {
        a.context_full_handled = false;
      }
    } catch (const std::exception& e) {
      // Nothing else may wake this agent (its messages are already queued): try again, waiting
      // 1 s, then twice as long each time up to 30 s, so a store that keeps failing is not
      // hammered.
      a.pump_retry_seconds = std::clamp(a.pump_retry_seconds * 2, 1.0, 30.0);
      log_error("agent could not start a run", {{"agent", a.record.name},
                                               {"error", e.what()},
                                               {"retry_in_s", std::to_string(a.pump_retry_seconds)}});
      auto timer = std::make_shared<asio::steady_timer>(
          io, std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                  std::chrono::duration<double>(a.pump_retry_seconds)));
      timer->async_wait([this, timer, id](boost::system::error_code ec) {
        if (!ec) pump_agent(id);
      });
    }
  }

  // The store's row of a run about to start (a failpoint first, for tests of a store that fails).
  int64_t begin_run(Agent& a, const std::string& trigger, int64_t message, int64_t timer) {
    memory::failpoint("agents.begin_run");
    const int64_t run = store.begin_run(a.record.id, trigger, message, timer);
    a.pump_retry_seconds = 0;
    return run;
  }

  void pump_all() {
    std::vector<int64_t> ids;
    for (auto& [id, a] : agents) ids.push_back(id);
    for (int64_t id : ids) pump_agent(id);
  }

  // Wakes the agent thread when the next timer falls due (the prefetch a second earlier is
  // armed where the timer is set: prefetch_at).
  static constexpr double kDueTimerRecheckSeconds = 0.05;
  void arm_timers() {
    if (shutting_down) return;
    const std::optional<double> next = store.next_timer_due();
    if (!next) return;
    // A timer already due waits for its agent's current run, whose end pumps the agent again:
    // look again shortly instead of at once (a zero wait re-fired at once, a busy loop on the
    // agent thread and the store for as long as the run went on).
    double wait = *next - unix_now();
    if (wait <= 0.0) wait = kDueTimerRecheckSeconds;
    timer_wakeup.expires_after(std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(wait)));
    timer_wakeup.async_wait([this](boost::system::error_code ec) {
      if (ec) return;
      pump_all();
      arm_timers();
    });
  }

  json::object agent_object(const Agent& a) const {
    json::object o{{"name", a.record.name},
                   {"id", "a-" + std::to_string(a.record.id)},
                   {"status", a.record.status},
                   {"session", "s-" + std::to_string(a.record.session)},
                   {"priority", a.record.priority},
                   {"token_budget", a.record.token_budget},
                   {"tokens_used", a.record.tokens_used},
                   {"script", a.record.script_path},
                   {"queued_messages", store.queued_messages(a.record.id)},
                   {"created_at", a.record.created_at}};
    if (!a.record.error.empty()) o["error"] = a.record.error;
    if (a.run) {
      o["run"] = json::object{{"id", a.run->record.id},
                              {"trigger", a.run->record.trigger},
                              {"status", a.run->record.status},
                              {"waiting", a.run->waiting},
                              {"waiting_on", a.run->waiting ? json::value(a.run->waiting_on) : json::value(nullptr)},
                              {"waiting_seconds", a.run->waiting ? unix_now() - a.run->waiting_since : 0.0},
                              {"started_at", a.run->record.started_at}};
    } else if (a.ending) {
      // The handler is done; the store has not taken its end yet (tried again until it does).
      o["run"] = json::object{{"id", a.ending->record.id},
                              {"trigger", a.ending->record.trigger},
                              {"status", "committing"},
                              {"waiting", false},
                              {"waiting_on", nullptr},
                              {"waiting_seconds", 0.0},
                              {"started_at", a.ending->record.started_at}};
    } else {
      o["run"] = nullptr;
    }
    return o;
  }
};

AgentRuntime::AgentRuntime(AgentRuntimeConfig config, const engine::Model& model, memory::SessionManager& sessions,
                           Scheduler& scheduler, const ChatTurns& chat, SessionClaims& claims, ToolRegistry* tools)
    : impl_(std::make_unique<Impl>(std::move(config), model, sessions, scheduler, chat, claims, tools)) {}

AgentRuntime::~AgentRuntime() { shutdown(); }

void AgentRuntime::start() {
  Impl& impl = *impl_;
  // Runs a previous daemon left running were cut off: they run again (their journals replay).
  const std::vector<RunRecord> cut_off = impl.store.interrupt_running();
  for (const AgentRecord& record : impl.store.agents()) {
    auto a = std::make_unique<Impl::Agent>();
    a->impl = &impl;
    a->record = record;
    if (record.status != "failed") {
      try {
        a->sandbox = impl.make_sandbox(*a);
      } catch (const std::exception& e) {
        impl.store.set_agent_status(record.id, "failed", e.what());
        a->record.status = "failed";
        a->record.error = e.what();
      }
    }
    impl.agents[record.id] = std::move(a);
  }
  for (const RunRecord& r : impl.store.interrupted_runs()) {
    auto it = impl.agents.find(r.agent);
    if (it != impl.agents.end()) it->second->interrupted.push_back(r);
  }
  if (!cut_off.empty()) log_info("agent runs cut off by the last stop will run again", {{"runs", std::to_string(cut_off.size())}});
  impl.thread = std::thread([&impl] {
    for (;;) {
      try {
        impl.io.run();
        return;
      } catch (const std::exception& e) {
        log_error("agent thread", {{"error", e.what()}});
      }
    }
  });
  asio::post(impl.io, [&impl] {
    impl.pump_all();
    impl.arm_timers();
  });
}

boost::json::object AgentRuntime::spawn(const SpawnRequest& request) {
  Impl& impl = *impl_;
  if (!valid_name(request.name)) {
    throw AgentError(AgentError::Kind::invalid, "invalid agent name '" + request.name + "': use 1-64 of A-Z a-z 0-9 . _ -");
  }
  return impl.on_agent_thread([&]() -> json::object {
    if (impl.shutting_down) throw AgentError(AgentError::Kind::stopped, "the daemon is shutting down");
    if (impl.store.find_agent(request.name)) {
      throw AgentError(AgentError::Kind::exists, "an agent named '" + request.name + "' exists already");
    }
    auto a = std::make_unique<Impl::Agent>();
    a->impl = &impl;
    a->record.name = request.name;
    a->record.source = request.source;
    a->record.script_path = request.script_path;
    a->record.priority = request.priority;
    a->record.token_budget = request.token_budget;
    // The script must load before anything is created.
    try {
      a->sandbox = impl.make_sandbox(*a);
    } catch (const lua::ScriptError& e) {
      throw AgentError(AgentError::Kind::invalid, std::string("the script does not load: ") + e.what());
    }
    const std::string session_name = "agent." + request.name;
    if (auto old = impl.sessions.find(session_name)) impl.sessions.drop(*old);  // left by a deleted agent
    a->record.session = impl.sessions.create(session_name);
    impl.sessions.save_history(a->record.session);
    a->record.created_at = unix_now();
    try {
      a->record.id = impl.store.create_agent(a->record);
    } catch (...) {
      impl.sessions.drop(a->record.session);
      throw;
    }
    const int64_t run = impl.store.begin_run(a->record.id, "start", 0, 0);
    Impl::Agent& agent = *a;
    impl.agents[a->record.id] = std::move(a);
    impl.start_run(agent, *impl.store.run(run));
    return impl.agent_object(agent);
  });
}

boost::json::array AgentRuntime::list() const {
  Impl& impl = *impl_;
  return impl.on_agent_thread([&] {
    json::array out;
    for (auto& [id, a] : impl.agents) out.push_back(impl.agent_object(*a));
    return out;
  });
}

boost::json::object AgentRuntime::get(std::string_view name) const {
  Impl& impl = *impl_;
  return impl.on_agent_thread([&] {
    const Impl::Agent& a = impl.agent_by_name(name);
    json::object o = impl.agent_object(a);
    json::array runs;
    for (const RunRecord& r : impl.store.runs(a.record.id, 20)) {
      runs.push_back(json::object{{"id", r.id}, {"trigger", r.trigger}, {"status", r.status}, {"error", r.error},
                                  {"message", r.message_id}, {"started_at", r.started_at}, {"ended_at", r.ended_at}});
    }
    o["runs"] = std::move(runs);
    json::array timers;
    for (const TimerRecord& t : impl.store.timers(a.record.id)) {
      timers.push_back(json::object{{"id", t.id}, {"due_at", t.due_at}, {"payload", json::parse(t.payload_json)}});
    }
    o["timers"] = std::move(timers);
    o["state"] = json::parse(a.record.state_json);
    return o;
  });
}

int64_t AgentRuntime::send(std::string_view name, std::string_view sender, const boost::json::value& body) {
  Impl& impl = *impl_;
  const std::optional<AgentRecord> record = impl.store.find_agent(name);
  if (!record) throw AgentError(AgentError::Kind::not_found, "no agent '" + std::string(name) + "'");
  if (record->status != "active") {
    throw AgentError(AgentError::Kind::stopped, "agent '" + std::string(name) + "' is " + record->status);
  }
  const int64_t id = impl.store.enqueue_message(record->id, sender, json::serialize(body));
  asio::post(impl.io, [&impl, agent = record->id] { impl.pump_agent(agent); });
  memory::failpoint("agents.before_ack");  // stored, and handled even if the sender never hears
  return id;
}

AgentRuntime::MessageState AgentRuntime::message_state(int64_t message_id) const { return impl_->message_state_of(message_id); }

void AgentRuntime::when_handled(int64_t message_id, std::function<void(MessageState)> done) {
  Impl& impl = *impl_;
  const std::optional<MessageRecord> message = impl.store.message(message_id);
  if (!message) throw AgentError(AgentError::Kind::not_found, "no message " + std::to_string(message_id));
  {
    std::lock_guard lock(impl.listeners_mutex);
    Impl::Waiting& waiting = impl.handled_waiters[message_id];
    waiting.agent = message->agent;
    waiting.callbacks.push_back(done);
  }
  // Handled already (before the waiter was registered)? Then answer now.
  const MessageState state = impl.message_state_of(message_id);
  if (!state.handled) return;
  std::vector<std::function<void(MessageState)>> waiters;
  {
    std::lock_guard lock(impl.listeners_mutex);
    auto it = impl.handled_waiters.find(message_id);
    if (it == impl.handled_waiters.end()) return;  // the agent thread answered meanwhile
    waiters = std::move(it->second.callbacks);
    impl.handled_waiters.erase(it);
  }
  for (auto& w : waiters) w(state);
}

uint64_t AgentRuntime::subscribe(std::string_view name, AgentListener listener) {
  Impl& impl = *impl_;
  const std::optional<AgentRecord> record = impl.store.find_agent(name);
  if (!record) throw AgentError(AgentError::Kind::not_found, "no agent '" + std::string(name) + "'");
  std::lock_guard lock(impl.listeners_mutex);
  const uint64_t id = impl.next_subscription++;
  impl.listeners[record->id][id] = std::move(listener);
  impl.subscription_agent[id] = record->id;
  return id;
}

void AgentRuntime::unsubscribe(uint64_t subscription) {
  Impl& impl = *impl_;
  std::lock_guard lock(impl.listeners_mutex);
  auto it = impl.subscription_agent.find(subscription);
  if (it == impl.subscription_agent.end()) return;
  impl.listeners[it->second].erase(subscription);
  impl.subscription_agent.erase(it);
}

void AgentRuntime::stop(std::string_view name) {
  Impl& impl = *impl_;
  impl.on_agent_thread([&] {
    Impl::Agent& a = impl.agent_by_name(name);
    impl.store.set_agent_status(a.record.id, "stopped", "stopped by request");
    a.record.status = "stopped";
    // The message of a run in progress, or of one whose end is being committed, is still answered.
    const RunRecord* in_progress = a.run ? &a.run->record : a.ending ? &a.ending->record : nullptr;
    const int64_t current = in_progress != nullptr && in_progress->trigger == "message" ? in_progress->message_id : 0;
    impl.release_waiters(a.record.id, current, "stopped");
    return 0;
  });
}

void AgentRuntime::remove(std::string_view name) {
  Impl& impl = *impl_;
  impl.on_agent_thread([&] {
    Impl::Agent& a = impl.agent_by_name(name);
    if (a.run) {
      if (a.run->generation) a.run->generation->cancel();
      if (a.run->tool_call) a.run->tool_call->cancel();
    }
    const int64_t id = a.record.id;
    const memory::SessionId session = a.record.session;
    impl.release_waiters(id, 0, "deleted");
    impl.agents.erase(id);
    impl.store.delete_agent(id);
    // Its session goes too, once no generation holds it.
    asio::post(impl.blocking, [&impl, session] {
      for (int i = 0; i < 500; ++i) {
        if (impl.claims.try_claim(session, "deleting")) {
          try {
            impl.sessions.drop(session);
          } catch (const std::exception&) {
          }
          impl.claims.release(session);
          return;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    });
    return 0;
  });
}

boost::json::array AgentRuntime::logs(std::string_view name, int64_t after_id, int32_t limit) const {
  Impl& impl = *impl_;
  const std::optional<AgentRecord> record = impl.store.find_agent(name);
  if (!record) throw AgentError(AgentError::Kind::not_found, "no agent '" + std::string(name) + "'");
  json::array out;
  for (const LogRecord& l : impl.store.logs(record->id, after_id, limit)) {
    out.push_back(json::object{{"id", l.id}, {"at", l.at}, {"level", l.level}, {"text", l.text}});
  }
  return out;
}

boost::json::object AgentRuntime::stats() const {
  Impl& impl = *impl_;
  return {{"runs_completed", impl.runs_completed.load()},
          {"runs_failed", impl.runs_failed.load()},
          {"effects_replayed", impl.effects_replayed.load()}};
}

void AgentRuntime::shutdown() {
  Impl& impl = *impl_;
  if (!impl.thread.joinable()) return;
  {
    std::lock_guard lock(impl.api_mutex);
    impl.shutting_down_flag = true;
  }
  asio::post(impl.io, [&impl] {
    impl.shutting_down = true;
    impl.timer_wakeup.cancel();
    for (auto& [id, a] : impl.agents) {
      if (a->run && a->run->tool_call) a->run->tool_call->cancel();
    }
  });
  // Whoever waits for a handler hears it now: the message is handled after the restart.
  impl.release_waiters(0, 0, "interrupted");
  impl.work.reset();
  // Pending timers (sleeps) would keep io running: stop it once the shutdown task ran.
  asio::post(impl.io, [&impl] { impl.io.stop(); });
  impl.thread.join();
  impl.blocking.join();
  impl.agents.clear();
}

}  // namespace den::runtime
