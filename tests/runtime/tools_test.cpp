// Agents' tools (runtime/src/tools.cpp): the MCP client against the example servers in
// examples/tools and the failure modes of tests/fixtures/tools/misbehaving.py (hang, crash,
// garbage, overlong lines, malformed results, a failed start, exactly-once calls), servers
// that dial in to tools.sock (named, made unique, dropped when they hang up), and
// parse_tool_calls on the formats models write.
#include "den/runtime/tools.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "test_support.h"

namespace json = boost::json;
namespace fs = std::filesystem;
using den::runtime::parse_tool_calls;
using den::runtime::ToolCall;
using den::runtime::ToolError;
using den::runtime::ToolRegistry;
using den::runtime::ToolResult;
using den::runtime::ToolServerConfig;
using den::test::repo_path;
using den::test::TempDir;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

bool has_python3() {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "");
  for (std::string dir; std::getline(dirs, dir, ':');)
    if (!dir.empty() && ::access((fs::path(dir) / "python3").c_str(), X_OK) == 0) return true;
  return false;
}

ToolServerConfig clock_server() { return {"clock", {"python3", repo_path("examples/tools/clock_calc.py")}, {}}; }

ToolServerConfig misbehaving(const std::string& mode, const std::string& file = "") {
  ToolServerConfig config{"bad", {"python3", den::test::fixture_path("tools/misbehaving.py"), mode}, {}};
  if (!file.empty()) config.command.push_back(file);
  return config;
}

bool contains(std::string_view text, std::string_view part) { return text.find(part) != std::string_view::npos; }

struct Outcome {
  std::optional<ToolResult> result;
  std::optional<ToolError> error;
  std::string message() const { return error ? error->what() : ""; }
};

// One call: its handle, and its completion's outcome and how many times the completion ran.
struct Flight {
  std::shared_ptr<ToolCall> call;
  std::shared_ptr<std::mutex> mu = std::make_shared<std::mutex>();
  std::shared_ptr<std::condition_variable> cv = std::make_shared<std::condition_variable>();
  std::shared_ptr<int> runs = std::make_shared<int>(0);
  std::shared_ptr<Outcome> outcome = std::make_shared<Outcome>();

  ToolRegistry::Completion completion() {
    return
        [mu = mu, cv = cv, runs = runs, outcome = outcome](std::optional<ToolResult> result, std::exception_ptr error) {
          Outcome o;
          o.result = std::move(result);
          if (error) {
            try {
              std::rethrow_exception(error);
            } catch (const ToolError& e) {
              o.error = e;
            } catch (...) {
              o.error = ToolError(ToolError::Kind::protocol, "not a ToolError");
            }
          }
          std::lock_guard lock(*mu);
          if (++*runs == 1) *outcome = std::move(o);
          cv->notify_all();
        };
  }

  Outcome wait() const {
    std::unique_lock lock(*mu);
    REQUIRE(cv->wait_for(lock, 20s, [&] { return *runs > 0; }));
    return *outcome;
  }

  int run_count() const {
    std::lock_guard lock(*mu);
    return *runs;
  }
};

Flight start(ToolRegistry& tools, std::string_view name, json::object arguments = {},
             std::chrono::milliseconds timeout = 0ms) {
  Flight flight;
  flight.call = tools.call(name, arguments, timeout, flight.completion());
  return flight;
}

Outcome call(ToolRegistry& tools, std::string_view name, json::object arguments = {},
             std::chrono::milliseconds timeout = 0ms) {
  return start(tools, name, std::move(arguments), timeout).wait();
}

// The one result text; fails the test when the call failed.
std::string text_of(const Outcome& outcome) {
  INFO(outcome.message());
  REQUIRE(outcome.result);
  return outcome.result->text();
}

ToolError::Kind kind_of(const Outcome& outcome) {
  REQUIRE(outcome.error);
  return outcome.error->kind();
}

// Polls `condition` for up to 5 s.
template <typename F>
bool eventually(F&& condition) {
  for (const auto deadline = Clock::now() + 5s; Clock::now() < deadline; std::this_thread::sleep_for(20ms))
    if (condition()) return true;
  return condition();
}

