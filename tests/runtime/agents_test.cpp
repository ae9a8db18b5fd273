// Integration tests of agents through a real daemon (stories260K, CPU backend): handlers and
// effects, durability across SIGKILL (journaled effects are not repeated), timers across a
// restart, the sandbox under abuse while other agents carry on, misbehaving tools, and 200
// agents at once.
#include <signal.h>

#include <algorithm>
#include <cstdlib>
#include <atomic>
#include <chrono>
#include <future>
#include <memory>
#include <thread>

#include "daemon_process.h"
#include "den/runtime/client.h"
#include "den/runtime/json_rpc.h"
#include "test_support.h"

namespace den::test {
namespace {

namespace json = boost::json;
using runtime::DaemonClient;
using runtime::RpcCallError;
using Clock = std::chrono::steady_clock;

std::vector<std::string> agent_daemon_args(std::vector<std::string> more = {}) {
  std::vector<std::string> args = {"-m", stories_model(), "--backend", test_daemon_backend(), "--threads", "1"};
  args.insert(args.end(), more.begin(), more.end());
  return args;
}

json::value spawn(DaemonClient& client, const std::string& name, const std::string& script) {
  return client.call("agents/spawn", {{"name", name}, {"script", script}});
}

json::value send_and_wait(DaemonClient& client, const std::string& agent, const std::string& text) {
  return client.call("agents/send", {{"agent", agent}, {"text", text}, {"wait", true}});
}

// send_and_wait on a thread of its own, bounded: a wedged agent would never answer, and the test
// must fail then, not hang (killing the daemon ends the wait).
json::value send_and_wait_bounded(DaemonProcess& daemon, const std::string& agent, const std::string& text,
                                  std::chrono::seconds timeout = std::chrono::seconds(30)) {
  auto answer = std::async(std::launch::async, [&] {
    DaemonClient waiting(daemon.socket_path());
    return send_and_wait(waiting, agent, text);
  });
  if (answer.wait_for(timeout) != std::future_status::ready) {
    daemon.kill(SIGKILL);
    answer.wait();
    FAIL("message '" << text << "' to " << agent << " was never answered");
  }
  return answer.get();
}

std::vector<std::string> replies_of(const json::value& sent) {
  std::vector<std::string> out;
  for (const json::value& r : sent.at("replies").as_array()) out.emplace_back(r.as_string());
  return out;
}

// Polls agents/get until pred holds (or the deadline passes); returns the last answer.
template <typename Pred>
json::value wait_for_agent(DaemonClient& client, const std::string& agent, Pred pred, std::chrono::seconds timeout) {
  const auto deadline = Clock::now() + timeout;
  json::value got;
  do {
    got = client.call("agents/get", {{"agent", agent}});
    if (pred(got)) return got;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  } while (Clock::now() < deadline);
  return got;
}

// An integer in the agent's committed state, -1 while it is not there yet.
int64_t state_int(const json::value& agent, const char* key) {
  const json::object& state = agent.at("state").as_object();
  const json::value* v = state.if_contains(key);
  return v != nullptr && v->is_number() ? v->to_number<int64_t>() : -1;
}

std::string log_text(DaemonClient& client, const std::string& agent) {
  std::string all;
  const json::value logs = client.call("agents/logs", {{"agent", agent}, {"limit", 1000}});
  for (const json::value& line : logs.at("logs").as_array()) {
    all += std::string(line.at("text").as_string()) + "\n";
  }
  return all;
}

// Polls the agent's log until it holds `needle` (or the deadline passes); whether it does.
bool wait_for_log(DaemonClient& client, const std::string& agent, const std::string& needle,
                  std::chrono::seconds timeout = std::chrono::seconds(30)) {
  const auto deadline = Clock::now() + timeout;
  while (log_text(client, agent).find(needle) == std::string::npos) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

const char* kEchoAgent = R"lua(
return {
  on_start = function(ctx) ctx.state.seen = 0 end,
  on_message = function(ctx, msg)
    ctx.state.seen = ctx.state.seen + 1
    ctx:reply(msg, "echo " .. msg.text .. " #" .. ctx.state.seen)
  end,
}
)lua";

TEST_CASE("agents answer messages, keep state and survive a restart") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DaemonProcess daemon(agent_daemon_args());
  {
    DaemonClient client(daemon.socket_path());
    const json::value agent = spawn(client, "echo", kEchoAgent);
    CHECK(agent.at("name").as_string() == "echo");
    CHECK(replies_of(send_and_wait(client, "echo", "a")) == std::vector<std::string>{"echo a #1"});
    CHECK(replies_of(send_and_wait(client, "echo", "b")) == std::vector<std::string>{"echo b #2"});
    // Errors: unknown agent, taken name, a script that does not load (nothing created).
    CHECK_THROWS_AS(send_and_wait(client, "nobody", "x"), RpcCallError);
    try {
      spawn(client, "echo", kEchoAgent);
      FAIL("a second agent named echo was spawned");
    } catch (const RpcCallError& e) {
      CHECK(e.code() == runtime::rpc::agent_exists);
    }
    try {
      spawn(client, "broken", "return {on_message = function(ctx, msg) end");
      FAIL("a script with a syntax error was spawned");
    } catch (const RpcCallError& e) {
      CHECK(e.code() == runtime::rpc::agent_invalid);
    }
    CHECK(client.call("agents/list").at("agents").as_array().size() == 1);
  }
  daemon.restart();
  DaemonClient client(daemon.socket_path());
  CHECK(replies_of(send_and_wait(client, "echo", "c")) == std::vector<std::string>{"echo c #3"});
  client.call("agents/delete", {{"agent", "echo"}});
  CHECK(client.call("agents/list").at("agents").as_array().empty());
}

TEST_CASE("a run that cannot be set up fails, and the agent goes on with its next message") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  // The agent's second run (its first message; the first is on_start) meets an I/O error while
  // it is set up. Before runs were set up under a catch, the agent then held a run that never
  // stepped and handled nothing more.
  ::setenv("DEN_FAILPOINTS", "agents.start_run=error@2", 1);
  DaemonProcess daemon(agent_daemon_args());
  ::unsetenv("DEN_FAILPOINTS");
  DaemonClient client(daemon.socket_path());
  spawn(client, "echo", kEchoAgent);
  const json::value answer = send_and_wait_bounded(daemon, "echo", "a");
  CHECK(answer.at("status").as_string() == "failed");
  CHECK(replies_of(answer).empty());
  CHECK(wait_for_log(client, "echo", "the run could not start"));
  const json::value agent = wait_for_agent(
      client, "echo", [](const json::value& a) { return a.at("run").is_null(); }, std::chrono::seconds(30));
  REQUIRE(agent.at("run").is_null());
  CHECK(replies_of(send_and_wait(client, "echo", "b")) == std::vector<std::string>{"echo b #1"});
  CHECK(replies_of(send_and_wait(client, "echo", "c")) == std::vector<std::string>{"echo c #2"});
}

