// Integration tests of `den serve`: a real daemon process on stories260K (CPU backend), driven
// through its socket. Concurrency and batching, restart after SIGTERM and SIGKILL, bad input
// while a well-behaved client measures its latency, cancellation, and other users' refusal.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <future>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <sstream>
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

std::vector<std::string> stories_daemon_args(std::vector<std::string> more = {}) {
  std::vector<std::string> args = {"-m", stories_model(), "--backend", test_daemon_backend(), "--threads", "1"};
  args.insert(args.end(), more.begin(), more.end());
  return args;
}

json::object greedy(std::string text, int max_tokens) {
  return {{"text", std::move(text)}, {"max_tokens", max_tokens}, {"temperature", 0}};
}

json::object with_session(json::object params, const std::string& session) {
  params["session"] = session;
  return params;
}

std::string generate_text(DaemonClient& client, const std::string& session, json::object params) {
  const json::value r = client.call("sessions/generate", with_session(std::move(params), session));
  return std::string(r.at("text").as_string());
}

int64_t memory_stat(DaemonClient& client, const char* key) {
  return client.call("daemon/stats").at("memory").at(key).to_number<int64_t>();
}

int error_code_of(const std::string& line) {
  const json::value v = json::parse(line);
  return static_cast<int>(v.at("error").at("code").to_number<int64_t>());
}

const std::vector<std::string> kPrompts = {"Once upon a time", "The cat", "Lily and Ben went", "One day, a little",
                                           "Tom had a big red"};

TEST_CASE("daemon serves 50 concurrent clients in shared steps with single-client outputs") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DaemonProcess daemon(stories_daemon_args());
  constexpr int kClients = 50;
  constexpr int kTokens = 24;

  // Single-client references, one prompt at a time.
  std::vector<std::string> reference;
  {
    DaemonClient client(daemon.socket_path());
    for (size_t i = 0; i < kPrompts.size(); ++i) {
      const std::string name = "ref" + std::to_string(i);
      client.call("sessions/create", {{"name", name}});
      reference.push_back(generate_text(client, name, greedy(kPrompts[i], kTokens)));
      CHECK(!reference.back().empty());
    }
  }

  std::vector<std::string> outputs(kClients);
  std::vector<std::string> failures(kClients);
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      try {
        DaemonClient client(daemon.socket_path());
        const std::string name = "c" + std::to_string(i);
        client.call("sessions/create", {{"name", name}});
        json::object params = greedy(kPrompts[static_cast<size_t>(i) % kPrompts.size()], kTokens);
        params["stream"] = true;
        std::string streamed;
        int64_t expected_seq = 0;
        const json::value r = client.call("sessions/generate", with_session(params, name),
                                          [&](std::string_view method, const json::object& p) {
                                            if (method != "sessions/stream") return;
                                            if (p.at("seq").to_number<int64_t>() != expected_seq++) streamed += "<seq gap>";
                                            streamed += p.at("text").as_string();
                                          });
        outputs[static_cast<size_t>(i)] = std::string(r.at("text").as_string());
        if (streamed != outputs[static_cast<size_t>(i)]) failures[static_cast<size_t>(i)] = "stream != result";
      } catch (const std::exception& e) {
        failures[static_cast<size_t>(i)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kClients; ++i) {
    INFO("client " << i);
    CHECK(failures[static_cast<size_t>(i)] == "");
    CHECK(outputs[static_cast<size_t>(i)] == reference[static_cast<size_t>(i) % kPrompts.size()]);
  }
  DaemonClient client(daemon.socket_path());
  const json::value stats = client.call("daemon/stats");
  const json::value& engine = stats.at("engine");
  MESSAGE("steps " << engine.at("steps") << ", batched " << engine.at("batched_steps") << ", max batch "
                   << engine.at("max_batch") << ", mean batch " << engine.at("mean_batch"));
  CHECK(engine.at("batched_steps").to_number<int64_t>() > 0);
  CHECK(engine.at("max_batch").to_number<int64_t>() > 1);
  CHECK(engine.at("requests_completed").to_number<int64_t>() == kClients + static_cast<int64_t>(kPrompts.size()));
}

