// The soak: a real daemon (stories260K, CPU) under a mixed workload (sessions appended to,
// generated on, checkpointed, hibernated, woken, forked and deleted by two clients; an agent
// that takes messages, calls a tool, generates and sets timers), SIGKILLed at random instants
// or crashed by a random failpoint (memory/failpoints.h), restarted, and checked against an
// oracle this process keeps of everything the daemon acknowledged:
//   - every acknowledged session exists with its acknowledged history (a request in flight at
//     the kill may or may not have landed; only a delete in flight may have removed it), every
//     acknowledged delete stays deleted;
//   - resumed sessions continue exactly: the next token's log-probabilities equal those of a
//     fresh session that recomputes the same history, and checkpointed KV is reused;
//   - every acknowledged agent message is handled exactly once, its timer fires exactly once.
// Bounded by DEN_SOAK_EPOCHS (default 12: a CI-sized run) and DEN_SOAK_SECONDS; scripts/soak
// runs it long. Prints one summary line ("soak: ...").
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>

#include "daemon_process.h"
#include "den/memory/failpoints.h"
#include "den/runtime/client.h"
#include "den/runtime/json_rpc.h"
#include "test_support.h"

namespace den::test {
namespace {

namespace json = boost::json;
using runtime::DaemonClient;
using runtime::RpcCallError;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// What a hang leaves for its diagnosis, printed before the watchdog kills the daemon (the
// temporary directory with its log goes with the test): the agents as the daemon reports them,
// if it still answers within 5 s, and the last 60 lines of its log.
void report_hang(const DaemonProcess& daemon) {
  try {
    DaemonClient client(daemon.socket_path());
    client.send_raw("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"agents/list\"}\n");
    const auto reply = client.read_line(std::chrono::seconds(5));
    std::printf("soak: hang: agents/list: %s\n", reply ? reply->c_str() : "(no answer within 5 s)");
  } catch (const std::exception& e) {
    std::printf("soak: hang: agents/list failed: %s\n", e.what());
  }
  const std::string log = daemon.log();
  size_t from = log.size();
  for (int lines = 0; from > 0 && lines <= 60; ++lines) {
    const size_t newline = log.rfind('\n', from - 1);
    from = newline == std::string::npos ? 0 : newline;
  }
  std::istringstream tail(log.substr(from));
  for (std::string line; std::getline(tail, line);) {
    if (!line.empty()) std::printf("soak: hang: log: %s\n", line.c_str());
  }
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoll(v, nullptr, 10) : fallback;
}

std::vector<int64_t> token_ids_of(const json::value& session) {
  std::vector<int64_t> ids;
  for (const json::value& t : session.at("token_ids").as_array()) ids.push_back(t.to_number<int64_t>());
  return ids;
}

bool starts_with(const std::vector<int64_t>& all, const std::vector<int64_t>& prefix) {
  return all.size() >= prefix.size() && std::equal(prefix.begin(), prefix.end(), all.begin());
}

// What the daemon acknowledged about one session. A session is driven by one client at a
// time, so at most one request on it is unanswered (in flight) at a kill.
struct SessionOracle {
  bool created = false;         // acknowledged
  bool deleted = false;         // acknowledged
  bool in_flight = false;       // a request was sent and not answered (or answered with an error)
  bool delete_in_flight = false;  // a delete was sent and not acknowledged: it may have landed
  std::vector<int64_t> tokens;  // a known prefix of the acknowledged history (the ids, as last read)
  size_t length = 0;            // the acknowledged history's length
  int64_t checkpointed_kv = 0;  // KV tokens the last acknowledged checkpoint/hibernate holds
  std::vector<std::string> ops; // the last 32 requests on it and how they ended, for a report
  void note(std::string op) {
    if (ops.size() >= 32) ops.erase(ops.begin());
    ops.push_back(std::move(op));
  }
  std::string history() const {
    std::string all;
    for (const auto& op : ops) all += (all.empty() ? "" : "; ") + op;
    return all;
  }
};

struct Tally {
  int64_t epochs = 0, kills = 0, failpoint_crashes = 0, failpoint_errors_seen = 0, acked = 0;
  int64_t sessions_verified = 0, logits_compared = 0, messages_acked = 0, messages_handled = 0;
  int64_t lost = 0, corrupt = 0, tool_repeats = 0;
  std::map<std::string, int64_t> armed, fired;
  std::vector<std::string> problems;
};

// The agent: counts each message and each timer in its state (exactly-once shows as counts of
// 1), calls the counting tool, generates a little, and sets a short timer per message.
const char* kSoakAgent = R"lua(
return {
  on_start = function(ctx) ctx.state.seen = {}; ctx.state.fired = {}; ctx.state.tools = 0 end,
  on_message = function(ctx, msg)
    local key = msg.text
    if HAVE_TOOLS then
      local result = den.tools.call("counter.bump", {})
      if result then ctx.state.tools = ctx.state.tools + 1 end
    end
    if #key % 3 == 0 then
      ctx.session:append("user", "Tell me about " .. key)
      ctx.session:generate{max_tokens = 3, temperature = 0}
    end
    ctx:schedule(0.05, key)
    ctx.state.seen[key] = (ctx.state.seen[key] or 0) + 1
  end,
  on_timer = function(ctx, key) ctx.state.fired[key] = (ctx.state.fired[key] or 0) + 1 end,
}
)lua";

class Soak {
 public:
  Soak(DaemonProcess& daemon, uint64_t seed, bool have_tools, std::string counter_file)
      : daemon_(daemon), rng_(seed), have_tools_(have_tools), counter_file_(std::move(counter_file)) {}

