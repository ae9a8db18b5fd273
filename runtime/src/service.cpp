// The daemon's methods. Every request is a Call that answers exactly once: handlers throw
// rpc::Error (or a memory::SessionError, std::invalid_argument, anything) and run_on turns that
// into a JSON-RPC error; a Call dropped without an answer answers "internal error" itself.
#include "den/runtime/service.h"

#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <random>
#include <thread>

#include "den/engine/tokenizer.h"
#include "den/memory/failpoints.h"
#include "den/runtime/log.h"
#include "den/runtime/names.h"
#include "den/runtime/metrics.h"

namespace den::runtime {
namespace json = boost::json;
using rpc::Error;

namespace {

constexpr std::string_view kProtocolVersion = "2025-06-18";
constexpr int kDenProtocol = 1;
constexpr size_t kMaxStopStrings = 16;
constexpr size_t kMaxStopBytes = 256;
constexpr int kMaxLogprobs = 20;

// "s-<digits>": the form of server-made ids, reserved.
std::optional<memory::SessionId> parse_session_id(std::string_view text) {
  if (text.size() < 3 || text.substr(0, 2) != "s-" || text.size() > 22) return std::nullopt;
  memory::SessionId id = 0;
  for (char c : text.substr(2)) {
    if (c < '0' || c > '9') return std::nullopt;
    id = id * 10 + static_cast<memory::SessionId>(c - '0');
  }
  return id;
}

std::string id_text(memory::SessionId id) { return "s-" + std::to_string(id); }

double ms(double seconds) { return std::round(seconds * 1e6) / 1e3; }

json::object quantiles_ms(const Histogram::Snapshot& h) {
  return {{"p50", ms(h.quantile(0.5))}, {"p90", ms(h.quantile(0.9))}, {"p99", ms(h.quantile(0.99))},
          {"count", h.count}};
}

std::vector<engine::ChatMessage> parse_messages(const json::array& array) {
  if (array.empty()) throw Error(rpc::invalid_params, "invalid params: 'messages' is empty");
  std::vector<engine::ChatMessage> messages;
  for (size_t i = 0; i < array.size(); ++i) {
    const std::string where = "'messages[" + std::to_string(i) + "]'";
    if (!array[i].is_object()) throw Error(rpc::invalid_params, "invalid params: " + where + " must be an object {role, content}");
    const json::object& m = array[i].as_object();
    for (const auto& kv : m) {
      if (kv.key() != "role" && kv.key() != "content") {
        throw Error(rpc::invalid_params, "invalid params: " + where + " has an unknown key '" + std::string(kv.key()) +
                                             "' (known: role, content)");
      }
    }
    const json::value* role = m.if_contains("role");
    const json::value* content = m.if_contains("content");
    if (role == nullptr || !role->is_string()) throw Error(rpc::invalid_params, "invalid params: " + where + ".role must be a string");
    if (content == nullptr || !content->is_string()) throw Error(rpc::invalid_params, "invalid params: " + where + ".content must be a string");
    const std::string r(role->as_string());
    if (r != "system" && r != "user" && r != "assistant" && r != "tool") {
      throw Error(rpc::invalid_params, "invalid params: " + where + ".role must be system, user, assistant or tool, got '" + r + "'");
    }
    messages.push_back({r, std::string(content->as_string())});
  }
  return messages;
}

}  // namespace

// A session claimed by one activity (generating, appending, moving its KV, deleting).
class Service::BusyGuard {
 public:
  BusyGuard(Service& service, memory::SessionId id) : service_(service), id_(id) {}
  ~BusyGuard() { service_.claims_.release(id_); }
  BusyGuard(const BusyGuard&) = delete;
  BusyGuard& operator=(const BusyGuard&) = delete;

 private:
  Service& service_;
  memory::SessionId id_;
};

// One request: answers exactly once, and the service counts it until it has.
struct Service::Call {
  Service* service;
  ConnectionId connection;
  rpc::Request request;
  std::shared_ptr<Replier> replier;
  std::atomic<bool> answered{false};
  std::chrono::steady_clock::time_point received = std::chrono::steady_clock::now();
  std::unique_ptr<BusyGuard> busy;  // released before the answer goes out, so the client may go on

