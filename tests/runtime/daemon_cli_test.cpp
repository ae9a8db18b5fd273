// The client side of the daemon: DaemonClient against a scripted in-test server (framing,
// notifications, errors, broken connections), the `den sessions|stats|generate|chat` commands
// against the same server (output formats, error lines, Ctrl-C), and the whole path against a
// real `den serve` on stories260K.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <csignal>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>

#include <boost/json.hpp>

#include "daemon_process.h"
#include "den/runtime/client.h"
#include "test_support.h"

namespace json = boost::json;
using den::runtime::DaemonClient;
using den::runtime::DaemonUnavailable;
using den::runtime::RpcCallError;
using den::test::run_den;
using den::test::TempDir;

namespace {

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

std::string result_line(const json::value& id, const json::value& result) {
  return json::serialize(json::object{{"jsonrpc", "2.0"}, {"id", id}, {"result", result}}) + "\n";
}

std::string error_line(const json::value& id, int code, const std::string& message, const json::value& data) {
  json::object error{{"code", code}, {"message", message}};
  if (!data.is_null()) error["data"] = data;
  return json::serialize(json::object{{"jsonrpc", "2.0"}, {"id", id}, {"error", error}}) + "\n";
}

std::string notification_line(const std::string& method, const json::object& params) {
  return json::serialize(json::object{{"jsonrpc", "2.0"}, {"method", method}, {"params", params}}) + "\n";
}

json::object session_object(const std::string& id, const std::string& name, int tokens, const std::string& tier) {
  return {{"id", id},
          {"name", name.empty() ? json::value(nullptr) : json::value(name)},
          {"tokens", tokens},
          {"kv_tokens", tokens},
          {"tier", tier},
          {"pinned", false},
          {"busy", false},
          {"generating", false},
          {"blocks", {{"fast", 1}, {"dram", 0}, {"ssd", 0}}},
          {"checkpoint", {{"generation", 2}, {"current", true}}}};
}

// One accepted connection of the FakeDaemon, as its handler sees it.
class FakeConnection {
 public:
  explicit FakeConnection(int fd) : fd_(fd) {}
  void send(const std::string& bytes) {
    size_t at = 0;
    while (at < bytes.size()) {
      const ssize_t n = ::send(fd_.get(), bytes.data() + at, bytes.size() - at, MSG_NOSIGNAL);
      if (n <= 0) return;
      at += static_cast<size_t>(n);
    }
  }
  void close() { closed_ = true; }  // hang up after the handler returns
  bool closed() const { return closed_; }
  pid_t peer_pid() const {
    ucred cred{};
    socklen_t size = sizeof cred;
    return ::getsockopt(fd_.get(), SOL_SOCKET, SO_PEERCRED, &cred, &size) == 0 ? cred.pid : -1;
  }
  int fd() const { return fd_.get(); }

 private:
  Fd fd_;
  bool closed_ = false;
};

// A scripted daemon: listens on a Unix socket, serves every connection on its own thread,
// records each request and lets the test's handler answer it (or hang up).
class FakeDaemon {
 public:
  using Handler = std::function<void(const json::object& request, FakeConnection& connection)>;