std::string read_or_empty(const std::string& path) {
  return den::test::file_exists(path) ? den::test::read_file(path) : std::string();
}

}  // namespace

TEST_CASE("tools list the example clock_calc server") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  ToolRegistry tools({clock_server()}, 5s);
  const auto list = tools.list();
  REQUIRE(list.size() == 2);
  CHECK(list[0].qualified == "clock.now");
  CHECK(list[0].server == "clock");
  CHECK(list[0].name == "now");
  CHECK(list[1].qualified == "clock.calculate");
  CHECK(contains(list[1].description, "arithmetic"));
  CHECK(list[1].input_schema.at("required") == json::array{"expression"});

  const auto status = tools.status();
  REQUIRE(status.size() == 1);
  CHECK(status[0].name == "clock");
  CHECK(status[0].running);
  CHECK(status[0].tools == 2);
  CHECK(status[0].restarts == 0);
  CHECK(status[0].last_error.empty());
}

TEST_CASE("tools call now and calculate on clock_calc") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  ToolRegistry tools({clock_server()}, 5s);

  const Outcome now = call(tools, "clock.now");
  CHECK(contains(text_of(now), "unix"));
  CHECK_FALSE(now.result->is_error);
  const int64_t unix = now.result->structured.at("unix").to_number<int64_t>();
  CHECK(std::abs(unix - static_cast<int64_t>(std::time(nullptr))) < 60);
  CHECK(json::value_to<std::string>(now.result->structured.at("utc")).ends_with("Z"));

  const Outcome sum = call(tools, "clock.calculate", {{"expression", "(2 + 3) * 7 / 2 - 2 ** 3"}});
  CHECK(text_of(sum) == "9.5");
  CHECK_FALSE(sum.result->is_error);
  CHECK(call(tools, "clock.calculate", {{"expression", "-7 // 2 % 5"}}).result->text() == "1");
  CHECK(tools.status()[0].calls == 3);
  CHECK(tools.status()[0].failures == 0);
}

TEST_CASE("tools report a bad expression as an error result") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  ToolRegistry tools({clock_server()}, 5s);
  for (const char* expression : {"__import__('os').system('true')", "1 / 0", "2 +", "x * 2", "(10 ** 1000) ** 1000"}) {
    CAPTURE(expression);
    const Outcome outcome = call(tools, "clock.calculate", {{"expression", expression}});
    REQUIRE(outcome.result);  // the tool ran and said no: a result, not a ToolError
    CHECK(outcome.result->is_error);
    CHECK(contains(outcome.result->text(), "cannot evaluate"));
  }
  CHECK(contains(call(tools, "clock.calculate", {{"expression", "__import__('os')"}}).result->text(), "not allowed"));
}

TEST_CASE("tools files server stays inside its directory") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  TempDir shared, outside;
  den::test::write_file(shared.file("notes.txt"), "inside\n");
  fs::create_directory(shared.path() / "sub");
  den::test::write_file(outside.file("secret.txt"), "outside\n");
  fs::create_symlink(outside.file("secret.txt"), shared.path() / "escape");
  ToolRegistry tools({{"files", {"python3", repo_path("examples/tools/files.py"), shared.path().string()}, {}}}, 5s);

  CHECK(text_of(call(tools, "files.read", {{"path", "notes.txt"}})) == "inside\n");
  CHECK(text_of(call(tools, "files.read", {{"path", "sub/../notes.txt"}})) == "inside\n");
  const std::string listing = text_of(call(tools, "files.list"));
  CHECK(contains(listing, "file notes.txt 7"));
  CHECK(contains(listing, "dir sub"));
  CHECK(contains(listing, "link escape"));

  const std::string relative_secret = fs::relative(outside.file("secret.txt"), shared.path()).string();
  for (const std::string& path : {std::string("../secret.txt"), relative_secret, std::string("escape"),
                                  outside.file("secret.txt"), std::string("sub/../../x")}) {
    CAPTURE(path);
    const Outcome refused = call(tools, "files.read", {{"path", path}});
    REQUIRE(refused.result);
    CHECK(refused.result->is_error);
    CHECK_FALSE(contains(refused.result->text(), "outside"));
  }
  CHECK(call(tools, "files.list", {{"path", ".."}}).result->is_error);
}

