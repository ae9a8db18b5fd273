// `den bench agents`: the agent population against one daemon. Each agent is a thread with its
// own connection that plays its plan: a conversation's opening or a user message (or a tool
// result after a tool call) appended as token ids and generated on with `stream: true`, then
// the wait the plan draws. A sampler thread polls daemon/stats for the occupancy timeline; the
// calling thread prints progress, stops new turns at the deadline, gives the turns under way
// the drain time and cancels what still runs.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>

#include "bench_agents.h"
#include "den/runtime/client.h"

namespace den::runtime::cli::bench_agents {
namespace {

namespace json = boost::json;
using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }
double ms_between(Clock::time_point a, Clock::time_point b) { return 1e3 * seconds_between(a, b); }

// Shared by the agents and the thread that runs them.
struct Run {
  Run(const std::string& socket, const WorkloadOptions& w, const Vocabulary& v, const DriveOptions& o,
      int32_t context, bool dram_tier)
      : socket(socket), workload(w), vocabulary(v), options(o), context(context), dram_tier(dram_tier) {}

  const std::string& socket;
  const WorkloadOptions& workload;
  const Vocabulary& vocabulary;
  const DriveOptions& options;
  const int32_t context;
  const bool dram_tier;
  Clock::time_point start = Clock::now();

  std::mutex mutex;
  std::condition_variable changed;
  bool stopping = false;  // the deadline passed: no new turns, waits end now
  std::vector<TurnRecord> turns;
  std::vector<std::string> created;  // every session made, to delete at the end
  std::vector<std::string> errors;
  int64_t turns_not_started = 0, conversations_restarted = 0;
  int64_t demotions = 0, demotions_refused = 0, prefetches = 0, prefetches_refused = 0;
  std::atomic<int64_t> turns_done{0};
  std::atomic<int32_t> generating{0};

  // Sleeps `seconds` (already scaled); false when the run stopped meanwhile.
  bool sleep_for(double seconds) {
    std::unique_lock lock(mutex);
    return !changed.wait_for(lock, std::chrono::duration<double>(std::max(0.0, seconds)), [&] { return stopping; });
  }
  bool stopped() {
    std::lock_guard lock(mutex);
    return stopping;
  }
  void note_error(const std::string& message) {
    std::lock_guard lock(mutex);
    if (errors.size() < 8) errors.push_back(message);
  }
};

// What the caller needs to cancel an agent's generation at the end of the drain.
struct AgentSlot {
  std::mutex mutex;
  std::string session;    // the session it generates on now ("" when not generating)
  bool finished = false;
};

class Agent {
 public:
  Agent(Run& run, const AgentPlan& plan, AgentSlot& slot) : run_(run), plan_(plan), slot_(slot) {}

  void operator()() {
    try {
      play();
    } catch (const std::exception& e) {
      run_.note_error("agent " + std::to_string(plan_.index) + ": " + e.what());
    }
    if (client_ && !session_.empty()) {
      try {
        client_->call("sessions/delete", {{"session", session_}});
      } catch (const std::exception&) {
        // Deleted at the end by the caller's connection instead.
      }
    }
    std::lock_guard lock(slot_.mutex);
    slot_.finished = true;
  }

 private:
  void play() {
    client_ = std::make_unique<DaemonClient>(run_.socket);
    const double scale = run_.workload.time_scale;
    if (!run_.sleep_for(plan_.start_s * scale)) {
      std::lock_guard lock(run_.mutex);
      run_.turns_not_started += static_cast<int64_t>(plan_.turns.size());
      return;
    }
    bool after_tool = false;
    for (size_t t = 0; t < plan_.turns.size(); ++t) {
      if (run_.stopped()) {
        std::lock_guard lock(run_.mutex);
        run_.turns_not_started += static_cast<int64_t>(plan_.turns.size() - t);
        return;
      }
      const TurnPlan& turn = plan_.turns[t];
      if (!run_turn(static_cast<int32_t>(t), turn, after_tool) || !wait_after(turn)) {
        std::lock_guard lock(run_.mutex);
        run_.turns_not_started += static_cast<int64_t>(plan_.turns.size() - t - 1);
        return;
      }
      after_tool = turn.after == AfterTurn::tool;
    }
  }