  FakeDaemon(const std::string& path, Handler handler) : handler_(std::move(handler)) {
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, path.c_str(), sizeof address.sun_path - 1);
    if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 || ::listen(listen_fd_, 16) != 0) {
      ::close(listen_fd_);
      throw std::runtime_error("FakeDaemon cannot listen on " + path);
    }
    acceptor_ = std::thread([this] { accept_loop(); });
  }
  ~FakeDaemon() {
    stopping_ = true;
    acceptor_.join();
    ::close(listen_fd_);
  }
  FakeDaemon(const FakeDaemon&) = delete;
  FakeDaemon& operator=(const FakeDaemon&) = delete;

  std::vector<json::object> requests() const {
    std::lock_guard lock(mutex_);
    return requests_;
  }
  std::vector<std::string> methods() const {
    std::vector<std::string> names;
    for (const json::object& r : requests()) names.emplace_back(r.at("method").as_string());
    return names;
  }

 private:
  void accept_loop() {
    std::vector<std::thread> connections;
    while (!stopping_) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd >= 0) connections.emplace_back([this, fd] { serve(fd); });
    }
    for (std::thread& t : connections) t.join();
  }

  void serve(int fd) {
    FakeConnection connection(fd);
    std::string buffer;
    while (!stopping_ && !connection.closed()) {
      const size_t newline = buffer.find('\n');
      if (newline != std::string::npos) {
        const json::object request = json::parse(buffer.substr(0, newline)).as_object();
        buffer.erase(0, newline + 1);
        {
          std::lock_guard lock(mutex_);
          requests_.push_back(request);
        }
        handler_(request, connection);
        continue;
      }
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      char chunk[4096];
      const ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
      if (n <= 0) return;
      buffer.append(chunk, static_cast<size_t>(n));
    }
  }

  Handler handler_;
  int listen_fd_ = -1;
  std::atomic<bool> stopping_{false};
  mutable std::mutex mutex_;
  std::vector<json::object> requests_;
  std::thread acceptor_;
};

json::object parse_object(const std::string& text) {
  json::error_code ec;
  json::value v = json::parse(text, ec);
  REQUIRE_MESSAGE(!ec, "not JSON: " << text);
  REQUIRE(v.is_object());
  return v.as_object();
}

}  // namespace

// ---- DaemonClient against the fake daemon ----------------------------------------------------

TEST_CASE("client hands notifications over in order before the result") {
  TempDir dir;
  const std::string path = dir.file("fake.sock");
  FakeDaemon daemon(path, [](const json::object& request, FakeConnection& c) {
    const json::value& id = request.at("id");
    // A response to some other id first: a client must skip it, not take it for its own.
    c.send(result_line(12345, json::object{{"stale", true}}));
    c.send(notification_line("sessions/stream", {{"request", id}, {"seq", 0}, {"text", "Hel"}}));
    // Two messages in one write, the second split over two writes: framing is by newline only.
    const std::string second = notification_line("sessions/stream", {{"request", id}, {"seq", 1}, {"text", "lo"}});
    const std::string result = result_line(id, json::object{{"text", "Hello"}});
    const std::string both = second + result;
    c.send(both.substr(0, second.size() + 5));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    c.send(both.substr(second.size() + 5));
  });

  DaemonClient client(path);
  CHECK(client.socket_path() == path);
  std::vector<std::string> seen;
  const int64_t id = client.next_id();
  const json::value result = client.call("sessions/generate", {{"session", "s-1"}},
                                         [&](std::string_view method, const json::object& params) {
                                           CHECK(params.at("request").as_int64() == id);
                                           seen.push_back(std::string(method) + ":" +
                                                          std::string(params.at("text").as_string()));
                                         });
  CHECK(result.at("text").as_string() == "Hello");
  REQUIRE(seen.size() == 2);
  CHECK(seen[0] == "sessions/stream:Hel");
  CHECK(seen[1] == "sessions/stream:lo");
  CHECK(client.next_id() == id + 1);

  const auto requests = daemon.requests();
  REQUIRE(requests.size() == 1);
  CHECK(requests[0].at("jsonrpc").as_string() == "2.0");
  CHECK(requests[0].at("method").as_string() == "sessions/generate");
  CHECK(requests[0].at("id").as_int64() == id);
  CHECK(requests[0].at("params").at("session").as_string() == "s-1");
}