  void spawn_agent() {
    DaemonClient client(daemon_.socket_path());
    std::string script = std::string("local HAVE_TOOLS = ") + (have_tools_ ? "true" : "false") + "\n" + kSoakAgent;
    client.call("agents/spawn", {{"name", "soak"}, {"script", script}});
  }

  // One epoch: check (on a daemon without failpoints), restart with the failpoint armed if
  // there is one, run the workload until the daemon dies (a random SIGKILL, or the failpoint),
  // restart without failpoints.
  void epoch(const std::string& failpoint_spec, const std::string& point, const std::string& armed_point) {
    ++tally_.epochs;
    verify();
    if (!failpoint_spec.empty()) {
      daemon_.kill(SIGKILL);  // at a quiet instant: a kill all the same
      daemon_.wait_exit();
      ++tally_.kills;
      restart(failpoint_spec, armed_point);
    }
    std::atomic<bool> stop{false};
    std::vector<std::thread> workers;
    for (int w = 0; w < 2; ++w) {
      workers.emplace_back([this, w, &stop, seed = rng_()] { session_worker(w, seed, stop); });
    }
    workers.emplace_back([this, &stop] { agent_worker(stop); });
    const auto kill_after = milliseconds(std::uniform_int_distribution<int>(100, 1500)(rng_));
    const auto deadline = Clock::now() + kill_after;
    bool died_alone = false;
    while (Clock::now() < deadline) {
      if (!daemon_.running()) {
        died_alone = true;
        break;
      }
      std::this_thread::sleep_for(milliseconds(5));
    }
    if (!died_alone) daemon_.kill(SIGKILL);
    ++tally_.kills;
    const int status = daemon_.wait_exit();
    stop = true;
    for (auto& t : workers) t.join();
    if (died_alone) {
      if (status == 128 + SIGKILL && !point.empty()) {
        ++tally_.failpoint_crashes;
        ++tally_.fired[point];
      } else {
        problem("the daemon exited by itself with status " + std::to_string(status));
      }
    }
    restart("");
  }

  void restart(const std::string& failpoint_spec, const std::string& armed_point = "") {
    if (!failpoint_spec.empty()) ::setenv("DEN_FAILPOINTS", failpoint_spec.c_str(), 1);
    try {
      daemon_.restart();
    } catch (const std::exception& e) {
      // A failpoint that fires during the start (a SQLite commit of the recovery) kills it
      // there; the workload then finds no daemon and the epoch ends at once.
      ::unsetenv("DEN_FAILPOINTS");
      if (failpoint_spec.empty() || daemon_.running()) throw;
      ++tally_.failpoint_crashes;
      ++tally_.kills;
      if (!armed_point.empty()) ++tally_.fired[armed_point];
      daemon_.restart();
    }
    ::unsetenv("DEN_FAILPOINTS");
  }