TEST_CASE("tools refuse missing arguments and unknown tools") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  ToolRegistry tools({clock_server()}, 5s);

  const Outcome missing = call(tools, "clock.calculate", {{"expr", "1+1"}});
  CHECK(kind_of(missing) == ToolError::Kind::invalid_arguments);
  CHECK(contains(missing.message(), "missing required argument 'expression'"));
  const Outcome mistyped = call(tools, "clock.calculate", {{"expression", 12}});
  CHECK(kind_of(mistyped) == ToolError::Kind::invalid_arguments);
  CHECK(contains(mistyped.message(), "'expression' must be string, got number"));

  const Outcome unknown = call(tools, "clock.sundial");
  CHECK(kind_of(unknown) == ToolError::Kind::unknown_tool);
  CHECK(contains(unknown.message(), "'clock.sundial'"));
  CHECK(contains(unknown.message(), "clock.now, clock.calculate"));
  for (const char* name : {"calendar.now", "now", ""}) {
    CAPTURE(name);
    const Outcome no_server = call(tools, name);
    CHECK(kind_of(no_server) == ToolError::Kind::unknown_tool);
    CHECK(contains(no_server.message(), "known tools: clock.now, clock.calculate"));
  }
  const auto status = tools.status()[0];
  CHECK(status.calls == 3);  // the ones that named the server
  CHECK(status.failures == 3);
}

TEST_CASE("tools time out on a hanging server which stays usable") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  TempDir dir;
  const std::string file = dir.file("state");
  ToolRegistry tools({misbehaving("hang", file)}, 5s);

  const auto t0 = Clock::now();
  const Flight hung = start(tools, "bad.misbehave", {}, 300ms);
  const Outcome timed_out = hung.wait();
  const auto elapsed = Clock::now() - t0;
  CHECK(kind_of(timed_out) == ToolError::Kind::timeout);
  CHECK(contains(timed_out.message(), "did not answer within 300 ms"));
  CHECK(elapsed >= 300ms);
  CHECK(elapsed < 3s);
  // The server was told; it still answers, with no restart.
  CHECK(eventually([&] { return contains(read_or_empty(file + ".cancelled"), "timed out after 300 ms"); }));
  CHECK(text_of(call(tools, "bad.echo", {{"text", "still here"}})) == "still here");
  const auto status = tools.status()[0];
  CHECK(status.restarts == 0);
  CHECK(status.failures == 1);
  CHECK(hung.run_count() == 1);
}

TEST_CASE("tools restart a server that crashed") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  ToolRegistry tools({misbehaving("crash")}, 5s);
  const Outcome crashed = call(tools, "bad.misbehave");
  CHECK(kind_of(crashed) == ToolError::Kind::server_failed);
  CHECK(contains(crashed.message(), "exited with status 3"));
  CHECK(eventually([&] { return !tools.status()[0].running; }));
  CHECK(contains(tools.status()[0].last_error, "exited with status 3"));

  // echo also makes the server ping us first: the restarted server is fully working.
  CHECK(text_of(call(tools, "bad.echo", {{"text", "back"}})) == "back");
  const auto status = tools.status()[0];
  CHECK(status.running);
  CHECK(status.restarts == 1);
  CHECK(status.calls == 2);
  CHECK(status.failures == 1);
}

TEST_CASE("tools treat garbage from a server as a protocol error and restart it") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  ToolRegistry tools({misbehaving("garbage")}, 5s);
  const Outcome garbage = call(tools, "bad.misbehave");
  CHECK(kind_of(garbage) == ToolError::Kind::protocol);
  CHECK(contains(garbage.message(), "not a JSON-RPC message"));
  CHECK(contains(garbage.message(), "this is not JSON"));
  CHECK(text_of(call(tools, "bad.echo", {{"text", "clean"}})) == "clean");
  CHECK(tools.status()[0].restarts == 1);
}

TEST_CASE("tools treat an overlong line as garbage") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  ToolRegistry tools({misbehaving("long_line")}, 5s);
  const Outcome overlong = call(tools, "bad.misbehave");
  CHECK(kind_of(overlong) == ToolError::Kind::protocol);
  CHECK(contains(overlong.message(), "a line longer than 16 MiB"));
  CHECK(text_of(call(tools, "bad.echo", {{"text", "short"}})) == "short");
  CHECK(tools.status()[0].restarts == 1);
}