TEST_CASE("client turns an error response into RpcCallError with code and data") {
  TempDir dir;
  const std::string path = dir.file("fake.sock");
  FakeDaemon daemon(path, [](const json::object& request, FakeConnection& c) {
    c.send(error_line(request.at("id"), -32000, "no such session", json::object{{"session", "foo"}}));
  });
  DaemonClient client(path);
  try {
    client.call("sessions/get", {{"session", "foo"}});
    FAIL("no exception");
  } catch (const RpcCallError& e) {
    CHECK(e.code() == -32000);
    CHECK(std::string(e.what()) == "no such session");
    CHECK(e.data().at("session").as_string() == "foo");
    CHECK(den::runtime::describe_for_user(e) == "no session 'foo' (den sessions ls lists them)");
  }
  // The connection stays usable after an error.
  CHECK_THROWS_AS(client.call("sessions/get", {{"session", "foo"}}), RpcCallError);
}

TEST_CASE("client reports a connection closed mid-call as DaemonUnavailable") {
  TempDir dir;
  const std::string path = dir.file("fake.sock");
  FakeDaemon daemon(path, [](const json::object& request, FakeConnection& c) {
    c.send(notification_line("sessions/progress", {{"request", request.at("id")}, {"seq", 0}}));
    c.send("{\"jsonrpc\":\"2.0\",\"id\":");  // half a response, then the daemon is gone
    c.close();
  });
  DaemonClient client(path);
  int notifications = 0;
  try {
    client.call("sessions/wake", {{"session", "s-1"}}, [&](std::string_view, const json::object&) { ++notifications; });
    FAIL("no exception");
  } catch (const DaemonUnavailable& e) {
    CHECK(std::string(e.what()) == "the daemon at " + path + " closed the connection");
  }
  CHECK(notifications == 1);
  // Writing to the closed connection fails the same way, without SIGPIPE.
  CHECK_THROWS_AS(
      {
        for (int i = 0; i < 100; ++i) client.call("daemon/stats");
      },
      DaemonUnavailable);
}

TEST_CASE("client without a daemon says to start den serve") {
  TempDir dir;
  const std::string path = dir.file("nobody.sock");
  CHECK_FALSE(den::runtime::daemon_listening(path));
  try {
    DaemonClient client(path);
    FAIL("no exception");
  } catch (const DaemonUnavailable& e) {
    CHECK(std::string(e.what()) == "no daemon at " + path + ": start one with 'den serve'");
  }
  // A stale socket file nobody listens on is the same: no daemon.
  { FakeDaemon gone(path, [](const json::object&, FakeConnection&) {}); }
  CHECK(den::test::file_exists(path));
  CHECK_FALSE(den::runtime::daemon_listening(path));
  CHECK_THROWS_AS(DaemonClient{path}, DaemonUnavailable);
}

TEST_CASE("client read_line returns lines and times out") {
  TempDir dir;
  const std::string path = dir.file("fake.sock");
  FakeDaemon daemon(path, [](const json::object& request, FakeConnection& c) {
    c.send(error_line(request.at("id"), -32700, "parse error", nullptr));
  });
  DaemonClient client(path);
  client.send_raw("{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"x\"}\n");
  const auto line = client.read_line(std::chrono::milliseconds(5000));
  REQUIRE(line);
  CHECK(parse_object(*line).at("error").at("code").as_int64() == -32700);
  const auto start = std::chrono::steady_clock::now();
  CHECK_FALSE(client.read_line(std::chrono::milliseconds(100)));
  CHECK(std::chrono::steady_clock::now() - start >= std::chrono::milliseconds(100));
}

// ---- The den commands against the fake daemon ------------------------------------------------