  // Waits until every acknowledged message was handled and its timer fired (or `timeout`).
  void drain(std::chrono::seconds timeout) {
    const auto deadline = Clock::now() + timeout;
    for (;;) {
      json::value agent;
      {
        DaemonClient client(daemon_.socket_path());
        agent = client.call("agents/get", {{"agent", "soak"}});
      }
      const json::object& state = agent.at("state").as_object();
      size_t handled = 0, fired = 0;
      for (const std::string& key : acked_messages_) {
        handled += count_in(state, "seen", key) >= 1;
        fired += count_in(state, "fired", key) >= 1;
      }
      if ((handled == acked_messages_.size() && fired == acked_messages_.size()) || Clock::now() >= deadline) {
        const int64_t lost_before = tally_.lost;
        check_agent_state(state, /*final=*/true);
        if (tally_.lost > lost_before) report_agent_run(agent);
        return;
      }
      std::this_thread::sleep_for(milliseconds(100));
    }
  }

  Tally& tally() { return tally_; }

  // What the agent is doing and its last log lines: why a message was not handled.
  void report_agent_run(const json::value& agent) {
    problem("agent: run " + json::serialize(agent.at("run")) + ", " +
            std::to_string(agent.at("queued_messages").to_number<int64_t>()) + " messages queued, status " +
            json::serialize(agent.at("status")));
    // Its last 20 runs, newest first: the ones that did not complete say why.
    int shown = 0;
    for (const json::value& run : agent.at("runs").as_array()) {
      if (run.at("status") != "completed" && shown++ < 3) problem("agent run: " + json::serialize(run));
    }
    try {
      DaemonClient client(daemon_.socket_path());
      const json::value logs = client.call("agents/logs", {{"agent", "soak"}, {"limit", 1000}});
      const json::array& entries = logs.at("logs").as_array();
      for (size_t i = entries.size() > 5 ? entries.size() - 5 : 0; i < entries.size(); ++i) {
        problem("agent log: " + json::serialize(entries[i]));
      }
    } catch (const std::exception& e) {
      problem(std::string("agent logs unavailable: ") + e.what());
    }
  }

 private:
  void problem(const std::string& what) {
    std::lock_guard lock(mu_);
    if (tally_.problems.size() < 20) tally_.problems.push_back(what);
  }

  static int64_t count_in(const json::object& state, const char* table, const std::string& key) {
    const json::value* t = state.if_contains(table);
    if (!t || !t->is_object()) return 0;
    const json::value* v = t->as_object().if_contains(key);
    return v ? v->to_number<int64_t>() : 0;
  }

  // ---- verification (single-threaded, between epochs)

  void verify() {
    DaemonClient client(daemon_.socket_path());
    std::vector<std::string> names;
    for (const auto& [name, o] : sessions_) names.push_back(name);
    int compared = 0;
    for (const std::string& name : names) {
      SessionOracle& o = sessions_[name];
      std::optional<json::value> got;
      try {
        got = client.call("sessions/get", {{"session", name}, {"tokens", true}});
      } catch (const RpcCallError& e) {
        if (e.code() != runtime::rpc::session_not_found) throw;
      }
      ++tally_.sessions_verified;
      if (!got) {
        if (o.created && !o.deleted && !o.delete_in_flight) {
          ++tally_.lost;
          problem("session " + name + " was acknowledged and is gone (epoch " + std::to_string(tally_.epochs) +
                  "; its last requests: " + o.history() + ")");
        }
        sessions_.erase(name);
        continue;
      }
      if (o.deleted) {
        ++tally_.lost;
        problem("session " + name + " was deleted (acknowledged) and came back");
        continue;
      }
      const std::vector<int64_t> ids = token_ids_of(*got);
      const bool whole = o.in_flight ? ids.size() >= o.length : ids.size() == o.length;
      if (o.created && !(whole && starts_with(ids, o.tokens))) {
        ++tally_.lost;
        problem("session " + name + ": " + std::to_string(ids.size()) + " tokens where " + std::to_string(o.length) +
                " were acknowledged" + (o.in_flight ? " (a request in flight)" : "") +
                (starts_with(ids, o.tokens) ? "" : ", and not the acknowledged ones") + " (epoch " +
                std::to_string(tally_.epochs) + "; its last requests: " + o.history() + ")");
      }
      o.tokens = ids;
      o.length = ids.size();
      o.created = true;
      o.in_flight = false;
      o.delete_in_flight = false;  // it is there: an unacknowledged delete did not land
      if (compared < 2 && got->at("checkpoint").at("generation").to_number<int64_t>() > 0 && ids.size() > 1) {
        ++compared;
        compare_with_recompute(client, name, o);
      }
    }
    if (agent_spawned_) {
      const json::value agent = client.call("agents/get", {{"agent", "soak"}});
      check_agent_state(agent.at("state").as_object(), /*final=*/false);
    }
  }