  Call(Service* s, ConnectionId c, rpc::Request r, std::shared_ptr<Replier> rep)
      : service(s), connection(c), request(std::move(r)), replier(std::move(rep)) {}
  ~Call() {
    busy.reset();
    if (!answered.exchange(true)) {
      replier->error(Error(rpc::internal_error, "internal error: the request was dropped without an answer"));
      service->request_done(true);
    }
  }
  rpc::Params params() const { return rpc::Params(request.params); }
  bool changes_a_session() const {
    const std::string_view m = request.method;
    return m.starts_with("sessions/") && m != "sessions/list" && m != "sessions/get" && m != "sessions/cancel";
  }
  void ok(json::value result) {
    if (changes_a_session()) {
      try {
        memory::failpoint("sessions.before_ack");
      } catch (const std::exception& e) {
        return fail(Error(rpc::internal_error, e.what()));
      }
    }
    if (answered.exchange(true)) return;
    busy.reset();
    log_session_change(&result, nullptr);
    replier->result(std::move(result));
    service->request_done(false);
  }
  void fail(const Error& error) {
    if (answered.exchange(true)) return;
    busy.reset();
    log_session_change(nullptr, &error);
    replier->error(error);
    service->request_done(true);
  }
  // At debug level, one line per answer to a request that changes a session: what was asked and
  // what the client was told, so a kept log can tell a change the client saw acknowledged from
  // one it saw refused (a refusal after the change landed included: sessions.before_ack).
  void log_session_change(const json::value* result, const Error* error) const {
    if (!changes_a_session() || log_level() != LogLevel::debug) return;
    const json::object& p = request.params;
    const auto text = [](const json::value* v) {
      if (v == nullptr) return std::string("-");
      return v->is_string() ? std::string(v->as_string()) : json::serialize(*v);
    };
    // The session the answer names: a create's or fork's new one ({"id": ...}), or {"session":
    // {"id": ...}} as most other methods answer.
    const json::value* answered_session = nullptr;
    if (result != nullptr && result->is_object()) {
      const json::object& r = result->as_object();
      answered_session = r.if_contains("id");
      if (const json::value* s = r.if_contains("session"); answered_session == nullptr && s != nullptr && s->is_object()) {
        answered_session = s->as_object().if_contains("id");
      }
    }
    log_debug("session request answered",
              {{"method", request.method}, {"request", json::serialize(request.id)},
               {"session", text(p.if_contains("session"))}, {"name", text(p.if_contains("name"))},
               {"outcome", error == nullptr ? "ok" : "error " + std::to_string(error->code())},
               {"answered_session", text(answered_session)},
               {"error", error == nullptr ? std::string("-") : error->what()}});
  }
};

Service::Service(const DaemonConfig& config, const engine::Model& model, engine::Backend& backend,
                 memory::SessionManager& sessions, std::string backend_name)
    : config_(config),
      model_(model),
      sessions_(sessions),
      backend_name_(std::move(backend_name)),
      max_context_(config.context > 0 ? config.context : model.config().n_ctx_train),
      chat_turns_(model) {
  scheduler_ = std::make_unique<Scheduler>(model, backend, sessions, config.scheduler, config.kv.layerwise_wake);
  control_pool_ = std::make_unique<boost::asio::thread_pool>(2);
  operations_pool_ = std::make_unique<boost::asio::thread_pool>(4);
  const auto tool_timeout = std::chrono::milliseconds(static_cast<int64_t>(config.limits.tool_seconds * 1000));
  tools_ = std::make_unique<ToolRegistry>(config.tools, tool_timeout);  // servers may dial in later
  if (!sessions.config().state_dir.empty()) {
    AgentRuntimeConfig agents;
    agents.store_path = sessions.config().state_dir / "agents.sqlite";
    agents.max_context = max_context_;
    agents.limits.step_seconds = 0.5;  // Lua between two yields; the agent thread is shared
    agents.tool_timeout = tool_timeout;
    agents_ = std::make_unique<AgentRuntime>(agents, model, sessions, *scheduler_, chat_turns_, claims_, tools_.get());
    agents_->start();
  }
}

Service::~Service() {
  begin_shutdown();
  wait_quiet();
  control_pool_->join();
  operations_pool_->join();
  // The agents' generations still in the scheduler call back into the agent runtime.
  scheduler_->wait_idle();
  tools_.reset();
  agents_.reset();
  scheduler_.reset();
}

void Service::request_done(bool failed) {
  if (failed) ++errors_;
  std::lock_guard lock(mutex_);
  --in_flight_;
  if (in_flight_ == 0) quiet_.notify_all();
}

void Service::dispatch(ConnectionId connection, rpc::Request request, std::shared_ptr<Replier> replier) {
  ++requests_;
  {
    std::lock_guard lock(mutex_);
    ++in_flight_;
  }
  auto call = std::make_shared<Call>(this, connection, std::move(request), std::move(replier));
  struct Route {
    Handler handler;
    bool slow;  // waits for I/O: the operations pool
  };
  static const std::map<std::string, Route, std::less<>> routes = {
      {"initialize", {&Service::initialize, false}},
      {"sessions/create", {&Service::sessions_create, false}},
      {"sessions/list", {&Service::sessions_list, false}},
      {"sessions/get", {&Service::sessions_get, false}},
      {"sessions/append", {&Service::sessions_append, false}},
      {"sessions/generate", {&Service::sessions_generate, false}},
      {"sessions/cancel", {&Service::sessions_cancel, false}},
      {"sessions/pin", {&Service::sessions_pin, true}},
      {"sessions/unpin", {&Service::sessions_unpin, false}},
      {"sessions/checkpoint", {&Service::sessions_checkpoint, true}},
      {"sessions/hibernate", {&Service::sessions_hibernate, true}},
      {"sessions/wake", {&Service::sessions_wake, true}},
      {"sessions/fork", {&Service::sessions_fork, false}},
      {"sessions/delete", {&Service::sessions_delete, false}},
      {"models/list", {&Service::models_list, false}},
      {"daemon/stats", {&Service::daemon_stats, false}},
      {"daemon/shutdown", {&Service::daemon_shutdown, false}},
      {"agents/spawn", {&Service::agents_spawn, true}},
      {"agents/list", {&Service::agents_list, true}},
      {"agents/get", {&Service::agents_get, true}},
      {"agents/send", {&Service::agents_send, false}},
      {"agents/subscribe", {&Service::agents_subscribe, false}},
      {"agents/unsubscribe", {&Service::agents_unsubscribe, false}},
      {"agents/logs", {&Service::agents_logs, false}},
      {"agents/stop", {&Service::agents_stop, true}},
      {"agents/delete", {&Service::agents_delete, true}},
  };
  const auto route = routes.find(call->request.method);
  if (route == routes.end()) {
    call->fail(Error(rpc::method_not_found, "method not found: '" + call->request.method +
                                                "' (docs/PROTOCOL.md lists the methods)"));
    return;
  }
  {
    std::lock_guard lock(mutex_);
    if (shutting_down_ && call->request.method != "daemon/stats") {
      call->fail(Error(rpc::shutting_down, "the daemon is shutting down"));
      return;
    }
  }
  const std::string_view method = call->request.method;
  if (method == "daemon/stats" || method == "sessions/get" || method == "sessions/list" || method == "models/list") {
    // Answered where it arrives (the connection's io thread): they only read, under short
    // locks, and they are what operators and clients poll while everything else is busy. Two
    // thread hops fewer, and no queue shared with other clients' work.
    run_here(call, route->second.handler);
    return;
  }
  run_on(route->second.slow ? *operations_pool_ : *control_pool_, call, route->second.handler);
}

void Service::run_on(boost::asio::thread_pool& pool, const std::shared_ptr<Call>& call, Handler handler) {
  boost::asio::post(pool, [this, call, handler] { run_here(call, handler); });
}

void Service::run_here(const std::shared_ptr<Call>& call, Handler handler) {
  try {
    (this->*handler)(call);
  } catch (const Error& e) {
    call->fail(e);
  } catch (const memory::SessionError& e) {
    call->fail(Error(rpc::session_refused, e.what()));
  } catch (const AgentError& e) {
    const int code = e.kind() == AgentError::Kind::not_found ? rpc::agent_not_found
                     : e.kind() == AgentError::Kind::exists  ? rpc::agent_exists
                     : e.kind() == AgentError::Kind::invalid ? rpc::agent_invalid
                                                             : rpc::agent_stopped;
    call->fail(Error(code, e.what()));
  } catch (const std::invalid_argument& e) {
    call->fail(Error(rpc::invalid_params, std::string("invalid params: ") + e.what()));
  } catch (const std::exception& e) {
    log_error("request failed", {{"method", call->request.method}, {"error", e.what()}});
    call->fail(Error(rpc::internal_error, std::string("internal error: ") + e.what()));
  }
}

void Service::connection_closed(ConnectionId connection) {
  std::vector<uint64_t> subscriptions;
  {
    std::lock_guard lock(mutex_);
    for (auto& [key, running] : generates_) {
      if (key.first == connection) running.handle->cancel();
    }
    auto [first, last] = subscriptions_.equal_range(connection);
    for (auto it = first; it != last; ++it) subscriptions.push_back(it->second);
    subscriptions_.erase(connection);
  }
  for (uint64_t id : subscriptions) agents_->unsubscribe(id);
}

void Service::begin_shutdown() {
  {
    std::lock_guard lock(mutex_);
    if (shutting_down_) return;
    shutting_down_ = true;
  }
  // Agents first: their runs cut off now are re-run after the restart, not journaled as cancelled.
  if (agents_) agents_->shutdown();
  scheduler_->cancel_all();
}

void Service::wait_quiet() {
  std::unique_lock lock(mutex_);
  quiet_.wait(lock, [&] { return in_flight_ == 0; });
}

Service::CheckpointSummary Service::checkpoint_all(
    const std::function<void(int64_t, int64_t, int32_t, int32_t)>& progress) {
  const auto t0 = std::chrono::steady_clock::now();
  CheckpointSummary summary;
  std::vector<memory::SessionId> dirty;
  for (const memory::SessionInfo& s : sessions_.list()) {
    if (s.tokens > 0 && !s.checkpoint_current) dirty.push_back(s.id);
  }
  const auto total_sessions = static_cast<int32_t>(dirty.size());
  int64_t done_before = 0, total_estimate = 0;
  for (memory::SessionId id : dirty) {
    total_estimate += static_cast<int64_t>(sessions_.info(id).kv_tokens) * sessions_.kv_bytes_per_token();
  }
  for (memory::SessionId id : dirty) {
    std::shared_ptr<memory::Operation> op;
    try {
      op = sessions_.checkpoint(id);
    } catch (const std::exception& e) {
      ++summary.failed;
      log_error("checkpoint refused", {{"session", id_text(id)}, {"error", e.what()}});
      continue;
    }
    while (op->state() == memory::Operation::State::queued || op->state() == memory::Operation::State::running) {
      if (progress) progress(done_before + op->done_bytes(), std::max(total_estimate, done_before + op->total_bytes()),
                             summary.sessions, total_sessions);
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (op->state() == memory::Operation::State::failed) {
      ++summary.failed;
      log_error("checkpoint failed", {{"session", id_text(id)}, {"error", op->error()}});
    } else {
      ++summary.sessions;
    }
    done_before += op->total_bytes();
  }
  if (progress) progress(done_before, std::max(done_before, total_estimate), summary.sessions, total_sessions);
  summary.bytes = done_before;
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return summary;
}

void Service::reload(const DaemonConfig& config) {
  {
    std::lock_guard lock(config_mutex_);
    config_.limits = config.limits;
    config_.scheduler = config.scheduler;
    config_.log_level = config.log_level;
  }
  scheduler_->set_config(config.scheduler);
}

// --- helpers -----------------------------------------------------------------------------

memory::SessionId Service::resolve(const rpc::Params& params, std::string_view key) const {
  const std::string ref = params.string(key);
  if (auto id = parse_session_id(ref)) {
    try {
      sessions_.info(*id);
      return *id;
    } catch (const memory::SessionError&) {
    }
  } else if (auto found = sessions_.find(ref)) {
    return *found;
  }
  throw Error(rpc::session_not_found, "no session '" + ref + "'", json::object{{"session", ref}});
}

std::string Service::session_ref(memory::SessionId id) const { return id_text(id); }

json::object Service::session_object(memory::SessionId id) const {
  const memory::SessionInfo s = sessions_.info(id);
  const bool generating = claims_.activity(id) == "generating";
  json::object o;
  o["id"] = id_text(id);
  o["name"] = s.name.empty() ? json::value(nullptr) : json::value(s.name);
  o["tokens"] = s.tokens;
  o["kv_tokens"] = s.kv_tokens;
  o["tier"] = std::string(memory::tier_name(s.tier));
  o["pinned"] = s.pinned;
  o["busy"] = s.busy || generating;
  o["generating"] = generating;
  o["blocks"] = json::object{{"fast", s.fast_blocks}, {"dram", s.dram_blocks}, {"ssd", s.ssd_blocks}};
  o["checkpoint"] = json::object{{"generation", s.generation}, {"current", s.checkpoint_current}};
  return o;
}

std::vector<int32_t> Service::tokens_to_append(memory::SessionId id, const rpc::Params& params, bool generation_prompt,
                                               bool& chat_turn) const {
  const int given = static_cast<int>(params.has("text")) + static_cast<int>(params.has("tokens")) +
                    static_cast<int>(params.has("messages"));
  if (given > 1) throw Error(rpc::invalid_params, "invalid params: give one of 'text', 'tokens' and 'messages'");
  chat_turn = false;
  const engine::Tokenizer& tok = model_.tokenizer();
  const bool empty_history = sessions_.info(id).tokens == 0;
  if (params.has("text")) {
    return tok.encode(params.string("text"), empty_history && tok.add_bos_by_default(), false);
  }
  if (params.has("tokens")) {
    return params.int32s("tokens", 0, model_.config().n_vocab - 1);
  }
  if (!params.has("messages")) return {};
  const json::array* array = params.optional_array("messages");
  if (array == nullptr) throw Error(rpc::invalid_params, "invalid params: 'messages' must be an array of {role, content}");
  const std::vector<engine::ChatMessage> messages = parse_messages(*array);
  const bool prompt = generation_prompt && messages.back().role != "assistant";
  chat_turn = prompt;
  try {
    return chat_turns_.tokens(messages, empty_history, prompt);
  } catch (const std::invalid_argument& e) {
    throw Error(rpc::unsupported, e.what());
  }
}

void Service::check_context(memory::SessionId id, size_t adding) const {
  const auto tokens = static_cast<size_t>(sessions_.info(id).tokens);
  if (tokens + adding > static_cast<size_t>(max_context_)) {
    throw Error(rpc::context_full,
                "the history would have " + std::to_string(tokens + adding) + " tokens, more than the context of " +
                    std::to_string(max_context_),
                json::object{{"tokens", tokens + adding}, {"context", max_context_}});
  }
}

void Service::claim(const std::shared_ptr<Call>& call, memory::SessionId id, std::string_view activity) {
  std::string holder;
  if (!claims_.try_claim(id, activity, &holder)) {
    throw Error(rpc::session_busy, "session " + id_text(id) + " is busy (" + holder + ")",
                json::object{{"session", id_text(id)}, {"activity", holder}});
  }
  call->busy = std::make_unique<BusyGuard>(*this, id);
}

void Service::wait_operation(const std::shared_ptr<Call>& call, memory::SessionId id,
                             const std::shared_ptr<memory::Operation>& op, std::string_view verb) {
  const auto t0 = std::chrono::steady_clock::now();
  const bool progress = call->params().boolean("progress", false);
  int64_t seq = 0, last_reported = -1;
  auto last_sent = std::chrono::steady_clock::now() - std::chrono::seconds(1);
  while (op->state() == memory::Operation::State::queued || op->state() == memory::Operation::State::running) {
    const auto now = std::chrono::steady_clock::now();
    // At most ten a second, and only once the operation knows how much it moves.
    if (progress && op->total_bytes() > 0 && op->done_bytes() != last_reported &&
        now - last_sent >= std::chrono::milliseconds(100)) {
      last_sent = now;
      last_reported = op->done_bytes();
      call->replier->notify("sessions/progress", {{"request", call->request.id}, {"seq", seq++},
                                                  {"done_bytes", op->done_bytes()}, {"total_bytes", op->total_bytes()}});
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (op->state() == memory::Operation::State::failed) {
    throw Error(rpc::storage_error, std::string(verb) + " of " + id_text(id) + " failed: " + op->error(),
                json::object{{"session", id_text(id)}});
  }
  if (progress) {
    call->replier->notify("sessions/progress", {{"request", call->request.id}, {"seq", seq},
                                                {"done_bytes", op->total_bytes()}, {"total_bytes", op->total_bytes()}});
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  call->ok(json::object{{"session", session_object(id)}, {"bytes", op->total_bytes()}, {"seconds", seconds}});
}

// --- methods -----------------------------------------------------------------------------

void Service::initialize(const std::shared_ptr<Call>& call) {
  call->ok(json::object{
      {"protocolVersion", kProtocolVersion},
      {"serverInfo", {{"name", "den"}, {"version", DEN_VERSION}}},
      {"denProtocol", kDenProtocol},
      {"capabilities",
       {{"sessions", {{"streaming", true}, {"logprobs", true}, {"cancel", true}}}, {"models", json::object{}},
        {"agents", true}}}});
}

void Service::sessions_create(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"name"});
  const std::string name = p.optional_string("name").value_or("");
  if (!name.empty() && (!valid_name(name) || parse_session_id(name))) {
    throw Error(rpc::session_exists,
                "invalid session name '" + name + "': use 1-64 of A-Z a-z 0-9 . _ - and not the form s-<digits>",
                json::object{{"name", name}});
  }
  int32_t limit = 0;
  {
    std::lock_guard lock(config_mutex_);
    limit = config_.limits.sessions;
  }
  if (sessions_.stats().sessions >= limit) {
    throw Error(rpc::limit_exceeded, "the daemon holds " + std::to_string(limit) + " sessions, its limit (limits.sessions)",
                json::object{{"limit", limit}});
  }
  if (!name.empty() && sessions_.find(name)) {
    throw Error(rpc::session_exists, "a session named '" + name + "' exists already", json::object{{"name", name}});
  }
  const memory::SessionId id = sessions_.create(name);
  sessions_.save_history(id);
  call->ok(session_object(id));
}

void Service::sessions_list(const std::shared_ptr<Call>& call) {
  call->params().check_known({});
  json::array list;
  for (const memory::SessionInfo& s : sessions_.list()) {
    try {
      list.push_back(session_object(s.id));
    } catch (const memory::SessionError&) {
      // deleted meanwhile
    }
  }
  call->ok(json::object{{"sessions", std::move(list)}});
}

void Service::sessions_get(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"session", "tokens", "text"});
  const memory::SessionId id = resolve(p);
  json::object o = session_object(id);
  const bool want_tokens = p.boolean("tokens", false), want_text = p.boolean("text", false);
  if (want_tokens || want_text) {
    const std::vector<int32_t> tokens = sessions_.tokens(id);
    if (want_tokens) {
      json::array ids;
      for (int32_t t : tokens) ids.push_back(t);
      o["token_ids"] = std::move(ids);
    }
    if (want_text) o["text"] = model_.tokenizer().decode(tokens, true);
  }
  call->ok(std::move(o));
}

void Service::sessions_append(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"session", "text", "tokens", "messages"});
  const memory::SessionId id = resolve(p);
  claim(call, id, "appending");
  bool chat_turn = false;
  const std::vector<int32_t> tokens = tokens_to_append(id, p, false, chat_turn);
  if (!p.has("text") && !p.has("tokens") && !p.has("messages")) {
    throw Error(rpc::invalid_params, "invalid params: give one of 'text', 'tokens' and 'messages'");
  }
  check_context(id, tokens.size());
  sessions_.append(id, tokens);
  sessions_.save_history(id);
  call->ok(session_object(id));
}

