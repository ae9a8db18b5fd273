// `den bench agents`: a synthetic agent population (multi-turn conversations, tool waits,
// timers, a shared system prompt) against Den under several KV policies, to show what the
// tiered hierarchy buys against recomputing and against a fast pool that drops what it evicts.
// Either it drives a running daemon (--socket), or for each policy it starts its own `den serve`
// and runs the identical seeded workload against it. Prints one row per policy and the ratios
// the issue sets bars for; --out writes results.json (scripts/plot-bench-agents plots it).
// docs/BENCHMARKS.md defines every option and metric.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "bench_agents.h"
#include "client_output.h"
#include "commands.h"
#include "den/runtime/client.h"
#include "den/runtime/paths.h"

namespace den::runtime::cli {
namespace {

namespace json = boost::json;
using namespace bench_agents;

struct AgentsOptions {
  std::string socket;
  std::string label = "daemon";
  std::vector<std::string> policies;
  DaemonSetup daemon;
  std::string state_root;
  std::string out;
  WorkloadOptions workload;
  DriveOptions drive;
};

struct Quantiles {
  double p50 = 0, p90 = 0, p99 = 0, mean = 0;
  size_t count = 0;
};

// Nearest-rank quantiles.
Quantiles quantiles(std::vector<double> values) {
  Quantiles q;
  q.count = values.size();
  if (values.empty()) return q;
  std::sort(values.begin(), values.end());
  auto at = [&](double p) {
    const auto rank = static_cast<size_t>(std::ceil(p * static_cast<double>(values.size())));
    return values[std::clamp<size_t>(rank, 1, values.size()) - 1];
  };
  q.p50 = at(0.50);
  q.p90 = at(0.90);
  q.p99 = at(0.99);
  q.mean = std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(values.size());
  return q;
}

json::object to_json(const Quantiles& q) {
  return {{"p50", q.p50}, {"p90", q.p90}, {"p99", q.p99}, {"mean", q.mean}, {"count", q.count}};
}

bool completed(const TurnRecord& r) {
  return r.finish == "length" || r.finish == "end_of_generation" || r.finish == "stop_string" ||
         r.finish == "context_full";
}

// One policy's figures; docs/BENCHMARKS.md says how each is computed.
struct Summary {
  std::string policy;
  int64_t completed = 0, cancelled = 0, failed = 0, not_started = 0, restarted = 0;
  double wall_s = 0, turns_per_s = 0;
  Quantiles ttft, daemon_ttft, tpot, daemon_tpot;
  int64_t tokens_generated = 0, prompt_tokens = 0, recomputed_client = 0;
  double busy_s = 0, busy_ms_per_turn = 0;
  int64_t computed = 0, recomputed = 0, loaded = 0, prefix_hits = 0, dropped = 0, evicted = 0;
  int64_t dram_to_fast = 0, fast_to_dram = 0, ssd_read = 0, ssd_written = 0;
  double hit_fast = 0, hit_dram = 0, hit_ssd = 0, hit_prefix = 0, hit_computed = 0;
  int64_t peak_fast = 0, peak_dram = 0, peak_ssd = 0, fast_capacity = 0, dram_capacity = 0;
  bool stuck = false;  // the daemon stopped stepping: its counters are missing
};

Summary summarize(const std::string& policy, const RunOutcome& run) {
  Summary s;
  s.policy = policy;
  std::vector<double> ttft, daemon_ttft, tpot, daemon_tpot;
  int64_t decode_fed = 0;  // generated tokens whose KV was computed by decode steps
  for (const TurnRecord& r : run.turns) {
    if (r.finish == "error") {
      ++s.failed;
      continue;
    }
    s.tokens_generated += r.generated;
    s.prompt_tokens += r.prompt;
    s.recomputed_client += std::max(0, r.previous_kv - r.reused);
    decode_fed += std::max(0, r.generated - 1);
    if (!completed(r)) {
      ++s.cancelled;
      continue;
    }
    ++s.completed;
    ttft.push_back(r.ttft_ms);
    daemon_ttft.push_back(r.daemon_ttft_ms);
    if (r.generated > 1) {
      tpot.push_back(r.tpot_ms);
      daemon_tpot.push_back(r.decode_ms / (r.generated - 1));
    }
  }
  s.stuck = run.stuck;
  s.not_started = run.turns_not_started;
  s.restarted = run.conversations_restarted;
  s.wall_s = run.wall_s;
  s.turns_per_s = run.wall_s > 0 ? static_cast<double>(s.completed) / run.wall_s : 0;
  s.ttft = quantiles(ttft);
  s.daemon_ttft = quantiles(daemon_ttft);
  s.tpot = quantiles(tpot);
  s.daemon_tpot = quantiles(daemon_tpot);

  for (const OccupancySample& o : run.occupancy) {
    s.peak_fast = std::max(s.peak_fast, o.fast_bytes);
    s.peak_dram = std::max(s.peak_dram, o.dram_bytes);
    s.peak_ssd = std::max(s.peak_ssd, o.ssd_bytes);
  }
  if (run.stuck) return s;  // the daemon's counters are missing
  const json::object& a = run.stats_after;
  const json::object& b = run.stats_before;
  auto delta = [&](std::initializer_list<std::string_view> path) { return int_at(a, path) - int_at(b, path); };
  s.busy_s = number_at(a, {"engine", "busy_s"}) - number_at(b, {"engine", "busy_s"});
  s.busy_ms_per_turn = s.completed > 0 ? 1e3 * s.busy_s / static_cast<double>(s.completed) : 0;
  s.computed = delta({"memory", "tokens_computed"});
  s.recomputed = delta({"memory", "tokens_recomputed"});
  s.loaded = delta({"memory", "tokens_loaded"});
  s.prefix_hits = delta({"memory", "prefix_hit_tokens"});
  s.dropped = delta({"memory", "kv_tokens_dropped"});
  s.evicted = delta({"memory", "blocks_evicted"});
  s.dram_to_fast = delta({"memory", "bytes_moved", "dram_to_fast"});
  s.fast_to_dram = delta({"memory", "bytes_moved", "fast_to_dram"});
  s.ssd_read = delta({"memory", "bytes_moved", "ssd_read"});
  s.ssd_written = delta({"memory", "bytes_moved", "ssd_written"});
  s.fast_capacity = int_at(a, {"memory", "fast", "capacity_bytes"});
  s.dram_capacity = int_at(a, {"memory", "dram", "capacity_bytes"});

  // Where the prompts' KV came from. Computed for the prompts: all KV computed, less what
  // decode steps computed for generated tokens; SSD: the tokens the SSD reads carried; DRAM:
  // the other loaded tokens; fast: what is left (KV that was resident already).
  const int64_t bytes_per_token = std::max<int64_t>(1, int_at(run.model, {"kv_bytes_per_token"}));
  if (s.prompt_tokens > 0) {
    const auto total = static_cast<double>(s.prompt_tokens);
    const int64_t prompt_computed = std::max<int64_t>(0, s.computed + s.recomputed - decode_fed);
    const int64_t from_ssd = std::min(s.loaded, s.ssd_read / bytes_per_token);
    const int64_t from_dram = s.loaded - from_ssd;
    const int64_t resident = std::max<int64_t>(0, s.prompt_tokens - prompt_computed - s.loaded - s.prefix_hits);
    s.hit_fast = static_cast<double>(resident) / total;
    s.hit_dram = static_cast<double>(from_dram) / total;
    s.hit_ssd = static_cast<double>(from_ssd) / total;
    s.hit_prefix = static_cast<double>(s.prefix_hits) / total;
    s.hit_computed = std::min(1.0, static_cast<double>(prompt_computed) / total);
  }
  return s;
}

json::object summary_json(const Summary& s) {
  return {{"daemon_stuck", s.stuck},
          {"turns_completed", s.completed},
          {"turns_cancelled", s.cancelled},
          {"turns_failed", s.failed},
          {"turns_not_started", s.not_started},
          {"conversations_restarted", s.restarted},
          {"wall_s", s.wall_s},
          {"turns_per_s", s.turns_per_s},
          {"ttft_ms", to_json(s.ttft)},
          {"daemon_ttft_ms", to_json(s.daemon_ttft)},
          {"tpot_ms", to_json(s.tpot)},
          {"daemon_tpot_ms", to_json(s.daemon_tpot)},
          {"tokens_generated", s.tokens_generated},
          {"prompt_tokens", s.prompt_tokens},
          {"engine_busy_s", s.busy_s},
          {"busy_ms_per_turn", s.busy_ms_per_turn},
          {"tokens",
           {{"computed", s.computed},
            {"recomputed", s.recomputed},
            {"loaded", s.loaded},
            {"prefix_hits", s.prefix_hits},
            {"dropped", s.dropped},
            {"recomputed_client", s.recomputed_client}}},
          {"blocks_evicted", s.evicted},
          {"bytes_moved",
           {{"dram_to_fast", s.dram_to_fast},
            {"fast_to_dram", s.fast_to_dram},
            {"ssd_read", s.ssd_read},
            {"ssd_written", s.ssd_written}}},
          {"hit_rate",
           {{"fast", s.hit_fast}, {"dram", s.hit_dram}, {"ssd", s.hit_ssd}, {"prefix", s.hit_prefix},
            {"computed", s.hit_computed}}},
          {"capacity_bytes", {{"fast", s.fast_capacity}, {"dram", s.dram_capacity}}},
          {"peak_bytes", {{"fast", s.peak_fast}, {"dram", s.peak_dram}, {"ssd", s.peak_ssd}}}};
}

json::object occupancy_json(const RunOutcome& run) {
  json::array samples;
  for (const OccupancySample& o : run.occupancy) {
    samples.push_back(json::array{o.t_s, o.fast_bytes, o.dram_bytes, o.ssd_bytes, o.sessions_fast, o.sessions_dram,
                                  o.sessions_ssd, o.sessions_none, o.tokens_generated, o.busy_s, o.waiting_for_memory});
  }
  return {{"fields", json::array{"t_s", "fast_bytes", "dram_bytes", "ssd_bytes", "sessions_fast", "sessions_dram",
                                 "sessions_ssd", "sessions_none", "tokens_generated", "busy_s", "waiting_for_memory"}},
          {"samples", std::move(samples)}};
}

json::object turns_json(const RunOutcome& run) {
  json::array records;
  for (const TurnRecord& r : run.turns) {
    records.push_back(json::array{r.agent, r.turn, r.conversation, r.start_s, r.appended, r.prompt, r.reused,
                                  r.previous_kv, r.generated, r.max_tokens, r.ttft_ms, r.tpot_ms, r.latency_ms,
                                  r.daemon_ttft_ms, r.queue_ms, r.wake_ms, r.prefill_ms, r.decode_ms, r.finish});
  }
  return {{"fields", json::array{"agent", "turn", "conversation", "start_s", "appended", "prompt", "reused",
                                 "previous_kv", "generated", "max_tokens", "ttft_ms", "tpot_ms", "latency_ms",
                                 "daemon_ttft_ms", "queue_ms", "wake_ms", "prefill_ms", "decode_ms", "finish"}},
          {"records", std::move(records)}};
}

void print_tables(const std::vector<Summary>& rows) {
  if (rows.empty()) return;
  std::printf("\n%-22s %6s %7s %9s %9s %9s %8s %8s %11s %11s %10s %10s %10s %10s\n", "policy", "turns", "turns/s",
              "TTFT p50", "p90", "p99 ms", "TPOT ms", "busy ms", "recomputed", "loaded", "dram>fast", "fast>dram",
              "ssd read", "ssd write");
  for (const Summary& s : rows) {
    std::printf("%-22s %6lld %7.2f %9.2f %9.2f %9.2f %8.2f %8.2f %11lld %11lld %10s %10s %10s %10s\n", s.policy.c_str(),
                static_cast<long long>(s.completed), s.turns_per_s, s.ttft.p50, s.ttft.p90, s.ttft.p99, s.tpot.p50,
                s.busy_ms_per_turn, static_cast<long long>(s.recomputed), static_cast<long long>(s.loaded),
                human_bytes(static_cast<double>(s.dram_to_fast)).c_str(),
                human_bytes(static_cast<double>(s.fast_to_dram)).c_str(), human_bytes(static_cast<double>(s.ssd_read)).c_str(),
                human_bytes(static_cast<double>(s.ssd_written)).c_str());
  }
  std::printf("\n%-22s %9s %7s %7s %7s %7s %8s %11s %11s %11s %6s %6s\n", "policy", "prompt/t", "fast", "dram", "ssd",
              "prefix", "computed", "peak fast", "peak dram", "peak ssd", "cut", "unrun");
  for (const Summary& s : rows) {
    const double per_turn = s.completed + s.cancelled > 0
                                ? static_cast<double>(s.prompt_tokens) / static_cast<double>(s.completed + s.cancelled)
                                : 0;
    std::printf("%-22s %9.0f %6.1f%% %6.1f%% %6.1f%% %6.1f%% %7.1f%% %11s %11s %11s %6lld %6lld\n", s.policy.c_str(),
                per_turn, 100 * s.hit_fast, 100 * s.hit_dram, 100 * s.hit_ssd, 100 * s.hit_prefix, 100 * s.hit_computed,
                human_bytes(static_cast<double>(s.peak_fast)).c_str(), human_bytes(static_cast<double>(s.peak_dram)).c_str(),
                human_bytes(static_cast<double>(s.peak_ssd)).c_str(), static_cast<long long>(s.cancelled + s.failed),
                static_cast<long long>(s.not_started));
  }
  for (const Summary& s : rows) {
    if (s.stuck) {
      std::printf("%s: THE DAEMON GOT STUCK (cancelled generations never ended); its counters are missing above\n",
                  s.policy.c_str());
    }
  }
}

// The ratios the issue sets bars for (on an H100), where both policies ran.
json::object print_ratios(const std::vector<Summary>& rows) {
  auto find = [&](std::string_view name) -> const Summary* {
    for (const Summary& s : rows)
      if (s.policy == name) return &s;
    return nullptr;
  };
  const Summary* tiered = find("tiered");
  json::object ratios;
  std::string line;
  auto add = [&](const std::string& key, const char* text, double numerator, double denominator, const char* bar) {
    if (denominator <= 0) return;
    const double r = numerator / denominator;
    ratios[key] = r;
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s%s %.2fx (bar %s)", line.empty() ? "" : ", ", text, r, bar);
    line += buf;
  };
  if (tiered != nullptr) {
    if (const Summary* r = find("recompute")) {
      add("recompute_over_tiered_ttft_p50", "recompute/tiered TTFT p50", r->ttft.p50, tiered->ttft.p50, ">= 5x");
      add("tiered_over_recompute_turns_per_s", "tiered/recompute turns/s", tiered->turns_per_s, r->turns_per_s, ">= 1x");
    }
    if (const Summary* h = find("hbm-only")) {
      add("hbm_only_over_tiered_ttft_p50", "hbm-only/tiered TTFT p50", h->ttft.p50, tiered->ttft.p50, ">= 2x");
      add("tiered_over_hbm_only_turns_per_s", "tiered/hbm-only turns/s", tiered->turns_per_s, h->turns_per_s,
          ">= 1.5x with tool waits");
    }
    for (const char* variant : {"tiered-no-cost-model", "tiered-no-layerwise"}) {
      if (const Summary* v = find(variant)) {
        add(std::string(variant) + "_over_tiered_ttft_p50", (std::string(variant) + "/tiered TTFT p50").c_str(),
            v->ttft.p50, tiered->ttft.p50, ">= 1x");
      }
    }
  }
  if (line.empty()) line = "none (they compare tiered with recompute and hbm-only: run those in --policies)";
  std::printf("\nratios: %s\n", line.c_str());
  return ratios;
}

json::object workload_json(const WorkloadOptions& w) {
  return {{"seed", w.seed},
          {"agents", w.agents},
          {"turns", w.turns},
          {"system_tokens", w.system_tokens},
          {"shared_fraction", w.shared_fraction},
          {"first_tokens", w.first_tokens},
          {"user_tokens", w.user_tokens},
          {"response_tokens", w.response_tokens},
          {"tool_result_tokens", w.tool_result_tokens},
          {"think_seconds", w.think_seconds},
          {"tool_probability", w.tool_probability},
          {"tool_seconds", w.tool_seconds},
          {"timer_probability", w.timer_probability},
          {"timer_seconds", w.timer_seconds},
          {"time_scale", w.time_scale}};
}

// Checks what the command line cannot: sizes, policy names, options that belong to one mode.
void validate(const AgentsOptions& o, const std::vector<CLI::Option*>& managed_only) {
  if (!o.socket.empty()) {
    for (const CLI::Option* option : managed_only) {
      if (option->count() > 0) {
        throw std::runtime_error("bench agents: " + option->get_name() +
                                 " configures the daemons the bench starts itself; with --socket the running daemon's "
                                 "own configuration (one policy) is measured: leave out --socket to compare policies");
      }
    }
  }
  for (const std::string& name : o.policies) {
    if (!policy_spec(name)) {
      std::string known;
      for (const std::string& k : policy_names()) known += (known.empty() ? "" : ", ") + k;
      throw std::runtime_error("bench agents: unknown policy '" + name + "' in --policies; known: " + known);
    }
  }
  for (const auto& [flag, size] : {std::pair{"--hbm", o.daemon.hbm}, {"--dram", o.daemon.dram}, {"--ssd", o.daemon.ssd}}) {
    if (size != "auto" && !parse_size(size)) {
      throw std::runtime_error(std::string("bench agents: ") + flag + " expects a size like 8GiB or 512MiB, or auto; got '" +
                               size + "'");
    }
  }
  if (o.workload.tool_probability + o.workload.timer_probability > 1.0) {
    throw std::runtime_error("bench agents: --tool-probability + --timer-probability must be at most 1");
  }
}

void print_header(const AgentsOptions& o, const json::object& model, const Vocabulary& vocabulary) {
  const WorkloadOptions& w = o.workload;
  std::printf("bench agents: model %s (%s, %s backend): %lld parameters, %lld layers, context %lld, KV %s per token, "
              "blocks of %lld tokens\n",
              json::value_to<std::string>(model.at("name")).c_str(), json::value_to<std::string>(model.at("path")).c_str(),
              json::value_to<std::string>(model.at("backend")).c_str(),
              static_cast<long long>(int_at(model, {"parameters"})), static_cast<long long>(int_at(model, {"layers"})),
              static_cast<long long>(int_at(model, {"context_length"})),
              human_bytes(static_cast<double>(int_at(model, {"kv_bytes_per_token"}))).c_str(),
              static_cast<long long>(int_at(model, {"block_tokens"})));
  std::printf("workload: seed %llu, %d agents x up to %d turns, system prompt %d tokens (%.0f%% shared), medians: first "
              "turn %d, user %d, response %d, tool result %d tokens; think %.1f s, tool %.1f s (p %.2f), timer %.1f s "
              "(p %.2f); waits x%g; %.0f s per policy + %.0f s drain; tokens: %s\n",
              static_cast<unsigned long long>(w.seed), w.agents, w.turns, w.system_tokens, 100 * w.shared_fraction,
              w.first_tokens, w.user_tokens, w.response_tokens, w.tool_result_tokens, w.think_seconds, w.tool_seconds,
              w.tool_probability, w.timer_seconds, w.timer_probability, w.time_scale, o.drive.duration_s, o.drive.drain_s,
              vocabulary.source.c_str());
  std::fflush(stdout);
}

// The hot set: what every agent's history would hold at the end, against the fast pool.
json::object hot_set(const AgentsOptions& o, const std::vector<AgentPlan>& plans, const json::object& model,
                     int64_t fast_capacity) {
  const auto context = static_cast<int32_t>(int_at(model, {"context_length"}));
  int64_t tokens = 0;
  for (const AgentPlan& p : plans) tokens += planned_final_tokens(o.workload, p, context);
  const int64_t bytes = tokens * int_at(model, {"kv_bytes_per_token"});
  const double ratio = fast_capacity > 0 ? static_cast<double>(bytes) / static_cast<double>(fast_capacity) : 0;
  return {{"tokens", tokens}, {"bytes", bytes}, {"fast_pool_bytes", fast_capacity}, {"over_fast_pool", ratio}};
}

void run_agents(const AgentsOptions& given, const std::vector<CLI::Option*>& managed_only) {
  AgentsOptions o = given;
  validate(o, managed_only);
  const bool managed = o.socket.empty();
  if (managed && o.policies.empty()) o.policies = policy_names();
  o.daemon.state_root = o.state_root.empty() ? std::filesystem::temp_directory_path() : std::filesystem::path(o.state_root);
  o.daemon.connections = std::max(256, o.workload.agents + 16);
  if (!o.out.empty()) {
    std::filesystem::create_directories(o.out);
    o.daemon.log_dir = std::filesystem::absolute(o.out);
  }
  const std::vector<AgentPlan> plans = make_plans(o.workload);

  std::optional<Vocabulary> vocabulary;
  json::object model;
  json::array policy_results;
  json::object hot;
  std::vector<Summary> rows;
  auto run_one = [&](const std::string& name, const std::string& socket, const std::string& config_text,
                     std::function<void()> kill_daemon) {
    if (!vocabulary) {
      model = daemon_model(socket);
      vocabulary = workload_vocabulary(json::value_to<std::string>(model.at("path")),
                                       static_cast<int32_t>(int_at(model, {"vocab_size"})));
      print_header(o, model, *vocabulary);
    }
    DaemonClient probe(socket);
    const json::object stats = probe.call("daemon/stats").as_object();
    hot = hot_set(o, plans, model, int_at(stats, {"memory", "fast", "capacity_bytes"}));
    std::fprintf(stderr, "bench agents: %s: fast pool %s, DRAM %s; hot set if every turn ran %s = %.1fx the fast pool\n",
                 name.c_str(), human_bytes(static_cast<double>(int_at(stats, {"memory", "fast", "capacity_bytes"}))).c_str(),
                 human_bytes(static_cast<double>(int_at(stats, {"memory", "dram", "capacity_bytes"}))).c_str(),
                 human_bytes(static_cast<double>(int_at(hot, {"bytes"}))).c_str(), number_at(hot, {"over_fast_pool"}));
    DriveOptions drive = o.drive;
    drive.label = name;
    drive.kill_daemon = std::move(kill_daemon);
    const RunOutcome run = drive_agents(socket, o.workload, plans, *vocabulary, drive);
    Summary s = summarize(name, run);
    json::object result{{"policy", name}, {"metrics", summary_json(s)}};
    if (!config_text.empty()) result["daemon_config"] = config_text;
    result["model"] = run.model;
    result["wait_hints"] = json::object{{"demotions", run.demotions},
                                        {"demotions_refused", run.demotions_refused},
                                        {"prefetches", run.prefetches},
                                        {"prefetches_refused", run.prefetches_refused}};
    json::array errors;
    for (const std::string& e : run.errors) {
      errors.push_back(json::string(e));
      std::fprintf(stderr, "bench agents: %s: %s\n", name.c_str(), e.c_str());
    }
    result["errors"] = std::move(errors);
    result["occupancy"] = occupancy_json(run);
    result["turns"] = turns_json(run);
    policy_results.push_back(std::move(result));
    rows.push_back(std::move(s));
  };

  std::vector<std::string> failures;  // policies whose daemon failed; the others still run
  if (managed) {
    o.daemon.model = resolve_model_path(o.daemon.model);
    for (const std::string& name : o.policies) {
      const PolicySpec spec = *policy_spec(name);
      std::fprintf(stderr, "bench agents: %s: starting den serve\n", name.c_str());
      try {
        ManagedDaemon daemon(o.daemon, spec);
        std::fprintf(stderr, "bench agents: %s: den serve ready (log %s)\n", name.c_str(), daemon.log_path().c_str());
        run_one(name, daemon.socket_path(), daemon.config_text(), [&daemon] { daemon.kill(); });
        const int status = daemon.stop();
        if (status != 0) {
          std::fprintf(stderr, "bench agents: %s: den serve exited with status %d; its log ends with:\n%s", name.c_str(),
                       status, tail_of_file(daemon.log_path(), 10).c_str());
        }
      } catch (const std::exception& e) {
        std::string_view what = e.what();
        if (what.starts_with("bench agents: ")) what.remove_prefix(std::string_view("bench agents: ").size());
        std::fprintf(stderr, "bench agents: %s: %.*s\n", name.c_str(), static_cast<int>(what.size()), what.data());
        failures.push_back(name);
        policy_results.push_back(json::object{{"policy", name}, {"failed", what}});
      }
    }
  } else {
    run_one(o.label, socket_path(o.socket), "", {});
  }

  print_tables(rows);
  const json::object ratios = print_ratios(rows);
  std::fflush(stdout);
  auto report_failures = [&] {
    if (failures.empty()) return;
    std::string names;
    for (const std::string& f : failures) names += (names.empty() ? "" : ", ") + f;
    throw std::runtime_error("bench agents: " + std::to_string(failures.size()) + " of " +
                             std::to_string(o.policies.size()) + " policies failed (" + names + "): see above");
  };
  if (o.out.empty()) {
    report_failures();
    return;
  }

  json::object config{{"mode", managed ? "managed" : "socket"},
                      {"workload", workload_json(o.workload)},
                      {"duration_s", o.drive.duration_s},
                      {"drain_s", o.drive.drain_s},
                      {"sample_interval_s", o.drive.sample_interval_s},
                      {"demote_waits", o.drive.demote_waits}};
  if (managed) {
    config["daemon"] = json::object{{"model", o.daemon.model},       {"backend", o.daemon.backend},
                                    {"device", o.daemon.device},     {"threads", o.daemon.threads},
                                    {"context", o.daemon.context},   {"block_tokens", o.daemon.block_tokens},
                                    {"hbm", o.daemon.hbm},           {"dram", o.daemon.dram},
                                    {"ssd", o.daemon.ssd}};
  }
  json::object results{{"bench", "den bench agents"},
                       {"den_version", DEN_VERSION},
                       {"config", std::move(config)},
                       {"model", model},
                       {"vocabulary", vocabulary ? vocabulary->source : ""},
                       {"hot_set", hot},
                       {"policies", std::move(policy_results)},
                       {"ratios", ratios}};
  const std::filesystem::path path = std::filesystem::path(o.out) / "results.json";
  std::ofstream file(path);
  file << json::serialize(results) << "\n";
  if (!file) throw std::runtime_error("bench agents: cannot write " + path.string());
  std::fprintf(stderr, "bench agents: wrote %s (plots: scripts/plot-bench-agents %s)\n", path.c_str(), o.out.c_str());
  report_failures();
}

}  // namespace

void add_bench_agents_command(CLI::App& bench) {
  auto o = std::make_shared<AgentsOptions>();
  WorkloadOptions& w = o->workload;
  CLI::App* cmd = bench.add_subcommand("agents", "An agent population under each KV policy: TTFT, throughput, KV traffic");
  cmd->add_option("--socket", o->socket, "Drive this running daemon (one policy: its own) instead of starting daemons");
  cmd->add_option("--label", o->label, "With --socket: the name of its row")->capture_default_str();
  std::vector<CLI::Option*> managed_only;
  std::string all;
  for (const std::string& k : policy_names()) all += (all.empty() ? "" : ",") + k;
  managed_only.push_back(cmd->add_option("--policies", o->policies, "Policies to compare, comma-separated (default: " + all + ")")
                             ->delimiter(','));
  managed_only.push_back(cmd->add_option("-m,--model", o->daemon.model, "GGUF model (default: the fetched default model)"));
  managed_only.push_back(cmd->add_option("--backend", o->daemon.backend, "Backend of the daemons")
                             ->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str());
  managed_only.push_back(cmd->add_option("--device", o->daemon.device, "CUDA device")->capture_default_str());
  managed_only.push_back(cmd->add_option("-t,--threads", o->daemon.threads, "CPU backend threads (0: one per hardware thread)")
                             ->check(CLI::Range(0, 1024))->capture_default_str());
  managed_only.push_back(cmd->add_option("--ctx", o->daemon.context, "Context per session (0: the model's)")
                             ->check(CLI::Range(0, 1 << 24))->capture_default_str());
  managed_only.push_back(cmd->add_option("--hbm", o->daemon.hbm, "kv.hbm: the fast pool (size or auto)")->capture_default_str());
  managed_only.push_back(cmd->add_option("--dram", o->daemon.dram, "kv.dram: the DRAM tier (size or auto; auto is 0 on cpu)")
                             ->capture_default_str());
  managed_only.push_back(cmd->add_option("--ssd", o->daemon.ssd, "kv.ssd: the SSD tier's quota (size or auto)")->capture_default_str());
  managed_only.push_back(cmd->add_option("--block-tokens", o->daemon.block_tokens, "kv.block_tokens")
                             ->check(CLI::Range(1, 4096))->capture_default_str());
  managed_only.push_back(cmd->add_option("--state-root", o->state_root, "Where each daemon's temporary socket and state "
                                                                        "directory go (default: the system temp dir)"));
  managed_only.push_back(cmd->add_option("--start-timeout", o->daemon.start_timeout_s, "Seconds a daemon may take to start")
                             ->check(CLI::Range(1.0, 3600.0))->capture_default_str());

  cmd->add_option("--seed", w.seed, "Seed of the workload")->capture_default_str();
  cmd->add_option("--agents", w.agents, "Agents (one connection and thread each)")->check(CLI::Range(1, 1000))
      ->capture_default_str();
  cmd->add_option("--turns", w.turns, "Most turns per agent")->check(CLI::Range(1, 100000))->capture_default_str();
  cmd->add_option("--system-tokens", w.system_tokens, "System prompt length")->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--shared-fraction", w.shared_fraction, "Fraction of agents sharing one system prompt")
      ->check(CLI::Range(0.0, 1.0))->capture_default_str();
  cmd->add_option("--first-tokens", w.first_tokens, "Median context of a conversation's first turn")
      ->check(CLI::Range(0, 1 << 20))->capture_default_str();
  cmd->add_option("--user-tokens", w.user_tokens, "Median user message")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  cmd->add_option("--response-tokens", w.response_tokens, "Median max_tokens of a turn")->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--tool-result-tokens", w.tool_result_tokens, "Median tool result")->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--think-seconds", w.think_seconds, "Median pause before a user's next message")
      ->check(CLI::Range(0.0, 1e6))->capture_default_str();
  cmd->add_option("--tool-probability", w.tool_probability, "Probability that a turn ends in a tool call")
      ->check(CLI::Range(0.0, 1.0))->capture_default_str();
  cmd->add_option("--tool-seconds", w.tool_seconds, "Median tool wait")->check(CLI::Range(0.0, 1e6))->capture_default_str();
  cmd->add_option("--timer-probability", w.timer_probability, "Probability that an agent then idles until a timer")
      ->check(CLI::Range(0.0, 1.0))->capture_default_str();
  cmd->add_option("--timer-seconds", w.timer_seconds, "Median timer delay")->check(CLI::Range(0.0, 1e7))
      ->capture_default_str();
  cmd->add_option("--time-scale", w.time_scale, "Multiplies every wait (think, tool, timer, start)")
      ->check(CLI::Range(0.0, 100.0))->capture_default_str();
  cmd->add_option("--duration", o->drive.duration_s, "Seconds per policy; no turn starts after it")
      ->check(CLI::Range(1.0, 1e6))->capture_default_str();
  cmd->add_option("--drain", o->drive.drain_s, "Seconds turns under way may take to finish after --duration, "
                                               "then they are cancelled")
      ->check(CLI::Range(0.0, 1e6))->capture_default_str();
  cmd->add_option("--sample-interval", o->drive.sample_interval_s, "Seconds between daemon/stats samples")
      ->check(CLI::Range(0.05, 3600.0))->capture_default_str();
  cmd->add_flag("!--no-demote-waits", o->drive.demote_waits,
                "Do not demote sessions to DRAM during tool waits and timers (the agent runtime does)");
  cmd->add_option("--out", o->out, "Write results.json (and the daemons' logs) into this directory");
  cmd->callback([o, managed_only] { run_agents(*o, managed_only); });
}

}  // namespace den::runtime::cli