// A daemon whose store fails as `failpoints` says (DEN_FAILPOINTS, seen by it alone), with the
// echo agent spawned.
std::unique_ptr<DaemonProcess> echo_agent_with_failpoints(const char* failpoints) {
  ::setenv("DEN_FAILPOINTS", failpoints, 1);
  auto daemon = std::make_unique<DaemonProcess>(agent_daemon_args());
  ::unsetenv("DEN_FAILPOINTS");
  DaemonClient client(daemon->socket_path());
  spawn(client, "echo", kEchoAgent);
  return daemon;
}

TEST_CASE("an agent whose next run cannot be begun tries again, and handles the message") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  // The store fails to begin the run of the agent's first message (an injected I/O error). The
  // message is queued and nothing else would wake the agent: before the retry it waited for the
  // next message or timer, and a sender waiting for this one waited forever.
  const auto daemon = echo_agent_with_failpoints("agents.begin_run=error@1");
  DaemonClient client(daemon->socket_path());
  CHECK(replies_of(send_and_wait_bounded(*daemon, "echo", "a")) == std::vector<std::string>{"echo a #1"});
  CHECK(daemon->log().find("agent could not start a run") != std::string::npos);
  CHECK(replies_of(send_and_wait(client, "echo", "b")) == std::vector<std::string>{"echo b #2"});
}

TEST_CASE("an agent run whose end the store cannot take is committed in place, and its message handled") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  // The store fails to take the end of the first message's run (hit 2: on_start's end is hit 1).
  // Before, the agent went on with the run still `running` in the store until a restart replayed
  // it, and ctx.state kept what the last committed run left.
  const auto daemon = echo_agent_with_failpoints("agents.end_run=error@2");
  DaemonClient client(daemon->socket_path());
  CHECK(replies_of(send_and_wait_bounded(*daemon, "echo", "a")) == std::vector<std::string>{"echo a #1"});
  CHECK(daemon->log().find("agent run not committed") != std::string::npos);
  CHECK(replies_of(send_and_wait(client, "echo", "b")) == std::vector<std::string>{"echo b #2"});
  const json::value agent = wait_for_agent(
      client, "echo", [](const json::value& a) { return a.at("run").is_null(); }, std::chrono::seconds(30));
  REQUIRE(agent.at("run").is_null());
  const json::value details = client.call("agents/get", {{"agent", "echo"}});
  int completed = 0;
  for (const json::value& run : details.at("runs").as_array()) {
    CHECK(run.at("status").as_string() == "completed");
    completed += run.at("status").as_string() == "completed" ? 1 : 0;
  }
  CHECK(completed == 3);  // on_start, a, b
  CHECK(details.at("state").at("seen").to_number<int64_t>() == 2);
}