  // One turn; false when the agent must stop (its generation was cancelled at the end).
  bool run_turn(int32_t t, const TurnPlan& turn, bool after_tool) {
    // Room for the turn's answer; a conversation that would overflow the context ends and the
    // agent starts a new one (a person opening a new chat), so no history is ever cut.
    const int32_t max_tokens = std::min(turn.max_tokens, std::max(1, run_.context / 4));
    std::vector<int32_t> append;
    if (!session_.empty()) {
      const int32_t n = after_tool ? turn.tool_result_tokens : turn.user_tokens;
      if (length_ + n + max_tokens <= run_.context) {
        append = synthetic_tokens(run_.workload.seed, after_tool ? TokenStream::tool_result : TokenStream::user,
                                  plan_.index, t, n, run_.vocabulary);
      } else {
        client_->call("sessions/delete", {{"session", session_}});
        session_.clear();
        std::lock_guard lock(run_.mutex);
        ++run_.conversations_restarted;
      }
    }
    if (session_.empty()) {
      const json::value created = client_->call("sessions/create");
      session_ = std::string(created.at("id").as_string());
      {
        std::lock_guard lock(run_.mutex);
        run_.created.push_back(session_);
      }
      ++conversation_;
      length_ = 0;
      kv_after_ = 0;
      const int32_t opening = run_.workload.system_tokens + (run_.vocabulary.bos ? 1 : 0);
      const int32_t first = std::clamp(run_.context - max_tokens - opening, 0, turn.first_tokens);
      append = conversation_start(run_.workload, plan_, t, first, run_.vocabulary);
      append.resize(std::min<size_t>(append.size(), static_cast<size_t>(std::max(1, run_.context - max_tokens))));
    }

    TurnRecord r;
    r.agent = plan_.index;
    r.turn = t;
    r.conversation = conversation_;
    r.appended = static_cast<int32_t>(append.size());
    r.previous_kv = kv_after_;
    r.max_tokens = max_tokens;
    json::object params{{"session", session_},
                        {"tokens", json::value_from(append)},
                        {"max_tokens", max_tokens},
                        {"temperature", 0},
                        {"stream", true}};
    {
      std::lock_guard lock(slot_.mutex);
      slot_.session = session_;
    }
    ++run_.generating;
    const auto sent = Clock::now();
    r.start_s = seconds_between(run_.start, sent);
    std::optional<Clock::time_point> first_text;
    json::value result;
    try {
      result = client_->call("sessions/generate", params, [&](std::string_view method, const json::object&) {
        if (method == "sessions/stream" && !first_text) first_text = Clock::now();
      });
    } catch (const RpcCallError& e) {
      generation_ended();
      r.finish = "error";
      record(std::move(r));
      run_.note_error("agent " + std::to_string(plan_.index) + " turn " + std::to_string(t) + ": " + e.what());
      // Start over in a fresh conversation: the history may be in any state.
      try {
        client_->call("sessions/delete", {{"session", session_}});
      } catch (const RpcCallError&) {
        // Deleted at the end by the caller's connection instead.
      }
      session_.clear();
      return true;
    } catch (...) {
      generation_ended();
      throw;  // the daemon is gone: this agent stops
    }
    const auto done = Clock::now();
    generation_ended();
    r.latency_ms = ms_between(sent, done);
    r.finish = std::string(result.at("finish_reason").as_string());
    r.prompt = static_cast<int32_t>(int_at(result, {"tokens", "prompt"}));
    r.reused = static_cast<int32_t>(int_at(result, {"tokens", "reused"}));
    r.generated = static_cast<int32_t>(int_at(result, {"tokens", "generated"}));
    r.daemon_ttft_ms = number_at(result, {"timings", "ttft_ms"});
    r.queue_ms = number_at(result, {"timings", "queue_ms"});
    r.wake_ms = number_at(result, {"timings", "wake_ms"});
    r.prefill_ms = number_at(result, {"timings", "prefill_ms"});
    r.decode_ms = number_at(result, {"timings", "decode_ms"});
    // A first token that decodes to no text yet (part of a UTF-8 character) sends no
    // notification: the result is then the first sign of it.
    const Clock::time_point first = first_text.value_or(done);
    r.ttft_ms = ms_between(sent, first);
    r.tpot_ms = r.generated > 1 ? ms_between(first, done) / (r.generated - 1) : 0.0;
    length_ = r.prompt + r.generated;
    // The last generated token has no KV until the next turn feeds it.
    kv_after_ = r.generated > 0 ? length_ - 1 : r.reused;
    const bool cancelled = r.finish == "cancelled";
    record(std::move(r));
    if (!cancelled) ++run_.turns_done;
    return !cancelled;
  }