TEST_CASE("tools refuse a result without content but keep the server") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  ToolRegistry tools({misbehaving("bad_result")}, 5s);
  const Outcome malformed = call(tools, "bad.misbehave");
  CHECK(kind_of(malformed) == ToolError::Kind::protocol);
  CHECK(contains(malformed.message(), "no 'content' array"));
  CHECK(text_of(call(tools, "bad.echo", {{"text", "same"}})) == "same");
  CHECK(tools.status()[0].restarts == 0);
}

TEST_CASE("tools cancel a call in flight exactly once") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  TempDir dir;
  const std::string file = dir.file("state");
  ToolRegistry tools({misbehaving("hang", file)}, 5s);

  const auto t0 = Clock::now();
  const Flight hung = start(tools, "bad.misbehave", {}, 20s);
  std::this_thread::sleep_for(100ms);
  hung.call->cancel();
  const Outcome cancelled = hung.wait();
  CHECK(kind_of(cancelled) == ToolError::Kind::cancelled);
  CHECK(Clock::now() - t0 < 3s);
  CHECK(eventually([&] { return contains(read_or_empty(file + ".cancelled"), "cancelled by the caller"); }));
  hung.call->cancel();  // again: nothing more happens

  // Cancelling a call that already finished changes nothing either.
  const Flight done = start(tools, "bad.echo", {{"text", "done"}});
  CHECK(text_of(done.wait()) == "done");
  done.call->cancel();
  std::this_thread::sleep_for(200ms);
  CHECK(hung.run_count() == 1);
  CHECK(done.run_count() == 1);
  CHECK(tools.status()[0].failures == 0);  // a cancel is not a failure
}

TEST_CASE("tools counter counts exactly the calls made") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  TempDir dir;
  const std::string file = dir.file("count");
  ToolRegistry tools({misbehaving("counter", file)}, 5s);
  for (int i = 1; i <= 5; ++i) CHECK(text_of(call(tools, "bad.bump")) == std::to_string(i));

  std::vector<Flight> flights;
  for (int i = 0; i < 5; ++i) flights.push_back(start(tools, "bad.bump"));
  std::set<std::string> values;
  for (const Flight& flight : flights) values.insert(text_of(flight.wait()));
  CHECK(values == std::set<std::string>{"6", "7", "8", "9", "10"});
  CHECK(den::test::read_file(file) == "10");
  for (const Flight& flight : flights) CHECK(flight.run_count() == 1);
  CHECK(tools.status()[0].calls == 10);
}

TEST_CASE("tools completions may call again") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  ToolRegistry tools({clock_server()}, 5s);
  Flight second;
  Flight first;
  first.call = tools.call("clock.calculate", {{"expression", "1+1"}}, 0ms,
                          [&, inner = first.completion()](std::optional<ToolResult> result, std::exception_ptr error) {
                            if (result)
                              second.call = tools.call("clock.calculate", {{"expression", result->text() + "*10"}}, 0ms,
                                                       second.completion());
                            inner(std::move(result), error);
                          });
  CHECK(text_of(first.wait()) == "2");
  CHECK(text_of(second.wait()) == "20");
}

TEST_CASE("tools wait for a slow server and follow list pages and changes") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  ToolRegistry tools({misbehaving("slow_start")}, 5s);
  std::vector<std::string> names;
  for (const auto& tool : tools.list()) names.push_back(tool.qualified);
  CHECK(names == std::vector<std::string>{"bad.echo", "bad.misbehave", "bad.bump", "bad.grow"});

  CHECK(text_of(call(tools, "bad.grow")) == "grown");
  CHECK(eventually([&] { return tools.list().size() == 5; }));
  CHECK(text_of(call(tools, "bad.extra")) == "fine");
}