// The handler generates, then sleeps (durably); the daemon is killed during the sleep. After the
// restart the run is interrupted, runs again, gets its generation from the journal (the model is
// not asked again, the KV was checkpointed: 0 tokens recomputed), and replies exactly once.
TEST_CASE("agents resume a handler cut off by SIGKILL after a generation without repeating it") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DaemonProcess daemon(agent_daemon_args());
  const char* script = R"lua(
return {
  on_start = function(ctx) ctx.session:append("user", "Once upon a time") end,
  on_message = function(ctx, msg)
    local text = ctx.session:generate{max_tokens = 12, temperature = 0}
    ctx.log("generated: " .. text)
    ctx:sleep(3)
    ctx:reply(msg, text)
  end,
}
)lua";
  {
    DaemonClient client(daemon.socket_path());
    spawn(client, "writer", script);
    client.call("agents/send", {{"agent", "writer"}, {"text", "go"}});
    // Wait until the generation is logged (the handler then sleeps), then kill.
    REQUIRE(wait_for_log(client, "writer", "generated:"));
    const json::value agent = client.call("agents/get", {{"agent", "writer"}});
    CHECK(agent.at("run").at("waiting").as_bool());
  }
  daemon.kill(SIGKILL);
  daemon.wait_exit();
  daemon.restart();
  DaemonClient client(daemon.socket_path());
  // The cut-off run shows `interrupted` until it completes (unless its sleep had already run
  // out while the daemon restarted: then it may be done by now).
  const json::value interrupted = client.call("agents/get", {{"agent", "writer"}});
  const std::string status(interrupted.at("runs").as_array().at(0).at("status").as_string());
  CHECK((status == "interrupted" || status == "completed"));
  const json::value done = wait_for_agent(client, "writer", [](const json::value& a) { return a.at("run").is_null(); },
                                          std::chrono::seconds(30));
  CHECK(done.at("runs").as_array().at(0).at("status").as_string() == "completed");
  client.call("agents/send", {{"agent", "writer"}, {"text", "again"}, {"wait", true}});
  // The first message got exactly one reply; the model was not asked again for it.
  std::string log = log_text(client, "writer");
  size_t generated = 0;
  for (size_t at = log.find("generated:"); at != std::string::npos; at = log.find("generated:", at + 1)) ++generated;
  CHECK(generated == 2);  // the first message (once: a replay does not log again) and the second
  const json::value stats = client.call("daemon/stats");
  // Since the restart the engine generated for the second message only.
  CHECK(stats.at("engine").at("requests_completed").to_number<int64_t>() == 1);
  CHECK(stats.at("memory").at("tokens_recomputed").to_number<int64_t>() == 0);
  CHECK(stats.at("agents").at("effects_replayed").to_number<int64_t>() >= 1);
}

std::string tools_config(const TempDir& dir) {
  const std::string server = repo_path("tests/fixtures/tools/misbehaving.py");
  std::string yaml = "limits:\n  tool_seconds: 1\ntools:\n";
  yaml += "  - name: counter\n    command: [\"python3\", \"" + server + "\", \"counter\", \"" + dir.file("count") + "\"]\n";
  for (const char* mode : {"hang", "crash", "garbage"}) {
    yaml += std::string("  - name: ") + mode + "\n    command: [\"python3\", \"" + server + "\", \"" + mode + "\"]\n";
  }
  write_file(dir.file("den.yaml"), yaml);
  return dir.file("den.yaml");
}

// The handler calls a tool that counts its calls, then sleeps; the daemon is killed during the
// sleep. After the restart the handler completes with the journaled result: the tool's own
// counter shows one call, and there is one reply.
TEST_CASE("agents resume a handler cut off by SIGKILL after a tool call without calling it again") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DEN_SKIP_UNLESS(std::system("python3 -c pass >/dev/null 2>&1") == 0, "python3 is needed for the test tool server");
  TempDir dir;
  DaemonProcess daemon(agent_daemon_args({"--config", tools_config(dir)}));
  const char* script = R"lua(
