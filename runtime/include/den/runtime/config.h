// The daemon's configuration: defaults, the YAML file (`den serve --config den.yaml`) and the
// command-line overrides. Every key, its default and unit is documented in docs/CONFIG.md.
// Unknown keys and bad values are errors naming the file, line, key and what was expected.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace den::runtime {

// A configuration file Den refuses. what() reads like
//   "den.yaml:12: kv.hbm: expected a size like 8GiB or 512MiB, got '8 gigs'".
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class KvPolicy { tiered, hbm_only, recompute };
std::string_view kv_policy_name(KvPolicy policy);

enum class LogLevel { debug, info, warn, error };
std::string_view log_level_name(LogLevel level);

// A stdio MCP server the daemon spawns for agents' tools (used by issue #6).
struct ToolServerConfig {
  std::string name;                  // unique; tools are called as "<name>.<tool>"
  std::vector<std::string> command;  // argv, command[0] looked up in PATH
  std::vector<std::pair<std::string, std::string>> env;  // extra environment
};

struct KvConfig {
  int32_t block_tokens = 16;
  // Pool sizes in bytes; 0 means "choose from the hardware" (see docs/CONFIG.md): the fast
  // pool (HBM on cuda, host memory on cpu), the pinned DRAM tier, and the SSD tier's quota.
  int64_t hbm_bytes = 0;
  int64_t dram_bytes = 0;
  int64_t ssd_bytes = 0;
  KvPolicy policy = KvPolicy::tiered;
  bool cost_model = true;
  bool layerwise_wake = true;
};

struct LimitsConfig {
  int64_t line_bytes = 4 << 20;       // longest request line
  int32_t json_depth = 64;            // deepest nesting of arrays/objects in a request
  int32_t connections = 256;          // open client connections
  int32_t sessions = 10000;           // sessions in the store
  double request_seconds = 30;        // a started line must be complete within this
  int64_t client_buffer_bytes = 16 << 20;  // unread output a client may leave before it is dropped
  // Error answers (malformed or oversized lines, unknown methods, bad params...) one connection
  // may cause in a second; past it, the connection is not read again until that second is over
  // (0: no limit). A well-behaved client never comes near it; a flood of garbage is slowed
  // down to it, so that it cannot take the machine from the clients that behave.
  int64_t errors_per_second = 10000;
  double tool_seconds = 30;           // an agent's tool call fails with a timeout after this
};

struct SchedulerConfig {
  int32_t max_batch = 64;             // sequences per engine step
  int32_t step_tokens = 512;          // tokens per engine step (decode tokens + prefill chunks)
  int32_t prefill_chunk = 256;        // longest prefill piece of one sequence in one step
  int32_t lease_ahead = 512;          // fast-pool room taken for a turn's output when it is admitted
};

struct DaemonConfig {
  std::string source = "(defaults)";  // the file it came from, for messages
  std::string model;                  // GGUF path; "" = the fetched default model
  std::string backend = "auto";       // cpu | cuda | auto (cuda when a device is usable)
  int32_t device = 0;
  int32_t threads = 0;                // CPU backend threads; 0 = one per hardware thread
  int32_t context = 0;                // max context per session; 0 = the model's
  std::string socket;                 // "" = the default search order (paths.h)
  std::string state_dir;              // "" = $XDG_STATE_HOME/den
  LogLevel log_level = LogLevel::info;
  KvConfig kv;
  LimitsConfig limits;
  SchedulerConfig scheduler;
  std::optional<std::string> metrics_listen;  // "127.0.0.1:9464"; loopback addresses only
  std::vector<ToolServerConfig> tools;
  // Where MCP servers may dial in: "" = next to the socket (tools_socket_path below), "off" =
  // nowhere, else a path.
  std::string tool_socket;
};

// The dial-in socket for `config` whose main socket is `socket`: tools.sock beside den.sock,
// <stem>-tools.sock beside any other name; "" when config.tool_socket is "off".
std::string tools_socket_path(const DaemonConfig& config, const std::string& socket);

// Reads a YAML file over the defaults. Throws ConfigError (file, line, key, expectation).
DaemonConfig load_config(const std::string& path);
// Parses YAML text; `source` names it in messages.
DaemonConfig parse_config(std::string_view yaml_text, const std::string& source);

// SIGHUP: the keys that differ between the running and the reloaded configuration and only
// take effect after a restart (model, backend, device, threads, context, socket, state_dir, kv.*,
// metrics.listen, tools, tool_socket), as dotted names. log_level, limits.* and scheduler.* change live.
std::vector<std::string> restart_required_changes(const DaemonConfig& running, const DaemonConfig& reloaded);

// "8GiB", "512MiB", "1.5GB", "4096" (bytes), "0"; binary (KiB..TiB) and decimal (kB..TB)
// units, case-sensitive as written here. nullopt when malformed or negative.
std::optional<int64_t> parse_size(std::string_view text);
// 8589934592 -> "8GiB", 1536 -> "1.5KiB".
std::string format_size(int64_t bytes);

}  // namespace den::runtime