void Service::sessions_generate(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"session", "text", "tokens", "messages", "max_tokens", "temperature", "top_k", "top_p", "min_p",
                 "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty", "seed", "stop", "stream",
                 "logprobs"});
  const memory::SessionId id = resolve(p);
  claim(call, id, "generating");

  GenerateJob job;
  job.session = id;
  job.max_context = max_context_;
  GenerationOptions& o = job.options;
  o.max_new_tokens = static_cast<int32_t>(p.integer("max_tokens", 128, 0, max_context_));
  engine::SamplingParams& s = o.sampling;
  s.temperature = static_cast<float>(p.number("temperature", s.temperature, 0, 100));
  s.top_k = static_cast<int32_t>(p.integer("top_k", s.top_k, 0, model_.config().n_vocab));
  s.top_p = static_cast<float>(p.number("top_p", s.top_p, 0, 1));
  s.min_p = static_cast<float>(p.number("min_p", s.min_p, 0, 1));
  s.repeat_penalty = static_cast<float>(p.number("repeat_penalty", s.repeat_penalty, 0.01, 100));
  s.repeat_last_n = static_cast<int32_t>(p.integer("repeat_last_n", s.repeat_last_n, -1, max_context_));
  s.presence_penalty = static_cast<float>(p.number("presence_penalty", 0, -100, 100));
  s.frequency_penalty = static_cast<float>(p.number("frequency_penalty", 0, -100, 100));
  const auto seed = p.optional_integer("seed", 0, int64_t{1} << 53);
  s.seed = seed ? static_cast<uint64_t>(*seed) : std::random_device{}();
  s.validate();
  o.stop = p.strings("stop");
  if (o.stop.size() > kMaxStopStrings) throw Error(rpc::invalid_params, "invalid params: at most 16 'stop' strings");
  for (const std::string& stop : o.stop) {
    if (stop.empty() || stop.size() > kMaxStopBytes) {
      throw Error(rpc::invalid_params, "invalid params: each 'stop' string must have 1-256 bytes");
    }
  }
  o.top_logprobs = static_cast<int32_t>(p.integer("logprobs", -1, -1, kMaxLogprobs));
  const bool stream = p.boolean("stream", false);

  bool chat_turn = false;
  const std::vector<int32_t> prompt = tokens_to_append(id, p, true, chat_turn);
  check_context(id, prompt.size() + 1);  // room for at least one new token
  if (!prompt.empty()) sessions_.append(id, prompt);
  if (chat_turn) job.closing_tokens = chat_turns_.assistant_closing();

  const std::string request_key = json::serialize(call->request.id);
  if (stream) {
    auto seq = std::make_shared<int64_t>(0);
    job.on_text = [call, seq](std::string_view text) {
      call->replier->notify("sessions/stream", {{"request", call->request.id}, {"seq", (*seq)++}, {"text", text}});
    };
  }
  const uint64_t seed_used = s.seed;
  const int32_t logprobs = o.top_logprobs;
  job.on_done = [this, call, id, request_key, seed_used, logprobs](GenerateOutcome outcome) {
    // Off the engine thread: making the history durable waits for the disk.
    boost::asio::post(*control_pool_, [this, call, id, request_key, seed_used, logprobs,
                                       outcome = std::move(outcome)] {
      {
        std::lock_guard lock(mutex_);
        generates_.erase({call->connection, request_key});
      }
      try {
        if (config_.kv.policy == KvPolicy::recompute && outcome.reason != FinishReason::failed) {
          // No reuse across turns: forget the KV, keep the tokens.
          sessions_.drop_kv(id);
        }
        sessions_.save_history(id);
      } catch (const std::exception& e) {
        call->fail(Error(rpc::storage_error, std::string("the history could not be saved: ") + e.what(),
                         json::object{{"session", id_text(id)}}));
        return;
      }
      if (outcome.reason == FinishReason::failed) {
        call->fail(Error(rpc::internal_error, "generation failed: " + outcome.error, json::object{{"session", id_text(id)}}));
        return;
      }
      json::object result;
      result["session"] = id_text(id);
      result["text"] = outcome.text;
      result["finish_reason"] = std::string(finish_reason_name(outcome.reason));
      result["tokens"] = json::object{{"prompt", outcome.prompt_tokens},
                                      {"reused", outcome.reused_tokens},
                                      {"generated", outcome.tokens.size()}};
      result["timings"] = json::object{{"queue_ms", ms(outcome.queue_s)},   {"wake_ms", ms(outcome.wake_s)},
                                       {"ttft_ms", ms(outcome.ttft_s)},     {"prefill_ms", ms(outcome.prefill_s)},
                                       {"decode_ms", ms(outcome.decode_s)}};
      result["seed"] = seed_used;
      if (logprobs >= 0) {
        json::array entries;
        for (const GeneratedToken& t : outcome.tokens) {
          json::object e{{"id", t.id}, {"logprob", t.logprob}};
          if (logprobs > 0) {
            json::array top;
            for (const engine::TokenLogprob& alt : t.top) top.push_back(json::object{{"id", alt.id}, {"logprob", alt.logprob}});
            e["top"] = std::move(top);
          }
          entries.push_back(std::move(e));
        }
        result["logprobs"] = std::move(entries);
      }
      call->ok(std::move(result));
    });
  };
  std::shared_ptr<GenerateHandle> handle = scheduler_->submit(std::move(job));
  std::lock_guard lock(mutex_);
  generates_[{call->connection, request_key}] = {id, handle};
}