// Runs the same conversation in a daemon that restarts and in one that does not: the turns after
// the restart must be the same, and nothing may be recomputed.
TEST_CASE("daemon restart after SIGTERM lists sessions and continues with 0 tokens recomputed") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DaemonProcess reference_daemon(stories_daemon_args());
  DaemonProcess daemon(stories_daemon_args());
  DaemonClient reference(reference_daemon.socket_path());
  std::vector<std::string> first_turns;
  {
    DaemonClient client(daemon.socket_path());
    for (size_t i = 0; i < 3; ++i) {
      const std::string name = "story" + std::to_string(i);
      client.call("sessions/create", {{"name", name}});
      reference.call("sessions/create", {{"name", name}});
      const std::string a = generate_text(client, name, greedy(kPrompts[i], 20));
      CHECK(a == generate_text(reference, name, greedy(kPrompts[i], 20)));
    }
  }
  CHECK(daemon.stop() == 0);
  CHECK(daemon.log().find("sessions checkpointed") != std::string::npos);
  daemon.restart();

  DaemonClient client(daemon.socket_path());
  const json::array sessions = client.call("sessions/list").at("sessions").as_array();
  REQUIRE(sessions.size() == 3);
  for (const json::value& s : sessions) {
    CHECK(s.at("checkpoint").at("current").as_bool());
    CHECK(s.at("tier").as_string() == "ssd");
  }
  for (size_t i = 0; i < 3; ++i) {
    const std::string name = "story" + std::to_string(i);
    json::object next{{"max_tokens", 16}, {"temperature", 0}};
    CHECK(generate_text(client, name, next) == generate_text(reference, name, next));
  }
  CHECK(memory_stat(client, "tokens_recomputed") == 0);
  CHECK(memory_stat(client, "tokens_loaded") > 0);
}

TEST_CASE("daemon restart after SIGKILL keeps every checkpointed session's KV and every acknowledged history") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DaemonProcess reference_daemon(stories_daemon_args());
  DaemonProcess daemon(stories_daemon_args());
  DaemonClient reference(reference_daemon.socket_path());
  {
    DaemonClient client(daemon.socket_path());
    for (const char* name : {"kept", "unsaved"}) {
      client.call("sessions/create", {{"name", name}});
      reference.call("sessions/create", {{"name", name}});
      CHECK(generate_text(client, name, greedy("Once upon a time", 20)) ==
            generate_text(reference, name, greedy("Once upon a time", 20)));
    }
    client.call("sessions/checkpoint", {{"session", "kept"}});
  }
  daemon.kill(SIGKILL);
  CHECK(daemon.wait_exit() == 128 + SIGKILL);
  daemon.restart();

  DaemonClient client(daemon.socket_path());
  REQUIRE(client.call("sessions/list").at("sessions").as_array().size() == 2);
  json::object next{{"max_tokens", 16}, {"temperature", 0}};
  CHECK(generate_text(client, "kept", next) == generate_text(reference, "kept", next));
  CHECK(memory_stat(client, "tokens_recomputed") == 0);
  CHECK(memory_stat(client, "tokens_loaded") > 0);
  // The other session's history was acknowledged (saved before its answer), its KV was not:
  // it continues the same, computing its KV again.
  CHECK(generate_text(client, "unsaved", next) == generate_text(reference, "unsaved", next));
}

