// The daemon's configuration loader: a YAML file (yaml-cpp) read over the defaults and checked
// key by key, so that a typo or a bad value stops `den serve` with file, line, key and what was
// expected instead of being silently ignored. Also the size syntax and the SIGHUP comparison.
#include "den/runtime/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <span>
#include <utility>

namespace den::runtime {

namespace {

using Keys = std::span<const std::string_view>;

constexpr std::array<std::string_view, 14> kTopKeys = {
    "model", "backend", "device", "threads", "context", "socket", "state_dir", "tool_socket",
    "log_level", "kv", "limits", "scheduler", "metrics", "tools"};
constexpr std::array<std::string_view, 7> kKvKeys = {
    "block_tokens", "hbm", "dram", "ssd", "policy", "cost_model", "layerwise_wake"};
constexpr std::array<std::string_view, 8> kLimitsKeys = {
    "line_bytes", "json_depth", "connections", "sessions", "request_seconds", "client_buffer_bytes", "tool_seconds",
    "errors_per_second"};
constexpr std::array<std::string_view, 4> kSchedulerKeys = {"max_batch", "step_tokens", "prefill_chunk", "lease_ahead"};
constexpr std::array<std::string_view, 1> kMetricsKeys = {"listen"};
constexpr std::array<std::string_view, 3> kToolKeys = {"name", "command", "env"};

// The nested sections, for suggesting "kv.hbm" when "hbm" is written at the wrong level.
constexpr std::array<std::pair<std::string_view, Keys>, 4> kSections = {{
    {"kv", kKvKeys}, {"limits", kLimitsKeys}, {"scheduler", kSchedulerKeys}, {"metrics", kMetricsKeys}}};

constexpr std::array<std::pair<std::string_view, std::string_view>, 3> kBackends = {{
    {"cpu", "cpu"}, {"cuda", "cuda"}, {"auto", "auto"}}};
constexpr std::array<std::pair<std::string_view, LogLevel>, 4> kLogLevels = {{
    {"debug", LogLevel::debug}, {"info", LogLevel::info}, {"warn", LogLevel::warn}, {"error", LogLevel::error}}};
constexpr std::array<std::pair<std::string_view, KvPolicy>, 3> kPolicies = {{
    {"tiered", KvPolicy::tiered}, {"hbm-only", KvPolicy::hbm_only}, {"recompute", KvPolicy::recompute}}};

constexpr int64_t kKiB = int64_t{1} << 10;
constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// Edit distance counting a swap of neighbours as one edit ("cdua" is one from "cuda"), for
// "did you mean" suggestions. Case-insensitive.
size_t edit_distance(std::string_view a, std::string_view b) {
  const auto same = [](char x, char y) {
    return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
  };
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (same(a[i - 1], b[j - 1]) ? 0 : 1)});
      if (i > 1 && j > 1 && same(a[i - 1], b[j - 2]) && same(a[i - 2], b[j - 1])) {
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[a.size()][b.size()];
}

// The known word closest to `word`, when close enough to be a plausible typo: one edit for short
// words, up to three for long ones, so that "kv" never suggests an unrelated two-letter key.
std::optional<std::string_view> nearest(std::string_view word, Keys known) {
  std::optional<std::string_view> best;
  size_t best_distance = std::numeric_limits<size_t>::max();
  for (std::string_view candidate : known) {
    const size_t allowed = candidate.size() <= 4 ? 1 : candidate.size() <= 8 ? 2 : 3;
    const size_t distance = edit_distance(word, candidate);
    if (distance <= allowed && distance < best_distance) {
      best = candidate;
      best_distance = distance;
    }
  }
  return best;
}

std::string joined(Keys words, std::string_view separator = ", ") {
  std::string out;
  for (std::string_view word : words) {
    if (!out.empty()) out += separator;
    out += word;
  }
  return out;
}

// What a node holds, as the "got ..." part of a message.
std::string describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Scalar: return "'" + node.Scalar() + "'";
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Map: return "a map";
    default: return "nothing";
  }
}

bool is_name_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-'; }