return {
  on_message = function(ctx, msg)
    local result, err = den.tools.call("counter.bump", {})
    ctx.log("bumped: " .. (result and result.text or err))
    ctx:sleep(3)
    ctx:reply(msg, "count " .. (result and result.text or err))
  end,
}
)lua";
  {
    DaemonClient client(daemon.socket_path());
    spawn(client, "counter", script);
    client.call("agents/send", {{"agent", "counter"}, {"text", "go"}});
    REQUIRE(wait_for_log(client, "counter", "bumped: 1"));
  }
  daemon.kill(SIGKILL);
  daemon.wait_exit();
  daemon.restart();
  DaemonClient client(daemon.socket_path());
  wait_for_agent(client, "counter", [](const json::value& a) { return a.at("run").is_null(); }, std::chrono::seconds(30));
  CHECK(read_file(dir.file("count")) == "1");
  // One reply to the message, with the journaled result.
  const json::value get = client.call("agents/get", {{"agent", "counter"}});
  CHECK(get.at("runs").as_array().at(0).at("status").as_string() == "completed");
  const json::value sent = send_and_wait(client, "counter", "again");
  CHECK(replies_of(sent) == std::vector<std::string>{"count 2"});
  CHECK(read_file(dir.file("count")) == "2");
}

TEST_CASE("agents get clear errors from a tool that hangs, crashes or speaks garbage") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DEN_SKIP_UNLESS(std::system("python3 -c pass >/dev/null 2>&1") == 0, "python3 is needed for the test tool server");
  TempDir dir;
  DaemonProcess daemon(agent_daemon_args({"--config", tools_config(dir)}));
  DaemonClient client(daemon.socket_path());
  const char* script = R"lua(
return {
  on_message = function(ctx, msg)
    local result, err = den.tools.call(msg.text .. ".misbehave", {})
    ctx:reply(msg, result and ("result: " .. result.text) or ("error: " .. err))
  end,
}
)lua";
  spawn(client, "caller", script);
  for (const char* mode : {"hang", "crash", "garbage"}) {
    INFO(mode);
    const std::vector<std::string> replies = replies_of(send_and_wait(client, "caller", mode));
    REQUIRE(replies.size() == 1);
    MESSAGE(mode << ": " << replies[0]);
    CHECK(replies[0].starts_with("error: "));
  }
  const std::vector<std::string> unknown = replies_of(send_and_wait(client, "caller", "nosuch"));
  REQUIRE(unknown.size() == 1);
  CHECK(unknown[0].starts_with("error: "));
  // The tools still listed, the daemon fine.
  CHECK(daemon.running());
}

// A tool server that dials in to tools.sock beside den.sock: agents call it by the name it
// gave, daemon/stats lists it, and when it hangs up the agent gets a clear error.
TEST_CASE("agents call a tool server that dialed in to tools.sock, and hear when it hangs up") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DEN_SKIP_UNLESS(std::system("python3 -c pass >/dev/null 2>&1") == 0, "python3 is needed for the tool server");
  DaemonProcess daemon(agent_daemon_args());
  const std::string tools_socket = (daemon.directory() / "tools.sock").string();
  REQUIRE(file_exists(tools_socket));
  DaemonClient client(daemon.socket_path());
  auto dialed_in = std::make_unique<BackgroundProcess>(
      std::vector<std::string>{"python3", repo_path("examples/tools/clock_calc.py"), "--connect", tools_socket});
  const auto listed = [&] {
    const json::value stats = client.call("daemon/stats");  // kept: a range over a temporary's member dangles
    for (const json::value& server : stats.at("tool_servers").as_array())
      if (server.at("name") == "clock_calc" && server.at("dialed_in").as_bool() && server.at("tools").as_int64() == 2)
        return true;
    return false;
  };
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (!listed() && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  REQUIRE(listed());

  const char* script = R"lua(
return {
  on_message = function(ctx, msg)
    local result, err = den.tools.call("clock_calc.calculate", {expression = msg.text})
    ctx:reply(msg, result and ("result: " .. result.text) or ("error: " .. err))
  end,
}
)lua";
  spawn(client, "calc", script);
  CHECK(replies_of(send_and_wait(client, "calc", "6*7")) == std::vector<std::string>{"result: 42"});

  dialed_in->kill_and_wait();
  const auto gone_deadline = Clock::now() + std::chrono::seconds(10);
  while (listed() && Clock::now() < gone_deadline) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const std::vector<std::string> after = replies_of(send_and_wait(client, "calc", "1+1"));
  REQUIRE(after.size() == 1);
  CHECK(after[0].starts_with("error: unknown tool 'clock_calc.calculate'"));

  CHECK(daemon.stop() == 0);
  CHECK_FALSE(file_exists(tools_socket));  // removed on the way out
}

// A client waiting for a handler that sleeps hears back when the daemon stops (the message is
// handled after the restart), and the daemon exits promptly; effects only run inside handlers.
TEST_CASE("agents answer waiting senders on shutdown and refuse effects outside handlers") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DaemonProcess daemon(agent_daemon_args());
  DaemonClient client(daemon.socket_path());
  try {
    spawn(client, "early", "local t = den.now()\nreturn {}");
    FAIL("a script calling den.now() at load time was spawned");
  } catch (const RpcCallError& e) {
    CHECK(e.code() == runtime::rpc::agent_invalid);
    CHECK(std::string(e.what()).find("only possible inside a handler") != std::string::npos);
  }
  const char* nested = R"lua(