// Bad input of every kind while a well-behaved client keeps asking daemon/stats: each gets a
// clear error or is dropped, the daemon survives, and stats stays fast.
TEST_CASE("daemon answers bad input with errors while stats stays fast") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  TempDir config_dir;
  write_file(config_dir.file("den.yaml"), "limits:\n  request_seconds: 2\n  line_bytes: 1MiB\n  connections: 4\n");
  DaemonProcess daemon(stories_daemon_args({"--config", config_dir.file("den.yaml")}));

  std::atomic<bool> done{false};
  std::vector<double> latencies_ms;
  std::string watcher_error;
  std::thread watcher([&] {
    try {
      DaemonClient client(daemon.socket_path());
      while (!done.load()) {
        const auto t0 = std::chrono::steady_clock::now();
        client.call("daemon/stats");
        latencies_ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    } catch (const std::exception& e) {
      watcher_error = e.what();
    }
  });

  {
    DaemonClient bad(daemon.socket_path());
    auto answer = [&](std::string_view line) {
      bad.send_raw(line);
      const auto reply = bad.read_line(std::chrono::seconds(10));
      REQUIRE(reply.has_value());
      return *reply;
    };
    CHECK(error_code_of(answer("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\"\n")) == runtime::rpc::parse_error);
    CHECK(error_code_of(answer("[1,2]\n")) == runtime::rpc::invalid_request);
    CHECK(error_code_of(answer("{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"no/such\"}\n")) == runtime::rpc::method_not_found);
    CHECK(error_code_of(answer("{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"sessions/get\",\"params\":{\"session\":7}}\n")) ==
          runtime::rpc::invalid_params);
    CHECK(error_code_of(answer("{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"sessions/get\",\"params\":{\"session\":\"nope\"}}\n")) ==
          runtime::rpc::session_not_found);
    bad.call("sessions/create", {{"name", "typed"}});
    CHECK(error_code_of(answer(
              "{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"sessions/generate\",\"params\":{\"session\":\"typed\",\"max_tokens\":\"many\"}}\n")) ==
          runtime::rpc::invalid_params);
    CHECK(error_code_of(answer(
              "{\"jsonrpc\":\"2.0\",\"id\":6,\"method\":\"sessions/generate\",\"params\":{\"session\":\"typed\",\"temprature\":0}}\n")) ==
          runtime::rpc::invalid_params);
    // Nesting depth 10^5.
    std::string deep = "{\"jsonrpc\":\"2.0\",\"id\":6,\"method\":\"daemon/stats\",\"params\":{\"a\":";
    deep += std::string(100000, '[') + std::string(100000, ']') + "}}\n";
    CHECK(error_code_of(answer(deep)) == runtime::rpc::limit_exceeded);
    // A 100 MB line, sent in 1 MiB pieces: refused without being buffered.
    const std::string piece(1 << 20, 'x');
    for (int i = 0; i < 100; ++i) bad.send_raw(piece);
    CHECK(error_code_of(answer("\n")) == runtime::rpc::limit_exceeded);
    // The connection still works after all that.
    CHECK(bad.call("daemon/stats").at("engine").is_object());
  }
  {
    // A client that leaves in the middle of a stream.
    DaemonClient leaver(daemon.socket_path());
    leaver.call("sessions/create", {{"name", "leaver"}});
    json::object p = with_session(greedy("Once upon a time", 400), "leaver");
    p["stream"] = true;
    const std::string line = json::serialize(json::object{{"jsonrpc", "2.0"}, {"id", 1}, {"method", "sessions/generate"}, {"params", p}});
    leaver.send_raw(line + "\n");
    CHECK(leaver.read_line(std::chrono::seconds(10)).has_value());  // the first streamed piece
  }
  {
    // One byte per second: dropped with -32009 once limits.request_seconds (2 s) pass.
    DaemonClient slow(daemon.socket_path());
    const std::string request = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"daemon/stats\"}\n";
    std::optional<std::string> reply;
    for (size_t i = 0; i < request.size() && !reply; ++i) {
      try {
        slow.send_raw(request.substr(i, 1));
      } catch (const std::exception&) {
        break;
      }
      reply = slow.read_line(std::chrono::seconds(1));
    }
    REQUIRE(reply.has_value());
    CHECK(error_code_of(*reply) == runtime::rpc::request_timeout);
    CHECK_FALSE(slow.read_line(std::chrono::seconds(2)).has_value());  // closed
  }
  {
    // limits.connections is 4: the watcher and three more; the fifth is refused with -32007.
    std::vector<std::unique_ptr<DaemonClient>> held;
    for (int i = 0; i < 3; ++i) {
      held.push_back(std::make_unique<DaemonClient>(daemon.socket_path()));
      held.back()->call("initialize");
    }
    DaemonClient refused(daemon.socket_path());
    const auto reply = refused.read_line(std::chrono::seconds(5));
    REQUIRE(reply.has_value());
    CHECK(error_code_of(*reply) == runtime::rpc::limit_exceeded);
    CHECK_FALSE(refused.read_line(std::chrono::seconds(1)).has_value());  // closed
  }
  done = true;
  watcher.join();
  CHECK(watcher_error == "");
  REQUIRE(latencies_ms.size() > 20);
  std::sort(latencies_ms.begin(), latencies_ms.end());
  const double p99 = latencies_ms[latencies_ms.size() * 99 / 100];
  MESSAGE("daemon/stats under abuse: " << latencies_ms.size() << " calls, p50 " << latencies_ms[latencies_ms.size() / 2]
                                       << " ms, p99 " << p99 << " ms");
  CHECK(p99 < 100.0);
  CHECK(daemon.running());
  DaemonClient after(daemon.socket_path());
  const json::value stats = after.call("daemon/stats");
  CHECK(stats.at("connections").at("dropped_slow").to_number<int64_t>() == 1);
  CHECK(stats.at("connections").at("oversized_lines").to_number<int64_t>() == 1);
  CHECK(stats.at("connections").at("refused_over_limit").to_number<int64_t>() == 1);
  CHECK(daemon.stop() == 0);
}