  // The resumed session's next-token distribution against a fresh session that recomputes the
  // same history from its tokens.
  void compare_with_recompute(DaemonClient& client, const std::string& name, SessionOracle& o) {
    const json::object ask = {{"max_tokens", 1}, {"temperature", 0}, {"logprobs", 5}};
    json::object resumed_params = ask;
    resumed_params["session"] = name;
    const json::value resumed = client.call("sessions/generate", resumed_params);
    const std::string fresh_name = "soak-recompute";
    client.call("sessions/create", {{"name", fresh_name}});
    json::array history;
    for (int64_t t : o.tokens) history.push_back(t);
    client.call("sessions/append", {{"session", fresh_name}, {"tokens", history}});
    json::object fresh_params = ask;
    fresh_params["session"] = fresh_name;
    const json::value fresh = client.call("sessions/generate", fresh_params);
    client.call("sessions/delete", {{"session", fresh_name}});
    ++tally_.logits_compared;

    const json::array& a = resumed.at("logprobs").as_array()[0].at("top").as_array();
    const json::array& b = fresh.at("logprobs").as_array()[0].at("top").as_array();
    bool equal = a.size() == b.size();
    for (size_t i = 0; equal && i < a.size(); ++i) {
      equal = a[i].at("id") == b[i].at("id") &&
              std::fabs(a[i].at("logprob").to_number<double>() - b[i].at("logprob").to_number<double>()) < 1e-3;
    }
    if (!equal) {
      ++tally_.corrupt;
      problem("session " + name + " resumed with other next-token log-probabilities than a recompute: " +
              json::serialize(a) + " vs " + json::serialize(b));
    }
    const int64_t reused = resumed.at("tokens").at("reused").to_number<int64_t>();
    if (reused < std::min<int64_t>(o.checkpointed_kv, static_cast<int64_t>(o.tokens.size()) - 1)) {
      problem("session " + name + " recomputed checkpointed KV: reused " + std::to_string(reused) + " of " +
              std::to_string(o.checkpointed_kv) + " checkpointed tokens");
    }
    const json::value after = client.call("sessions/get", {{"session", name}, {"tokens", true}});
    o.tokens = token_ids_of(after);
    o.length = o.tokens.size();
  }

  void check_agent_state(const json::object& state, bool final) {
    int64_t handled = 0;
    for (const char* table : {"seen", "fired"}) {
      const json::value* t = state.if_contains(table);
      if (!t || !t->is_object()) continue;
      for (const auto& [key, count] : t->as_object()) {
        if (count.to_number<int64_t>() > 1) {
          ++tally_.corrupt;
          problem(std::string("agent: ") + table + "[" + std::string(key) + "] = " + json::serialize(count) +
                  " (more than once)");
        }
        if (std::string_view(table) == "seen") ++handled;
      }
    }
    if (!final) return;
    tally_.messages_handled = handled;
    for (const std::string& key : acked_messages_) {
      if (count_in(state, "seen", key) != 1 || count_in(state, "fired", key) != 1) {
        ++tally_.lost;
        problem("agent: acknowledged message " + key + " handled " + std::to_string(count_in(state, "seen", key)) +
                " times, its timer fired " + std::to_string(count_in(state, "fired", key)) + " times");
      }
    }
    if (have_tools_ && file_exists(counter_file_)) {
      const int64_t calls = std::strtoll(read_file(counter_file_).c_str(), nullptr, 10);
      const json::value* tools = state.if_contains("tools");
      const int64_t journaled = tools ? tools->to_number<int64_t>() : 0;
      if (calls < journaled) problem("the tool counted fewer calls than handlers journaled");
      tally_.tool_repeats = calls - journaled;
    }
  }

  // ---- the workload (threads, while the daemon lives)

