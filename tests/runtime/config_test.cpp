// The daemon's configuration loader: defaults, every key, the error messages (file, line, key,
// expectation), sizes, the SIGHUP comparison, and the shipped examples/den.yaml.
#include "den/runtime/config.h"

#include <filesystem>

#include "test_support.h"

using den::runtime::ConfigError;
using den::runtime::DaemonConfig;
using den::runtime::format_size;
using den::runtime::KvPolicy;
using den::runtime::LogLevel;
using den::runtime::parse_config;
using den::runtime::parse_size;

namespace {

constexpr int64_t kKiB = int64_t{1} << 10;
constexpr int64_t kMiB = int64_t{1} << 20;
constexpr int64_t kGiB = int64_t{1} << 30;
constexpr int64_t kTiB = int64_t{1} << 40;

DaemonConfig parse(const std::string& yaml) { return parse_config(yaml, "den.yaml"); }

// The message parse_config throws for `yaml`, or "(accepted)".
std::string error_of(const std::string& yaml) {
  try {
    parse(yaml);
  } catch (const ConfigError& error) {
    return error.what();
  }
  return "(accepted)";
}

void check_same_as_defaults(const DaemonConfig& config) {
  const DaemonConfig defaults;
  CHECK(config.model == defaults.model);
  CHECK(config.backend == "auto");
  CHECK(config.device == 0);
  CHECK(config.threads == 0);
  CHECK(config.context == 0);
  CHECK(config.socket.empty());
  CHECK(config.state_dir.empty());
  CHECK(config.log_level == LogLevel::info);
  CHECK(config.kv.block_tokens == 16);
  CHECK(config.kv.hbm_bytes == 0);
  CHECK(config.kv.dram_bytes == 0);
  CHECK(config.kv.ssd_bytes == 0);
  CHECK(config.kv.policy == KvPolicy::tiered);
  CHECK(config.kv.cost_model);
  CHECK(config.kv.layerwise_wake);
  CHECK(config.limits.line_bytes == 4 * kMiB);
  CHECK(config.limits.json_depth == 64);
  CHECK(config.limits.connections == 256);
  CHECK(config.limits.sessions == 10000);
  CHECK(config.limits.request_seconds == 30);
  CHECK(config.limits.client_buffer_bytes == 16 * kMiB);
  CHECK(config.scheduler.max_batch == 64);
  CHECK(config.scheduler.step_tokens == 512);
  CHECK(config.scheduler.prefill_chunk == 256);
  CHECK(config.scheduler.lease_ahead == 512);
  CHECK_FALSE(config.metrics_listen.has_value());
  CHECK(config.tools.empty());
  CHECK(den::runtime::restart_required_changes(defaults, config).empty());
}

// fixture_path("") is <repo>/tests/fixtures/, so the repository root is two levels up.
std::filesystem::path repository_root() {
  std::filesystem::path fixtures = std::filesystem::path(den::test::fixture_path("")).lexically_normal();
  if (!fixtures.has_filename()) fixtures = fixtures.parent_path();  // drop the trailing '/'
  return fixtures.parent_path().parent_path();
}

}  // namespace

TEST_SUITE_BEGIN("config");

TEST_CASE("config - an empty file gives the defaults") {
  for (const char* text : {"", "\n", "# nothing here\n", "---\n", "~\n", "kv:\nlimits:\nscheduler:\nmetrics:\ntools:\n"}) {
    CAPTURE(text);
    const DaemonConfig config = parse(text);
    CHECK(config.source == "den.yaml");
    check_same_as_defaults(config);
  }
  den::test::TempDir dir;
  den::test::write_file(dir.file("empty.yaml"), "");
  const DaemonConfig loaded = den::runtime::load_config(dir.file("empty.yaml"));
  CHECK(loaded.source == dir.file("empty.yaml"));
  check_same_as_defaults(loaded);
}

