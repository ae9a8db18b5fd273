// `den bench agents`, shared by its parts: the seeded workload (bench_agents_workload.cpp), the
// `den serve` child each policy runs in (bench_agents_daemon.cpp), the agent population that
// drives a daemon through its socket (bench_agents_driver.cpp) and the command with its report
// (bench_agents.cpp). Private to the CLI; docs/BENCHMARKS.md describes what it measures.
#pragma once

#include <sys/types.h>

#include <boost/json.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "den/runtime/config.h"

namespace den::runtime::cli::bench_agents {

// --- the workload ---------------------------------------------------------------------------

// Every length and wait is drawn log-normally around its median (the sigmas are fixed in
// bench_agents_workload.cpp) and clipped to [median / 8, median x 8]: most turns short, a few
// long. Waits are in seconds before --time-scale.
struct WorkloadOptions {
  uint64_t seed = 1;
  int32_t agents = 16;
  int32_t turns = 20;                // most turns one agent runs
  int32_t system_tokens = 512;       // each conversation starts with a system prompt this long
  double shared_fraction = 0.5;      // agents whose system prompt is the one shared prompt
  int32_t first_tokens = 256;        // median context of a conversation's first turn, after the system prompt
  int32_t user_tokens = 48;          // median user message
  int32_t response_tokens = 96;      // median max_tokens of a turn
  int32_t tool_result_tokens = 192;  // median tool result appended after a tool wait
  double think_seconds = 15;         // median pause before the next user message
  double tool_probability = 0.25;    // a turn ends in a tool call
  double tool_seconds = 20;          // median tool wait
  double timer_probability = 0.1;    // a turn ends with the agent idle until a timer wakes it
  double timer_seconds = 120;        // median timer delay
  double time_scale = 0.05;          // multiplies every wait
};

enum class AfterTurn { think, tool, timer };
std::string_view after_turn_name(AfterTurn after);

struct TurnPlan {
  int32_t first_tokens = 0;        // a new conversation's first-turn context (when this turn starts one)
  int32_t user_tokens = 0;         // appended before generating, after a think or timer wait
  int32_t tool_result_tokens = 0;  // appended instead, after this agent's previous turn called a tool
  int32_t max_tokens = 0;
  AfterTurn after = AfterTurn::think;
  double wait_s = 0;               // after this turn, before --time-scale
};

struct AgentPlan {
  int32_t index = 0;
  bool shared_system_prompt = false;
  double start_s = 0;  // before the first turn, before --time-scale
  std::vector<TurnPlan> turns;
};

// The same plans for the same options, whatever the policy, machine or timing.
std::vector<AgentPlan> make_plans(const WorkloadOptions& options);

// The token ids synthetic text is drawn from: the model's ordinary tokens (no control, unused or
// end-of-generation ones), and BOS to start a history when the model wants one.
struct Vocabulary {
  std::vector<int32_t> ordinary;
  std::optional<int32_t> bos;
  std::string source;  // how it was chosen, for the report
};
// From the GGUF's tokenizer; when the file cannot be read (a daemon elsewhere), the middle
// three quarters of [0, vocab_size), which leaves out the special tokens of the usual layouts.
Vocabulary workload_vocabulary(const std::string& model_path, int32_t vocab_size);

// Deterministic token ids: `n` tokens of stream (kind, agent, item) for the seed.
enum class TokenStream : uint64_t { shared_system = 1, own_system = 2, first_turn = 3, user = 4, tool_result = 5 };
std::vector<int32_t> synthetic_tokens(uint64_t seed, TokenStream kind, int32_t agent, int32_t item, int32_t n,
                                      const Vocabulary& vocabulary);
// A conversation's opening: BOS when wanted, the system prompt, then `first_tokens` of context.
std::vector<int32_t> conversation_start(const WorkloadOptions& options, const AgentPlan& agent, int32_t turn,
                                        int32_t first_tokens, const Vocabulary& vocabulary);

// Tokens an agent's history would reach if every turn ran to max_tokens (a new conversation
// whenever `context` would overflow): the hot set, for sizing the fast pool against it.
int64_t planned_final_tokens(const WorkloadOptions& options, const AgentPlan& agent, int32_t context);

// --- the daemon under test ------------------------------------------------------------------

struct PolicySpec {
  std::string name;  // recompute | hbm-only | tiered | tiered-no-cost-model | tiered-no-layerwise
  KvPolicy policy = KvPolicy::tiered;
  bool cost_model = true;
  bool layerwise_wake = true;
};
std::optional<PolicySpec> policy_spec(std::string_view name);
std::vector<std::string> policy_names();

struct DaemonSetup {
  std::string model;  // resolved path
  std::string backend = "cpu";
  int32_t device = 0;
  int32_t threads = 0;
  int32_t context = 0;
  int32_t block_tokens = 16;
  std::string hbm = "auto", dram = "auto", ssd = "auto";  // sizes as docs/CONFIG.md writes them
  int32_t connections = 256;
  std::filesystem::path state_root;  // where each daemon's temporary directory goes
  std::filesystem::path log_dir;     // daemon-<policy>.log; empty: inside the temporary directory
  double start_timeout_s = 300;
};

// One `den serve` (this executable) with a config written for one policy: its own socket and
// state directory in a fresh temporary directory, stderr to a log file. The constructor returns
// once it answers models/list and throws, with the log's last lines, when it does not.
class ManagedDaemon {
 public:
  ManagedDaemon(const DaemonSetup& setup, const PolicySpec& policy);
  ~ManagedDaemon();  // stop(), then the temporary directory goes (kept when the daemon failed)
  ManagedDaemon(const ManagedDaemon&) = delete;
  ManagedDaemon& operator=(const ManagedDaemon&) = delete;