// Connections with a backlog take turns on at most half the io threads (the burst slots):
// here four pipeline 4,000 requests each in batches of 250 while one client calls one at a
// time. Every line must be answered, exactly once, nobody starving.
TEST_CASE("daemon answers every pipelined line of four floods while a one-at-a-time client is served") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DaemonProcess daemon(stories_daemon_args({}));
  constexpr int kFloods = 4, kBatches = 16, kBatch = 250;
  std::vector<std::string> errors(kFloods + 1);
  std::atomic<int> floods_done{0};
  std::vector<std::thread> floods;
  for (int f = 0; f < kFloods; ++f) {
    floods.emplace_back([&, f] {
      try {
        DaemonClient c(daemon.socket_path());
        int next_id = 0;
        for (int b = 0; b < kBatches; ++b) {
          std::string batch;
          for (int i = 0; i < kBatch; ++i, ++next_id) {
            batch += i % 5 == 0 ? std::string("not json\n")
                                : "{\"jsonrpc\":\"2.0\",\"id\":" + std::to_string(next_id) + ",\"method\":\"no/such\"}\n";
          }
          c.send_raw(batch);
          // Answers may come in another order than their requests (JSON-RPC matches them by id;
          // parse errors are answered before requests the service dispatches): match by id.
          std::vector<char> seen(kBatch, 0);
          int parse_errors = 0;
          for (int i = 0; i < kBatch; ++i) {
            const auto reply = c.read_line(std::chrono::seconds(30));
            if (!reply) throw std::runtime_error("batch " + std::to_string(b) + ": " + std::to_string(i) + " answers of " +
                                                 std::to_string(kBatch));
            const json::value parsed = json::parse(*reply);
            const json::value& id = parsed.as_object().at("id");
            if (id.is_null() && error_code_of(*reply) == runtime::rpc::parse_error) {
              ++parse_errors;
              continue;
            }
            const int k = id.to_number<int>() - b * kBatch;
            if (k < 0 || k >= kBatch || k % 5 == 0 || seen[static_cast<size_t>(k)] ||
                error_code_of(*reply) != runtime::rpc::method_not_found) {
              throw std::runtime_error("unexpected answer in batch " + std::to_string(b) + ": " + *reply);
            }
            seen[static_cast<size_t>(k)] = 1;
          }
          if (parse_errors != kBatch / 5) throw std::runtime_error(std::to_string(parse_errors) + " parse errors");
        }
      } catch (const std::exception& e) {
        errors[static_cast<size_t>(f)] = e.what();
      }
      ++floods_done;
    });
  }
  int light_calls = 0;
  try {
    DaemonClient light(daemon.socket_path());
    while (floods_done.load() < kFloods) {
      CHECK(light.call("daemon/stats").at("engine").is_object());
      ++light_calls;
    }
  } catch (const std::exception& e) {
    errors[kFloods] = e.what();
  }
  for (auto& t : floods) t.join();
  for (const std::string& e : errors) CHECK(e == "");
  MESSAGE("one-at-a-time client: " << light_calls << " calls answered during the floods");
  CHECK(light_calls > 0);
  CHECK(daemon.running());
  CHECK(daemon.stop() == 0);
}