TEST_CASE("config - every key is read") {
  const DaemonConfig config = parse(R"(
model: /models/smol.gguf
backend: cuda
device: 1
threads: 8
context: 4096
socket: /run/den/den.sock
state_dir: /var/lib/den
log_level: debug
kv:
  block_tokens: 32
  hbm: 8GiB
  dram: 64 GiB
  ssd: 1.5TB
  policy: hbm-only
  cost_model: off
  layerwise_wake: false
limits:
  line_bytes: 1KiB
  json_depth: 100000
  connections: 1
  sessions: 2
  request_seconds: 2.5
  client_buffer_bytes: 64KiB
scheduler:
  max_batch: 1024
  step_tokens: 65536
  prefill_chunk: 1
  lease_ahead: 0
metrics:
  listen: "[::1]:9464"
tools:
  - name: fs
    command: [mcp-fs, --root, /srv]
    env:
      A: "1"
      B: two words
  - name: web_search-2
    command: "  mcp-search   -v\tfast "
)");
  CHECK(config.model == "/models/smol.gguf");
  CHECK(config.backend == "cuda");
  CHECK(config.device == 1);
  CHECK(config.threads == 8);
  CHECK(config.context == 4096);
  CHECK(config.socket == "/run/den/den.sock");
  CHECK(config.state_dir == "/var/lib/den");
  CHECK(config.log_level == LogLevel::debug);
  CHECK(config.kv.block_tokens == 32);
  CHECK(config.kv.hbm_bytes == 8 * kGiB);
  CHECK(config.kv.dram_bytes == 64 * kGiB);
  CHECK(config.kv.ssd_bytes == 1'500'000'000'000);
  CHECK(config.kv.policy == KvPolicy::hbm_only);
  CHECK_FALSE(config.kv.cost_model);
  CHECK_FALSE(config.kv.layerwise_wake);
  CHECK(config.limits.line_bytes == kKiB);
  CHECK(config.limits.json_depth == 100000);
  CHECK(config.limits.connections == 1);
  CHECK(config.limits.sessions == 2);
  CHECK(config.limits.request_seconds == 2.5);
  CHECK(config.limits.client_buffer_bytes == 64 * kKiB);
  CHECK(config.scheduler.max_batch == 1024);
  CHECK(config.scheduler.step_tokens == 65536);
  CHECK(config.scheduler.prefill_chunk == 1);
  CHECK(config.scheduler.lease_ahead == 0);
  REQUIRE(config.metrics_listen.has_value());
  CHECK(*config.metrics_listen == "[::1]:9464");
  REQUIRE(config.tools.size() == 2);
  CHECK(config.tools[0].name == "fs");
  CHECK(config.tools[0].command == std::vector<std::string>{"mcp-fs", "--root", "/srv"});
  CHECK(config.tools[0].env == std::vector<std::pair<std::string, std::string>>{{"A", "1"}, {"B", "two words"}});
  CHECK(config.tools[1].name == "web_search-2");
  CHECK(config.tools[1].command == std::vector<std::string>{"mcp-search", "-v", "fast"});
  CHECK(config.tools[1].env.empty());
}

TEST_CASE("config - choices, switches and auto sizes") {
  CHECK(parse("backend: cpu").backend == "cpu");
  CHECK(parse("backend: auto").backend == "auto");
  CHECK(parse("log_level: warn").log_level == LogLevel::warn);
  CHECK(parse("log_level: error").log_level == LogLevel::error);
  CHECK(parse("kv: {policy: recompute}").kv.policy == KvPolicy::recompute);
  CHECK(parse("kv: {policy: tiered}").kv.policy == KvPolicy::tiered);
  for (const char* on : {"on", "true", "yes", "On", "TRUE", "\"on\""}) {
    CAPTURE(on);
    const DaemonConfig config = parse(std::string("kv:\n  cost_model: ") + on + "\n  layerwise_wake: " + on + "\n");
    CHECK(config.kv.cost_model);
    CHECK(config.kv.layerwise_wake);
  }
  for (const char* off : {"off", "false", "no", "Off", "NO"}) {
    CAPTURE(off);
    const DaemonConfig config = parse(std::string("kv:\n  cost_model: ") + off + "\n  layerwise_wake: " + off + "\n");
    CHECK_FALSE(config.kv.cost_model);
    CHECK_FALSE(config.kv.layerwise_wake);
  }
  const DaemonConfig automatic = parse("kv: {hbm: auto, dram: 0, ssd: auto}");
  CHECK(automatic.kv.hbm_bytes == 0);
  CHECK(automatic.kv.dram_bytes == 0);
  CHECK(automatic.kv.ssd_bytes == 0);
  CHECK(parse("kv: {ssd: 1073741824}").kv.ssd_bytes == kGiB);
  CHECK(parse("limits: {line_bytes: 1000000}").limits.line_bytes == 1000000);
  CHECK(parse("metrics: {listen: 'localhost:0'}").metrics_listen == "localhost:0");
  CHECK(parse("metrics:").metrics_listen == std::nullopt);
}