bool all_digits(std::string_view text) {
  return !text.empty() && std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// host:port or [v6]:port, port 0..65535. Whether the host is a loopback address is the metrics
// server's decision (it resolves names); this only checks the shape.
bool is_listen_address(std::string_view text) {
  std::string_view port;
  if (text.starts_with('[')) {
    const size_t close = text.find(']');
    if (close == std::string_view::npos) return false;
    const std::string_view host = text.substr(1, close - 1);
    const std::string_view address = host.substr(0, host.find('%'));  // drop a zone: [fe80::1%eth0]
    if (address.find(':') == std::string_view::npos) return false;
    if (!std::all_of(address.begin(), address.end(),
                     [](char c) { return std::isxdigit(static_cast<unsigned char>(c)) || c == ':' || c == '.'; })) {
      return false;
    }
    if (host.size() == address.size() + 1) return false;  // '%' with no zone after it
    const std::string_view rest = text.substr(close + 1);
    if (!rest.starts_with(':')) return false;
    port = rest.substr(1);
  } else {
    const size_t colon = text.find(':');
    if (colon == std::string_view::npos || colon == 0 || text.find(':', colon + 1) != std::string_view::npos) {
      return false;
    }
    const std::string_view host = text.substr(0, colon);
    if (!std::all_of(host.begin(), host.end(), [](char c) { return is_name_char(c) || c == '.'; })) return false;
    port = text.substr(colon + 1);
  }
  return all_digits(port) && port.size() <= 5 && std::stoi(std::string(port)) <= 65535;
}

// One `key: value` pair of a map, with its dotted name ("kv.hbm", "tools[0].env.PATH").
struct Entry {
  std::string name;
  std::string dotted;
  YAML::Node key;
  YAML::Node value;
};

// Walks one parsed document; every failure throws ConfigError naming source, line and key.
class Reader {
 public:
  explicit Reader(const std::string& source) : source_(source) {}

  [[noreturn]] void fail(const YAML::Mark& mark, const std::string& message) const {
    if (mark.is_null()) throw ConfigError(source_ + ": " + message);
    throw ConfigError(source_ + ":" + std::to_string(mark.line + 1) + ": " + message);
  }

  // "den.yaml:12: kv.hbm: expected a size like 8GiB or 512MiB, got '8 gigs'"
  [[noreturn]] void fail_value(const Entry& entry, const std::string& expected, const std::string& note = {}) const {
    fail(value_mark(entry), entry.dotted + ": expected " + expected + ", got " + describe(entry.value) + note);
  }

  // The pairs of a map (or none for an empty section written as `kv:`), rejecting keys that are
  // not scalars, duplicates and, unless `known` is empty (free-form maps like env), unknown keys.
  std::vector<Entry> entries(const YAML::Node& map, const std::string& dotted, Keys known,
                             const YAML::Mark& section_mark) const {
    std::vector<Entry> out;
    if (map.IsNull()) return out;
    if (!map.IsMap()) {
      const std::string expected = known.empty() ? "a map" : "a map of " + joined(known);
      fail(map.Mark().is_null() ? section_mark : map.Mark(),
           (dotted.empty() ? "the file" : dotted) + ": expected " + expected + ", got " + describe(map));
    }
    for (auto it = map.begin(); it != map.end(); ++it) {
      const YAML::Node key = it->first;
      if (!key.IsScalar()) fail(key.Mark(), (dotted.empty() ? "" : dotted + ": ") + "keys must be plain names, got " + describe(key));
      Entry entry{key.Scalar(), dotted.empty() ? key.Scalar() : dotted + "." + key.Scalar(), key, it->second};
      for (const Entry& earlier : out) {
        if (earlier.name == entry.name) {
          fail(key.Mark(), "duplicate key '" + entry.dotted + "' (first at line " +
                               std::to_string(earlier.key.Mark().line + 1) + ")");
        }
      }
      if (!known.empty() && std::find(known.begin(), known.end(), entry.name) == known.end()) {
        fail(key.Mark(), "unknown key '" + entry.dotted + "'" + unknown_key_hint(entry.name, dotted, known));
      }
      out.push_back(std::move(entry));
    }
    return out;
  }

  std::string read_string(const Entry& entry) const {
    if (!entry.value.IsScalar()) fail_value(entry, "a string");
    return entry.value.Scalar();
  }

  int64_t read_integer(const Entry& entry, int64_t min, int64_t max) const {
    const std::string expected = max == kInt32Max ? "an integer >= " + std::to_string(min)
                                                  : "an integer from " + std::to_string(min) + " to " + std::to_string(max);
    if (!entry.value.IsScalar()) fail_value(entry, expected);
    const std::string& text = entry.value.Scalar();
    int64_t value = 0;
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (text.empty() || error != std::errc() || end != text.data() + text.size()) fail_value(entry, expected);
    if (value < min) fail_value(entry, expected);
    if (value > max) fail_value(entry, expected, max == kInt32Max ? " (too large)" : "");
    return value;
  }

  // A size in bytes; with `automatic`, "auto" (and 0) mean "choose from the hardware" and read 0.
  int64_t read_size(const Entry& entry, bool automatic, int64_t min_bytes) const {
    const std::string expected = "a size like 8GiB or 512MiB";
    if (!entry.value.IsScalar()) fail_value(entry, expected);
    if (automatic && entry.value.Scalar() == "auto") return 0;
    const std::optional<int64_t> bytes = parse_size(entry.value.Scalar());
    if (!bytes) fail_value(entry, expected);
    if (*bytes < min_bytes && !(automatic && *bytes == 0)) {
      fail_value(entry, "a size of at least " + format_size(min_bytes));
    }
    return *bytes;
  }

  double read_positive_seconds(const Entry& entry) const {
    const std::string expected = "a number of seconds > 0";
    if (!entry.value.IsScalar()) fail_value(entry, expected);
    const std::string& text = entry.value.Scalar();
    double value = 0;
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value, std::chars_format::fixed);
    if (text.empty() || error != std::errc() || end != text.data() + text.size() || !std::isfinite(value) || value <= 0) {
      fail_value(entry, expected);
    }
    return value;
  }

  // YAML 1.1 reads on/off/yes/no as booleans, so every spelling of a switch is accepted.
  bool read_switch(const Entry& entry) const {
    const std::string expected = "on or off";
    if (!entry.value.IsScalar()) fail_value(entry, expected);
    std::string text = entry.value.Scalar();
    std::transform(text.begin(), text.end(), text.begin(), [](unsigned char c) { return std::tolower(c); });
    if (text == "on" || text == "true" || text == "yes") return true;
    if (text == "off" || text == "false" || text == "no") return false;
    fail_value(entry, expected);
  }

  template <typename Value, size_t N>
  Value read_choice(const Entry& entry, const std::array<std::pair<std::string_view, Value>, N>& choices) const {
    std::array<std::string_view, N> names;
    std::transform(choices.begin(), choices.end(), names.begin(), [](const auto& choice) { return choice.first; });
    const std::string expected = "one of " + joined(names);
    if (!entry.value.IsScalar()) fail_value(entry, expected);
    for (const auto& [name, value] : choices) {
      if (entry.value.Scalar() == name) return value;
    }
    auto close = nearest(entry.value.Scalar(), names);
    // "gpu" is one letter from "cpu", but whoever wrote it wants the GPU.
    if (entry.value.Scalar() == "gpu" && std::find(names.begin(), names.end(), "cuda") != names.end()) close = "cuda";
    fail_value(entry, expected, close ? " (did you mean '" + std::string(*close) + "'?)" : "");
  }

  static YAML::Mark value_mark(const Entry& entry) {
    // A missing value (`hbm:`) carries the mark of whatever follows it, often the next line.
    return entry.value.IsNull() || entry.value.Mark().is_null() ? entry.key.Mark() : entry.value.Mark();
  }

 private:
  static std::string unknown_key_hint(const std::string& name, const std::string& dotted, Keys known) {
    const std::string prefix = dotted.empty() ? "" : dotted + ".";
    if (const auto close = nearest(name, known)) return " (did you mean '" + prefix + std::string(*close) + "'?)";
    // A key of another section written at the wrong level or as a dotted name.
    for (const auto& [section, keys] : kSections) {
      if (section == dotted) continue;
      for (std::string_view key : keys) {
        const std::string full = std::string(section) + "." + std::string(key);
        if (name == key) return " (did you mean '" + full + "'?)";
        if (dotted.empty() && name == full) {
          return " (write it nested: '" + std::string(section) + ":' then '" + std::string(key) + ":' indented below)";
        }
      }
    }
    return " (known keys" + (dotted.empty() ? std::string() : " under " + dotted) + ": " + joined(known) + ")";
  }

  const std::string& source_;
};