TEST_CASE("daemon reads a connection that causes errors past limits.errors_per_second once a second, answering all") {
  using Clock = std::chrono::steady_clock;
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  TempDir config_dir;
  write_file(config_dir.file("den.yaml"), "limits:\n  errors_per_second: 200\n");
  DaemonProcess daemon(stories_daemon_args({"--config", config_dir.file("den.yaml")}));
  DaemonClient flood(daemon.socket_path()), light(daemon.socket_path());
  const auto start = Clock::now();
  constexpr int kBatches = 3, kBatch = 300;
  double slowest_light_ms = 0;
  for (int b = 0; b < kBatches; ++b) {
    std::string batch;
    for (int i = 0; i < kBatch; ++i) batch += "not json\n";
    flood.send_raw(batch);
    for (int i = 0; i < kBatch; ++i) {
      const auto reply = flood.read_line(std::chrono::seconds(10));
      REQUIRE(reply.has_value());
      CHECK(error_code_of(*reply) == runtime::rpc::parse_error);
    }
    // The flood's connection now waits out its second; another client does not.
    const auto t0 = Clock::now();
    CHECK(light.call("daemon/stats").at("engine").is_object());
    slowest_light_ms = std::max(slowest_light_ms, std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const json::value stats = light.call("daemon/stats");
  MESSAGE((kBatches * kBatch) << " malformed lines answered in " << seconds << " s; the other client's slowest call "
                            << slowest_light_ms << " ms; throttled " << stats.at("connections").at("throttled"));
  CHECK(seconds >= 1.5);  // 300 errors a batch against 200 a second: the second and third batch wait
  CHECK(stats.at("connections").at("throttled").to_number<int64_t>() >= 2);
  CHECK(stats.at("connections").at("malformed_requests").to_number<int64_t>() == kBatches * kBatch);
  CHECK(slowest_light_ms < 500);
  CHECK(daemon.stop() == 0);
}

TEST_CASE("daemon cancels a generation during its prefill and refuses a second one on a busy session") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  TempDir config_dir;
  // One-token prefill chunks make the prefill of a long prompt take many steps.
  write_file(config_dir.file("den.yaml"), "scheduler:\n  prefill_chunk: 1\n");
  DaemonProcess daemon(stories_daemon_args({"--config", config_dir.file("den.yaml")}));
  DaemonClient client(daemon.socket_path());
  DaemonClient other(daemon.socket_path());
  client.call("sessions/create", {{"name", "long"}});
  std::string prompt;
  for (int i = 0; i < 100; ++i) prompt += "Once upon a time there was a cat. ";
  std::thread canceller([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    try {
      other.call("sessions/generate", {{"session", "long"}, {"max_tokens", 1}});
    } catch (const RpcCallError& e) {
      CHECK(e.code() == runtime::rpc::session_busy);
    }
    other.call("sessions/cancel", {{"session", "long"}});
  });
  const json::value r = client.call("sessions/generate", with_session(greedy(prompt, 50), "long"));
  canceller.join();
  CHECK(r.at("finish_reason").as_string() == "cancelled");
  CHECK(r.at("tokens").at("generated").to_number<int64_t>() == 0);
  // The session is usable again.
  CHECK(client.call("sessions/generate", {{"session", "long"}, {"max_tokens", 4}, {"temperature", 0}})
            .at("finish_reason")
            .as_string() == "length");
}

TEST_CASE("daemon refuses a client of another user") {
  DEN_SKIP_UNLESS(::geteuid() == 0, "needs root, to connect as a second user");
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DaemonProcess daemon(stories_daemon_args());
  // Open the file permissions so that only SO_PEERCRED stands in the way.
  const std::string dir = std::filesystem::path(daemon.socket_path()).parent_path().string();
  ::chmod(dir.c_str(), 0755);
  ::chmod(daemon.socket_path().c_str(), 0666);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) _exit(10);
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, daemon.socket_path().c_str(), sizeof addr.sun_path - 1);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) _exit(11);
    const char request[] = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"daemon/stats\"}\n";
    // The daemon may already have closed: MSG_NOSIGNAL turns SIGPIPE into an EPIPE we ignore.
    (void)!::send(fd, request, sizeof request - 1, MSG_NOSIGNAL);
    char buf[256];
    const ssize_t n = ::read(fd, buf, sizeof buf);  // the daemon closes: EOF (or a reset), no answer
    _exit(n <= 0 ? 0 : 12);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  INFO("child status ", status, (WIFSIGNALED(status) ? " (killed by a signal)" : ""));
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  DaemonClient client(daemon.socket_path());
  CHECK(client.call("daemon/stats").at("connections").at("refused_other_uid").to_number<int64_t>() == 1);
}