return { on_message = function(ctx, msg)
  local ok, err = pcall(coroutine.wrap(function() return ctx.session:length(), den.now() end))
  ctx:reply(msg, tostring(ok) .. " " .. tostring(err))
end }
)lua";
  spawn(client, "nested", nested);
  const std::vector<std::string> nested_reply = replies_of(send_and_wait(client, "nested", "x"));
  REQUIRE(nested_reply.size() == 1);
  CHECK(nested_reply[0].find("false") == 0);
  CHECK(nested_reply[0].find("from the handler itself") != std::string::npos);

  spawn(client, "sleeper", "return { on_message = function(ctx, msg) ctx:sleep(30) ctx:reply(msg, 'late') end }");
  std::string status;
  std::thread waiter([&] {
    DaemonClient other(daemon.socket_path());
    status = std::string(send_and_wait(other, "sleeper", "x").at("status").as_string());
  });
  wait_for_agent(client, "sleeper", [](const json::value& a) { return !a.at("run").is_null() && a.at("run").at("waiting").as_bool(); },
                 std::chrono::seconds(20));
  const auto t0 = Clock::now();
  client.call("daemon/shutdown");
  CHECK(daemon.wait_exit() == 0);
  waiter.join();
  CHECK(status == "interrupted");
  CHECK(Clock::now() - t0 < std::chrono::seconds(10));
  // After the restart the sleep goes on where it was and the reply comes.
  daemon.restart();
  DaemonClient again(daemon.socket_path());
  CHECK(again.call("agents/get", {{"agent", "sleeper"}}).at("runs").as_array().at(0).at("status").as_string() == "interrupted");
}

// The example agents of agents/, as they are (the watcher with a shorter period so the test
// does not wait minutes): each runs, and the watcher keeps looking across a restart.
TEST_CASE("agents examples run - assistant, researcher, watcher, ping and pong") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DEN_SKIP_UNLESS(std::system("python3 -c pass >/dev/null 2>&1") == 0, "python3 is needed for the clock tool server");
  TempDir dir;
  write_file(dir.file("den.yaml"), "tools:\n  - name: clock\n    command: [\"python3\", \"" +
                                       repo_path("examples/tools/clock_calc.py") + "\"]\n");
  DaemonProcess daemon(agent_daemon_args({"--config", dir.file("den.yaml")}));
  auto example = [](const std::string& file) { return read_file(repo_path("agents/" + file)); };
  {
    DaemonClient client(daemon.socket_path());
    spawn(client, "assistant", example("assistant.lua"));
    CHECK(replies_of(send_and_wait(client, "assistant", "Tell me a story about a cat.")).size() == 1);
    spawn(client, "researcher", example("researcher.lua"));
    const json::value answer = send_and_wait(client, "researcher", "What is 2*21?");
    CHECK(answer.at("status").as_string() == "done");
    CHECK(replies_of(answer).size() == 1);

    std::string watcher = example("watcher.lua");
    const size_t at = watcher.find("local PERIOD = 10");
    REQUIRE(at != std::string::npos);
    watcher.replace(at, std::string("local PERIOD = 10").size(), "local PERIOD = 0.3");
    spawn(client, "watcher", watcher);

    spawn(client, "pong", example("pong.lua"));
    spawn(client, "ping", example("ping.lua"));
    CHECK(wait_for_log(client, "ping", "game 1 over after 5 rounds"));
    const json::value pong = client.call("agents/get", {{"agent", "pong"}});
    INFO(json::serialize(pong));
    REQUIRE(pong.at("state").as_object().contains("rounds"));
    CHECK(pong.at("state").at("rounds").to_number<int64_t>() == 5);
    const json::value w = wait_for_agent(
        client, "watcher", [](const json::value& v) { return state_int(v, "looks") >= 3; },
        std::chrono::seconds(20));
    CHECK(state_int(w, "looks") >= 3);
    CHECK(log_text(client, "watcher").find("(clock.now)") != std::string::npos);  // it used the tool
  }
  daemon.restart();
  DaemonClient client(daemon.socket_path());
  const int64_t looks = state_int(client.call("agents/get", {{"agent", "watcher"}}), "looks");
  const json::value w = wait_for_agent(
      client, "watcher", [&](const json::value& v) { return state_int(v, "looks") >= looks + 3; },
      std::chrono::seconds(20));
  CHECK(state_int(w, "looks") >= looks + 3);
  CHECK(replies_of(send_and_wait(client, "assistant", "And then?")).size() == 1);
}

TEST_CASE("agents timers fire, also those that fell due while the daemon was down") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DaemonProcess daemon(agent_daemon_args());
  const char* watcher = R"lua(