TEST_CASE("config - bad values name the file, line, key and expectation") {
  // The example of config.h, exactly.
  CHECK(error_of("model: x.gguf\n\nkv:\n  hbm: 8 gigs\n") ==
        "den.yaml:4: kv.hbm: expected a size like 8GiB or 512MiB, got '8 gigs'");
  CHECK(error_of("backend: gpu") == "den.yaml:1: backend: expected one of cpu, cuda, auto, got 'gpu' (did you mean 'cuda'?)");
  CHECK(error_of("backend: tpu") == "den.yaml:1: backend: expected one of cpu, cuda, auto, got 'tpu' (did you mean 'cpu'?)");
  CHECK(error_of("backend: metal") == "den.yaml:1: backend: expected one of cpu, cuda, auto, got 'metal'");
  CHECK(error_of("backend: cdua") == "den.yaml:1: backend: expected one of cpu, cuda, auto, got 'cdua' (did you mean 'cuda'?)");
  CHECK(error_of("\ndevice: -1") == "den.yaml:2: device: expected an integer >= 0, got '-1'");
  CHECK(error_of("threads: 1.5") == "den.yaml:1: threads: expected an integer >= 0, got '1.5'");
  CHECK(error_of("context: 3000000000") == "den.yaml:1: context: expected an integer >= 0, got '3000000000' (too large)");
  CHECK(error_of("context: 12k") == "den.yaml:1: context: expected an integer >= 0, got '12k'");
  CHECK(error_of("log_level: verbose") == "den.yaml:1: log_level: expected one of debug, info, warn, error, got 'verbose'");
  CHECK(error_of("kv:\n  block_tokens: 0") == "den.yaml:2: kv.block_tokens: expected an integer from 1 to 4096, got '0'");
  CHECK(error_of("kv:\n  block_tokens: 4097") == "den.yaml:2: kv.block_tokens: expected an integer from 1 to 4096, got '4097'");
  CHECK(error_of("kv:\n  dram: -1GiB") == "den.yaml:2: kv.dram: expected a size like 8GiB or 512MiB, got '-1GiB'");
  CHECK(error_of("kv:\n  ssd: 8gb") == "den.yaml:2: kv.ssd: expected a size like 8GiB or 512MiB, got '8gb'");
  CHECK(error_of("kv:\n  policy: hbm_only") ==
        "den.yaml:2: kv.policy: expected one of tiered, hbm-only, recompute, got 'hbm_only' (did you mean 'hbm-only'?)");
  CHECK(error_of("kv:\n  cost_model: maybe") == "den.yaml:2: kv.cost_model: expected on or off, got 'maybe'");
  CHECK(error_of("kv:\n  layerwise_wake: 1") == "den.yaml:2: kv.layerwise_wake: expected on or off, got '1'");
  CHECK(error_of("limits:\n  line_bytes: 512") == "den.yaml:2: limits.line_bytes: expected a size of at least 1KiB, got '512'");
  CHECK(error_of("limits:\n  line_bytes: auto") == "den.yaml:2: limits.line_bytes: expected a size like 8GiB or 512MiB, got 'auto'");
  CHECK(error_of("limits:\n  json_depth: 1") == "den.yaml:2: limits.json_depth: expected an integer from 2 to 100000, got '1'");
  CHECK(error_of("limits:\n  connections: 0") == "den.yaml:2: limits.connections: expected an integer >= 1, got '0'");
  CHECK(error_of("limits:\n  sessions: lots") == "den.yaml:2: limits.sessions: expected an integer >= 1, got 'lots'");
  CHECK(error_of("limits:\n  request_seconds: 0") == "den.yaml:2: limits.request_seconds: expected a number of seconds > 0, got '0'");
  CHECK(error_of("limits:\n  request_seconds: 30s") == "den.yaml:2: limits.request_seconds: expected a number of seconds > 0, got '30s'");
  CHECK(error_of("limits:\n  client_buffer_bytes: 32KiB") ==
        "den.yaml:2: limits.client_buffer_bytes: expected a size of at least 64KiB, got '32KiB'");
  CHECK(error_of("scheduler:\n  max_batch: 1025") == "den.yaml:2: scheduler.max_batch: expected an integer from 1 to 1024, got '1025'");
  CHECK(error_of("scheduler:\n  step_tokens: 0") == "den.yaml:2: scheduler.step_tokens: expected an integer from 1 to 65536, got '0'");
  CHECK(error_of("scheduler:\n  prefill_chunk: 65537") ==
        "den.yaml:2: scheduler.prefill_chunk: expected an integer from 1 to 65536, got '65537'");
  // An empty value is reported on its key's line, not the next one.
  CHECK(error_of("kv:\n  hbm:\n  dram: 1GiB\n") == "den.yaml:2: kv.hbm: expected a size like 8GiB or 512MiB, got nothing");
  CHECK(error_of("model:\nbackend: cpu\n") == "den.yaml:1: model: expected a string, got nothing");
}

