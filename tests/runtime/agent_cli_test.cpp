// `den agent ...` against a real `den serve` on stories260K: the example assistant
// (agents/assistant.lua) spawned, sent messages, listed, its logs and details read, attached
// to, stopped and removed, plus the error lines for what the daemon refuses.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <boost/json.hpp>

#include "daemon_process.h"
#include "test_support.h"

extern char** environ;

namespace {

namespace json = boost::json;
using den::test::run_den;

json::object parse_object(const std::string& text) {
  json::error_code ec;
  json::value v = json::parse(text, ec);
  REQUIRE_MESSAGE(!ec, "not JSON: " << text);
  REQUIRE(v.is_object());
  return v.as_object();
}

// <repo>/agents/<name>: the example agents.
std::string example_agent(const std::string& name) {
  const std::filesystem::path root = (std::filesystem::path(den::test::fixture_path("")) / ".." / "..").lexically_normal();
  return (root / "agents" / name).string();
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// `den ARGS` running in the background with stdout and stderr in files; SIGINT when done.
class BackgroundDen {
 public:
  BackgroundDen(const std::vector<std::string>& args, const std::string& out_path, const std::string& err_path) {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    const std::string binary = den::test::den_binary();
    std::vector<std::string> strings = {binary};
    strings.insert(strings.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& s : strings) argv.push_back(s.data());
    argv.push_back(nullptr);
    const int rc = posix_spawn(&pid_, binary.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) throw std::runtime_error("cannot start " + binary);
  }
  ~BackgroundDen() { stop(); }
  BackgroundDen(const BackgroundDen&) = delete;
  BackgroundDen& operator=(const BackgroundDen&) = delete;

  // SIGINT and wait; the wait status.
  int stop() {
    if (pid_ <= 0) return status_;
    ::kill(pid_, SIGINT);
    ::waitpid(pid_, &status_, 0);
    pid_ = -1;
    return status_;
  }

 private:
  pid_t pid_ = -1;
  int status_ = 0;
};

// Polls `path` until it contains `part` (true) or `timeout` passes (false).
bool wait_for_text(const std::string& path, const std::string& part, std::chrono::seconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (den::test::file_exists(path) && contains(den::test::read_file(path), part)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

}  // namespace

TEST_CASE("den agent spawn, send, ps, get, logs, attach and rm with the example assistant") {
  DEN_SKIP_UNLESS(den::test::file_exists(den::test::stories_model()), "../shared/models/stories260K is absent");
  den::test::DaemonProcess daemon({"-m", den::test::stories_model(), "--backend", "cpu", "--threads", "1"});
  INFO("den serve's output:\n" << daemon.log());
  const std::string socket = daemon.socket_path();

  const auto spawned = run_den({"agent", "spawn", example_agent("assistant.lua"), "--name", "assistant", "--socket", socket});
  REQUIRE_MESSAGE(spawned.exit_code == 0, spawned.err);
  CHECK(contains(spawned.out, "spawned agent assistant"));

  // Not a terminal: no streaming, the reply alone, on one line.
  const auto sent = run_den({"agent", "send", "assistant", "Hello", "--socket", socket});
  CHECK_MESSAGE(sent.exit_code == 0, sent.err);
  CHECK_FALSE(sent.out.empty());
  CHECK(sent.out.back() == '\n');
  const auto sent_json = run_den({"agent", "send", "assistant", "Tell me a story", "--json", "--socket", socket});
  REQUIRE_MESSAGE(sent_json.exit_code == 0, sent_json.err);
  const json::object result = parse_object(sent_json.out);
  CHECK(result.at("status").as_string() == "done");
  CHECK(result.at("replies").as_array().size() == 1);

  const auto queued = run_den({"agent", "send", "assistant", "One more", "--no-wait", "--socket", socket});
  CHECK_MESSAGE(queued.exit_code == 0, queued.err);
  CHECK(contains(queued.out, "queued message"));

  const auto ps = run_den({"agent", "ps", "--socket", socket});
  CHECK(ps.exit_code == 0);
  CHECK(contains(ps.out, "NAME"));
  CHECK(contains(ps.out, "SESSION"));
  CHECK(contains(ps.out, "assistant"));
  CHECK(contains(ps.out, "active"));
  const auto ps_json = run_den({"agent", "ps", "--json", "--socket", socket});
  REQUIRE(ps_json.exit_code == 0);
  const json::array agents = parse_object(ps_json.out).at("agents").as_array();
  REQUIRE(agents.size() == 1);
  CHECK(agents[0].at("name").as_string() == "assistant");

  // The turn counter lives in ctx.state: wait for the queued third message to be handled.
  int64_t turns = 0;
  for (int i = 0; i < 200 && turns < 3; ++i) {
    const auto got = run_den({"agent", "get", "assistant", "--json", "--socket", socket});
    REQUIRE_MESSAGE(got.exit_code == 0, got.err);
    turns = parse_object(got.out).at("state").at("turns").to_number<int64_t>();
    if (turns < 3) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  CHECK(turns == 3);
  const auto details = run_den({"agent", "get", "assistant", "--socket", socket});
  CHECK(details.exit_code == 0);
  CHECK(contains(details.out, "status:"));
  CHECK(contains(details.out, "recent runs:"));
  CHECK(contains(details.out, "timers: none"));
  CHECK(contains(details.out, "\"turns\":3"));

  const auto logs = run_den({"agent", "logs", "assistant", "--socket", socket});
  CHECK(logs.exit_code == 0);
  CHECK(contains(logs.out, "turn 1:"));
  CHECK(contains(logs.out, "turn 3:"));

  // attach prints the events of the next message: its reply and the end of its run.
  {
    den::test::TempDir dir;
    BackgroundDen attach({"agent", "attach", "assistant", "--socket", socket}, dir.file("out"), dir.file("err"));
    REQUIRE_MESSAGE(wait_for_text(dir.file("err"), "attached to assistant", std::chrono::seconds(10)),
                    den::test::read_file(dir.file("err")));
    CHECK(run_den({"agent", "send", "assistant", "Hi again", "--socket", socket}).exit_code == 0);
    CHECK(wait_for_text(dir.file("out"), "run    ", std::chrono::seconds(30)));
    attach.stop();
    const std::string events = den::test::read_file(dir.file("out"));
    CHECK(contains(events, "reply  to message"));
    CHECK(contains(events, "log    info: turn 4:"));
    CHECK(contains(events, "(message) completed"));
  }

  const auto removed = run_den({"agent", "rm", "assistant", "--socket", socket});
  CHECK_MESSAGE(removed.exit_code == 0, removed.err);
  CHECK(contains(removed.out, "deleted agent assistant"));
  const auto after = run_den({"agent", "ps", "--json", "--socket", socket});
  CHECK(parse_object(after.out).at("agents").as_array().empty());
}

TEST_CASE("den agent error lines: unknown agent, name taken, bad script, failing handler, stopped agent") {
  DEN_SKIP_UNLESS(den::test::file_exists(den::test::stories_model()), "../shared/models/stories260K is absent");
  den::test::DaemonProcess daemon({"-m", den::test::stories_model(), "--backend", "cpu", "--threads", "1"});
  INFO("den serve's output:\n" << daemon.log());
  const std::string socket = daemon.socket_path();

  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"send", "nobody", "hi"}, {"get", "nobody"}, {"logs", "nobody"}, {"stop", "nobody"}, {"rm", "nobody"}}) {
    std::vector<std::string> command = {"agent"};
    command.insert(command.end(), args.begin(), args.end());
    command.insert(command.end(), {"--socket", socket});
    const auto r = run_den(command);
    CHECK(r.exit_code == 1);
    CHECK(r.err == "den: error: no agent 'nobody' (den agent ps lists the agents)\n");
  }

  const std::string echo = daemon.directory() / "echo.lua";
  den::test::write_file(echo, R"(return {
  on_message = function(ctx, msg)
    if msg.text == "fail" then error("asked to fail") end
    ctx:reply(msg, "echo: " .. msg.text)
  end,
})");
  const auto spawned = run_den({"agent", "spawn", echo, "--socket", socket});  // named after the file
  REQUIRE_MESSAGE(spawned.exit_code == 0, spawned.err);
  const auto again = run_den({"agent", "spawn", echo, "--socket", socket});
  CHECK(again.exit_code == 1);
  CHECK(contains(again.err, "'echo' exists already"));
  CHECK(contains(again.err, "den agent rm NAME"));