void Service::sessions_cancel(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"request", "session"});
  if (p.has("request") == p.has("session")) {
    throw Error(rpc::invalid_params, "invalid params: give 'request' (a generate call's id) or 'session'");
  }
  bool cancelled = false;
  if (p.has("request")) {
    const std::string key = json::serialize(p.raw().at("request"));
    std::lock_guard lock(mutex_);
    auto it = generates_.find({call->connection, key});
    if (it != generates_.end()) {
      it->second.handle->cancel();
      cancelled = true;
    }
  } else {
    const memory::SessionId id = resolve(p);
    std::lock_guard lock(mutex_);
    for (auto& [key, running] : generates_) {
      if (running.session == id) {
        running.handle->cancel();
        cancelled = true;
      }
    }
  }
  call->ok(json::object{{"cancelled", cancelled}});
}

void Service::sessions_pin(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"session"});
  const memory::SessionId id = resolve(p);
  sessions_.pin(id);
  call->ok(session_object(id));
}

void Service::sessions_unpin(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"session"});
  const memory::SessionId id = resolve(p);
  sessions_.unpin(id);
  call->ok(session_object(id));
}

void Service::sessions_checkpoint(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"session", "progress"});
  const memory::SessionId id = resolve(p);
  claim(call, id, "checkpointing");
  wait_operation(call, id, sessions_.checkpoint(id), "checkpoint");
}