TEST_CASE("config - the metrics address is host:port or [v6]:port") {
  for (const char* good : {"127.0.0.1:9464", "localhost:9464", "[::1]:0", "[fe80::1%lo]:65535", "my-host.local:80"}) {
    CAPTURE(good);
    CHECK(parse(std::string("metrics:\n  listen: '") + good + "'").metrics_listen == good);
  }
  for (const char* bad : {"9464", "127.0.0.1", "127.0.0.1:", ":9464", "127.0.0.1:65536", "::1:9464", "[::1]9464",
                          "[::1:9464", "[]:9464", "[localhost]:80", "host:80x", "a b:80", "host:999999"}) {
    CAPTURE(bad);
    CHECK(error_of(std::string("metrics:\n  listen: '") + bad + "'") ==
          std::string("den.yaml:2: metrics.listen: expected host:port or [v6]:port with a port from 0 to 65535, got '") + bad + "'");
  }
}

TEST_CASE("config - unknown keys are errors that suggest the nearest known key") {
  CHECK(error_of("kv:\n  block_tokens: 16\n  hbn: 8GiB\n") == "den.yaml:3: unknown key 'kv.hbn' (did you mean 'kv.hbm'?)");
  CHECK(error_of("treads: 4") == "den.yaml:1: unknown key 'treads' (did you mean 'threads'?)");
  CHECK(error_of("state-dir: /x") == "den.yaml:1: unknown key 'state-dir' (did you mean 'state_dir'?)");
  CHECK(error_of("limits:\n  linebytes: 1MiB") == "den.yaml:2: unknown key 'limits.linebytes' (did you mean 'limits.line_bytes'?)");
  CHECK(error_of("scheduler:\n  max_bach: 8") == "den.yaml:2: unknown key 'scheduler.max_bach' (did you mean 'scheduler.max_batch'?)");
  CHECK(error_of("metrics:\n  listn: x") == "den.yaml:2: unknown key 'metrics.listn' (did you mean 'metrics.listen'?)");
  CHECK(error_of("tools:\n  - name: a\n    comand: b\n") == "den.yaml:3: unknown key 'tools[0].comand' (did you mean 'tools[0].command'?)");
  // A key of another section, or a dotted name written flat.
  CHECK(error_of("hbm: 8GiB") == "den.yaml:1: unknown key 'hbm' (did you mean 'kv.hbm'?)");
  CHECK(error_of("kv:\n  max_batch: 8") == "den.yaml:2: unknown key 'kv.max_batch' (did you mean 'scheduler.max_batch'?)");
  CHECK(error_of("kv.hbm: 8GiB") == "den.yaml:1: unknown key 'kv.hbm' (write it nested: 'kv:' then 'hbm:' indented below)");
  // Nothing close: the known keys are listed.
  CHECK(error_of("scheduler:\n  zzz: 1") ==
        "den.yaml:2: unknown key 'scheduler.zzz' (known keys under scheduler: max_batch, step_tokens, prefill_chunk, lease_ahead)");
  const std::string top = error_of("\n\nfrobnicate: 1");
  CHECK(top.find("den.yaml:3: unknown key 'frobnicate' (known keys: model, backend,") == 0);
}

TEST_CASE("config - wrong node types and duplicate keys are errors") {
  CHECK(error_of("model: [a, b]") == "den.yaml:1: model: expected a string, got a list");
  CHECK(error_of("device: {x: 1}") == "den.yaml:1: device: expected an integer >= 0, got a map");
  CHECK(error_of("kv: 8GiB") ==
        "den.yaml:1: kv: expected a map of block_tokens, hbm, dram, ssd, policy, cost_model, layerwise_wake, got '8GiB'");
  CHECK(error_of("limits:\n  - line_bytes: 1MiB").find("den.yaml:2: limits: expected a map of line_bytes,") == 0);
  CHECK(error_of("scheduler:\n  max_batch: [1]") == "den.yaml:2: scheduler.max_batch: expected an integer from 1 to 1024, got a list");
  CHECK(error_of("metrics:\n  listen: {host: x}").find("den.yaml:2: metrics.listen: expected host:port") == 0);
  CHECK(error_of("just a string").find("den.yaml:1: the file: expected a map of model, backend,") == 0);
  CHECK(error_of("- model: x").find("den.yaml:1: the file: expected a map of model,") == 0);
  CHECK(error_of("? [a, b]\n: 1\n") == "den.yaml:1: keys must be plain names, got a list");
  CHECK(error_of("tools: {name: x}") == "den.yaml:1: tools: expected a list of tool servers (each with name and command), got a map");
  CHECK(error_of("threads: 2\nkv:\n  hbm: 1GiB\nthreads: 4\n") == "den.yaml:4: duplicate key 'threads' (first at line 1)");
  CHECK(error_of("kv:\n  hbm: 1GiB\n  hbm: 2GiB\n") == "den.yaml:3: duplicate key 'kv.hbm' (first at line 2)");
}