  // The plan's wait after a turn. With demote_waits and a DRAM tier, as the agent runtime does
  // (docs/ARCHITECTURE.md, "Memory while waiting"): a tool call still running after 1 s, or a
  // timer of 5 s or more, demotes the session's KV to DRAM; a timer's KV is brought back 1 s
  // before it fires. False when the run stopped meanwhile.
  bool wait_after(const TurnPlan& turn) {
    const double scale = run_.workload.time_scale;
    const bool hints = run_.options.demote_waits && run_.dram_tier;
    if (turn.after == AfterTurn::tool && hints && turn.wait_s > 1.0) {
      if (!run_.sleep_for(1.0 * scale)) return false;
      demote();
      return run_.sleep_for((turn.wait_s - 1.0) * scale);
    }
    if (turn.after == AfterTurn::timer && hints && turn.wait_s >= 5.0) {
      demote();
      if (!run_.sleep_for((turn.wait_s - 1.0) * scale)) return false;
      prefetch();
      return run_.sleep_for(1.0 * scale);
    }
    return run_.sleep_for(turn.wait_s * scale);
  }

  void generation_ended() {
    --run_.generating;
    std::lock_guard lock(slot_.mutex);
    slot_.session.clear();
  }

  void demote() {
    try {
      client_->call("sessions/hibernate", {{"session", session_}, {"tier", "dram"}});
      std::lock_guard lock(run_.mutex);
      ++run_.demotions;
    } catch (const RpcCallError&) {
      // E.g. no room in DRAM: the session stays where it is, as with the agent runtime.
      std::lock_guard lock(run_.mutex);
      ++run_.demotions_refused;
    }
  }

  void prefetch() {
    try {
      client_->call("sessions/wake", {{"session", session_}});
      std::lock_guard lock(run_.mutex);
      ++run_.prefetches;
    } catch (const RpcCallError&) {
      // No room in the fast pool now: the turn wakes it when it starts, as with the agent runtime.
      std::lock_guard lock(run_.mutex);
      ++run_.prefetches_refused;
    }
  }

  void record(TurnRecord r) {
    std::lock_guard lock(run_.mutex);
    run_.turns.push_back(std::move(r));
  }

  Run& run_;
  const AgentPlan& plan_;
  AgentSlot& slot_;
  std::unique_ptr<DaemonClient> client_;
  std::string session_;      // "" between conversations
  int32_t conversation_ = -1;
  int32_t length_ = 0;       // the history's tokens
  int32_t kv_after_ = 0;     // of which had KV when the last turn ended
};

OccupancySample sample_of(const json::value& stats, double t_s) {
  OccupancySample s;
  s.t_s = t_s;
  s.fast_bytes = int_at(stats, {"memory", "fast", "used_bytes"});
  s.dram_bytes = int_at(stats, {"memory", "dram", "used_bytes"});
  s.ssd_bytes = int_at(stats, {"memory", "ssd", "used_bytes"});
  s.sessions_fast = int_at(stats, {"sessions", "by_tier", "fast"});
  s.sessions_dram = int_at(stats, {"sessions", "by_tier", "dram"});
  s.sessions_ssd = int_at(stats, {"sessions", "by_tier", "ssd"});
  s.sessions_none = int_at(stats, {"sessions", "by_tier", "none"});
  s.tokens_generated = int_at(stats, {"engine", "tokens_generated"});
  s.busy_s = number_at(stats, {"engine", "busy_s"});
  s.waiting_for_memory = static_cast<int32_t>(int_at(stats, {"engine", "waiting_for_memory"}));
  return s;
}

}  // namespace