void read_kv(const Reader& reader, const Entry& section, KvConfig& kv) {
  for (const Entry& entry : reader.entries(section.value, section.dotted, kKvKeys, section.key.Mark())) {
    if (entry.name == "block_tokens") {
      kv.block_tokens = static_cast<int32_t>(reader.read_integer(entry, 1, 4096));
    } else if (entry.name == "hbm") {
      kv.hbm_bytes = reader.read_size(entry, true, 0);
    } else if (entry.name == "dram") {
      kv.dram_bytes = reader.read_size(entry, true, 0);
    } else if (entry.name == "ssd") {
      kv.ssd_bytes = reader.read_size(entry, true, 0);
    } else if (entry.name == "policy") {
      kv.policy = reader.read_choice(entry, kPolicies);
    } else if (entry.name == "cost_model") {
      kv.cost_model = reader.read_switch(entry);
    } else if (entry.name == "layerwise_wake") {
      kv.layerwise_wake = reader.read_switch(entry);
    }
  }
}

void read_limits(const Reader& reader, const Entry& section, LimitsConfig& limits) {
  for (const Entry& entry : reader.entries(section.value, section.dotted, kLimitsKeys, section.key.Mark())) {
    if (entry.name == "line_bytes") {
      limits.line_bytes = reader.read_size(entry, false, kKiB);
    } else if (entry.name == "json_depth") {
      limits.json_depth = static_cast<int32_t>(reader.read_integer(entry, 2, 100000));
    } else if (entry.name == "connections") {
      limits.connections = static_cast<int32_t>(reader.read_integer(entry, 1, kInt32Max));
    } else if (entry.name == "sessions") {
      limits.sessions = static_cast<int32_t>(reader.read_integer(entry, 1, kInt32Max));
    } else if (entry.name == "request_seconds") {
      limits.request_seconds = reader.read_positive_seconds(entry);
    } else if (entry.name == "client_buffer_bytes") {
      limits.client_buffer_bytes = reader.read_size(entry, false, 64 * kKiB);
    } else if (entry.name == "tool_seconds") {
      limits.tool_seconds = reader.read_positive_seconds(entry);
    } else if (entry.name == "errors_per_second") {
      limits.errors_per_second = reader.read_integer(entry, 0, int64_t{1} << 40);
    }
  }
}

