// `den agent spawn|send|attach|ps|logs|get|stop|rm`: the client CLI of the daemon's agents
// (docs/PROTOCOL.md, "Agents"). Human output by default; --json prints the daemon's results (and,
// for attach, its events) one JSON object per line, for scripts. Notes go to stderr.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
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

const json::object& as_object(const json::value& v, std::string_view what) {
  if (const json::object* o = v.if_object()) return *o;
  throw std::runtime_error("the daemon answered " + std::string(what) + " with something that is not an object: " +
                           json::serialize(v));
}

const json::array& array_field(const json::object& o, std::string_view key, std::string_view method) {
  const json::value* v = o.if_contains(key);
  if (v == nullptr || !v->is_array()) {
    throw std::runtime_error("the daemon's " + std::string(method) + " result has no '" + std::string(key) + "' array");
  }
  return v->as_array();
}

// Unix seconds as local "YYYY-MM-DD HH:MM:SS" ("-" for 0: not yet).
std::string local_time(double unix_seconds) {
  if (unix_seconds <= 0) return "-";
  const auto t = static_cast<std::time_t>(unix_seconds);
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &tm);
  return buf;
}

std::string clock_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[16];
  std::strftime(buf, sizeof buf, "%H:%M:%S", &tm);
  return buf;
}

std::string seconds_text(double seconds) {
  char buf[32];
  std::snprintf(buf, sizeof buf, seconds < 10 ? "%.2f s" : "%.0f s", seconds);
  return buf;
}

std::string trimmed(std::string_view s) {
  const auto first = s.find_first_not_of(" \t\r\n");
  if (first == std::string_view::npos) return {};
  const auto last = s.find_last_not_of(" \t\r\n");
  return std::string(s.substr(first, last - first + 1));
}

// "message#12 (waiting)" for the run an agent is in, "-" when idle.
std::string run_text(const json::object& agent) {
  const json::value* run = agent.if_contains("run");
  const json::object* r = run != nullptr ? run->if_object() : nullptr;
  if (r == nullptr) return "-";
  const json::value* waiting = r->if_contains("waiting");
  const bool is_waiting = waiting != nullptr && waiting->is_bool() && waiting->as_bool();
  return field(*r, "trigger") + "#" + field(*r, "id") + (is_waiting ? " (waiting)" : "");
}

// "120" or "120/5000" when the agent has a token budget.
std::string tokens_text(const json::object& agent) {
  const double budget = number_of(agent.if_contains("token_budget"));
  return field(agent, "tokens_used") + (budget > 0 ? "/" + field(agent, "token_budget") : "");
}

// --- spawn ------------------------------------------------------------------------------------

struct SpawnOptions {
  ClientOptions client;
  std::string file;
  std::string name;  // default: the file's stem
  int priority = 0;
  int64_t budget = 0;
};