static const json::value* value_at(const json::object& root, std::initializer_list<std::string_view> path) {
  const json::value* at = nullptr;
  const json::object* o = &root;
  for (std::string_view key : path) {
    at = o != nullptr ? o->if_contains(key) : nullptr;
    if (at == nullptr) return nullptr;
    o = at->if_object();
  }
  return at;
}

double number_at(const json::object& root, std::initializer_list<std::string_view> path) {
  const json::value* at = value_at(root, path);
  if (at == nullptr) return 0;
  json::error_code ec;
  const auto d = at->to_number<double>(ec);
  return ec ? 0 : d;
}

int64_t int_at(const json::object& root, std::initializer_list<std::string_view> path) {
  const json::value* at = value_at(root, path);
  if (at == nullptr) return 0;
  json::error_code ec;
  const auto n = at->to_number<int64_t>(ec);
  if (!ec) return n;
  const auto d = at->to_number<double>(ec);  // a whole number written as a double
  return ec ? 0 : static_cast<int64_t>(d);
}

json::object daemon_model(const std::string& socket) {
  DaemonClient client(socket);
  const json::value listed = client.call("models/list");
  const json::array& models = listed.at("models").as_array();
  if (models.empty()) throw std::runtime_error("the daemon at " + socket + " lists no model");
  return models.front().as_object();
}