void read_scheduler(const Reader& reader, const Entry& section, SchedulerConfig& scheduler) {
  for (const Entry& entry : reader.entries(section.value, section.dotted, kSchedulerKeys, section.key.Mark())) {
    if (entry.name == "max_batch") {
      scheduler.max_batch = static_cast<int32_t>(reader.read_integer(entry, 1, 1024));
    } else if (entry.name == "step_tokens") {
      scheduler.step_tokens = static_cast<int32_t>(reader.read_integer(entry, 1, 65536));
    } else if (entry.name == "prefill_chunk") {
      scheduler.prefill_chunk = static_cast<int32_t>(reader.read_integer(entry, 1, 65536));
    } else if (entry.name == "lease_ahead") {
      scheduler.lease_ahead = static_cast<int32_t>(reader.read_integer(entry, 0, 1 << 20));
    }
  }
}

void read_metrics(const Reader& reader, const Entry& section, std::optional<std::string>& listen) {
  for (const Entry& entry : reader.entries(section.value, section.dotted, kMetricsKeys, section.key.Mark())) {
    const std::string expected = "host:port or [v6]:port with a port from 0 to 65535";
    if (!entry.value.IsScalar() || !is_listen_address(entry.value.Scalar())) reader.fail_value(entry, expected);
    listen = entry.value.Scalar();
  }
}

// `command: [npx, -y, server]` or `command: npx -y server` (split on whitespace, no quoting).
std::vector<std::string> read_command(const Reader& reader, const Entry& entry) {
  const std::string expected = "a command: a list of strings or one string";
  std::vector<std::string> argv;
  if (entry.value.IsScalar()) {
    const std::string& text = entry.value.Scalar();
    size_t at = 0;
    while (at < text.size()) {
      const size_t start = text.find_first_not_of(" \t\n\r", at);
      if (start == std::string::npos) break;
      const size_t end = std::min(text.find_first_of(" \t\n\r", start), text.size());
      argv.push_back(text.substr(start, end - start));
      at = end;
    }
  } else if (entry.value.IsSequence()) {
    for (const YAML::Node& item : entry.value) {
      if (!item.IsScalar()) {
        reader.fail(item.Mark().is_null() ? Reader::value_mark(entry) : item.Mark(),
                    entry.dotted + ": expected a string for each argument, got " + describe(item));
      }
      argv.push_back(item.Scalar());
    }
  } else {
    reader.fail_value(entry, expected);
  }
  if (argv.empty() || argv[0].empty()) reader.fail_value(entry, expected, " (the program is missing)");
  return argv;
}

