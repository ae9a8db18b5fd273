// `den sessions ls|show|create|fork|pin|unpin|checkpoint|hibernate|wake|rm` and `den stats`:
// thin clients of the daemon's socket (docs/PROTOCOL.md). Human output by default; --json
// prints the daemon's result as it came, for scripts. Progress bars and summaries go to stderr
// only where they would not disturb a script (stdout stays the result).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "client_output.h"
#include "commands.h"
#include "den/runtime/client.h"
#include "den/runtime/paths.h"

namespace den::runtime::cli {
namespace {

namespace json = boost::json;

// "alice (s-3)" for a named session, "s-3" otherwise.
std::string label(const json::object& session) {
  const json::value* name = session.if_contains("name");
  const std::string id = field(session, "id");
  if (name == nullptr || !name->is_string() || name->as_string().empty()) return id;
  return std::string(name->as_string()) + " (" + id + ")";
}

std::string checkpoint_text(const json::object& session) {
  const json::value* cp = session.if_contains("checkpoint");
  const json::object* o = cp != nullptr ? cp->if_object() : nullptr;
  if (o == nullptr || number_of(o->if_contains("generation")) <= 0) return "none";
  const json::value* current = o->if_contains("current");
  const bool is_current = current != nullptr && current->is_bool() && current->as_bool();
  return field(*o, "generation") + (is_current ? " (current)" : " (behind)");
}

std::string blocks_text(const json::object& session) {
  const json::value* blocks = session.if_contains("blocks");
  const json::object* o = blocks != nullptr ? blocks->if_object() : nullptr;
  if (o == nullptr) return "-";
  std::string text;
  for (const auto& [tier, count] : *o) text += (text.empty() ? "" : ", ") + std::string(tier) + " " + plain(&count);
  return text.empty() ? "-" : text;
}

const json::object& as_session(const json::value& v) {
  if (const json::object* o = v.if_object()) return *o;
  throw std::runtime_error("the daemon answered with something that is not a session: " + json::serialize(v));
}

// --- ls / show -------------------------------------------------------------------------------

void print_session_table(const json::array& sessions) {
  std::vector<std::vector<std::string>> rows = {{"ID", "NAME", "TOKENS", "KV", "TIER", "PINNED", "CHECKPOINT"}};
  for (const json::value& v : sessions) {
    const json::object& s = as_session(v);
    rows.push_back({field(s, "id"), field(s, "name"), field(s, "tokens"), field(s, "kv_tokens"), field(s, "tier"),
                    field(s, "pinned"), checkpoint_text(s)});
  }
  print_table(rows);
}

void run_ls(const ClientOptions& o) {
  DaemonClient client(socket_path(o.socket));
  const json::value result = call_daemon(client, "sessions/list");
  if (o.json) return print_json(result);
  const json::value* sessions = result.is_object() ? result.as_object().if_contains("sessions") : nullptr;
  if (sessions == nullptr || !sessions->is_array()) {
    throw std::runtime_error("the daemon's sessions/list result has no 'sessions' array");
  }
  print_session_table(sessions->as_array());
  if (sessions->as_array().empty()) std::fprintf(stderr, "no sessions yet: den sessions create NAME makes one\n");
}

struct ShowOptions {
  ClientOptions client;
  std::string session;
  bool tokens = false;
  bool text = false;
};

void run_show(const ShowOptions& o) {
  DaemonClient client(socket_path(o.client.socket));
  json::object params{{"session", o.session}};
  if (o.tokens) params["tokens"] = true;
  if (o.text) params["text"] = true;
  const json::value result = call_daemon(client, "sessions/get", params);
  if (o.client.json) return print_json(result);
  const json::object& s = as_session(result);
  std::vector<std::pair<std::string, std::string>> lines = {
      {"id", field(s, "id")},
      {"name", field(s, "name")},
      {"tokens", field(s, "tokens")},
      {"kv tokens", field(s, "kv_tokens")},
      {"tier", field(s, "tier")},
      {"pinned", field(s, "pinned")},
      {"busy", field(s, "busy")},
      {"generating", field(s, "generating")},
      {"blocks", blocks_text(s)},
      {"checkpoint", checkpoint_text(s)},
  };
  // Fields a newer daemon adds still show, after the known ones.
  static const std::vector<std::string_view> kShown = {"id",         "name",   "tokens",     "kv_tokens",
                                                       "tier",       "pinned", "busy",       "generating",
                                                       "blocks",     "checkpoint", "token_ids", "text"};
  for (const auto& [key, value] : s) {
    if (std::find(kShown.begin(), kShown.end(), std::string_view(key)) == kShown.end()) {
      lines.emplace_back(std::string(key), value.is_structured() ? json::serialize(value) : plain(&value));
    }
  }
  if (const json::value* ids = s.if_contains("token_ids"); ids != nullptr && ids->is_array()) {
    std::string text;
    for (const json::value& id : ids->as_array()) text += (text.empty() ? "" : " ") + plain(&id);
    lines.emplace_back("token ids", text);
  }
  size_t width = 0;
  for (const auto& line : lines) width = std::max(width, line.first.size());
  for (const auto& [key, value] : lines) {
    std::printf("%s:%s%s\n", key.c_str(), std::string(width - key.size() + 1, ' ').c_str(), value.c_str());
  }
  if (const json::value* text = s.if_contains("text"); text != nullptr && text->is_string()) {
    std::printf("text:\n%s\n", std::string(text->as_string()).c_str());
  }
}

// --- create / fork / pin / unpin / rm ---------------------------------------------------------

struct NameOptions {
  ClientOptions client;
  std::string session;   // the session acted on (or, for create, the new name)
  std::string new_name;  // fork's NEW
};

void run_create(const NameOptions& o) {
  DaemonClient client(socket_path(o.client.socket));
  json::object params;
  if (!o.session.empty()) params["name"] = o.session;
  const json::value result = call_daemon(client, "sessions/create", params);
  if (o.client.json) return print_json(result);
  std::printf("created session %s\n", label(as_session(result)).c_str());
}

void run_fork(const NameOptions& o) {
  DaemonClient client(socket_path(o.client.socket));
  json::object params{{"session", o.session}};
  if (!o.new_name.empty()) params["name"] = o.new_name;
  const json::value result = call_daemon(client, "sessions/fork", params);
  if (o.client.json) return print_json(result);
  std::printf("forked %s into %s\n", o.session.c_str(), label(as_session(result)).c_str());
}

void run_pin(const NameOptions& o, bool pin) {
  DaemonClient client(socket_path(o.client.socket));
  const json::value result =
      call_daemon(client, pin ? "sessions/pin" : "sessions/unpin", json::object{{"session", o.session}});
  if (o.client.json) return print_json(result);
  std::printf("%s %s\n", pin ? "pinned" : "unpinned", label(as_session(result)).c_str());
}

struct RemoveOptions {
  ClientOptions client;
  std::vector<std::string> sessions;
};

void run_rm(const RemoveOptions& o) {
  DaemonClient client(socket_path(o.client.socket));
  for (const std::string& session : o.sessions) {
    const json::value result = call_daemon(client, "sessions/delete", json::object{{"session", session}});
    if (o.client.json) {
      print_json(result);
    } else {
      const json::value* deleted = result.is_object() ? result.as_object().if_contains("deleted") : nullptr;
      std::printf("deleted %s\n", deleted != nullptr ? plain(deleted).c_str() : session.c_str());
    }
    std::fflush(stdout);  // a later failure must not hide what was already deleted
  }
}

// --- checkpoint / hibernate / wake ------------------------------------------------------------

// Draws "[#####.....] 12.5 MiB / 50.0 MiB  41.3 MiB/s" on stderr, redrawn in place, when stderr
// is a terminal; silent otherwise.
class ProgressBar {
 public:
  ProgressBar() : enabled_(::isatty(STDERR_FILENO) != 0), start_(std::chrono::steady_clock::now()) {}
  ~ProgressBar() { clear(); }
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  void update(double done_bytes, double total_bytes) {
    if (!enabled_) return;
    constexpr int kWidth = 30;
    const double fraction = total_bytes > 0 ? std::clamp(done_bytes / total_bytes, 0.0, 1.0) : 0.0;
    const int filled = static_cast<int>(fraction * kWidth);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const double rate = seconds > 0 ? done_bytes / seconds : 0.0;
    std::fprintf(stderr, "\r[%s%s] %s / %s  %s/s\033[K", std::string(filled, '#').c_str(),
                 std::string(kWidth - filled, '.').c_str(), human_bytes(done_bytes).c_str(),
                 human_bytes(total_bytes).c_str(), human_bytes(rate).c_str());
    std::fflush(stderr);
    drawn_ = true;
  }