TEST_CASE("tools refuse a server that dies at start for a while with a clear error") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  ToolRegistry tools({misbehaving("exit_at_start"), clock_server()}, 5s);
  CHECK(tools.list().size() == 2);  // the clock's
  const auto status = tools.status()[0];
  CHECK_FALSE(status.running);
  CHECK(contains(status.last_error, "failed to start"));
  CHECK(contains(status.last_error, "exited with status 3"));
  CHECK(contains(status.last_error, "exiting at start as asked"));  // its last stderr line

  const Outcome refused = call(tools, "bad.echo", {{"text", "x"}});
  CHECK(kind_of(refused) == ToolError::Kind::server_failed);
  CHECK(contains(refused.message(), "failed to start"));
  CHECK(contains(refused.message(), "exited with status 3"));
  CHECK(text_of(call(tools, "clock.calculate", {{"expression", "6*7"}})) == "42");
}

TEST_CASE("tools survive a command that does not exist") {
  ToolRegistry tools({{"ghost", {"den-test-no-such-tool-server"}, {}}}, 5s);
  CHECK(tools.list().empty());
  CHECK(contains(tools.status()[0].last_error, "cannot run 'den-test-no-such-tool-server'"));
  const Outcome refused = call(tools, "ghost.anything");
  CHECK(kind_of(refused) == ToolError::Kind::server_failed);
  CHECK(contains(refused.message(), "cannot run"));
}

TEST_CASE("tools pass the configured environment") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  TempDir dir;
  den::test::write_file(dir.file("from_env.txt"), "found\n");
  // files.py shares the directory named by a variable only the config sets.
  ToolRegistry tools({{"files",
                       {"sh", "-c", "exec python3 \"$0\" \"$DEN_TEST_SHARE\"", repo_path("examples/tools/files.py")},
                       {{"DEN_TEST_SHARE", dir.path().string()}}}},
                     5s);
  CHECK(text_of(call(tools, "files.read", {{"path", "from_env.txt"}})) == "found\n");
}

TEST_CASE("tools registry destructor cancels calls in flight") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  Flight hung;
  const auto t0 = Clock::now();
  {
    ToolRegistry tools({misbehaving("hang")}, 5s);
    hung = start(tools, "bad.misbehave", {}, 20s);
    std::this_thread::sleep_for(100ms);
  }
  CHECK(Clock::now() - t0 < 5s);
  CHECK(hung.run_count() == 1);
  CHECK(kind_of(hung.wait()) == ToolError::Kind::cancelled);
  hung.call->cancel();  // after the registry: harmless
  CHECK(hung.run_count() == 1);
}

// ---- dial-in servers (ToolRegistry::listen)

// A connected Unix socket to `path`, blocking; -1 when the connect fails.
int connect_unix(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return fd;
  if (fd >= 0) ::close(fd);
  return -1;
}

// A hand-written dial-in server: reads JSON-RPC lines, answers initialize and tools/list with
// one tool "wait", and never answers tools/call, so the test decides when it hangs up.
class ScriptedDialIn {
 public:
  explicit ScriptedDialIn(const std::string& path) : fd_(connect_unix(path)) { REQUIRE(fd_ >= 0); }
  ~ScriptedDialIn() { hang_up(); }
  void hang_up() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  // Answers until a tools/call arrives (its method returned) or 10 s pass.
  std::string serve_until_call() {
    const auto deadline = Clock::now() + 10s;
    std::string buffer;
    while (Clock::now() < deadline) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      char chunk[4096];
      const ssize_t n = ::read(fd_, chunk, sizeof chunk);
      if (n <= 0) return "";
      buffer.append(chunk, static_cast<size_t>(n));
      for (size_t nl; (nl = buffer.find('\n')) != std::string::npos; buffer.erase(0, nl + 1)) {
        const json::value message = json::parse(buffer.substr(0, nl));
        const std::string method(message.at("method").as_string());
        if (method == "tools/call") return method;
        json::object result;
        if (method == "initialize") result = {{"protocolVersion", "2025-06-18"}, {"serverInfo", {{"name", "scripted"}}}};
        if (method == "tools/list")
          result = {{"tools", json::array{json::object{{"name", "wait"}, {"inputSchema", {{"type", "object"}}}}}}};
        if (!message.as_object().contains("id")) continue;  // notifications/initialized
        const std::string reply =
            json::serialize(json::object{{"jsonrpc", "2.0"}, {"id", message.at("id")}, {"result", result}}) + "\n";
        REQUIRE(::write(fd_, reply.data(), reply.size()) == static_cast<ssize_t>(reply.size()));
      }
    }
    return "";
  }

 private:
  int fd_;
};