std::vector<std::pair<std::string, std::string>> read_env(const Reader& reader, const Entry& section) {
  std::vector<std::pair<std::string, std::string>> env;
  for (const Entry& entry : reader.entries(section.value, section.dotted, {}, section.key.Mark())) {
    if (entry.name.empty() || entry.name.find('=') != std::string::npos) {
      reader.fail(entry.key.Mark(), entry.dotted + ": an environment variable name cannot be empty or contain '='");
    }
    env.emplace_back(entry.name, reader.read_string(entry));
  }
  return env;
}

std::vector<ToolServerConfig> read_tools(const Reader& reader, const Entry& section) {
  std::vector<ToolServerConfig> tools;
  if (section.value.IsNull()) return tools;
  if (!section.value.IsSequence()) reader.fail_value(section, "a list of tool servers (each with name and command)");
  std::vector<int> name_lines;  // where each tool's name was given, for the duplicate message
  for (size_t index = 0; index < section.value.size(); ++index) {
    const YAML::Node node = section.value[index];
    const std::string dotted = section.dotted + "[" + std::to_string(index) + "]";
    const YAML::Mark mark = node.Mark().is_null() ? section.key.Mark() : node.Mark();
    if (!node.IsMap()) reader.fail(mark, dotted + ": expected a map with name and command, got " + describe(node));
    ToolServerConfig tool;
    bool has_name = false, has_command = false;
    for (const Entry& entry : reader.entries(node, dotted, kToolKeys, mark)) {
      if (entry.name == "name") {
        tool.name = reader.read_string(entry);
        if (tool.name.empty() || !std::all_of(tool.name.begin(), tool.name.end(), is_name_char)) {
          reader.fail_value(entry, "a name of letters, digits, '_' and '-'");
        }
        const auto same = std::find_if(tools.begin(), tools.end(), [&](const auto& t) { return t.name == tool.name; });
        if (same != tools.end()) {
          reader.fail(Reader::value_mark(entry), entry.dotted + ": tool server '" + tool.name + "' is already defined at line " +
                                                     std::to_string(name_lines[same - tools.begin()] + 1));
        }
        name_lines.push_back(Reader::value_mark(entry).line);
        has_name = true;
      } else if (entry.name == "command") {
        tool.command = read_command(reader, entry);
        has_command = true;
      } else if (entry.name == "env") {
        tool.env = read_env(reader, entry);
      }
    }
    if (!has_name) reader.fail(mark, dotted + ": missing 'name' (the prefix of its tools, like 'fs')");
    if (!has_command) reader.fail(mark, dotted + ": missing 'command' (the program to run and its arguments)");
    tools.push_back(std::move(tool));
  }
  return tools;
}

void read_document(const Reader& reader, const YAML::Node& root, DaemonConfig& config) {
  for (const Entry& entry : reader.entries(root, "", kTopKeys, root.Mark())) {
    if (entry.name == "model") {
      config.model = reader.read_string(entry);
    } else if (entry.name == "backend") {
      config.backend = std::string(reader.read_choice(entry, kBackends));
    } else if (entry.name == "device") {
      config.device = static_cast<int32_t>(reader.read_integer(entry, 0, kInt32Max));
    } else if (entry.name == "threads") {
      config.threads = static_cast<int32_t>(reader.read_integer(entry, 0, kInt32Max));
    } else if (entry.name == "context") {
      config.context = static_cast<int32_t>(reader.read_integer(entry, 0, kInt32Max));
    } else if (entry.name == "socket") {
      config.socket = reader.read_string(entry);
    } else if (entry.name == "state_dir") {
      config.state_dir = reader.read_string(entry);
    } else if (entry.name == "tool_socket") {
      config.tool_socket = reader.read_string(entry);
    } else if (entry.name == "log_level") {
      config.log_level = reader.read_choice(entry, kLogLevels);
    } else if (entry.name == "kv") {
      read_kv(reader, entry, config.kv);
    } else if (entry.name == "limits") {
      read_limits(reader, entry, config.limits);
    } else if (entry.name == "scheduler") {
      read_scheduler(reader, entry, config.scheduler);
    } else if (entry.name == "metrics") {
      read_metrics(reader, entry, config.metrics_listen);
    } else if (entry.name == "tools") {
      config.tools = read_tools(reader, entry);
    }
  }
}