void Service::sessions_hibernate(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"session", "tier", "progress"});
  const memory::SessionId id = resolve(p);
  const std::string tier = p.optional_string("tier").value_or("ssd");
  if (tier != "dram" && tier != "ssd") {
    throw Error(rpc::invalid_params, "invalid params: 'tier' must be \"dram\" or \"ssd\", got \"" + tier + "\"");
  }
  if (tier == "dram" && sessions_.stats().dram_capacity == 0) {
    throw Error(rpc::unsupported, "there is no DRAM tier in this configuration (kv.dram is 0): hibernate to ssd");
  }
  claim(call, id, "hibernating");
  wait_operation(call, id, sessions_.hibernate(id, tier == "dram" ? memory::Tier::dram : memory::Tier::ssd), "hibernate");
}

void Service::sessions_wake(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"session", "progress"});
  const memory::SessionId id = resolve(p);
  claim(call, id, "waking");
  wait_operation(call, id, sessions_.wake(id), "wake");
}

void Service::sessions_fork(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"session", "name"});
  const memory::SessionId source = resolve(p);
  const std::string name = p.optional_string("name").value_or("");
  if (!name.empty() && (!valid_name(name) || parse_session_id(name))) {
    throw Error(rpc::session_exists,
                "invalid session name '" + name + "': use 1-64 of A-Z a-z 0-9 . _ - and not the form s-<digits>",
                json::object{{"name", name}});
  }
  if (!name.empty() && sessions_.find(name)) {
    throw Error(rpc::session_exists, "a session named '" + name + "' exists already", json::object{{"name", name}});
  }
  claim(call, source, "forking");
  const memory::SessionId id = sessions_.fork(source, name);
  sessions_.save_history(id);
  call->ok(session_object(id));
}