bool lists(const ToolRegistry& tools, std::string_view qualified) {
  const auto all = tools.list();
  return std::any_of(all.begin(), all.end(), [&](const auto& t) { return t.qualified == qualified; });
}

TEST_CASE("tools accept dial-in servers named by their serverInfo, and drop one that hangs up") {
  DEN_SKIP_UNLESS(has_python3(), "python3 is not on PATH");
  TempDir dir;
  const std::string socket = dir.file("tools.sock");
  ToolRegistry tools({clock_server()}, 5s);
  tools.listen(socket);
  CHECK(tools.listen_path() == socket);
  struct stat st {};
  REQUIRE(::stat(socket.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);

  const std::vector<std::string> dial_in = {"python3", repo_path("examples/tools/clock_calc.py"), "--connect", socket};
  auto first = std::make_unique<den::test::BackgroundProcess>(dial_in);
  REQUIRE(eventually([&] { return lists(tools, "clock_calc.calculate"); }));
  CHECK(text_of(call(tools, "clock_calc.calculate", {{"expression", "6*7"}})) == "42");
  CHECK(text_of(call(tools, "clock.calculate", {{"expression", "1+1"}})) == "2");  // the spawned one, untouched

  den::test::BackgroundProcess second(dial_in);  // the same serverInfo.name: made unique
  REQUIRE(eventually([&] { return lists(tools, "clock_calc-2.now"); }));
  int dialed_in = 0;
  for (const auto& status : tools.status()) dialed_in += status.dialed_in ? 1 : 0;
  CHECK(dialed_in == 2);

  first->kill_and_wait();
  REQUIRE(eventually([&] { return !lists(tools, "clock_calc.calculate"); }));
  const Outcome gone = call(tools, "clock_calc.calculate", {{"expression", "1"}});
  CHECK(kind_of(gone) == ToolError::Kind::unknown_tool);
  CHECK(contains(gone.message(), "clock_calc-2.calculate"));  // what is there instead
  CHECK(text_of(call(tools, "clock_calc-2.calculate", {{"expression", "2**10"}})) == "1024");

  // Its name was given back: the next one to dial in gets it.
  den::test::BackgroundProcess third(dial_in);
  REQUIRE(eventually([&] { return lists(tools, "clock_calc.now"); }));
}

TEST_CASE("tools fail a dial-in's call in flight when it hangs up") {
  TempDir dir;
  ToolRegistry tools({}, 5s);
  tools.listen(dir.file("tools.sock"));
  ScriptedDialIn server(dir.file("tools.sock"));
  std::thread serving([&] { CHECK(server.serve_until_call() == "tools/call"); });
  REQUIRE(eventually([&] { return lists(tools, "scripted.wait"); }));
  Flight flight = start(tools, "scripted.wait", {}, 20s);
  serving.join();  // the call reached it
  server.hang_up();
  const Outcome outcome = flight.wait();
  CHECK(kind_of(outcome) == ToolError::Kind::server_failed);
  CHECK(contains(outcome.message(), "tool server 'scripted' hung up"));
  CHECK(contains(outcome.message(), "dial in again"));
  REQUIRE(eventually([&] { return tools.status().empty(); }));
}

TEST_CASE("tools refuse a live tools socket and a file that is not a socket, and replace a stale one") {
  TempDir dir;
  const std::string socket = dir.file("tools.sock");
  {
    ToolRegistry first({}, 5s);
    first.listen(socket);
    ToolRegistry second({}, 5s);
    CHECK_THROWS_WITH_AS(second.listen(socket), doctest::Contains("another daemon's tool servers dial in at"),
                         std::runtime_error);
  }
  CHECK_FALSE(den::test::file_exists(socket));  // the registry removed its file

  den::test::write_file(dir.file("plain"), "not a socket");
  ToolRegistry tools({}, 5s);
  CHECK_THROWS_WITH_AS(tools.listen(dir.file("plain")), doctest::Contains("exists and is not a socket"),
                       std::runtime_error);
  CHECK(den::test::read_file(dir.file("plain")) == "not a socket");  // untouched

  // A socket file no one listens on any more, as a killed daemon leaves it.
  const int stale = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket.c_str(), sizeof addr.sun_path - 1);
  REQUIRE(::bind(stale, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  ::close(stale);
  tools.listen(socket);
  const int fd = connect_unix(socket);
  CHECK(fd >= 0);
  if (fd >= 0) ::close(fd);
}

TEST_CASE("tools refuse a dial-in of another user") {
  DEN_SKIP_UNLESS(::geteuid() == 0, "needs root, to connect as a second user");
  TempDir dir;
  const std::string socket = dir.file("tools.sock");
  ToolRegistry tools({}, 5s);
  tools.listen(socket);
  // Open the file permissions so that only SO_PEERCRED stands in the way.
  ::chmod(dir.path().c_str(), 0755);
  ::chmod(socket.c_str(), 0666);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) _exit(10);
    const int fd = connect_unix(socket);
    if (fd < 0) _exit(11);
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 5000) != 1) _exit(12);  // den speaks first (initialize) or closes
    char buf[256];
    _exit(::read(fd, buf, sizeof buf) <= 0 ? 0 : 13);  // closed, no initialize
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(tools.status().empty());
}