  void session_worker(int worker, uint64_t seed, const std::atomic<bool>& stop) {
    std::mt19937_64 rng(seed);
    std::unique_ptr<DaemonClient> client;
    try {
      client = std::make_unique<DaemonClient>(daemon_.socket_path());
    } catch (const std::exception&) {
      return;
    }
    const std::vector<std::string> words = {" the cat", " a dog ran", " once upon a time", " she said", " happy"};
    while (!stop) {
      std::vector<std::string> mine;
      {
        std::lock_guard lock(mu_);
        for (const auto& [name, o] : sessions_)
          if (name.starts_with("w" + std::to_string(worker) + "-") && !o.deleted) mine.push_back(name);
      }
      const int dice = std::uniform_int_distribution<int>(0, 99)(rng);
      std::string name = mine.empty() ? "" : mine[rng() % mine.size()];
      std::string method;
      json::object params;
      std::string created;  // the session this request makes, if any
      if (name.empty() || (dice < 8 && mine.size() < 6)) {
        method = "sessions/create";
        name.clear();  // a create touches no other session (it once cleared a picked one's in-flight mark)
        created = "w" + std::to_string(worker) + "-" + std::to_string(next_session_++);
        params = {{"name", created}};
      } else if (dice < 40) {
        method = "sessions/append";
        params = {{"session", name}, {"text", words[rng() % words.size()]}};
      } else if (dice < 60) {
        method = "sessions/generate";
        params = {{"session", name}, {"max_tokens", 4}, {"temperature", 0}};
      } else if (dice < 75) {
        method = "sessions/checkpoint";
        params = {{"session", name}};
      } else if (dice < 83) {
        method = "sessions/hibernate";
        params = {{"session", name}};
      } else if (dice < 87) {
        method = "sessions/wake";
        params = {{"session", name}};
      } else if (dice < 93 && mine.size() < 6) {
        method = "sessions/fork";
        created = "w" + std::to_string(worker) + "-" + std::to_string(next_session_++);
        params = {{"session", name}, {"name", created}};
      } else {
        method = "sessions/delete";
        params = {{"session", name}};
      }
      const std::string epoch = "e" + std::to_string(tally_.epochs) + " ";
      {
        std::lock_guard lock(mu_);
        if (!created.empty()) {
          SessionOracle& o = sessions_[created];
          o.in_flight = true;
          if (method == "sessions/fork") o.tokens = sessions_[name].tokens;
          o.note(epoch + method + (name.empty() ? "" : " of " + name) + " sent");
        }
        if (!name.empty()) {
          sessions_[name].in_flight = true;
          if (method == "sessions/delete") sessions_[name].delete_in_flight = true;
          sessions_[name].note(epoch + method + " sent");
        }
      }
      json::value result;
      try {
        result = client->call(method, params);
      } catch (const RpcCallError& e) {
        // Refused (busy, the context full, an injected error): nothing was acknowledged, but an
        // injected error may strike after the change was stored, so the request stays in
        // flight (uncertain) until the next acknowledgement or check.
        std::lock_guard lock(mu_);
        if (e.code() == runtime::rpc::internal_error) ++tally_.failpoint_errors_seen;
        for (const std::string& n : {name, created})
          if (!n.empty()) sessions_[n].note(epoch + method + " error " + std::to_string(e.code()));
        continue;
      } catch (const std::exception&) {
        std::lock_guard lock(mu_);
        for (const std::string& n : {name, created})
          if (!n.empty()) sessions_[n].note(epoch + method + " cut off");
        return;  // the daemon went away; this request stays in flight
      }
      std::lock_guard lock(mu_);
      ++tally_.acked;
      for (const std::string& n : {name, created})
        if (!n.empty()) sessions_[n].note(epoch + method + " ok");
      if (method == "sessions/delete") {
        sessions_[name].deleted = true;
        sessions_[name].in_flight = false;
        continue;
      }
      if (!created.empty()) {
        SessionOracle& o = sessions_[created];
        o.created = true;
        o.in_flight = false;
        o.length = static_cast<size_t>(result.at("tokens").to_number<int64_t>());
        if (!name.empty()) {  // a fork: it copied the source's whole history, which is now known
          sessions_[name].length = o.length;
          sessions_[name].in_flight = false;
        }
        continue;
      }
      SessionOracle& o = sessions_[name];
      o.in_flight = false;
      o.created = true;
      if (method == "sessions/append") o.length = static_cast<size_t>(result.at("tokens").to_number<int64_t>());
      if (method == "sessions/generate") {
        const json::value& tokens = result.at("tokens");
        o.length = static_cast<size_t>(tokens.at("prompt").to_number<int64_t>() + tokens.at("generated").to_number<int64_t>());
      }
      if (method == "sessions/checkpoint" || method == "sessions/hibernate") {
        const json::value& session = result.at("session");
        o.checkpointed_kv = session.at("kv_tokens").to_number<int64_t>();
        o.length = static_cast<size_t>(session.at("tokens").to_number<int64_t>());
      }
    }
  }