struct FileCloser {
  void operator()(std::FILE* file) const { std::fclose(file); }
};

std::string read_whole_file(const std::string& path) {
  const auto fail = [&] { throw ConfigError("cannot read config '" + path + "': " + std::strerror(errno)); };
  std::unique_ptr<std::FILE, FileCloser> file(std::fopen(path.c_str(), "rb"));
  if (!file) fail();
  std::string text;
  std::array<char, 65536> buffer;
  size_t got = 0;
  while ((got = std::fread(buffer.data(), 1, buffer.size(), file.get())) > 0) text.append(buffer.data(), got);
  if (std::ferror(file.get())) fail();  // a directory opens fine and fails here with EISDIR
  return text;
}

bool same_tools(const std::vector<ToolServerConfig>& a, const std::vector<ToolServerConfig>& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(), [](const ToolServerConfig& x, const ToolServerConfig& y) {
    return x.name == y.name && x.command == y.command && x.env == y.env;
  });
}

}  // namespace

std::string_view kv_policy_name(KvPolicy policy) {
  for (const auto& [name, value] : kPolicies) {
    if (value == policy) return name;
  }
  return "?";
}

std::string_view log_level_name(LogLevel level) {
  for (const auto& [name, value] : kLogLevels) {
    if (value == level) return name;
  }
  return "?";
}

DaemonConfig load_config(const std::string& path) { return parse_config(read_whole_file(path), path); }

DaemonConfig parse_config(std::string_view yaml_text, const std::string& source) {
  DaemonConfig config;
  config.source = source;
  const Reader reader(source);
  std::vector<YAML::Node> documents;
  try {
    documents = YAML::LoadAll(std::string(yaml_text));
  } catch (const YAML::Exception& error) {
    reader.fail(error.mark, "not valid YAML: " + error.msg +
                                (error.mark.is_null() ? "" : " (column " + std::to_string(error.mark.column + 1) + ")"));
  }
  // A trailing `---` makes an empty second document; anything more is a mistake.
  for (size_t i = 1; i < documents.size(); ++i) {
    if (!documents[i].IsNull()) reader.fail(documents[i].Mark(), "a config file holds one YAML document; a second one starts here");
  }
  if (!documents.empty()) read_document(reader, documents[0], config);
  return config;
}

std::vector<std::string> restart_required_changes(const DaemonConfig& running, const DaemonConfig& reloaded) {
  std::vector<std::string> changed;
  const auto compare = [&](bool differs, const char* key) {
    if (differs) changed.emplace_back(key);
  };
  compare(running.model != reloaded.model, "model");
  compare(running.backend != reloaded.backend, "backend");
  compare(running.device != reloaded.device, "device");
  compare(running.threads != reloaded.threads, "threads");
  compare(running.context != reloaded.context, "context");
  compare(running.socket != reloaded.socket, "socket");
  compare(running.state_dir != reloaded.state_dir, "state_dir");
  compare(running.tool_socket != reloaded.tool_socket, "tool_socket");
  const KvConfig& a = running.kv;
  const KvConfig& b = reloaded.kv;
  compare(a.block_tokens != b.block_tokens, "kv.block_tokens");
  compare(a.hbm_bytes != b.hbm_bytes, "kv.hbm");
  compare(a.dram_bytes != b.dram_bytes, "kv.dram");
  compare(a.ssd_bytes != b.ssd_bytes, "kv.ssd");
  compare(a.policy != b.policy, "kv.policy");
  compare(a.cost_model != b.cost_model, "kv.cost_model");
  compare(a.layerwise_wake != b.layerwise_wake, "kv.layerwise_wake");
  compare(running.metrics_listen != reloaded.metrics_listen, "metrics.listen");
  compare(!same_tools(running.tools, reloaded.tools), "tools");
  return changed;
}