TEST_CASE("config - tool servers") {
  CHECK(error_of("tools:\n  - command: x\n") == "den.yaml:2: tools[0]: missing 'name' (the prefix of its tools, like 'fs')");
  CHECK(error_of("tools:\n  - name: a\n    command: x\n  - name: b\n") ==
        "den.yaml:4: tools[1]: missing 'command' (the program to run and its arguments)");
  CHECK(error_of("tools:\n  - name: fs\n    command: a\n  - name: fs\n    command: b\n") ==
        "den.yaml:4: tools[1].name: tool server 'fs' is already defined at line 2");
  CHECK(error_of("tools:\n  - name: my tool\n    command: x\n") ==
        "den.yaml:2: tools[0].name: expected a name of letters, digits, '_' and '-', got 'my tool'");
  CHECK(error_of("tools:\n  - name: a.b\n    command: x\n").find("den.yaml:2: tools[0].name: expected a name") == 0);
  CHECK(error_of("tools:\n  - name: a\n    command: '   '\n") ==
        "den.yaml:3: tools[0].command: expected a command: a list of strings or one string, got '   ' (the program is missing)");
  CHECK(error_of("tools:\n  - name: a\n    command: []\n").find("den.yaml:3: tools[0].command: expected a command") == 0);
  CHECK(error_of("tools:\n  - name: a\n    command: {x: 1}\n").find("den.yaml:3: tools[0].command: expected a command") == 0);
  CHECK(error_of("tools:\n  - name: a\n    command:\n      - x\n      - [y]\n") ==
        "den.yaml:5: tools[0].command: expected a string for each argument, got a list");
  CHECK(error_of("tools:\n  - name: a\n    command: x\n    env: [A=1]\n") ==
        "den.yaml:4: tools[0].env: expected a map, got a list");
  CHECK(error_of("tools:\n  - name: a\n    command: x\n    env:\n      A: {b: 1}\n") ==
        "den.yaml:5: tools[0].env.A: expected a string, got a map");
  CHECK(error_of("tools:\n  - name: a\n    command: x\n    env:\n      A: 1\n      A: 2\n") ==
        "den.yaml:6: duplicate key 'tools[0].env.A' (first at line 5)");
  CHECK(error_of("tools:\n  - name: a\n    command: x\n    env:\n      'A=B': 1\n") ==
        "den.yaml:5: tools[0].env.A=B: an environment variable name cannot be empty or contain '='");
  CHECK(error_of("tools:\n  - just-a-name\n") == "den.yaml:2: tools[0]: expected a map with name and command, got 'just-a-name'");
  // Flow style works too.
  const DaemonConfig flow = parse("tools: [{name: a, command: [x, y], env: {K: v}}]");
  REQUIRE(flow.tools.size() == 1);
  CHECK(flow.tools[0].command == std::vector<std::string>{"x", "y"});
  CHECK(flow.tools[0].env == std::vector<std::pair<std::string, std::string>>{{"K", "v"}});
}

TEST_CASE("config - the tool socket is beside the main one unless set or off") {
  using den::runtime::tools_socket_path;
  CHECK(parse("").tool_socket.empty());
  CHECK(tools_socket_path(parse(""), "/run/user/7/den/den.sock") == "/run/user/7/den/tools.sock");
  CHECK(tools_socket_path(parse(""), "/tmp/x/alpha.sock") == "/tmp/x/alpha-tools.sock");
  CHECK(tools_socket_path(parse("tool_socket: /srv/den-tools.sock"), "/tmp/den.sock") == "/srv/den-tools.sock");
  CHECK(tools_socket_path(parse("tool_socket: \"off\""), "/tmp/den.sock").empty());
  CHECK(tools_socket_path(parse("tool_socket: off"), "/tmp/den.sock").empty());
  CHECK(error_of("tool_socket: [a]\n") == "den.yaml:1: tool_socket: expected a string, got a list");
}