return {
  on_start = function(ctx)
    ctx.state.ticks = 0
    ctx:schedule(0.2, {period = 0.2})
  end,
  on_timer = function(ctx, payload)
    ctx.state.ticks = ctx.state.ticks + 1
    ctx.log("tick " .. ctx.state.ticks)
    ctx:schedule(payload.period, payload)
  end,
}
)lua";
  {
    DaemonClient client(daemon.socket_path());
    spawn(client, "watcher", watcher);
    const json::value a = wait_for_agent(
        client, "watcher", [](const json::value& v) { return state_int(v, "ticks") >= 3; },
        std::chrono::seconds(20));
    CHECK(state_int(a, "ticks") >= 3);
  }
  CHECK(daemon.stop() == 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // a timer falls due while it is down
  daemon.restart();
  DaemonClient client(daemon.socket_path());
  const int64_t before = state_int(client.call("agents/get", {{"agent", "watcher"}}), "ticks");
  const json::value a = wait_for_agent(
      client, "watcher", [&](const json::value& v) { return state_int(v, "ticks") >= before + 3; },
      std::chrono::seconds(20));
  CHECK(state_int(a, "ticks") >= before + 3);
}

// Each hostile script is refused or stopped with a clear error for its agent; a well-behaved
// agent keeps answering and daemon/stats stays fast throughout.
TEST_CASE("agents sandbox refuses hostile code while other agents carry on") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DaemonProcess daemon(agent_daemon_args());
  DaemonClient client(daemon.socket_path());
  spawn(client, "echo", kEchoAgent);

  std::atomic<bool> done{false};
  std::vector<double> latencies_ms;
  std::thread watcher([&] {
    DaemonClient stats(daemon.socket_path());
    while (!done.load()) {
      const auto t0 = Clock::now();
      stats.call("daemon/stats");
      latencies_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });

  const std::vector<std::pair<std::string, std::string>> corpus = {
      {"os_execute", "os.execute('touch /tmp/den-pwned')"},
      {"io_open", "io.open('/etc/passwd')"},
      {"require", "require('os')"},
      {"binary_chunk", "assert(load('\\27Lua\\84\\0'))()"},
      {"string_dump", "string.dump(function() end)"},
      {"debug", "debug.getinfo(1)"},
      {"setmetatable_G", "setmetatable(_G, {})"},
      {"string_metatable", "getmetatable('').__index = {}"},
      {"global_write", "x = 1"},
      {"collectgarbage", "collectgarbage('stop')"},
      {"memory_bomb", "local s = string.rep('x', 1 << 30)"},
      {"table_bomb", "local t = {} for i = 1, 1e9 do t[i] = i end"},
      {"infinite_loop", "while true do end"},
      {"loop_in_pcall", "while true do pcall(function() while true do end end) end"},
  };
  for (const auto& [name, code] : corpus) {
    INFO(name);
    const std::string script = "return { on_message = function(ctx, msg)\n" + code + "\nctx:reply(msg, 'escaped') end }";
    spawn(client, name, script);
    const json::value sent = send_and_wait(client, name, "go");
    CHECK(sent.at("status").as_string() == "failed");
    CHECK(replies_of(sent).empty());
    const std::string log = log_text(client, name);
    CHECK(log.find("on_message failed") != std::string::npos);
    MESSAGE(name << ": " << log.substr(0, log.find('\n')));
    // The well-behaved agent still answers.
    CHECK(replies_of(send_and_wait(client, "echo", name)).size() == 1);
  }
  done = true;
  watcher.join();
  CHECK_FALSE(file_exists("/tmp/den-pwned"));
  std::sort(latencies_ms.begin(), latencies_ms.end());
  REQUIRE(!latencies_ms.empty());
  const double p99 = latencies_ms[latencies_ms.size() * 99 / 100];
  MESSAGE("daemon/stats during the corpus: " << latencies_ms.size() << " calls, p99 " << p99 << " ms");
  CHECK(p99 <= 100.0);
  CHECK(daemon.running());
}

// A 256-token context and a conversation that outgrows it: the default policy keeps the first
// turn and the recent ones, and the agent keeps answering.
TEST_CASE("agents keep answering when the conversation outgrows the context") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DaemonProcess daemon(agent_daemon_args({"--ctx", "256"}));
  DaemonClient client(daemon.socket_path());
  const char* script = R"lua(