TEST_CASE("den sessions prints tables, details and one-line errors") {
  TempDir dir;
  const std::string path = dir.file("fake.sock");
  FakeDaemon daemon(path, [](const json::object& request, FakeConnection& c) {
    const std::string method(request.at("method").as_string());
    const json::value& id = request.at("id");
    const json::object& params = request.at("params").as_object();
    if (method == "sessions/list") {
      json::object hibernated = session_object("s-12", "", 4096, "ssd");
      hibernated["pinned"] = true;
      hibernated["checkpoint"] = nullptr;
      c.send(result_line(id, json::object{{"sessions", json::array{session_object("s-1", "alice", 412, "fast"),
                                                                     hibernated}}}));
    } else if (method == "sessions/get" && params.at("session").as_string() == "alice") {
      c.send(result_line(id, session_object("s-1", "alice", 412, "fast")));
    } else if (method == "sessions/get") {
      c.send(error_line(id, -32000, "session not found", json::object{{"session", params.at("session")}}));
    } else if (method == "sessions/create") {
      c.send(error_line(id, -32001, "name taken", json::object{{"name", params.at("name")}}));
    } else if (method == "sessions/delete") {
      c.send(result_line(id, json::object{{"deleted", params.at("session")}}));
    } else if (method == "daemon/stats") {
      c.send(result_line(id, json::object{{"uptime_s", 12.5},
                                          {"requests", 40},
                                          {"generated_tokens_per_s", 1.5},
                                          {"ttft_ms", {{"p50", 75.0}, {"count", 3}}},
                                          {"memory", {{"fast", {{"sessions", 2}, {"used_bytes", 3 << 20}}},
                                                      {"bytes_moved", {{"ssd_read", 40960}}}}}}));
    }
  });

  const auto ls = run_den({"sessions", "ls", "--socket", path});
  CHECK(ls.exit_code == 0);
  CHECK(ls.out ==
        "ID    NAME   TOKENS  KV    TIER  PINNED  CHECKPOINT\n"
        "s-1   alice  412     412   fast  no      2 (current)\n"
        "s-12  -      4096    4096  ssd   yes     none\n");

  const auto ls_json = run_den({"sessions", "ls", "--json", "--socket", path});
  CHECK(ls_json.exit_code == 0);
  CHECK(parse_object(ls_json.out).at("sessions").as_array().size() == 2);

  const auto show = run_den({"sessions", "show", "alice", "--socket", path});
  CHECK(show.exit_code == 0);
  CHECK(show.out.find("id:         s-1\n") != std::string::npos);
  CHECK(show.out.find("name:       alice\n") != std::string::npos);
  CHECK(show.out.find("blocks:     fast 1, dram 0, ssd 0\n") != std::string::npos);

  const auto missing = run_den({"sessions", "show", "bob", "--socket", path});
  CHECK(missing.exit_code == 1);
  CHECK(missing.out.empty());
  CHECK(missing.err == "den: error: no session 'bob' (den sessions ls lists them)\n");

  const auto taken = run_den({"sessions", "create", "alice", "--socket", path});
  CHECK(taken.exit_code == 1);
  CHECK(taken.err.find("the session name 'alice' is taken or invalid") != std::string::npos);

  const auto rm = run_den({"sessions", "rm", "s-1", "s-12", "--socket", path});
  CHECK(rm.exit_code == 0);
  CHECK(rm.out == "deleted s-1\ndeleted s-12\n");

  const auto stats = run_den({"stats", "--socket", path});
  CHECK(stats.exit_code == 0);
  CHECK(stats.out ==
        "uptime s:               12.5 s\n"
        "requests:               40\n"
        "generated tokens per s: 1.5/s\n"
        "ttft ms:\n"
        "  p50:   75 ms\n"
        "  count: 3\n"
        "memory:\n"
        "  fast:\n"
        "    sessions:   2\n"
        "    used bytes: 3.0 MiB\n"
        "  bytes moved:\n"
        "    ssd read: 40.0 KiB\n");
  const auto stats_json = run_den({"stats", "--json", "--socket", path});
  CHECK(parse_object(stats_json.out).at("requests").as_int64() == 40);
}