  const std::string& socket_path() const { return socket_; }
  const std::string& config_text() const { return config_text_; }
  const std::filesystem::path& log_path() const { return log_; }
  // daemon/shutdown, then SIGTERM and SIGKILL if it lingers; returns the exit status (-1 when
  // it had to be killed). Idempotent.
  int stop();
  // SIGKILL now (a daemon that stopped making progress); its log is kept.
  void kill();

 private:
  [[noreturn]] void fail(const std::string& what);
  bool reap(bool block, int& status);

  std::filesystem::path dir_;
  std::filesystem::path log_;
  std::string socket_;
  std::string config_text_;
  pid_t pid_ = -1;
  int exit_status_ = -1;
  bool keep_dir_ = false;
};

// The last `lines` lines of a text file ("" when it cannot be read).
std::string tail_of_file(const std::filesystem::path& path, int lines);

// --- driving the agents ---------------------------------------------------------------------

struct DriveOptions {
  std::string label;            // names the run in progress lines
  double duration_s = 60;       // no turn starts after this
  double drain_s = 10;          // then turns under way may finish for this long before they are cancelled
  double sample_interval_s = 0.5;
  bool demote_waits = true;     // act as the agent runtime does during tool waits and timers
  double stuck_s = 30;          // cancelled turns that have not ended after this: the daemon is stuck
  // Called when the daemon is stuck, to end it (its connections then close and the agents
  // stop); when empty, the bench exits with an error instead.
  std::function<void()> kill_daemon;
};

struct TurnRecord {
  int32_t agent = 0, turn = 0, conversation = 0;
  double start_s = 0;        // since the run started
  int32_t appended = 0;      // tokens this turn appended
  int32_t prompt = 0;        // the daemon's tokens.prompt: the history before generating
  int32_t reused = 0;        // of which had KV somewhere (tokens.reused)
  int32_t previous_kv = 0;   // KV the session had computed when its previous turn ended
  int32_t generated = 0;
  int32_t max_tokens = 0;
  double ttft_ms = 0;        // client: request sent -> first stream notification
  double tpot_ms = 0;        // client: first notification -> result, per further token
  double latency_ms = 0;     // client: request sent -> result
  double daemon_ttft_ms = 0, queue_ms = 0, wake_ms = 0, prefill_ms = 0, decode_ms = 0;
  std::string finish;        // the finish_reason, or "error"
};

struct OccupancySample {
  double t_s = 0;
  int64_t fast_bytes = 0, dram_bytes = 0, ssd_bytes = 0;
  int64_t sessions_fast = 0, sessions_dram = 0, sessions_ssd = 0, sessions_none = 0;
  int64_t tokens_generated = 0;
  double busy_s = 0;
  int32_t waiting_for_memory = 0;
};

struct RunOutcome {
  boost::json::object model;         // the models/list entry
  boost::json::object stats_before;  // daemon/stats
  boost::json::object stats_after;
  std::vector<TurnRecord> turns;
  std::vector<OccupancySample> occupancy;
  double wall_s = 0;                 // first turn may start -> the last agent stopped
  int64_t turns_not_started = 0;     // planned turns left when the deadline came
  int64_t conversations_restarted = 0;  // the context would have overflowed
  int64_t demotions = 0, demotions_refused = 0;    // sessions/hibernate to DRAM during waits
  int64_t prefetches = 0, prefetches_refused = 0;  // sessions/wake before a timer fires
  bool stuck = false;                // generations did not end after being cancelled: stats_after is stats_before
  std::vector<std::string> errors;   // the first few
};

// The number at a path of object keys in a daemon answer (0 when a key is missing or the value
// is not a number): `int_at(stats, {"memory", "fast", "used_bytes"})`.
double number_at(const boost::json::object& root, std::initializer_list<std::string_view> path);
int64_t int_at(const boost::json::object& root, std::initializer_list<std::string_view> path);
inline double number_at(const boost::json::value& root, std::initializer_list<std::string_view> path) {
  const boost::json::object* o = root.if_object();
  return o != nullptr ? number_at(*o, path) : 0;
}
inline int64_t int_at(const boost::json::value& root, std::initializer_list<std::string_view> path) {
  const boost::json::object* o = root.if_object();
  return o != nullptr ? int_at(*o, path) : 0;
}

// models/list's first model (throws when the daemon lists none).
boost::json::object daemon_model(const std::string& socket);

RunOutcome drive_agents(const std::string& socket, const WorkloadOptions& workload, const std::vector<AgentPlan>& plans,
                        const Vocabulary& vocabulary, const DriveOptions& options);

}  // namespace den::runtime::cli::bench_agents