  void agent_worker(const std::atomic<bool>& stop) {
    std::unique_ptr<DaemonClient> client;
    try {
      client = std::make_unique<DaemonClient>(daemon_.socket_path());
    } catch (const std::exception&) {
      return;
    }
    while (!stop) {
      const std::string key = "m" + std::to_string(next_message_++);
      try {
        client->call("agents/send", {{"agent", "soak"}, {"text", key}});
      } catch (const RpcCallError&) {
        continue;  // an injected error after the store: may be handled, is not acknowledged
      } catch (const std::exception&) {
        return;
      }
      {
        std::lock_guard lock(mu_);
        acked_messages_.push_back(key);
        ++tally_.messages_acked;
      }
      // Keep the agent's queue short: it handles one message at a time, and a long backlog
      // would only measure its speed, not its durability.
      try {
        while (!stop && client->call("agents/get", {{"agent", "soak"}}).at("queued_messages").to_number<int64_t>() > 8)
          std::this_thread::sleep_for(milliseconds(20));
      } catch (const std::exception&) {
        return;
      }
    }
  }

 public:
  bool agent_spawned_ = false;

 private:
  DaemonProcess& daemon_;
  std::mt19937_64 rng_;
  const bool have_tools_;
  const std::string counter_file_;
  std::mutex mu_;
  std::map<std::string, SessionOracle> sessions_;
  std::vector<std::string> acked_messages_;
  std::atomic<int64_t> next_session_{0}, next_message_{0};
  Tally tally_;
};

}  // namespace