TEST_CASE("den sessions hibernate asks for progress and prints a summary") {
  TempDir dir;
  const std::string path = dir.file("fake.sock");
  FakeDaemon daemon(path, [](const json::object& request, FakeConnection& c) {
    const json::value& id = request.at("id");
    for (int seq = 0; seq < 3; ++seq) {
      c.send(notification_line("sessions/progress",
                               {{"request", id}, {"seq", seq}, {"done_bytes", seq << 20}, {"total_bytes", 2 << 20}}));
    }
    json::object session = session_object("s-3", "", 100, "ssd");
    c.send(result_line(id, json::object{{"session", session}, {"bytes", 13107200}, {"seconds", 0.21}}));
  });
  const auto r = run_den({"sessions", "hibernate", "s-3", "--socket", path});
  CHECK(r.exit_code == 0);
  CHECK(r.out == "hibernated s-3 to ssd: 12.5 MiB in 0.21 s\n");
  CHECK(r.err.empty());  // no progress bar when stderr is not a terminal
  const auto dram = run_den({"sessions", "hibernate", "s-3", "--tier", "dram", "--json", "--socket", path});
  CHECK(dram.exit_code == 0);
  CHECK(parse_object(dram.out).at("bytes").as_int64() == 13107200);

  const auto requests = daemon.requests();
  REQUIRE(requests.size() == 2);
  const json::object& params = requests[0].at("params").as_object();
  CHECK(params.at("progress").as_bool());
  CHECK(params.at("tier").as_string() == "ssd");
  CHECK(requests[1].at("params").at("tier").as_string() == "dram");

  CHECK(run_den({"sessions", "hibernate", "s-3", "--tier", "tape", "--socket", path}).exit_code != 0);
}

TEST_CASE("den generate streams through the daemon and deletes its temporary session") {
  TempDir dir;
  const std::string path = dir.file("fake.sock");
  FakeDaemon daemon(path, [](const json::object& request, FakeConnection& c) {
    const std::string method(request.at("method").as_string());
    const json::value& id = request.at("id");
    if (method == "sessions/create") {
      c.send(result_line(id, session_object("s-7", "", 0, "fast")));
    } else if (method == "sessions/generate") {
      c.send(notification_line("sessions/stream", {{"request", id}, {"seq", 0}, {"text", " there"}}));
      c.send(notification_line("sessions/stream", {{"request", id}, {"seq", 1}, {"text", " was"}}));
      c.send(result_line(id, json::object{{"session", "s-7"},
                                          {"text", " there was"},
                                          {"finish_reason", "length"},
                                          {"tokens", {{"prompt", 5}, {"reused", 0}, {"generated", 2}}},
                                          {"timings", {{"prefill_ms", 1.0}, {"decode_ms", 2.0}}},
                                          {"logprobs", json::array{{{"id", 11}, {"logprob", -0.5}},
                                                                   {{"id", 22}, {"logprob", -0.25}}}}}));
    } else if (method == "sessions/delete") {
      c.send(result_line(id, json::object{{"deleted", "s-7"}}));
    }
  });
  const auto r = run_den({"generate", "--socket", path, "-p", "Once upon a time", "-n", "2", "--temp", "0", "-m",
                          "/nonexistent.gguf", "--stop", "."});
  CHECK(r.exit_code == 0);
  CHECK(r.out == " there was\n");
  CHECK(r.err.find("note: using the daemon at " + path) != std::string::npos);
  CHECK(r.err.find("--model") != std::string::npos);

  auto requests = daemon.requests();
  REQUIRE(requests.size() == 3);
  CHECK(requests[0].at("method").as_string() == "sessions/create");
  CHECK(requests[1].at("method").as_string() == "sessions/generate");
  const json::object& params = requests[1].at("params").as_object();
  CHECK(params.at("session").as_string() == "s-7");
  CHECK(params.at("text").as_string() == "Once upon a time");
  CHECK(params.at("max_tokens").as_int64() == 2);
  CHECK(params.at("temperature").to_number<double>() == 0.0);
  CHECK(params.at("stream").as_bool());
  CHECK(params.at("stop").as_array() == json::array{"."});
  CHECK_FALSE(params.contains("logprobs"));
  CHECK(requests[2].at("method").as_string() == "sessions/delete");
  CHECK(requests[2].at("params").at("session").as_string() == "s-7");

  const auto ids = run_den({"generate", "--socket", path, "-p", "x", "--ids", "--temp", "0"});
  CHECK(ids.exit_code == 0);
  CHECK(ids.out == "11 22\n");
  CHECK(daemon.requests()[4].at("params").at("logprobs").as_int64() == 0);
}