void Service::sessions_delete(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"session"});
  const memory::SessionId id = resolve(p);
  claim(call, id, "deleting");
  sessions_.drop(id);
  call->ok(json::object{{"deleted", id_text(id)}});
}

void Service::models_list(const std::shared_ptr<Call>& call) {
  call->params().check_known({});
  const engine::ModelConfig& c = model_.config();
  json::object m{{"name", c.name},
                 {"path", model_.path()},
                 {"architecture", c.architecture},
                 {"parameters", model_.non_embedding_parameters()},
                 {"context_length", max_context_},
                 {"trained_context_length", c.n_ctx_train},
                 {"vocab_size", c.n_vocab},
                 {"layers", c.n_layers},
                 {"chat_template", std::string(chat_turns_.template_name())},
                 {"backend", backend_name_},
                 {"kv_bytes_per_token", sessions_.kv_bytes_per_token()},
                 {"block_tokens", sessions_.config().layout.block_tokens}};
  call->ok(json::object{{"models", json::array{std::move(m)}}});
}

void Service::daemon_stats(const std::shared_ptr<Call>& call) {
  call->params().check_known({});
  call->ok(stats());
}

void Service::daemon_shutdown(const std::shared_ptr<Call>& call) {
  call->params().check_known({});
  call->ok(json::object{{"shutting_down", true}});
  bool first = false;
  {
    std::lock_guard lock(mutex_);
    first = !shutdown_requested_;
    shutdown_requested_ = true;
  }
  if (first && on_shutdown_request) on_shutdown_request();
}

// --- agents ------------------------------------------------------------------------------

namespace {

AgentRuntime& require_agents(const std::unique_ptr<AgentRuntime>& agents) {
  if (!agents) throw Error(rpc::unsupported, "agents need a state directory");
  return *agents;
}

std::string read_script(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(rpc::invalid_params, "cannot read the script '" + path + "' (the daemon reads it: give an absolute path, or send 'script')");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

void Service::agents_spawn(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"name", "script", "path", "priority", "token_budget"});
  SpawnRequest request;
  request.name = p.string("name");
  if (p.has("script") == p.has("path")) throw Error(rpc::invalid_params, "invalid params: give 'script' (the Lua text) or 'path'");
  if (p.has("script")) {
    request.source = p.string("script");
  } else {
    request.script_path = p.string("path");
    request.source = read_script(request.script_path);
  }
  request.priority = static_cast<int32_t>(p.integer("priority", 0, -100, 100));
  request.token_budget = p.integer("token_budget", 0, 0, int64_t{1} << 50);
  call->ok(require_agents(agents_).spawn(request));
}