RunOutcome drive_agents(const std::string& socket, const WorkloadOptions& workload, const std::vector<AgentPlan>& plans,
                        const Vocabulary& vocabulary, const DriveOptions& options) {
  RunOutcome out;
  DaemonClient control(socket);
  out.model = daemon_model(socket);
  const auto context = static_cast<int32_t>(int_at(out.model, {"context_length"}));
  if (context < 8) throw std::runtime_error("bench agents: the daemon's context (" + std::to_string(context) + ") is too short");
  out.stats_before = control.call("daemon/stats").as_object();
  const bool dram_tier = int_at(out.stats_before, {"memory", "dram", "capacity_bytes"}) > 0;

  Run run(socket, workload, vocabulary, options, context, dram_tier);
  std::atomic<bool> sampling{true};
  std::thread sampler([&] {
    try {
      DaemonClient client(socket);
      while (sampling) {
        const json::value stats = client.call("daemon/stats");
        const OccupancySample s = sample_of(stats, seconds_between(run.start, Clock::now()));
        {
          std::lock_guard lock(run.mutex);
          out.occupancy.push_back(s);
        }
        const auto next = Clock::now() + std::chrono::duration<double>(options.sample_interval_s);
        while (sampling && Clock::now() < next) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    } catch (const std::exception& e) {
      run.note_error(std::string("stats sampler: ") + e.what());
    }
  });

  std::vector<std::unique_ptr<AgentSlot>> slots;
  std::vector<std::thread> agents;
  for (const AgentPlan& plan : plans) {
    slots.push_back(std::make_unique<AgentSlot>());
    agents.emplace_back(Agent(run, plan, *slots.back()));
  }
  auto all_finished = [&] {
    return std::all_of(slots.begin(), slots.end(), [](const auto& s) {
      std::lock_guard lock(s->mutex);
      return s->finished;
    });
  };
  auto progress = [&](const char* phase) {
    const double t = seconds_between(run.start, Clock::now());
    std::fprintf(stderr, "bench agents: %s: %5.1f s of %.0f s%s, %lld turns done, %d generating\n",
                 options.label.c_str(), t, options.duration_s, phase, static_cast<long long>(run.turns_done.load()),
                 run.generating.load());
  };

  // Until the deadline (or every agent ran out of turns), progress every 5 s.
  auto next_progress = run.start + std::chrono::seconds(5);
  const auto deadline = run.start + std::chrono::duration<double>(options.duration_s);
  while (Clock::now() < deadline && !all_finished()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (Clock::now() >= next_progress) {
      progress("");
      next_progress += std::chrono::seconds(5);
    }
  }
  {
    std::lock_guard lock(run.mutex);
    run.stopping = true;
  }
  run.changed.notify_all();
  // Turns under way may finish within the drain time; then they are cancelled.
  const auto drain_end = Clock::now() + std::chrono::duration<double>(options.drain_s);
  const auto stuck_at = drain_end + std::chrono::duration<double>(options.stuck_s);
  bool drained_announced = false;
  auto next_cancel = drain_end;
  while (!all_finished()) {
    if (Clock::now() >= stuck_at && !out.stuck) {
      // A cancellation lands within one engine step: the engine thread no longer steps.
      out.stuck = true;
      const auto waiting = std::count_if(slots.begin(), slots.end(), [](const auto& slot) {
        std::lock_guard lock(slot->mutex);
        return !slot->finished;
      });
      const std::string message = std::to_string(waiting) + " agents (" + std::to_string(run.generating.load()) +
                                  " of them generating) still wait on the daemon " +
                                  std::to_string(static_cast<int>(options.drain_s + options.stuck_s)) +
                                  " s after the deadline, their generations cancelled: it is stuck";
      run.note_error(message);
      if (!options.kill_daemon) {
        std::fprintf(stderr, "bench agents: giving up on the daemon at %s\n", socket.c_str());
        std::fflush(stdout);
        std::_Exit(1);  // the agents' threads wait on it forever and cannot be joined
      }
      options.kill_daemon();  // the agents' connections close and they stop
    }
    if (Clock::now() >= next_cancel && !out.stuck) {
      if (!drained_announced) progress(", drain over: cancelling");
      drained_announced = true;
      // Sent without waiting for the answers (a later call skips them), so that a daemon that
      // stopped answering cannot hold this loop; again every second, for a generate that was
      // not registered yet when its cancel arrived.
      for (const auto& slot : slots) {
        std::string session;
        {
          std::lock_guard lock(slot->mutex);
          session = slot->session;
        }
        if (session.empty()) continue;
        const json::object cancel{{"jsonrpc", "2.0"},
                                  {"id", 0},
                                  {"method", "sessions/cancel"},
                                  {"params", json::object{{"session", session}}}};
        try {
          control.send_raw(json::serialize(cancel) + "\n");
        } catch (const std::exception&) {
          // The daemon is gone: the agents find out themselves.
        }
      }
      next_cancel = Clock::now() + std::chrono::seconds(1);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  for (std::thread& a : agents) a.join();
  out.wall_s = seconds_between(run.start, Clock::now());
  sampling = false;
  sampler.join();
  progress(", done");

  if (out.stuck) {
    out.stats_after = out.stats_before;  // no deltas: the daemon is gone
  } else {
    out.stats_after = control.call("daemon/stats").as_object();
    // Agents delete their sessions as they stop; whatever one could not is deleted here, so a
    // shutdown has nothing left to checkpoint.
    const json::value listed = control.call("sessions/list");
    for (const json::value& s : listed.at("sessions").as_array()) {
      const std::string id(s.at("id").as_string());
      if (std::find(run.created.begin(), run.created.end(), id) == run.created.end()) continue;
      try {
        control.call("sessions/delete", {{"session", id}});
      } catch (const std::exception&) {
        // Gone meanwhile.
      }
    }
  }
  out.turns = std::move(run.turns);
  std::sort(out.turns.begin(), out.turns.end(),
            [](const TurnRecord& a, const TurnRecord& b) { return a.start_s < b.start_s; });
  out.turns_not_started = run.turns_not_started;
  out.conversations_restarted = run.conversations_restarted;
  out.demotions = run.demotions;
  out.demotions_refused = run.demotions_refused;
  out.prefetches = run.prefetches;
  out.prefetches_refused = run.prefetches_refused;
  out.errors = std::move(run.errors);
  return out;
}

}  // namespace den::runtime::cli::bench_agents