TEST_CASE("den generate sends sessions/cancel on Ctrl-C and still cleans up") {
  TempDir dir;
  const std::string path = dir.file("fake.sock");
  std::mutex mutex;
  std::condition_variable cancelled_cv;
  bool cancelled = false;
  FakeDaemon daemon(path, [&](const json::object& request, FakeConnection& c) {
    const std::string method(request.at("method").as_string());
    const json::value& id = request.at("id");
    if (method == "sessions/create") {
      c.send(result_line(id, session_object("s-9", "", 0, "fast")));
    } else if (method == "sessions/generate") {
      c.send(notification_line("sessions/stream", {{"request", id}, {"seq", 0}, {"text", "Once"}}));
      ::kill(c.peer_pid(), SIGINT);  // the user presses Ctrl-C while it generates
      std::unique_lock lock(mutex);
      cancelled_cv.wait_for(lock, std::chrono::seconds(10), [&] { return cancelled; });
      c.send(result_line(id, json::object{{"session", "s-9"}, {"text", "Once"}, {"finish_reason", "cancelled"}}));
    } else if (method == "sessions/cancel") {
      {
        std::lock_guard lock(mutex);
        cancelled = true;
      }
      cancelled_cv.notify_all();
      c.send(result_line(id, json::object{{"cancelled", true}}));
    } else if (method == "sessions/delete") {
      c.send(result_line(id, json::object{{"deleted", "s-9"}}));
    }
  });
  const auto r = run_den({"generate", "--socket", path, "-p", "x", "--temp", "0"});
  CHECK(r.exit_code == 1);
  CHECK(r.out == "Once\n");
  CHECK(r.err.find("interrupted") != std::string::npos);
  const auto methods = daemon.methods();
  CHECK(methods == std::vector<std::string>{"sessions/create", "sessions/generate", "sessions/cancel", "sessions/delete"});
  CHECK(daemon.requests()[2].at("params").at("session").as_string() == "s-9");
}

TEST_CASE("den chat through the daemon continues a named session") {
  TempDir dir;
  const std::string path = dir.file("fake.sock");
  FakeDaemon daemon(path, [](const json::object& request, FakeConnection& c) {
    const std::string method(request.at("method").as_string());
    const json::value& id = request.at("id");
    if (method == "sessions/get") {
      c.send(result_line(id, session_object("s-2", "bar", 30, "fast")));
    } else if (method == "sessions/generate") {
      c.send(notification_line("sessions/stream", {{"request", id}, {"seq", 0}, {"text", "Hi!"}}));
      c.send(result_line(id, json::object{{"session", "s-2"}, {"text", "Hi!"}, {"finish_reason", "end_of_generation"}}));
    }
  });
  const auto r = run_den({"chat", "--socket", path, "--session", "bar", "--system", "Be brief", "--temp", "0"},
                         "Hello\n\nHow are you?\n/exit\nnot sent\n");
  CHECK(r.exit_code == 0);
  CHECK(r.out == "Hi!\nHi!\n");
  CHECK(r.err.find("continuing session bar (30 tokens)") != std::string::npos);
  const auto requests = daemon.requests();
  REQUIRE(requests.size() == 3);
  // A continued session gets no system prompt again: just the user's line.
  const json::array& messages = requests[1].at("params").at("messages").as_array();
  REQUIRE(messages.size() == 1);
  CHECK(messages[0].at("role").as_string() == "user");
  CHECK(messages[0].at("content").as_string() == "Hello");
  CHECK(requests[2].at("params").at("messages").as_array()[0].at("content").as_string() == "How are you?");
}

// ---- Without a daemon ------------------------------------------------------------------------