// Sixteen long generations in a fast pool that holds about a third of what they need at once:
// every one waits its turn (or has its KV evicted and recomputed) and none fails.
TEST_CASE("daemon queues generations when the fast pool is short and completes every one") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  TempDir config_dir;
  // stories260K: 20 KiB per 16-token block; 2 MiB = 102 blocks, each generation needs ~13.
  write_file(config_dir.file("den.yaml"), "context: 512\nkv:\n  hbm: 2MiB\n");
  DaemonProcess daemon(stories_daemon_args({"--config", config_dir.file("den.yaml")}));
  constexpr int kClients = 16;
  std::string reference;
  {
    DaemonClient client(daemon.socket_path());
    client.call("sessions/create", {{"name", "ref"}});
    reference = generate_text(client, "ref", greedy("Once upon a time", 200));
  }
  std::vector<std::string> outputs(kClients), failures(kClients);
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      try {
        DaemonClient client(daemon.socket_path());
        const std::string name = "m" + std::to_string(i);
        client.call("sessions/create", {{"name", name}});
        outputs[static_cast<size_t>(i)] = generate_text(client, name, greedy("Once upon a time", 200));
      } catch (const std::exception& e) {
        failures[static_cast<size_t>(i)] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kClients; ++i) {
    INFO("client " << i);
    CHECK(failures[static_cast<size_t>(i)] == "");
    CHECK(outputs[static_cast<size_t>(i)] == reference);
  }
  DaemonClient client(daemon.socket_path());
  const json::value stats = client.call("daemon/stats");
  MESSAGE("engine: " << json::serialize(stats.at("engine")));
  MESSAGE("memory: " << json::serialize(stats.at("memory")));
  CHECK(stats.at("engine").at("requests_failed").to_number<int64_t>() == 0);
  CHECK(stats.at("engine").at("max_batch").to_number<int64_t>() > 1);
  // Admitted requests keep room for their output (scheduler.lease_ahead): none gives its KV
  // back mid-turn to be dropped and recomputed (with lease_ahead 0 this run recomputed 144).
  CHECK(stats.at("memory").at("tokens_recomputed").to_number<int64_t>() == 0);
}

TEST_CASE("daemon serves Prometheus metrics and reloads limits on SIGHUP") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  TempDir config_dir;
  const std::string config = config_dir.file("den.yaml");
  write_file(config, "metrics:\n  listen: \"127.0.0.1:0\"\nlimits:\n  line_bytes: 1MiB\n");
  DaemonProcess daemon(stories_daemon_args({"--config", config}));
  {
    DaemonClient client(daemon.socket_path());
    client.call("sessions/create", {{"name", "m"}});
    generate_text(client, "m", greedy("The cat", 8));
  }
  // The port the listener got is in the log.
  const std::string log = daemon.log();
  const size_t at = log.find("msg=\"metrics listening\"");
  REQUIRE(at != std::string::npos);
  const size_t port_at = log.find("port=", at);
  REQUIRE(port_at != std::string::npos);
  const int port = std::stoi(log.substr(port_at + 5));
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  const std::string get = "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n";
  REQUIRE(::write(fd, get.data(), get.size()) == static_cast<ssize_t>(get.size()));
  std::string response;
  char buf[4096];
  for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) response.append(buf, static_cast<size_t>(n));
  ::close(fd);
  CHECK(response.starts_with("HTTP/1.1 200"));
  CHECK(response.find("den_tokens_generated_total 8") != std::string::npos);
  CHECK(response.find("den_ttft_seconds_bucket{le=\"+Inf\"} 1") != std::string::npos);
  CHECK(response.find("den_kv_tokens_total{kind=\"computed\"}") != std::string::npos);

  // A 4 KiB request line is fine under the 1 MiB limit, refused after SIGHUP lowers it to 2 KiB.
  const std::string padded = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"daemon/stats\"" + std::string(4096, ' ') + "}\n";
  {
    DaemonClient client(daemon.socket_path());
    client.send_raw(padded);
    const auto reply = client.read_line(std::chrono::seconds(5));
    REQUIRE(reply.has_value());
    CHECK(reply->find("\"result\"") != std::string::npos);
  }
  write_file(config, "metrics:\n  listen: \"127.0.0.1:0\"\nlimits:\n  line_bytes: 2KiB\n");
  daemon.kill(SIGHUP);
  for (int i = 0; i < 100 && daemon.log().find("configuration reloaded") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  REQUIRE(daemon.log().find("configuration reloaded") != std::string::npos);
  DaemonClient client(daemon.socket_path());
  client.send_raw(padded);
  const auto reply = client.read_line(std::chrono::seconds(5));
  REQUIRE(reply.has_value());
  CHECK(error_code_of(*reply) == runtime::rpc::limit_exceeded);
}

// systemd's notify protocol: a datagram socket in $NOTIFY_SOCKET receives READY=1 once the
// socket accepts connections, and STOPPING=1 on the way down.
TEST_CASE("daemon tells systemd it is ready and stopping") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  TempDir dir;
  const std::string notify_path = dir.file("notify.sock");
  const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, notify_path.c_str(), sizeof addr.sun_path - 1);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  ::setenv("NOTIFY_SOCKET", notify_path.c_str(), 1);
  std::string received;
  {
    DaemonProcess daemon(stories_daemon_args());
    ::unsetenv("NOTIFY_SOCKET");
    CHECK(daemon.stop() == 0);
  }
  ::unsetenv("NOTIFY_SOCKET");
  char buf[4096];
  for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT)) > 0;) received += std::string(buf, static_cast<size_t>(n)) + "|";
  ::close(fd);
  CHECK(received.find("READY=1") != std::string::npos);
  CHECK(received.find("STOPPING=1") != std::string::npos);
}