return {
  on_start = function(ctx) ctx.session:append("system", "You tell stories.") end,
  on_message = function(ctx, msg)
    ctx.session:append("user", msg.text)
    local text = ctx.session:generate{max_tokens = 40, temperature = 0}
    ctx:reply(msg, text)
  end,
}
)lua";
  spawn(client, "teller", script);
  for (int i = 0; i < 12; ++i) {
    INFO("message " << i);
    const json::value sent = send_and_wait(client, "teller", "Once upon a time there was a cat number " + std::to_string(i));
    CHECK(sent.at("status").as_string() == "done");
    CHECK(replies_of(sent).size() == 1);
  }
  CHECK(log_text(client, "teller").find("context nearly full") != std::string::npos);
  const json::value agent = client.call("agents/get", {{"agent", "teller"}});
  const json::value session = client.call("sessions/get", {{"session", agent.at("session")}, {"text", true}});
  CHECK(session.at("tokens").to_number<int64_t>() <= 256);
  // The first turn and the last are still there. (stories260K's Llama 2 template folds a
  // system prompt into the first user turn, and renders nothing for a system message alone.)
  const std::string text(session.at("text").as_string());
  INFO(text);
  CHECK(text.find("cat number 0 ") != std::string::npos);
  CHECK(text.find("cat number 11 ") != std::string::npos);
  CHECK(text.find("cat number 5 ") == std::string::npos);
}

TEST_CASE("agents 200 spawned at once each answer a message") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DaemonProcess daemon(agent_daemon_args());
  constexpr int kAgents = 200;
  constexpr auto kBound = std::chrono::seconds(60);  // per agent, from spawn to its reply, on a 2-core CI machine
  const char* script = R"lua(