std::optional<int64_t> parse_size(std::string_view text) {
  size_t at = 0;
  while (at < text.size() && text[at] >= '0' && text[at] <= '9') ++at;
  const std::string_view whole = text.substr(0, at);
  std::string_view fraction;
  if (at < text.size() && text[at] == '.') {
    const size_t start = ++at;
    while (at < text.size() && text[at] >= '0' && text[at] <= '9') ++at;
    fraction = text.substr(start, at - start);
    if (fraction.empty()) return std::nullopt;
  }
  if (whole.empty()) return std::nullopt;
  std::string_view unit = text.substr(at);
  if (unit.starts_with(' ')) {
    unit.remove_prefix(1);
    if (unit.empty()) return std::nullopt;
  }

  constexpr std::array<std::pair<std::string_view, int64_t>, 10> kUnits = {{
      {"B", 1},
      {"KiB", int64_t{1} << 10}, {"MiB", int64_t{1} << 20}, {"GiB", int64_t{1} << 30}, {"TiB", int64_t{1} << 40},
      {"kB", 1000}, {"MB", 1000'000}, {"GB", 1000'000'000}, {"TB", 1000'000'000'000},
      {"", 1}}};
  const auto found = std::find_if(kUnits.begin(), kUnits.end(), [&](const auto& u) { return u.first == unit; });
  if (found == kUnits.end()) return std::nullopt;
  const int64_t multiplier = found->second;
  if (!fraction.empty() && multiplier == 1) return std::nullopt;  // bytes are whole

  int64_t count = 0;
  const auto [end, error] = std::from_chars(whole.data(), whole.data() + whole.size(), count);
  if (error != std::errc() || end != whole.data() + whole.size()) return std::nullopt;
  int64_t bytes = 0;
  if (__builtin_mul_overflow(count, multiplier, &bytes)) return std::nullopt;
  if (!fraction.empty()) {
    // Exact: digits * multiplier / 10^digits, rounded to the nearest byte. Beyond 18 digits the
    // fraction is far below one byte of a TiB, so the rest is ignored.
    __extension__ using Wide = unsigned __int128;
    fraction = fraction.substr(0, 18);
    uint64_t digits = 0, scale = 1;
    for (char c : fraction) {
      digits = digits * 10 + static_cast<uint64_t>(c - '0');
      scale *= 10;
    }
    const Wide part = (Wide{digits} * static_cast<uint64_t>(multiplier) * 2 + scale) / (Wide{scale} * 2);
    if (__builtin_add_overflow(bytes, static_cast<int64_t>(part), &bytes)) return std::nullopt;
  }
  return bytes;
}

std::string tools_socket_path(const DaemonConfig& config, const std::string& socket) {
  if (config.tool_socket == "off") return "";
  if (!config.tool_socket.empty()) return config.tool_socket;
  const std::filesystem::path main(socket);
  const std::string name = main.filename() == "den.sock" ? "tools.sock" : main.stem().string() + "-tools.sock";
  return (main.parent_path() / name).string();
}

std::string format_size(int64_t bytes) {
  if (bytes < 0) {
    const uint64_t magnitude = uint64_t{0} - static_cast<uint64_t>(bytes);
    if (magnitude > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return "-8388608TiB";  // INT64_MIN
    return "-" + format_size(static_cast<int64_t>(magnitude));
  }
  constexpr std::array<std::string_view, 5> kNames = {"B", "KiB", "MiB", "GiB", "TiB"};
  size_t unit = 0;
  while (unit + 1 < kNames.size() && bytes >= (int64_t{1} << (10 * (unit + 1)))) ++unit;
  const auto tenths_in = [&](size_t u) {
    const int64_t size = int64_t{1} << (10 * u);
    return bytes / size * 10 + ((bytes % size) * 20 + size) / (2 * size);  // rounded to the nearest tenth
  };
  int64_t tenths = tenths_in(unit);
  if (tenths >= 10240 && unit + 1 < kNames.size()) tenths = tenths_in(++unit);  // 1023.96KiB reads 1MiB
  std::string out = std::to_string(tenths / 10);
  if (tenths % 10 != 0) out += "." + std::to_string(tenths % 10);
  return out + std::string(kNames[unit]);
}

}  // namespace den::runtime