void Service::agents_list(const std::shared_ptr<Call>& call) {
  call->params().check_known({});
  call->ok(json::object{{"agents", require_agents(agents_).list()}});
}

void Service::agents_get(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"agent"});
  call->ok(require_agents(agents_).get(p.string("agent")));
}

// Queues a message; with wait, answers once the handler has finished, with its replies (and
// streams the agent's generated text meanwhile when stream is set).
void Service::agents_send(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"agent", "text", "body", "wait", "stream"});
  AgentRuntime& agents = require_agents(agents_);
  if (p.has("text") == p.has("body")) throw Error(rpc::invalid_params, "invalid params: give 'text' or 'body'");
  const json::value body = p.has("text") ? json::value(p.string("text")) : p.raw().at("body");
  const std::string agent = p.string("agent");
  const bool wait = p.boolean("wait", false), stream = p.boolean("stream", false);
  uint64_t subscription = 0;
  if (wait && stream) {
    auto seq = std::make_shared<std::atomic<int64_t>>(0);
    subscription = agents.subscribe(agent, [call, seq](const json::object& event) {
      if (event.at("kind").as_string() != "text") return;
      call->replier->notify("agents/stream", {{"request", call->request.id}, {"seq", (*seq)++}, {"text", event.at("text")}});
    });
  }
  int64_t message = 0;
  try {
    message = agents.send(agent, "client", body);
  } catch (...) {
    if (subscription != 0) agents.unsubscribe(subscription);
    throw;
  }
  if (!wait) {
    call->ok(json::object{{"message", message}});
    return;
  }
  agents.when_handled(message, [this, call, message, subscription](AgentRuntime::MessageState state) {
    if (subscription != 0) agents_->unsubscribe(subscription);
    json::array replies;
    for (const std::string& r : state.replies) replies.push_back(json::string(r));
    call->ok(json::object{{"message", message}, {"status", state.status}, {"replies", std::move(replies)}});
  });
}

void Service::agents_subscribe(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"agent"});
  auto seq = std::make_shared<std::atomic<int64_t>>(0);
  auto replier = call->replier;
  const json::value request = call->request.id;
  const uint64_t id = require_agents(agents_).subscribe(p.string("agent"), [replier, request, seq](const json::object& event) {
    json::object params = event;
    params["request"] = request;
    params["seq"] = (*seq)++;
    replier->notify("agents/event", std::move(params));
  });
  {
    std::lock_guard lock(mutex_);
    subscriptions_.emplace(call->connection, id);
  }
  call->ok(json::object{{"subscription", id}});
}

void Service::agents_unsubscribe(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"subscription"});
  const auto id = static_cast<uint64_t>(p.integer("subscription", 0, 0, int64_t{1} << 53));
  bool found = false;
  {
    std::lock_guard lock(mutex_);
    auto [first, last] = subscriptions_.equal_range(call->connection);
    for (auto it = first; it != last; ++it) {
      if (it->second == id) {
        subscriptions_.erase(it);
        found = true;
        break;
      }
    }
  }
  if (found) require_agents(agents_).unsubscribe(id);
  call->ok(json::object{{"unsubscribed", found}});
}

void Service::agents_logs(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"agent", "after", "limit"});
  call->ok(json::object{{"logs", require_agents(agents_).logs(p.string("agent"), p.integer("after", 0, 0, int64_t{1} << 62),
                                                              static_cast<int32_t>(p.integer("limit", 100, 1, 1000)))}});
}

void Service::agents_stop(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"agent"});
  require_agents(agents_).stop(p.string("agent"));
  call->ok(json::object{{"stopped", p.string("agent")}});
}

void Service::agents_delete(const std::shared_ptr<Call>& call) {
  const rpc::Params p = call->params();
  p.check_known({"agent"});
  require_agents(agents_).remove(p.string("agent"));
  call->ok(json::object{{"deleted", p.string("agent")}});
}

// --- statistics ----------------------------------------------------------------------------