return {
  on_start = function(ctx) ctx.session:append("user", "Once upon a time") end,
  on_message = function(ctx, msg)
    local text = ctx.session:generate{max_tokens = 4, temperature = 0}
    ctx:reply(msg, text)
  end,
}
)lua";
  std::atomic<bool> done{false};
  std::vector<double> latencies_ms;
  std::thread watcher([&] {
    DaemonClient stats(daemon.socket_path());
    while (!done.load()) {
      const auto t0 = Clock::now();
      stats.call("daemon/stats");
      latencies_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  });
  std::vector<std::thread> threads;
  std::vector<std::string> failures(kAgents);
  std::vector<double> seconds(kAgents);
  const auto t0 = Clock::now();
  for (int i = 0; i < kAgents; ++i) {
    threads.emplace_back([&, i] {
      try {
        DaemonClient client(daemon.socket_path());
        const auto start = Clock::now();
        const std::string name = "agent" + std::to_string(i);
        spawn(client, name, script);
        const json::value sent = send_and_wait(client, name, "hello");
        seconds[static_cast<size_t>(i)] = std::chrono::duration<double>(Clock::now() - start).count();
        if (replies_of(sent).size() != 1) failures[static_cast<size_t>(i)] = "no reply";
      } catch (const std::exception& e) {
        failures[static_cast<size_t>(i)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  done = true;
  watcher.join();
  const double total = std::chrono::duration<double>(Clock::now() - t0).count();
  for (int i = 0; i < kAgents; ++i) {
    INFO("agent " << i);
    CHECK(failures[static_cast<size_t>(i)] == "");
    CHECK(seconds[static_cast<size_t>(i)] < static_cast<double>(kBound.count()));
  }
  std::sort(latencies_ms.begin(), latencies_ms.end());
  const double p99 = latencies_ms[latencies_ms.size() * 99 / 100];
  MESSAGE(kAgents << " agents: all answered in " << total << " s (slowest " << *std::max_element(seconds.begin(), seconds.end())
                  << " s); daemon/stats p99 " << p99 << " ms over " << latencies_ms.size() << " calls");
  CHECK(p99 <= 100.0);
}

// The soak's seed 13 once saw an agent whose run was cut off while its ctx.state was being
// converted for the commit never finish after the restart. Here that crash comes at each of
// the first runs in turn (on_start, a message, a timer...): after the restart every message
// must be handled once and every timer fire once.
TEST_CASE("agents finish a run cut off while its state was being serialized") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  for (const bool with_tool : {false, true}) {
    CAPTURE(with_tool);
    TempDir dir;
    const std::vector<std::string> extra =
        with_tool ? std::vector<std::string>{"--config", tools_config(dir)} : std::vector<std::string>{};
    const std::string script = std::string("local WITH_TOOL = ") + (with_tool ? "true" : "false") + R"lua(
return {
  on_start = function(ctx) ctx.state.seen = {}; ctx.state.fired = {}; ctx.state.tools = 0 end,
  on_message = function(ctx, msg)
    local key = msg.text
    if WITH_TOOL and den.tools.call("counter.bump", {}) then ctx.state.tools = ctx.state.tools + 1 end
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
    const std::vector<std::string> keys = {"abc", "de", "fghi"};
    for (int hit = 1; hit <= 5; ++hit) {
      CAPTURE(hit);
      const std::string spec = "agents.serialize_state=crash@" + std::to_string(hit);
      ::setenv("DEN_FAILPOINTS", spec.c_str(), 1);
      DaemonProcess daemon(agent_daemon_args(extra));
      ::unsetenv("DEN_FAILPOINTS");
      try {
        DaemonClient client(daemon.socket_path());
        spawn(client, "cut", script);
        for (const std::string& key : keys) client.call("agents/send", {{"agent", "cut"}, {"text", key}});
      } catch (const std::exception&) {
        // The failpoint fired while these were sent: what was acknowledged is checked below.
      }
      const int exit_status = daemon.wait_exit(std::chrono::seconds(20));
      CHECK(exit_status != 0);  // the failpoint crashed it
      daemon.restart();
      DaemonClient client(daemon.socket_path());
      // Messages the crash cut off before they were acknowledged are sent again.
      const json::value before = client.call("agents/get", {{"agent", "cut"}});
      INFO("the run after the restart: " << json::serialize(before.at("run")));
      for (const std::string& key : keys) client.call("agents/send", {{"agent", "cut"}, {"text", "again-" + key}});
      const json::value done = wait_for_agent(
          client, "cut",
          [&](const json::value& a) {
            const json::object& state = a.at("state").as_object();
            if (!state.contains("fired") || !state.at("fired").is_object()) return false;
            for (const std::string& key : keys) {
              const auto* fired = state.at("fired").as_object().if_contains("again-" + key);
              if (fired == nullptr || fired->to_number<int64_t>() != 1) return false;
            }
            return a.at("run").is_null();
          },
          std::chrono::seconds(30));
      INFO("agent: " << json::serialize(done));
      const std::string log = daemon.log();
      INFO("daemon log: " << log.substr(log.size() > 6000 ? log.size() - 6000 : 0));
      REQUIRE(done.at("run").is_null());
      const json::object& state = done.at("state").as_object();
      for (const auto& [key, count] : state.at("seen").as_object()) CHECK(count.to_number<int64_t>() == 1);
      for (const auto& [key, count] : state.at("fired").as_object()) CHECK(count.to_number<int64_t>() == 1);
    }
  }
}

// A handler appends a long message to a nearly full conversation: the append compacts the
// history (durably) and the daemon dies right after, before the append's intent is journaled.
// After the restart the run replays the append on the compacted history and the message is
// handled. (The intent used to be journaled first, with the uncompacted length; the replay then
// asked to keep more tokens than the history held and the message failed.)
TEST_CASE("agents replay an append cut off right after the history was compacted for it") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  const char* script = R"lua(
return {
  on_start = function(ctx) ctx.state.seen = {} end,
  on_message = function(ctx, msg)
    ctx.session:append("user", msg.text)
    ctx.state.seen[msg.text] = (ctx.state.seen[msg.text] or 0) + 1
  end,
}
)lua";
  ::setenv("DEN_FAILPOINTS", "agents.after_compact=crash@1", 1);
  DaemonProcess daemon(agent_daemon_args({"--ctx", "256"}));
  ::unsetenv("DEN_FAILPOINTS");
  // About 170 tokens each (stories260K's tokenizer): the first fits in the 256-token context
  // (and stays under the idle policy's three quarters), the second needs the room.
  std::string filler;
  for (int i = 0; i < 5; ++i) filler += " a little dog ran to the park and played with a red ball all day long";
  std::vector<std::string> acked;
  try {
    DaemonClient client(daemon.socket_path());
    spawn(client, "keeper", script);
    for (int i = 0; i < 2; ++i) {
      const std::string text = "message " + std::to_string(i) + filler;
      client.call("agents/send", {{"agent", "keeper"}, {"text", text}});
      acked.push_back(text);
    }
  } catch (const std::exception&) {
    // The failpoint fired: what was acknowledged is checked below.
  }
  CHECK(daemon.wait_exit(std::chrono::seconds(30)) != 0);  // the compaction's failpoint crashed it
  REQUIRE(acked.size() == 2);
  daemon.restart();
  DaemonClient client(daemon.socket_path());
  const json::value done = wait_for_agent(
      client, "keeper",
      [&](const json::value& a) {
        return a.at("run").is_null() && a.at("queued_messages").to_number<int64_t>() == 0;
      },
      std::chrono::seconds(60));
  INFO("agent: " << json::serialize(done));
  REQUIRE(done.at("run").is_null());
  for (const json::value& run : done.at("runs").as_array()) CHECK(run.at("status") == "completed");
  const json::object& seen = done.at("state").at("seen").as_object();
  for (const std::string& text : acked) {
    CAPTURE(text);
    const json::value* count = seen.if_contains(text);
    REQUIRE(count != nullptr);
    CHECK(count->to_number<int64_t>() == 1);
  }
}

}  // namespace
}  // namespace den::test