TEST_CASE("den sessions and stats without a daemon fail and say to run den serve") {
  TempDir dir;
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"sessions", "ls"}, {"sessions", "hibernate", "foo"}, {"stats"}}) {
    std::vector<std::string> with_socket = args;
    with_socket.insert(with_socket.end(), {"--socket", dir.file("none.sock")});
    const auto r = run_den(with_socket);
    CHECK(r.exit_code == 1);
    CHECK(r.out.empty());
    CHECK(r.err == "den: error: no daemon at " + dir.file("none.sock") + ": start one with 'den serve'\n");
  }
}

TEST_CASE("den generate without a daemon runs in-process, as before") {
  DEN_SKIP_UNLESS(den::test::file_exists(den::test::stories_model()), "../shared/models/stories260K is absent");
  TempDir dir;
  const std::string model = den::test::stories_model();
  const auto fallback =
      run_den({"generate", "--socket", dir.file("none.sock"), "-m", model, "-p", "Once upon a time", "-n", "16", "--temp", "0"});
  const auto local = run_den({"generate", "--local", "-m", model, "-p", "Once upon a time", "-n", "16", "--temp", "0"});
  CHECK(fallback.exit_code == 0);
  CHECK(local.exit_code == 0);
  CHECK(fallback.out == local.out);
  CHECK(fallback.err.find("note:") == std::string::npos);  // silently
  // A session exists only on a daemon.
  const auto session = run_den({"generate", "--socket", dir.file("none.sock"), "-m", model, "--session", "foo"});
  CHECK(session.exit_code == 1);
  CHECK(session.err.find("den serve") != std::string::npos);
}

// ---- A real daemon ---------------------------------------------------------------------------