std::string read_script(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read the script '" + path + "': " + std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

void run_spawn(const SpawnOptions& o) {
  const std::string name = o.name.empty() ? std::filesystem::path(o.file).stem().string() : o.name;
  json::object params{{"name", name}, {"script", read_script(o.file)}};
  if (o.priority != 0) params["priority"] = o.priority;
  if (o.budget > 0) params["token_budget"] = o.budget;
  DaemonClient client(socket_path(o.client.socket));
  const json::value result = call_daemon(client, "agents/spawn", params);
  if (o.client.json) return print_json(result);
  const json::object& a = as_object(result, "agents/spawn");
  std::printf("spawned agent %s (%s, session %s)\n", field(a, "name").c_str(), field(a, "id").c_str(),
              field(a, "session").c_str());
  std::fprintf(stderr, "talk to it: den agent send %s \"hello\"; watch it: den agent attach %s\n", name.c_str(),
               name.c_str());
}

// --- send -------------------------------------------------------------------------------------

struct SendOptions {
  ClientOptions client;
  std::string agent;
  std::string text;
  bool no_wait = false;
};

// Why the handler of `message` failed, from the agent's recent runs ("" when not found).
std::string run_error(DaemonClient& client, const std::string& agent, double message) {
  try {
    const json::object a = as_object(client.call("agents/get", {{"agent", agent}}), "agents/get");
    for (const json::value& r : array_field(a, "runs", "agents/get")) {
      const json::object* run = r.if_object();
      if (run != nullptr && number_of(run->if_contains("message")) == message) return field(*run, "error");
    }
  } catch (const std::exception&) {
    // The failure itself is what matters; its reason is a bonus.
  }
  return {};
}

void run_send(const SendOptions& o) {
  DaemonClient client(socket_path(o.client.socket));
  const bool stream = !o.no_wait && !o.client.json && ::isatty(STDOUT_FILENO) != 0;
  const json::object params{{"agent", o.agent}, {"text", o.text}, {"wait", !o.no_wait}, {"stream", stream}};
  const int64_t request = client.next_id();
  std::string streamed;
  const json::value result = call_daemon(client, "agents/send", params, [&](std::string_view method, const json::object& p) {
    if (method != "agents/stream" || number_of(p.if_contains("request")) != static_cast<double>(request)) return;
    const json::value* text = p.if_contains("text");
    if (text == nullptr || !text->is_string()) return;
    streamed += text->as_string();
    std::fwrite(text->as_string().data(), 1, text->as_string().size(), stdout);
    std::fflush(stdout);
  });
  if (o.client.json) return print_json(result);
  const json::object& r = as_object(result, "agents/send");
  if (o.no_wait) {
    std::printf("queued message %s for %s\n", field(r, "message").c_str(), o.agent.c_str());
    return;
  }
  if (!streamed.empty() && streamed.back() != '\n') std::printf("\n");
  // A reply the stream already showed (the agent replied with text it generated) is not
  // printed twice.
  const std::string shown = trimmed(streamed);
  const json::value* replies = r.if_contains("replies");
  size_t count = 0;
  if (replies != nullptr && replies->is_array()) {
    for (const json::value& reply : replies->as_array()) {
      ++count;
      const std::string text = plain(&reply);
      const std::string t = trimmed(text);
      if (!shown.empty() && !t.empty() && shown.ends_with(t)) continue;
      std::printf("%s\n", text.c_str());
    }
  }
  std::fflush(stdout);
  if (field(r, "status") == "failed") {
    // The error's first line: its traceback is in the log.
    std::string why = run_error(client, o.agent, number_of(r.if_contains("message")));
    why = why.substr(0, why.find('\n'));
    throw std::runtime_error("agent " + o.agent + "'s on_message failed" + (why.empty() ? "" : ": " + why) +
                             " (den agent logs " + o.agent + " shows its log)");
  }
  if (count == 0) std::fprintf(stderr, "den: %s handled the message without replying\n", o.agent.c_str());
}

// --- attach -----------------------------------------------------------------------------------

// Prints agents/event notifications as lines: "12:00:01 reply  ...". Generated text arrives in
// pieces; they are written on one line as they come, which the next event ends.
class EventPrinter {
 public:
  static constexpr size_t kIndent = 16;  // "12:00:01 reply  "

  explicit EventPrinter(bool json) : json_(json) {}

  void print(const json::object& event) {
    if (json_) return print_json(event);
    const std::string kind = field(event, "kind");
    if (kind == "text") {
      if (!in_text_) std::printf("%s text   ", clock_now().c_str());
      in_text_ = true;
      const std::string text = field(event, "text");
      // Newlines inside the text would break the one-event-per-line layout.
      std::string flat = text;
      std::replace(flat.begin(), flat.end(), '\n', ' ');
      std::fputs(flat.c_str(), stdout);
      std::fflush(stdout);
      return;
    }
    end_text();
    std::string line;
    if (kind == "reply") {
      line = "reply  to message " + field(event, "message") + ": " + field(event, "text");
    } else if (kind == "log") {
      line = "log    " + field(event, "level") + ": " + field(event, "text");
    } else if (kind == "run") {
      const std::string error = field(event, "error");
      line = "run    " + field(event, "run") + " (" + field(event, "trigger") + ") " + field(event, "status") +
             (field(event, "status") == "failed" && error != "-" && !error.empty() ? ": " + error : "");
    } else {
      json::object rest = event;
      rest.erase("request");
      rest.erase("seq");
      line = kind + " " + json::serialize(rest);
    }
    // A multi-line reply or log line continues indented under its first line.
    std::string indented;
    for (char c : line) indented += c == '\n' ? std::string("\n") + std::string(kIndent, ' ') : std::string(1, c);
    std::printf("%s %s\n", clock_now().c_str(), indented.c_str());
    std::fflush(stdout);
  }

  void end_text() {
    if (!in_text_) return;
    std::printf("\n");
    std::fflush(stdout);
    in_text_ = false;
  }

 private:
  bool json_;
  bool in_text_ = false;
};

struct NameOptions {
  ClientOptions client;
  std::string agent;
};

void run_attach(const NameOptions& o) {
  DaemonClient client(socket_path(o.client.socket));
  EventPrinter printer(o.client.json);
  const int64_t request = client.next_id();
  auto on_event = [&](std::string_view method, const json::object& p) {
    if (method == "agents/event" && number_of(p.if_contains("request")) == static_cast<double>(request)) printer.print(p);
  };
  call_daemon(client, "agents/subscribe", {{"agent", o.agent}}, on_event);
  if (!o.client.json) std::fprintf(stderr, "den: attached to %s (Ctrl-C detaches)\n", o.agent.c_str());
  for (;;) {
    const std::optional<std::string> line = client.read_line(std::chrono::milliseconds(-1));
    if (!line) break;
    json::error_code ec;
    const json::value message = json::parse(*line, ec);
    const json::object* m = ec ? nullptr : message.if_object();
    if (m == nullptr) continue;
    const json::value* method = m->if_contains("method");
    const json::value* params = m->if_contains("params");
    if (method != nullptr && method->is_string() && params != nullptr && params->is_object()) {
      on_event(method->as_string(), params->as_object());
    }
  }
  printer.end_text();
  std::fprintf(stderr, "den: the daemon closed the connection\n");
}

// --- ps / get / logs --------------------------------------------------------------------------

void run_ps(const ClientOptions& o) {
  DaemonClient client(socket_path(o.socket));
  const json::value result = call_daemon(client, "agents/list");
  if (o.json) return print_json(result);
  const json::array& agents = array_field(as_object(result, "agents/list"), "agents", "agents/list");
  std::vector<std::vector<std::string>> rows = {{"NAME", "STATUS", "RUN", "QUEUED", "TOKENS", "SESSION"}};
  for (const json::value& v : agents) {
    const json::object& a = as_object(v, "agents/list");
    rows.push_back({field(a, "name"), field(a, "status"), run_text(a), field(a, "queued_messages"), tokens_text(a),
                    field(a, "session")});
  }
  print_table(rows);
  if (agents.empty()) std::fprintf(stderr, "no agents yet: den agent spawn FILE.lua --name NAME starts one\n");
}

void run_get(const NameOptions& o) {
  DaemonClient client(socket_path(o.client.socket));
  const json::value result = call_daemon(client, "agents/get", {{"agent", o.agent}});
  if (o.client.json) return print_json(result);
  const json::object& a = as_object(result, "agents/get");
  std::vector<std::pair<std::string, std::string>> lines = {
      {"name", field(a, "name")},
      {"id", field(a, "id")},
      {"status", field(a, "status")},
  };
  if (a.contains("error")) lines.emplace_back("error", field(a, "error"));
  lines.insert(lines.end(), {{"session", field(a, "session")},
                             {"priority", field(a, "priority")},
                             {"tokens used", tokens_text(a)},
                             {"queued messages", field(a, "queued_messages")},
                             {"run", run_text(a)},
                             {"script", field(a, "script").empty() ? "-" : field(a, "script")},
                             {"created", local_time(number_of(a.if_contains("created_at")))}});
  if (const json::value* state = a.if_contains("state")) lines.emplace_back("state", json::serialize(*state));
  size_t width = 0;
  for (const auto& line : lines) width = std::max(width, line.first.size());
  for (const auto& [key, value] : lines) {
    std::printf("%s:%s%s\n", key.c_str(), std::string(width - key.size() + 1, ' ').c_str(), value.c_str());
  }
  if (const json::value* runs = a.if_contains("runs"); runs != nullptr && runs->is_array()) {
    std::printf("recent runs:%s\n", runs->as_array().empty() ? " none" : "");
    for (const json::value& v : runs->as_array()) {
      const json::object* r = v.if_object();
      if (r == nullptr) continue;
      const double started = number_of(r->if_contains("started_at")), ended = number_of(r->if_contains("ended_at"));
      std::string line = "  " + field(*r, "id") + "  " + field(*r, "trigger");
      if (number_of(r->if_contains("message")) > 0) line += " (message " + field(*r, "message") + ")";
      line += "  " + field(*r, "status") + "  " + local_time(started);
      if (ended > 0) line += ", " + seconds_text(ended - started);
      // The error's first line (a traceback follows it; den agent logs has it whole).
      const std::string error = field(*r, "error");
      if (!error.empty() && error != "-") line += "  " + error.substr(0, error.find('\n'));
      std::printf("%s\n", line.c_str());
    }
  }
  if (const json::value* timers = a.if_contains("timers"); timers != nullptr && timers->is_array()) {
    std::printf("timers:%s\n", timers->as_array().empty() ? " none" : "");
    const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    for (const json::value& v : timers->as_array()) {
      const json::object* t = v.if_object();
      if (t == nullptr) continue;
      const double due = number_of(t->if_contains("due_at"));
      std::string line = "  " + field(*t, "id") + "  due " + local_time(due);
      line += due > now ? " (in " + seconds_text(due - now) + ")" : " (due now)";
      if (const json::value* payload = t->if_contains("payload"); payload != nullptr && !payload->is_null()) {
        line += "  payload " + json::serialize(*payload);
      }
      std::printf("%s\n", line.c_str());
    }
  }
}

struct LogsOptions {
  ClientOptions client;
  std::string agent;
  bool follow = false;
};

void run_logs(const LogsOptions& o) {
  DaemonClient client(socket_path(o.client.socket));
  constexpr int kPage = 1000;  // the daemon's largest page
  int64_t after = 0;
  for (;;) {
    const json::value result =
        call_daemon(client, "agents/logs", {{"agent", o.agent}, {"after", after}, {"limit", kPage}});
    const json::array& logs = array_field(as_object(result, "agents/logs"), "logs", "agents/logs");
    for (const json::value& v : logs) {
      const json::object* l = v.if_object();
      if (l == nullptr) continue;
      after = std::max(after, static_cast<int64_t>(number_of(l->if_contains("id"))));
      if (o.client.json) {
        print_json(v);
      } else {
        std::printf("%s %-5s %s\n", local_time(number_of(l->if_contains("at"))).c_str(), field(*l, "level").c_str(),
                    field(*l, "text").c_str());
      }
    }
    std::fflush(stdout);
    if (logs.size() >= static_cast<size_t>(kPage)) continue;  // more to read at once
    if (!o.follow) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
}

// --- stop / rm --------------------------------------------------------------------------------

void run_stop(const NameOptions& o) {
  DaemonClient client(socket_path(o.client.socket));
  const json::value result = call_daemon(client, "agents/stop", {{"agent", o.agent}});
  if (o.client.json) return print_json(result);
  std::printf("stopped agent %s\n", o.agent.c_str());
  std::fprintf(stderr, "its current handler finishes first; it takes no more messages (den agent rm %s deletes it)\n",
               o.agent.c_str());
}

struct RemoveOptions {
  ClientOptions client;
  std::vector<std::string> agents;
};

void run_rm(const RemoveOptions& o) {
  DaemonClient client(socket_path(o.client.socket));
  for (const std::string& agent : o.agents) {
    const json::value result = call_daemon(client, "agents/delete", {{"agent", agent}});
    if (o.client.json) {
      print_json(result);
    } else {
      std::printf("deleted agent %s\n", agent.c_str());
    }
    std::fflush(stdout);  // a later failure must not hide what was already deleted
  }
}

}  // namespace

void add_agent_commands(CLI::App& app) {
  CLI::App* agent = app.add_subcommand("agent", "Run and manage Lua agents in the daemon (needs 'den serve'; agents/README.md)");
  agent->require_subcommand(1);

  {
    auto o = std::make_shared<SpawnOptions>();
    CLI::App* cmd = agent->add_subcommand("spawn", "Start an agent from a Lua script (its on_start runs at once)");
    cmd->add_option("file", o->file, "The agent's Lua script (sent to the daemon as text)")->required();
    cmd->add_option("--name", o->name, "The agent's name: 1-64 of A-Z a-z 0-9 . _ - (default: the file's name without .lua)");
    cmd->add_option("--priority", o->priority, "Scheduling priority: higher generates first")->check(CLI::Range(-100, 100))
        ->capture_default_str();
    cmd->add_option("--budget", o->budget, "Tokens it may use in all (0: unlimited)")->check(CLI::NonNegativeNumber)
        ->capture_default_str();
    add_client_options(*cmd, o->client);
    cmd->callback([o] { run_spawn(*o); });
  }
  {
    auto o = std::make_shared<SendOptions>();
    CLI::App* cmd = agent->add_subcommand(
        "send", "Send an agent a message and print its replies, one per line (on a terminal, its generated text streams first)");
    cmd->add_option("agent", o->agent, "The agent's name")->required();
    cmd->add_option("text", o->text, "The message")->required();
    cmd->add_flag("--no-wait", o->no_wait, "Only queue the message and print its id");
    add_client_options(*cmd, o->client);
    cmd->callback([o] { run_send(*o); });
  }
  {
    auto o = std::make_shared<NameOptions>();
    CLI::App* cmd = agent->add_subcommand("attach", "Print an agent's events as they happen: replies, text, logs, runs (Ctrl-C stops)");
    cmd->add_option("agent", o->agent, "The agent's name")->required();
    add_client_options(*cmd, o->client);
    cmd->callback([o] { run_attach(*o); });
  }
  {
    auto o = std::make_shared<ClientOptions>();
    CLI::App* cmd = agent->add_subcommand("ps", "List the agents: status, current run, queued messages, tokens, session");
    cmd->alias("ls");
    add_client_options(*cmd, *o);
    cmd->callback([o] { run_ps(*o); });
  }
  {
    auto o = std::make_shared<LogsOptions>();
    CLI::App* cmd = agent->add_subcommand("logs", "Print an agent's log (ctx:log, print, failed handlers)");
    cmd->add_option("agent", o->agent, "The agent's name")->required();
    cmd->add_flag("-f,--follow", o->follow, "Keep printing new lines as they come (Ctrl-C stops)");
    add_client_options(*cmd, o->client);
    cmd->callback([o] { run_logs(*o); });
  }
  {
    auto o = std::make_shared<NameOptions>();
    CLI::App* cmd = agent->add_subcommand("get", "Show one agent: status, tokens, state, recent runs, timers");
    cmd->alias("show");
    cmd->add_option("agent", o->agent, "The agent's name")->required();
    add_client_options(*cmd, o->client);
    cmd->callback([o] { run_get(*o); });
  }
  {
    auto o = std::make_shared<NameOptions>();
    CLI::App* cmd = agent->add_subcommand("stop", "Stop an agent: no more handlers run (it stays listed)");
    cmd->add_option("agent", o->agent, "The agent's name")->required();
    add_client_options(*cmd, o->client);
    cmd->callback([o] { run_stop(*o); });
  }
  {
    auto o = std::make_shared<RemoveOptions>();
    CLI::App* cmd = agent->add_subcommand("rm", "Delete agents and everything of them: state, queue, log, session");
    cmd->alias("delete");
    cmd->add_option("agents", o->agents, "Agent names")->required();
    add_client_options(*cmd, o->client);
    cmd->callback([o] { run_rm(*o); });
  }
}

}  // namespace den::runtime::cli