TEST_CASE("tools parse Hermes tool calls") {
  const auto calls = parse_tool_calls(
      "Let me check.\n<tool_call>\n{\"name\": \"clock.now\", \"arguments\": {}}\n</tool_call>\n"
      "<tool_call>{\"name\": \"clock.calculate\", \"arguments\": \"{\\\"expression\\\": \\\"1+1\\\"}\"}</tool_call>"
      "<tool_call>{\"name\": \"files.list\"}</tool_call>\n"
      "<tool_call>{\"name\": \"files.read\", \"arguments\": {\"path\": \"a.txt\"}}");  // the stop string ate
                                                                                       // </tool_call>
  REQUIRE(calls.size() == 4);
  CHECK(calls[0].name == "clock.now");
  CHECK(calls[0].arguments.empty());
  CHECK(calls[1].name == "clock.calculate");
  CHECK(calls[1].arguments == json::object{{"expression", "1+1"}});
  CHECK(calls[2].name == "files.list");
  CHECK(calls[2].arguments.empty());
  CHECK(calls[3].arguments == json::object{{"path", "a.txt"}});
}

TEST_CASE("tools parse Llama 3 tool calls") {
  auto calls = parse_tool_calls(
      "<|python_tag|>{\"name\": \"clock.calculate\", \"parameters\": {\"expression\": \"2*3\"}}<|eom_id|>");
  REQUIRE(calls.size() == 1);
  CHECK(calls[0].name == "clock.calculate");
  CHECK(calls[0].arguments == json::object{{"expression", "2*3"}});

  calls = parse_tool_calls("  \n{\"name\": \"clock.now\", \"arguments\": {}}\n");
  REQUIRE(calls.size() == 1);
  CHECK(calls[0].name == "clock.now");
}

TEST_CASE("tools skip malformed tool calls") {
  const auto calls = parse_tool_calls(
      "<tool_call>{\"name\": 5}</tool_call><tool_call>not json</tool_call>"
      "<tool_call>{\"name\": \"list_args\", \"arguments\": [1]}</tool_call>"
      "<tool_call>{\"name\": \"bad_string\", \"arguments\": \"{oops\"}</tool_call>"
      "<tool_call>{\"name\": \"good\", \"arguments\": {\"n\": 1}}</tool_call><tool_call></tool_call>");
  REQUIRE(calls.size() == 1);
  CHECK(calls[0].name == "good");

  CHECK(parse_tool_calls("The time is noon.").empty());
  CHECK(parse_tool_calls("").empty());
  CHECK(parse_tool_calls("{\"name\": \"Bob\", \"age\": 3}").empty());                      // JSON, but no call
  CHECK(parse_tool_calls("{\"name\": \"clock.now\", \"parameters\": {}").empty());         // cut short
  CHECK(parse_tool_calls("Sure: {\"name\": \"clock.now\", \"parameters\": {}}").empty());  // not the whole output
}