json::object Service::stats() const {
  const SchedulerStats e = scheduler_->stats();
  const memory::MemoryStats m = sessions_.stats();
  const int64_t block_bytes = sessions_.kv_bytes_per_token() * sessions_.config().layout.block_tokens;
  json::object by_tier{{"fast", 0}, {"dram", 0}, {"ssd", 0}, {"none", 0}};
  int64_t pinned = 0;
  for (const memory::SessionInfo& s : sessions_.list()) {
    by_tier[memory::tier_name(s.tier)] = by_tier[memory::tier_name(s.tier)].as_int64() + 1;
    pinned += s.pinned ? 1 : 0;
  }
  json::object o;
  o["uptime_s"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  o["requests"] = requests_.load();
  o["errors"] = errors_.load();
  if (server_stats) o["connections"] = server_stats();
  o["engine"] = json::object{
      {"backend", backend_name_},
      {"steps", e.steps},
      {"batched_steps", e.batched_steps},
      {"max_batch", e.max_batch},
      {"mean_batch", e.steps > 0 ? static_cast<double>(e.sequences_stepped) / static_cast<double>(e.steps) : 0.0},
      {"tokens_generated", e.tokens_generated},
      {"tokens_prefilled", e.tokens_prefilled},
      {"generated_tokens_per_s", e.generated_per_s_10s},
      {"busy_s", e.busy_s},
      {"active_requests", e.active},
      {"waiting_for_memory", e.waiting_for_memory},
      {"requests_completed", e.requests_completed},
      {"requests_cancelled", e.requests_cancelled},
      {"requests_failed", e.requests_failed}};
  if (agents_) o["agents"] = agents_->stats();
  json::array tool_servers;
  for (const ToolRegistry::ServerStatus& t : tools_->status()) {
    json::object server{{"name", t.name},         {"dialed_in", t.dialed_in}, {"running", t.running},
                        {"tools", t.tools},       {"calls", t.calls},         {"failures", t.failures},
                        {"restarts", t.restarts}};
    if (!t.last_error.empty()) server["last_error"] = t.last_error;
    tool_servers.push_back(std::move(server));
  }
  o["tool_servers"] = std::move(tool_servers);
  o["ttft_ms"] = quantiles_ms(e.ttft);
  o["time_per_output_token_ms"] = quantiles_ms(e.time_per_output_token);
  o["sessions"] = json::object{{"total", m.sessions}, {"pinned", pinned}, {"by_tier", std::move(by_tier)}};
  o["memory"] = json::object{
      {"block_bytes", block_bytes},
      {"fast", {{"capacity_bytes", m.fast_capacity * block_bytes}, {"used_bytes", m.fast_used * block_bytes}}},
      {"dram", {{"capacity_bytes", m.dram_capacity * block_bytes}, {"used_bytes", m.dram_used * block_bytes}}},
      {"ssd", {{"used_bytes", m.ssd_bytes}}},
      {"tokens_computed", m.tokens_computed},
      {"tokens_recomputed", m.tokens_recomputed},
      {"tokens_loaded", m.tokens_loaded},
      {"prefix_hit_tokens", m.prefix_hit_tokens},
      {"bytes_moved",
       {{"dram_to_fast", m.bytes_dram_to_fast},
        {"fast_to_dram", m.bytes_fast_to_dram},
        {"ssd_read", m.bytes_ssd_read},
        {"ssd_written", m.bytes_ssd_written}}},
      {"blocks_evicted", m.blocks_evicted},
      {"kv_tokens_dropped", m.kv_tokens_dropped},
      {"segments_quarantined", m.segments_quarantined}};
  return o;
}

std::string Service::prometheus_text() const {
  const SchedulerStats e = scheduler_->stats();
  const memory::MemoryStats m = sessions_.stats();
  const int64_t block_bytes = sessions_.kv_bytes_per_token() * sessions_.config().layout.block_tokens;
  PrometheusText out;
  auto counter = [&](const char* name, const char* help, double v) { out.add({name, help, "counter", {}, v}); };
  auto gauge = [&](const char* name, const char* help, double v) { out.add({name, help, "gauge", {}, v}); };
  counter("den_requests_total", "JSON-RPC requests received", static_cast<double>(requests_.load()));
  counter("den_request_errors_total", "JSON-RPC requests answered with an error", static_cast<double>(errors_.load()));
  counter("den_engine_steps_total", "Engine steps run", static_cast<double>(e.steps));
  counter("den_engine_batched_steps_total", "Engine steps that ran more than one sequence", static_cast<double>(e.batched_steps));
  counter("den_tokens_generated_total", "Tokens generated", static_cast<double>(e.tokens_generated));
  counter("den_tokens_prefilled_total", "Tokens fed in prefill chunks", static_cast<double>(e.tokens_prefilled));
  gauge("den_generated_tokens_per_second", "Tokens generated per second over the last 10 s", e.generated_per_s_10s);
  gauge("den_active_requests", "Generations admitted and not finished", e.active);
  out.add_histogram("den_ttft_seconds", "Time to first token of generate requests", e.ttft);
  out.add_histogram("den_time_per_output_token_seconds", "Decode time per generated token", e.time_per_output_token);
  out.add_histogram("den_engine_batch_size", "Sequences per engine step", e.batch_size);
  int64_t by_tier[4] = {0, 0, 0, 0};
  for (const memory::SessionInfo& s : sessions_.list()) ++by_tier[static_cast<int>(s.tier)];
  for (memory::Tier tier : {memory::Tier::fast, memory::Tier::dram, memory::Tier::ssd, memory::Tier::none}) {
    out.add({"den_sessions", "Sessions by the fastest tier holding all their KV", "gauge",
             {{"tier", std::string(memory::tier_name(tier))}}, static_cast<double>(by_tier[static_cast<int>(tier)])});
  }
  out.add({"den_kv_capacity_bytes", "KV pool capacity per tier", "gauge", {{"tier", "fast"}},
           static_cast<double>(m.fast_capacity * block_bytes)});
  out.add({"den_kv_capacity_bytes", "KV pool capacity per tier", "gauge", {{"tier", "dram"}},
           static_cast<double>(m.dram_capacity * block_bytes)});
  out.add({"den_kv_used_bytes", "KV bytes held per tier", "gauge", {{"tier", "fast"}},
           static_cast<double>(m.fast_used * block_bytes)});
  out.add({"den_kv_used_bytes", "KV bytes held per tier", "gauge", {{"tier", "dram"}},
           static_cast<double>(m.dram_used * block_bytes)});
  out.add({"den_kv_used_bytes", "KV bytes held per tier", "gauge", {{"tier", "ssd"}}, static_cast<double>(m.ssd_bytes)});
  const std::pair<const char*, int64_t> links[] = {{"dram_to_fast", m.bytes_dram_to_fast},
                                                   {"fast_to_dram", m.bytes_fast_to_dram},
                                                   {"ssd_read", m.bytes_ssd_read},
                                                   {"ssd_write", m.bytes_ssd_written}};
  for (const auto& [link, bytes] : links) {
    out.add({"den_kv_bytes_moved_total", "KV bytes moved per link", "counter", {{"link", link}}, static_cast<double>(bytes)});
  }
  const std::pair<const char*, int64_t> token_kinds[] = {
      {"computed", m.tokens_computed}, {"recomputed", m.tokens_recomputed}, {"loaded", m.tokens_loaded}};
  for (const auto& [kind, n] : token_kinds) {
    out.add({"den_kv_tokens_total", "Tokens of KV computed, recomputed, or loaded from DRAM/SSD", "counter",
             {{"kind", kind}}, static_cast<double>(n)});
  }
  counter("den_prefix_hit_tokens_total", "KV tokens found in another session's blocks", static_cast<double>(m.prefix_hit_tokens));
  return out.str();
}

}  // namespace den::runtime