TEST_CASE("den sessions, generate, chat and stats against a real den serve") {
  DEN_SKIP_UNLESS(den::test::file_exists(den::test::stories_model()), "../shared/models/stories260K is absent");
  const std::string model = den::test::stories_model();
  den::test::DaemonProcess daemon({"-m", model, "--backend", "cpu"});
  INFO("den serve's output:\n" << daemon.log());
  const std::string socket = daemon.socket_path();

  const auto created = run_den({"sessions", "create", "foo", "--socket", socket});
  REQUIRE_MESSAGE(created.exit_code == 0, created.err);
  CHECK(created.out.find("foo") != std::string::npos);

  // Greedy decoding through the daemon matches the in-process generator token for token.
  const auto via_daemon = run_den({"generate", "--socket", socket, "--session", "foo", "-p", "Once upon a time", "-n",
                                   "16", "--temp", "0"});
  const auto local = run_den({"generate", "--local", "-m", model, "-p", "Once upon a time", "-n", "16", "--temp", "0"});
  CHECK(via_daemon.exit_code == 0);
  CHECK(local.exit_code == 0);
  CHECK(via_daemon.out == local.out);
  CHECK(via_daemon.out.size() > 1);

  // A temporary session (no --session) is gone afterwards.
  const auto temporary = run_den({"generate", "--socket", socket, "-p", "Once upon a time", "-n", "4", "--temp", "0"});
  CHECK(temporary.exit_code == 0);

  const auto ls = run_den({"sessions", "ls", "--json", "--socket", socket});
  REQUIRE(ls.exit_code == 0);
  const json::array sessions = parse_object(ls.out).at("sessions").as_array();
  REQUIRE(sessions.size() == 1);
  CHECK(sessions[0].at("name").as_string() == "foo");
  CHECK(sessions[0].at("tokens").as_int64() > 16);
  const auto table = run_den({"sessions", "ls", "--socket", socket});
  CHECK(table.out.find("foo") != std::string::npos);

  const auto hibernated = run_den({"sessions", "hibernate", "foo", "--socket", socket});
  CHECK_MESSAGE(hibernated.exit_code == 0, hibernated.err);
  CHECK(hibernated.out.find("hibernated foo") != std::string::npos);
  const auto cold = run_den({"sessions", "show", "foo", "--json", "--socket", socket});
  CHECK(parse_object(cold.out).at("tier").as_string() == "ssd");
  const auto woken = run_den({"sessions", "wake", "foo", "--socket", socket});
  CHECK_MESSAGE(woken.exit_code == 0, woken.err);
  CHECK(woken.out.find("woke foo") != std::string::npos);
  const auto warm = run_den({"sessions", "show", "foo", "--json", "--socket", socket});
  CHECK(parse_object(warm.out).at("tier").as_string() == "fast");
  const auto checkpointed = run_den({"sessions", "checkpoint", "foo", "--socket", socket});
  CHECK_MESSAGE(checkpointed.exit_code == 0, checkpointed.err);

  // A chat on a named session continues it on the next run.
  const auto first = run_den({"chat", "--socket", socket, "--session", "bar", "-n", "8", "--temp", "0"}, "Hello\n");
  CHECK_MESSAGE(first.exit_code == 0, first.err);
  const auto second = run_den({"chat", "--socket", socket, "--session", "bar", "-n", "8", "--temp", "0"}, "Again\n");
  CHECK(second.exit_code == 0);
  CHECK(second.err.find("continuing session bar (") != std::string::npos);
  const auto unnamed = run_den({"chat", "--socket", socket, "-n", "4", "--temp", "0"}, "Hi\n");
  CHECK(unnamed.exit_code == 0);
  CHECK(unnamed.err.find("kept: continue with den chat --session s-") != std::string::npos);

  const auto missing = run_den({"sessions", "show", "nobody", "--socket", socket});
  CHECK(missing.exit_code == 1);
  CHECK(missing.err == "den: error: no session 'nobody' (den sessions ls lists them)\n");

  const auto removed = run_den({"sessions", "rm", "foo", "bar", "--socket", socket});
  CHECK_MESSAGE(removed.exit_code == 0, removed.err);
  const auto after = run_den({"sessions", "ls", "--json", "--socket", socket});
  const json::object remaining = parse_object(after.out);
  for (const json::value& s : remaining.at("sessions").as_array()) {
    CHECK(s.at("name") != json::value("foo"));
  }

  const auto stats = run_den({"stats", "--json", "--socket", socket});
  CHECK(stats.exit_code == 0);
  CHECK_FALSE(parse_object(stats.out).empty());
  CHECK(run_den({"stats", "--socket", socket}).exit_code == 0);

  // SIGTERM is an orderly shutdown.
  daemon.kill(SIGTERM);
  CHECK(daemon.wait_exit() == 0);
  const auto gone = run_den({"sessions", "ls", "--socket", socket});
  CHECK(gone.exit_code == 1);
  CHECK(gone.err.find("den serve") != std::string::npos);
}

// A small `den bench abuse` (the full one is in docs/RELIABILITY.md): every malformed line is
// answered, the oversized frames are counted, and the daemon serves on afterwards.
TEST_CASE("den bench abuse floods a real den serve, which answers every line and carries on") {
  DEN_SKIP_UNLESS(den::test::file_exists(den::test::stories_model()), "../shared/models/stories260K is absent");
  den::test::DaemonProcess daemon({"-m", den::test::stories_model(), "--backend", "cpu", "--threads", "1"});
  const auto bench = run_den({"bench", "abuse", "--socket", daemon.socket_path(), "--malformed", "20000",
                              "--requests", "200", "--oversized", "2", "--slow", "5", "--idle", "20"});
  INFO(bench.out << bench.err);
  REQUIRE(bench.exit_code == 0);
  CHECK(bench.out.find("20000 malformed lines") != std::string::npos);
  CHECK(bench.out.find("20000 answered") != std::string::npos);
  CHECK(bench.out.find("2 oversized lines") != std::string::npos);
  CHECK(bench.out.find("p99 under abuse / alone") != std::string::npos);
  DaemonClient client(daemon.socket_path());
  CHECK(client.call("sessions/list").at("sessions").as_array().empty());  // its session cleaned up
  CHECK(daemon.running());
}