// A signal sent the moment the socket file appears (before the daemon accepts, and before it
// has told systemd it is ready) is held until the daemon can take it: a clean shutdown with
// exit code 0, never the signal's default action.
TEST_CASE("daemon shuts down cleanly on a SIGTERM sent as soon as its socket appears") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  for (int round = 0; round < 3; ++round) {
    DaemonProcess daemon(stories_daemon_args(), false);
    const auto deadline = std::chrono::steady_clock::now() + DaemonProcess::kReadyTimeout;
    while (!std::filesystem::exists(daemon.socket_path()) && daemon.running() &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    REQUIRE(std::filesystem::exists(daemon.socket_path()));
    daemon.kill(SIGTERM);
    CHECK(daemon.wait_exit() == 0);
    CHECK(daemon.log().find("SIGTERM: shutting down") != std::string::npos);
  }
}

TEST_CASE("daemon logs each answer to a session change at debug level, and none at info") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  const std::string line = "msg=\"session request answered\"";
  DaemonProcess debug(stories_daemon_args({"--log-level", "debug"}));
  {
    DaemonClient client(debug.socket_path());
    const std::string id = client.call("sessions/create", {{"name", "a"}}).at("id").as_string().c_str();
    client.call("sessions/append", {{"session", "a"}, {"text", "The cat"}});
    CHECK_THROWS_AS(client.call("sessions/append", {{"session", "missing"}, {"text", "x"}}), RpcCallError);
    client.call("sessions/list");  // reads change nothing: no line
    const std::string log = debug.log();
    std::vector<std::string> lines;
    std::istringstream in(log);
    for (std::string l; std::getline(in, l);) {
      if (l.find(line) != std::string::npos) lines.push_back(l);
    }
    REQUIRE(lines.size() == 3);
    CHECK(lines[0].find("method=sessions/create") != std::string::npos);
    CHECK(lines[0].find("outcome=ok") != std::string::npos);
    CHECK(lines[0].find("answered_session=" + id) != std::string::npos);  // the session it made
    CHECK(lines[1].find("method=sessions/append") != std::string::npos);
    CHECK(lines[1].find("outcome=ok") != std::string::npos);
    CHECK(lines[2].find("outcome=\"error ") != std::string::npos);
    CHECK(lines[2].find("missing") != std::string::npos);
  }
  DaemonProcess info(stories_daemon_args());
  DaemonClient client(info.socket_path());
  client.call("sessions/create", {{"name", "a"}});
  CHECK(info.log().find(line) == std::string::npos);
}

TEST_CASE("daemon shuts down on daemon/shutdown with exit code 0") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DaemonProcess daemon(stories_daemon_args());
  DaemonClient client(daemon.socket_path());
  client.call("sessions/create", {{"name", "a"}});
  generate_text(client, "a", greedy("The cat", 8));
  CHECK(client.call("daemon/shutdown").at("shutting_down").as_bool());
  CHECK(daemon.wait_exit() == 0);
  CHECK_FALSE(file_exists(daemon.socket_path()));
}