  void clear() {
    if (!drawn_) return;
    std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
    drawn_ = false;
  }

 private:
  bool enabled_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point start_;
};

enum class Move { checkpoint, hibernate, wake };

struct MoveOptions {
  ClientOptions client;
  std::string session;
  std::string tier = "ssd";  // hibernate only
};

void run_move(const MoveOptions& o, Move move) {
  DaemonClient client(socket_path(o.client.socket));
  json::object params{{"session", o.session}, {"progress", true}};
  const char* method = "sessions/checkpoint";
  if (move == Move::hibernate) {
    method = "sessions/hibernate";
    params["tier"] = o.tier;
  } else if (move == Move::wake) {
    method = "sessions/wake";
  }
  const int64_t request = client.next_id();
  json::value result;
  {
    ProgressBar bar;
    result = call_daemon(client, method, params, [&](std::string_view notified, const json::object& p) {
      if (notified != "sessions/progress" || number_of(p.if_contains("request")) != static_cast<double>(request)) {
        return;
      }
      bar.update(number_of(p.if_contains("done_bytes")), number_of(p.if_contains("total_bytes")));
    });
  }
  if (o.client.json) return print_json(result);
  const json::object* r = result.if_object();
  const json::value* session = r != nullptr ? r->if_contains("session") : nullptr;
  const std::string who = session != nullptr && session->is_object() ? label(session->as_object()) : o.session;
  const double bytes = r != nullptr ? number_of(r->if_contains("bytes")) : 0.0;
  const double seconds = r != nullptr ? number_of(r->if_contains("seconds")) : 0.0;
  std::string what;
  switch (move) {
    case Move::checkpoint: what = "checkpointed " + who; break;
    case Move::hibernate: what = "hibernated " + who + " to " + o.tier; break;
    case Move::wake: {
      const std::string tier = session != nullptr && session->is_object() ? field(session->as_object(), "tier") : "-";
      what = "woke " + who + " (now in " + tier + ")";
      break;
    }
  }
  std::printf("%s: %s in %.2f s\n", what.c_str(), human_bytes(bytes).c_str(), seconds);
}

// --- stats ------------------------------------------------------------------------------------

enum class Unit { none, bytes, seconds, milliseconds, per_second };

// The unit a key names by its suffix (the daemon names units in keys: _bytes, _s, _ms, _per_s).
Unit unit_of(std::string_view key) {
  if (key.ends_with("per_s")) return Unit::per_second;
  if (key.ends_with("bytes") || key.starts_with("bytes_")) return Unit::bytes;
  if (key.ends_with("_ms")) return Unit::milliseconds;
  if (key.ends_with("_s") || key.ends_with("seconds")) return Unit::seconds;
  return Unit::none;
}

// A figure as a person reads it, in its key's unit or else its group's (the figures of
// "bytes_moved" are bytes, those of "ttft_ms" milliseconds; a "count" never has a unit).
std::string figure(std::string_view key, const json::value& v, Unit group_unit) {
  if (!v.is_number()) return plain(&v);
  Unit unit = unit_of(key);
  if (unit == Unit::none && key != "count") unit = group_unit;
  const double x = number_of(&v);
  char buf[48];
  switch (unit) {
    case Unit::bytes: return human_bytes(x);
    case Unit::seconds: std::snprintf(buf, sizeof buf, "%.3g s", x); return buf;
    case Unit::milliseconds: std::snprintf(buf, sizeof buf, "%.3g ms", x); return buf;
    case Unit::per_second: std::snprintf(buf, sizeof buf, "%.4g/s", x); return buf;
    case Unit::none: break;
  }
  return plain(&v);
}

std::string pretty_key(std::string_view key) {
  std::string k(key);
  std::replace(k.begin(), k.end(), '_', ' ');
  return k;
}

// Scalars of a group first (aligned key: value lines), then its sub-groups, indented.
void print_group(const json::object& group, int indent, Unit unit) {
  const std::string pad(static_cast<size_t>(indent), ' ');
  size_t width = 0;
  for (const auto& [key, value] : group) {
    if (!value.is_object()) width = std::max(width, key.size());
  }
  for (const auto& [key, value] : group) {
    if (value.is_object()) continue;
    std::string text;
    if (const json::array* a = value.if_array()) {
      for (const json::value& item : *a) {
        text += (text.empty() ? "" : ", ") + (item.is_structured() ? json::serialize(item) : figure(key, item, unit));
      }
      if (text.empty()) text = "-";
    } else {
      text = figure(key, value, unit);
    }
    std::printf("%s%s:%s%s\n", pad.c_str(), pretty_key(key).c_str(), std::string(width - key.size() + 1, ' ').c_str(),
                text.c_str());
  }
  for (const auto& [key, value] : group) {
    if (!value.is_object()) continue;
    std::printf("%s%s:\n", pad.c_str(), pretty_key(key).c_str());
    const Unit named = unit_of(key);
    print_group(value.as_object(), indent + 2, named != Unit::none ? named : unit);
  }
}

// daemon/shutdown, then wait until the socket is gone (the daemon removes it when it stops
// accepting, and exits once every session is checkpointed).
void run_stop(const ClientOptions& o) {
  const std::string path = socket_path(o.socket);
  {
    DaemonClient client(path);
    const json::value result = call_daemon(client, "daemon/shutdown");
    if (o.json) print_json(result);
  }
  for (int i = 0; i < 600 && daemon_listening(path); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  if (!o.json) std::fprintf(stderr, "den: the daemon at %s is stopping (it checkpoints every session, then exits)\n", path.c_str());
}

void run_stats(const ClientOptions& o) {
  DaemonClient client(socket_path(o.socket));
  const json::value result = call_daemon(client, "daemon/stats");
  if (o.json) return print_json(result);
  if (const json::object* groups = result.if_object()) return print_group(*groups, 0, Unit::none);
  print_json(result);
}

}  // namespace

void add_sessions_commands(CLI::App& app) {
  CLI::App* sessions = app.add_subcommand("sessions", "List and manage the daemon's sessions (needs 'den serve')");
  sessions->require_subcommand(1);

  {
    auto o = std::make_shared<ClientOptions>();
    CLI::App* cmd = sessions->add_subcommand("ls", "List the sessions: id, name, tokens, KV tier, checkpoint");
    cmd->alias("list");
    add_client_options(*cmd, *o);
    cmd->callback([o] { run_ls(*o); });
  }
  {
    auto o = std::make_shared<ShowOptions>();
    CLI::App* cmd = sessions->add_subcommand("show", "Show one session");
    cmd->add_option("session", o->session, "Session id or name")->required();
    cmd->add_flag("--tokens", o->tokens, "Also print its token ids");
    cmd->add_flag("--text", o->text, "Also print its history as text");
    add_client_options(*cmd, o->client);
    cmd->callback([o] { run_show(*o); });
  }
  {
    auto o = std::make_shared<NameOptions>();
    CLI::App* cmd = sessions->add_subcommand("create", "Create an empty session, named or not");
    cmd->add_option("name", o->session, "Name: 1-64 characters of A-Z a-z 0-9 . _ - (default: none, use its id)");
    add_client_options(*cmd, o->client);
    cmd->callback([o] { run_create(*o); });
  }
  {
    auto o = std::make_shared<NameOptions>();
    CLI::App* cmd = sessions->add_subcommand("fork", "Copy a session (history and KV) into a new one");
    cmd->add_option("session", o->session, "Session id or name")->required();
    cmd->add_option("new", o->new_name, "Name of the copy (default: none)");
    add_client_options(*cmd, o->client);
    cmd->callback([o] { run_fork(*o); });
  }
  for (const bool pin : {true, false}) {
    auto o = std::make_shared<NameOptions>();
    CLI::App* cmd = sessions->add_subcommand(pin ? "pin" : "unpin",
                                             pin ? "Keep a session's KV in the fastest tier (never evicted)"
                                                 : "Let a pinned session's KV be evicted again");
    cmd->add_option("session", o->session, "Session id or name")->required();
    add_client_options(*cmd, o->client);
    cmd->callback([o, pin] { run_pin(*o, pin); });
  }
  {
    auto o = std::make_shared<MoveOptions>();
    CLI::App* cmd = sessions->add_subcommand("checkpoint", "Write a session's history and KV to durable storage");
    cmd->add_option("session", o->session, "Session id or name")->required();
    add_client_options(*cmd, o->client);
    cmd->callback([o] { run_move(*o, Move::checkpoint); });
  }
  {
    auto o = std::make_shared<MoveOptions>();
    CLI::App* cmd = sessions->add_subcommand("hibernate", "Move a session's KV out of the fast tier");
    cmd->add_option("session", o->session, "Session id or name")->required();
    cmd->add_option("--tier", o->tier, "Where to put it")->check(CLI::IsMember({"dram", "ssd"}))->capture_default_str();
    add_client_options(*cmd, o->client);
    cmd->callback([o] { run_move(*o, Move::hibernate); });
  }
  {
    auto o = std::make_shared<MoveOptions>();
    CLI::App* cmd = sessions->add_subcommand("wake", "Bring a hibernated session's KV back to the fast tier");
    cmd->add_option("session", o->session, "Session id or name")->required();
    add_client_options(*cmd, o->client);
    cmd->callback([o] { run_move(*o, Move::wake); });
  }
  {
    auto o = std::make_shared<RemoveOptions>();
    CLI::App* cmd = sessions->add_subcommand("rm", "Delete sessions (their history, KV and checkpoints)");
    cmd->add_option("sessions", o->sessions, "Session ids or names")->required();
    add_client_options(*cmd, o->client);
    cmd->callback([o] { run_rm(*o); });
  }

  auto o = std::make_shared<ClientOptions>();
  CLI::App* stats = app.add_subcommand("stats", "The daemon's counters: requests, tokens, latency, tiers, transfers");
  add_client_options(*stats, *o);
  stats->callback([o] { run_stats(*o); });

  CLI::App* stop = app.add_subcommand("stop", "Stop the daemon: it cancels generations, checkpoints every session and exits");
  add_client_options(*stop, *o);
  stop->callback([o] { run_stop(*o); });
}

}  // namespace den::runtime::cli