  const auto replied = run_den({"agent", "send", "echo", "hello there", "--socket", socket});
  CHECK_MESSAGE(replied.exit_code == 0, replied.err);
  CHECK(replied.out == "echo: hello there\n");

  // A handler that fails: exit 1 and the error, from the run.
  const auto failed = run_den({"agent", "send", "echo", "fail", "--socket", socket});
  CHECK(failed.exit_code == 1);
  CHECK(contains(failed.err, "on_message failed"));
  CHECK(contains(failed.err, "asked to fail"));
  const auto logs = run_den({"agent", "logs", "echo", "--socket", socket});
  CHECK(contains(logs.out, "asked to fail"));

  const std::string broken = daemon.directory() / "broken.lua";
  den::test::write_file(broken, "return {on_message = function(ctx, msg) end");
  const auto refused = run_den({"agent", "spawn", broken, "--socket", socket});
  CHECK(refused.exit_code == 1);
  CHECK(contains(refused.err, "does not load"));
  const auto bad_name = run_den({"agent", "spawn", echo, "--name", "no spaces", "--socket", socket});
  CHECK(bad_name.exit_code == 1);
  CHECK(contains(bad_name.err, "invalid agent name"));
  const auto missing_file = run_den({"agent", "spawn", daemon.directory() / "absent.lua", "--socket", socket});
  CHECK(missing_file.exit_code == 1);
  CHECK(contains(missing_file.err, "cannot read the script"));

  const auto stopped = run_den({"agent", "stop", "echo", "--socket", socket});
  CHECK_MESSAGE(stopped.exit_code == 0, stopped.err);
  const auto refused_send = run_den({"agent", "send", "echo", "hi", "--socket", socket});
  CHECK(refused_send.exit_code == 1);
  CHECK(contains(refused_send.err, "den agent rm echo"));
  const auto ps = run_den({"agent", "ps", "--socket", socket});
  CHECK(contains(ps.out, "stopped"));
}