// GPU faults (cuda backend only; tests/runtime runs on the GPU machine with
// DEN_TEST_DAEMON_BACKEND=cuda). A refused device allocation fails that step's requests with a
// clear error and the daemon carries on; a kernel that kills the CUDA context makes the daemon
// exit with status 70, and a restart resumes every acknowledged history and checkpointed KV.
TEST_CASE("daemon survives a refused GPU allocation and exits 70 on a lost GPU, resuming what is durable") {
  DEN_SKIP_UNLESS(test_daemon_backend() == "cuda", "the GPU faults need DEN_TEST_DAEMON_BACKEND=cuda");
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  struct ClearFault {
    ~ClearFault() { ::unsetenv("DEN_TEST_GPU_FAULT"); }
  } clear_fault;

  // A refused allocation at the 3rd step: the generation in it fails, the next one works.
  ::setenv("DEN_TEST_GPU_FAULT", "alloc@3", 1);
  {
    DaemonProcess daemon(stories_daemon_args());
    ::unsetenv("DEN_TEST_GPU_FAULT");
    DaemonClient client(daemon.socket_path());
    client.call("sessions/create", {{"name", "a"}});
    client.call("sessions/generate", with_session(greedy("Once upon a time", 1), "a"));  // step 1
    client.call("sessions/checkpoint", {{"session", "a"}});
    const int64_t generation = client.call("sessions/hibernate", {{"session", "a"}})
                                   .at("session").at("checkpoint").at("generation").to_number<int64_t>();
    try {
      client.call("sessions/generate", {{"session", "a"}, {"max_tokens", 8}, {"temperature", 0}});  // steps 2, 3: fails
      FAIL("the injected allocation failure did not fail the generation");
    } catch (const RpcCallError& e) {
      CHECK(std::string(e.what()).find("out of memory") != std::string::npos);
    }
    const json::value a = client.call("sessions/get", {{"session", "a"}});
    CHECK(a.at("checkpoint").at("generation").to_number<int64_t>() == generation);  // its checkpoint is intact
    const json::value again = client.call("sessions/generate", {{"session", "a"}, {"max_tokens", 8}, {"temperature", 0}});
    CHECK(again.at("tokens").at("generated").to_number<int64_t>() == 8);
    CHECK(daemon.running());
  }

  // A lost GPU at the 12th step: exit 70; after a restart everything acknowledged is there.
  ::setenv("DEN_TEST_GPU_FAULT", "kernel@12", 1);
  DaemonProcess daemon(stories_daemon_args());
  ::unsetenv("DEN_TEST_GPU_FAULT");
  int64_t checkpointed_tokens = 0, history_b = 0;
  {
    DaemonClient client(daemon.socket_path());
    client.call("sessions/create", {{"name", "kept"}});
    client.call("sessions/generate", with_session(greedy("Once upon a time", 6), "kept"));  // steps 1-6
    checkpointed_tokens =
        client.call("sessions/checkpoint", {{"session", "kept"}}).at("session").at("kv_tokens").to_number<int64_t>();
    client.call("sessions/create", {{"name", "b"}});
    history_b = client.call("sessions/append", {{"session", "b"}, {"text", "The little dog"}}).at("tokens").to_number<int64_t>();
    CHECK_THROWS(client.call("sessions/generate", {{"session", "b"}, {"max_tokens", 40}, {"temperature", 0}}));
  }
  CHECK(daemon.wait_exit() == 70);
  CHECK(daemon.log().find("the GPU is lost") != std::string::npos);
  daemon.restart();
  DaemonClient client(daemon.socket_path());
  const json::value b = client.call("sessions/get", {{"session", "b"}});
  CHECK(b.at("tokens").to_number<int64_t>() >= history_b);
  const json::value resumed = client.call("sessions/generate", {{"session", "kept"}, {"max_tokens", 4}, {"temperature", 0}});
  CHECK(resumed.at("tokens").at("reused").to_number<int64_t>() >= checkpointed_tokens);  // loaded, not recomputed
}


// Found by the soak: a session whose whole, block-aligned history has KV in another session's
// blocks (the prefix index) must still compute its last token to sample; it used to wait forever.
TEST_CASE("daemon generates on a history that a shared prefix covers to the last block") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "stories260K is not in ../shared/models");
  DaemonProcess daemon(stories_daemon_args());
  DaemonClient client(daemon.socket_path());
  client.call("sessions/create", {{"name", "first"}});
  client.call("sessions/generate", with_session(greedy("Once upon a time", 40), "first"));
  const json::value first = client.call("sessions/get", {{"session", "first"}, {"tokens", true}});
  json::array aligned;  // two whole 16-token blocks of the first session's history
  for (size_t i = 0; i < 32; ++i) aligned.push_back(first.at("token_ids").as_array()[i]);
  client.call("sessions/create", {{"name", "second"}});
  client.call("sessions/append", {{"session", "second"}, {"tokens", aligned}});
  auto answer = std::async(std::launch::async, [&] {
    DaemonClient second(daemon.socket_path());
    return second.call("sessions/generate", {{"session", "second"}, {"max_tokens", 4}, {"temperature", 0}});
  });
  REQUIRE_MESSAGE(answer.wait_for(std::chrono::seconds(20)) == std::future_status::ready,
                  "the generation on a fully shared history did not finish");
  const json::value r = answer.get();
  CHECK(r.at("tokens").at("generated").to_number<int64_t>() == 4);
  // Greedy from the same history: the same continuation as the first session had.
  const json::value second = client.call("sessions/get", {{"session", "second"}, {"tokens", true}});
  for (size_t i = 32; i < 36; ++i) CHECK(second.at("token_ids").as_array()[i] == first.at("token_ids").as_array()[i]);
}

}  // namespace
}  // namespace den::test