TEST_CASE("config - YAML syntax errors carry file and line") {
  const std::string unclosed = error_of("model: x\nkv: {hbm: 1GiB\n");
  CHECK(unclosed.find("den.yaml:") == 0);
  CHECK(unclosed.find("not valid YAML") != std::string::npos);
  CHECK(error_of("model: x\nkv:\n  hbm: 1GiB\n dram: 2GiB\n").find("den.yaml:4: not valid YAML: ") == 0);
  CHECK(error_of("model: x\nbackend: cpu: cuda\n").find("den.yaml:2: not valid YAML: ") == 0);
  CHECK(error_of("kv:\n\thbm: 1GiB\n").find("den.yaml:2: not valid YAML: ") == 0);  // a tab indents
  CHECK(error_of("tools:\n  - name: a\n  command: x\n").find("den.yaml:3: not valid YAML: ") == 0);
  CHECK(error_of("a: [1, 2]]\n") == "den.yaml:1: not valid YAML: illegal flow end (column 10)");
  CHECK(error_of("model: x\n---\nmodel: y\n") == "den.yaml:3: a config file holds one YAML document; a second one starts here");
  CHECK(parse("model: x\n---\n").model == "x");  // a trailing document marker is harmless
}

TEST_CASE("config - load_config reads a file and names it in errors") {
  den::test::TempDir dir;
  const std::string path = dir.file("den.yaml");
  den::test::write_file(path, "# comment\nmodel: m.gguf\nkv:\n  hbm: lots\n");
  try {
    den::runtime::load_config(path);
    FAIL("accepted a bad size");
  } catch (const ConfigError& error) {
    CHECK(std::string(error.what()) == path + ":4: kv.hbm: expected a size like 8GiB or 512MiB, got 'lots'");
  }
  den::test::write_file(path, "model: m.gguf\n");
  CHECK(den::runtime::load_config(path).model == "m.gguf");

  const std::string missing = dir.file("absent.yaml");
  try {
    den::runtime::load_config(missing);
    FAIL("accepted a missing file");
  } catch (const ConfigError& error) {
    CHECK(std::string(error.what()) == "cannot read config '" + missing + "': No such file or directory");
  }
  try {
    den::runtime::load_config(dir.path().string());
    FAIL("accepted a directory");
  } catch (const ConfigError& error) {
    CHECK(std::string(error.what()) == "cannot read config '" + dir.path().string() + "': Is a directory");
  }
}