TEST_CASE("soak - random SIGKILLs and failpoint crashes under a mixed workload lose nothing acknowledged") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  const int64_t epochs = env_int("DEN_SOAK_EPOCHS", 12);
  const int64_t seconds = env_int("DEN_SOAK_SECONDS", 600);
  const uint64_t seed = static_cast<uint64_t>(env_int("DEN_SOAK_SEED", 1));
  const int64_t failpoint_percent = env_int("DEN_SOAK_FAILPOINT_PERCENT", 50);
  const int64_t hang_seconds = env_int("DEN_SOAK_HANG_SECONDS", 120);  // the watchdog's patience
  const bool have_tools = std::system("python3 -c pass >/dev/null 2>&1") == 0;

  TempDir dir;
  std::vector<std::string> args = {"-m", stories_model(), "--backend", test_daemon_backend(), "--threads", "1"};
  // DEN_SOAK_LOG_LEVEL=debug (scripts/soak's default) logs every answer to a session change, so
  // the log kept after a problem shows what the client was told about the session in question.
  if (const char* level = std::getenv("DEN_SOAK_LOG_LEVEL"); level != nullptr && *level != '\0') {
    args.insert(args.end(), {"--log-level", level});
  }
  const std::string counter = dir.file("tool-calls");
  if (have_tools) {
    write_file(dir.file("den.yaml"), "tools:\n  - name: counter\n    command: [\"python3\", \"" +
                                         repo_path("tests/fixtures/tools/misbehaving.py") + "\", \"counter\", \"" +
                                         counter + "\"]\n");
    args.insert(args.end(), {"--config", dir.file("den.yaml")});
  }
  DaemonProcess daemon(args);
  Soak soak(daemon, seed, have_tools, counter);
  soak.spawn_agent();
  soak.agent_spawned_ = true;

  std::mt19937_64 rng(seed * 7919 + 1);
  const auto& points = memory::known_failpoints();
  const auto start = Clock::now();
  // A daemon that stops answering would block the harness forever: after 120 s (by default)
  // without a new epoch the watchdog says so, reports what it can and kills the daemon, so that
  // the waiting call fails and the test ends.
  std::atomic<int64_t> epoch_started_ms{0};
  std::atomic<bool> finished{false};
  const auto now_ms = [] {
    return std::chrono::duration_cast<milliseconds>(Clock::now().time_since_epoch()).count();
  };
  epoch_started_ms = now_ms();
  std::thread watchdog([&] {
    while (!finished) {
      std::this_thread::sleep_for(milliseconds(200));
      if (now_ms() - epoch_started_ms.load() < hang_seconds * 1000) continue;
      std::printf("soak: HANG: the daemon (pid %d) answered nothing for %lld s; killing it\n", static_cast<int>(daemon.pid()),
                  static_cast<long long>(hang_seconds));
      report_hang(daemon);
      std::fflush(stdout);
      if (daemon.pid() > 0) ::kill(daemon.pid(), SIGKILL);
      epoch_started_ms = now_ms();
    }
  });
  struct JoinWatchdog {
    std::atomic<bool>& finished;
    std::thread& thread;
    ~JoinWatchdog() {
      finished = true;
      thread.join();
    }
  } join_watchdog{finished, watchdog};
  int64_t failpoint_epochs = 0;
  for (int64_t e = 0; e < epochs && Clock::now() - start < std::chrono::seconds(seconds); ++e) {
    epoch_started_ms = now_ms();
    std::string spec, point, armed;
    if (static_cast<int64_t>(rng() % 100) < failpoint_percent) {
      // In turn, so that every point is armed as often as the others.
      const memory::FailpointInfo& info = points[static_cast<size_t>(failpoint_epochs++) % points.size()];
      point = std::string(info.name);
      // Mostly crashes, some injected errors where an error can happen at all.
      // agents.start_run only crashes here: an injected error there fails the run by design
      // (the message is answered as failed, its timer never set), which this oracle counts as lost.
      const bool crash = rng() % 4 != 0 || !info.errors || info.name == "agents.start_run";
      spec = point + "=" + (crash ? "crash" : "error") + "@" + std::to_string(1 + rng() % 6);
      ++soak.tally().armed[point];
      armed = point;
      if (!crash) point.clear();  // an error does not end the daemon: the random kill does
    }
    soak.epoch(spec, point, armed);
  }
  // The last restart ran without failpoints: let the agent catch up, then the final check. The
  // drain gives up before the watchdog would fire, so that a message never handled is reported
  // as such (with the agent's runs and log), not as a daemon that stopped answering.
  epoch_started_ms = now_ms();
  soak.drain(std::chrono::seconds(std::max<int64_t>(30, hang_seconds - 30)));

  const Tally& t = soak.tally();
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  std::string per_point;
  for (const auto& info : points) {
    const std::string name(info.name);
    per_point += " " + name + "=" + std::to_string(t.armed.count(name) ? t.armed.at(name) : 0) + "/" +
                 std::to_string(t.fired.count(name) ? t.fired.at(name) : 0);
  }
  std::printf(
      "soak: seed %llu, %lld epochs in %.0f s: %lld kills (%lld by a failpoint crash), %lld requests acknowledged, "
      "%lld session checks, %lld resumes compared with a recompute, %lld agent messages acknowledged and %lld handled, "
      "%lld tool calls repeated after a kill mid-call; lost %lld, corrupt %lld\n"
      "soak: failpoints armed/fired:%s\n",
      static_cast<unsigned long long>(seed), static_cast<long long>(t.epochs), elapsed, static_cast<long long>(t.kills),
      static_cast<long long>(t.failpoint_crashes), static_cast<long long>(t.acked),
      static_cast<long long>(t.sessions_verified), static_cast<long long>(t.logits_compared),
      static_cast<long long>(t.messages_acked), static_cast<long long>(t.messages_handled),
      static_cast<long long>(t.tool_repeats), static_cast<long long>(t.lost), static_cast<long long>(t.corrupt),
      per_point.c_str());
  std::fflush(stdout);
  for (const std::string& p : t.problems) MESSAGE(p);
  if (!t.problems.empty()) {
    const std::string kept = "/tmp/den-soak-seed" + std::to_string(seed) + "-daemon.log";
    write_file(kept, daemon.log());
    std::printf("soak: the daemon's log is kept in %s\n", kept.c_str());
  }
  CHECK(t.lost == 0);
  CHECK(t.corrupt == 0);
  CHECK(t.problems.empty());
  CHECK(t.kills >= t.epochs);
  CHECK(t.logits_compared > 0);
  CHECK(t.messages_acked > 0);
}

}  // namespace den::test