TEST_CASE("config - parse_size and format_size") {
  CHECK(parse_size("0") == 0);
  CHECK(parse_size("4096") == 4096);
  CHECK(parse_size("512B") == 512);
  CHECK(parse_size("8GiB") == 8 * kGiB);
  CHECK(parse_size("8 GiB") == 8 * kGiB);
  CHECK(parse_size("512MiB") == 512 * kMiB);
  CHECK(parse_size("1KiB") == kKiB);
  CHECK(parse_size("2TiB") == 2 * kTiB);
  CHECK(parse_size("1kB") == 1000);
  CHECK(parse_size("1.5GB") == 1'500'000'000);
  CHECK(parse_size("3MB") == 3'000'000);
  CHECK(parse_size("1TB") == 1'000'000'000'000);
  CHECK(parse_size("1.5GiB") == 3 * kGiB / 2);
  CHECK(parse_size("1.5KiB") == 1536);
  CHECK(parse_size("0.1KiB") == 102);  // 102.4, rounded to the nearest byte
  CHECK(parse_size("0.5B") == std::nullopt);
  CHECK(parse_size("0.0000000000000000001TiB") == 0);
  CHECK(parse_size("8388607TiB") == 8388607 * kTiB);
  CHECK(parse_size("9223372036854775807") == INT64_MAX);
  for (const char* bad : {"", " ", "-1", "-1GiB", "+1GiB", "8 gigs", "8gib", "8KB", "8GIB", "1.5", "1.GiB", ".5GiB", "8  GiB",
                          "8 ", " 8", "8GiB ", "GiB", "8EiB", "8388608TiB", "9223372036854775808", "99999999999999999999",
                          "1e3", "0x10", "1,5GiB", "1_000"}) {
    CAPTURE(bad);
    CHECK(parse_size(bad) == std::nullopt);
  }

  CHECK(format_size(0) == "0B");
  CHECK(format_size(512) == "512B");
  CHECK(format_size(1023) == "1023B");
  CHECK(format_size(1024) == "1KiB");
  CHECK(format_size(1536) == "1.5KiB");
  CHECK(format_size(8 * kGiB) == "8GiB");
  CHECK(format_size(8589934592) == "8GiB");
  CHECK(format_size(512 * kMiB) == "512MiB");
  CHECK(format_size(3 * kTiB / 2) == "1.5TiB");
  CHECK(format_size(kMiB - 1) == "1MiB");  // 1023.999KiB rounds up into the next unit
  CHECK(format_size(1000) == "1000B");
  CHECK(format_size(1'500'000'000) == "1.4GiB");
  CHECK(format_size(4096 * kTiB) == "4096TiB");
  CHECK(format_size(-2048) == "-2KiB");

  // Every value format_size prints exactly reads back as itself.
  for (int64_t bytes : {int64_t{0}, int64_t{1}, int64_t{1023}, kKiB, 1536 * int64_t{1}, 100 * kKiB + kKiB / 2, kMiB,
                        37 * kMiB, 3 * kGiB / 2, 8 * kGiB, kTiB, 5 * kTiB / 2, 1000 * kTiB}) {
    CAPTURE(bytes);
    CHECK(parse_size(format_size(bytes)) == bytes);
  }
  // And anything format_size prints reads back to within its rounding (a twentieth of the unit).
  std::mt19937 rng(7);
  std::uniform_int_distribution<int64_t> any(0, 64 * kTiB);
  for (int i = 0; i < 2000; ++i) {
    const int64_t bytes = any(rng) >> (rng() % 48);
    const std::string text = format_size(bytes);
    CAPTURE(bytes);
    CAPTURE(text);
    const std::optional<int64_t> back = parse_size(text);
    REQUIRE(back.has_value());
    const int64_t unit = bytes < kKiB ? 1 : bytes < kMiB ? kKiB : bytes < kGiB ? kMiB : bytes < kTiB ? kGiB : kTiB;
    CHECK(std::llabs(*back - bytes) <= unit / 20 + 1);
  }
}

TEST_CASE("config - restart_required_changes lists only what needs a restart") {
  using den::runtime::restart_required_changes;
  const DaemonConfig running = parse("model: a.gguf\ntools: [{name: fs, command: x}]\n");
  CHECK(restart_required_changes(running, running).empty());

  // Live keys: no restart needed.
  DaemonConfig live = running;
  live.source = "other.yaml";
  live.log_level = LogLevel::debug;
  live.limits.line_bytes = kMiB;
  live.limits.json_depth = 10;
  live.limits.connections = 1;
  live.limits.sessions = 1;
  live.limits.request_seconds = 1;
  live.limits.client_buffer_bytes = kMiB;
  live.scheduler.max_batch = 1;
  live.scheduler.step_tokens = 1;
  live.scheduler.prefill_chunk = 1;
  CHECK(restart_required_changes(running, live).empty());

  // Each restart key on its own, then all at once.
  const auto only = [&](auto change) {
    DaemonConfig reloaded = running;
    change(reloaded);
    return restart_required_changes(running, reloaded);
  };
  using Names = std::vector<std::string>;
  CHECK(only([](DaemonConfig& c) { c.model = "b.gguf"; }) == Names{"model"});
  CHECK(only([](DaemonConfig& c) { c.backend = "cpu"; }) == Names{"backend"});
  CHECK(only([](DaemonConfig& c) { c.device = 1; }) == Names{"device"});
  CHECK(only([](DaemonConfig& c) { c.threads = 3; }) == Names{"threads"});
  CHECK(only([](DaemonConfig& c) { c.context = 128; }) == Names{"context"});
  CHECK(only([](DaemonConfig& c) { c.socket = "/s"; }) == Names{"socket"});
  CHECK(only([](DaemonConfig& c) { c.state_dir = "/d"; }) == Names{"state_dir"});
  CHECK(only([](DaemonConfig& c) { c.tool_socket = "off"; }) == Names{"tool_socket"});
  CHECK(only([](DaemonConfig& c) { c.kv.block_tokens = 32; }) == Names{"kv.block_tokens"});
  CHECK(only([](DaemonConfig& c) { c.kv.hbm_bytes = kGiB; }) == Names{"kv.hbm"});
  CHECK(only([](DaemonConfig& c) { c.kv.dram_bytes = kGiB; }) == Names{"kv.dram"});
  CHECK(only([](DaemonConfig& c) { c.kv.ssd_bytes = kGiB; }) == Names{"kv.ssd"});
  CHECK(only([](DaemonConfig& c) { c.kv.policy = KvPolicy::recompute; }) == Names{"kv.policy"});
  CHECK(only([](DaemonConfig& c) { c.kv.cost_model = false; }) == Names{"kv.cost_model"});
  CHECK(only([](DaemonConfig& c) { c.kv.layerwise_wake = false; }) == Names{"kv.layerwise_wake"});
  CHECK(only([](DaemonConfig& c) { c.metrics_listen = "127.0.0.1:1"; }) == Names{"metrics.listen"});
  CHECK(only([](DaemonConfig& c) { c.tools[0].command.push_back("y"); }) == Names{"tools"});
  CHECK(only([](DaemonConfig& c) { c.tools[0].env.emplace_back("K", "v"); }) == Names{"tools"});
  CHECK(only([](DaemonConfig& c) { c.tools.clear(); }) == Names{"tools"});

  const DaemonConfig reloaded = parse(R"(
model: b.gguf
backend: cuda
device: 2
threads: 1
context: 9
socket: /s
state_dir: /d
log_level: error
kv: {block_tokens: 8, hbm: 1GiB, dram: 1GiB, ssd: 1GiB, policy: hbm-only, cost_model: off, layerwise_wake: off}
scheduler: {max_batch: 2}
metrics: {listen: "127.0.0.1:9464"}
)");
  CHECK(restart_required_changes(running, reloaded) ==
        Names{"model", "backend", "device", "threads", "context", "socket", "state_dir", "kv.block_tokens", "kv.hbm",
              "kv.dram", "kv.ssd", "kv.policy", "kv.cost_model", "kv.layerwise_wake", "metrics.listen", "tools"});
}

TEST_CASE("config - names of policies and log levels") {
  CHECK(den::runtime::kv_policy_name(KvPolicy::tiered) == "tiered");
  CHECK(den::runtime::kv_policy_name(KvPolicy::hbm_only) == "hbm-only");
  CHECK(den::runtime::kv_policy_name(KvPolicy::recompute) == "recompute");
  CHECK(den::runtime::log_level_name(LogLevel::debug) == "debug");
  CHECK(den::runtime::log_level_name(LogLevel::info) == "info");
  CHECK(den::runtime::log_level_name(LogLevel::warn) == "warn");
  CHECK(den::runtime::log_level_name(LogLevel::error) == "error");
}

TEST_CASE("config - examples/den.yaml loads") {
  const std::string example = (repository_root() / "examples" / "den.yaml").string();
  REQUIRE_MESSAGE(den::test::file_exists(example), example);
  const DaemonConfig config = den::runtime::load_config(example);
  CHECK(config.backend == "auto");
  CHECK(config.kv.ssd_bytes == 8 * kGiB);
  CHECK(config.limits.line_bytes == 4 * kMiB);
  CHECK(config.metrics_listen == "127.0.0.1:9464");
  REQUIRE(config.tools.size() == 2);
  CHECK(config.tools[1].command == std::vector<std::string>{"mcp-search", "--index", "/srv/index"});
  CHECK(config.tools[1].env == std::vector<std::pair<std::string, std::string>>{{"SEARCH_THREADS", "4"}});
}

TEST_CASE("config - the YAML blocks of docs/CONFIG.md parse, and its full example shows the defaults") {
  const std::string doc = den::test::read_file((repository_root() / "docs" / "CONFIG.md").string());
  std::vector<std::string> blocks;
  for (size_t at = doc.find("```yaml\n"); at != std::string::npos; at = doc.find("```yaml\n", at)) {
    at += 8;
    const size_t end = doc.find("```", at);
    REQUIRE(end != std::string::npos);
    blocks.push_back(doc.substr(at, end - at));
  }
  REQUIRE(blocks.size() >= 2);
  for (const std::string& block : blocks) {
    CAPTURE(block);
    CHECK_NOTHROW(parse(block));
  }
  const DaemonConfig full = parse(blocks.back());
  const DaemonConfig defaults;
  CHECK(den::runtime::restart_required_changes(defaults, full) == std::vector<std::string>{"metrics.listen", "tools"});
  CHECK(full.log_level == defaults.log_level);
  CHECK(full.limits.line_bytes == defaults.limits.line_bytes);
  CHECK(full.limits.json_depth == defaults.limits.json_depth);
  CHECK(full.limits.connections == defaults.limits.connections);
  CHECK(full.limits.sessions == defaults.limits.sessions);
  CHECK(full.limits.request_seconds == defaults.limits.request_seconds);
  CHECK(full.limits.client_buffer_bytes == defaults.limits.client_buffer_bytes);
  CHECK(full.scheduler.max_batch == defaults.scheduler.max_batch);
  CHECK(full.scheduler.step_tokens == defaults.scheduler.step_tokens);
  CHECK(full.scheduler.prefill_chunk == defaults.scheduler.prefill_chunk);
}

TEST_SUITE_END();
