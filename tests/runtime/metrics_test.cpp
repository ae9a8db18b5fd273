// Daemon metrics: Histogram buckets and quantiles, the exact Prometheus text exposition, and
// the loopback HTTP listener driven through a plain POSIX socket, as a scraper would.
#include "den/runtime/metrics.h"
#include "test_support.h"

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/post.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <future>
#include <limits>
#include <stdexcept>
#include <thread>

using den::runtime::Histogram;
using den::runtime::MetricSample;
using den::runtime::MetricsListener;
using den::runtime::PrometheusText;
using namespace std::chrono_literals;

namespace {

// An io_context run on its own thread, as the daemon runs it; stopped and joined on exit.
class IoThread {
 public:
  IoThread() : work_(io.get_executor()), thread_([this] { io.run(); }) {}
  ~IoThread() { stop(); }
  void stop() {
    work_.reset();
    io.stop();
    if (thread_.joinable()) thread_.join();
  }
  boost::asio::io_context io;

 private:
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
  std::thread thread_;
};

// A client socket to 127.0.0.1:port; reads give up after 10 s so a bug cannot hang the suite.
class Client {
 public:
  explicit Client(uint16_t port) : fd_(::socket(AF_INET, SOCK_STREAM, 0)) {
    REQUIRE(fd_ >= 0);
    timeval timeout{10, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  }
  ~Client() { ::close(fd_); }
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  void send(const std::string& bytes) {
    REQUIRE(::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size()));
  }
  // Everything until the server closes. `reset` tells whether it ended in an error (a reset
  // or the 10 s timeout) rather than an orderly close.
  std::string read_all(bool* reset = nullptr) {
    std::string out;
    char buf[4096];
    for (;;) {
      const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n > 0) {
        out.append(buf, n);
        continue;
      }
      if (reset) *reset = n < 0;
      return out;
    }
  }

 private:
  int fd_;
};

std::string exchange(uint16_t port, const std::string& request) {
  Client c(port);
  c.send(request);
  bool reset = false;
  std::string response = c.read_all(&reset);
  CHECK_FALSE(reset);
  return response;
}

std::string header_block(const std::string& response) { return response.substr(0, response.find("\r\n\r\n") + 4); }
std::string body_of(const std::string& response) { return response.substr(response.find("\r\n\r\n") + 4); }

}  // namespace

// ---- Histogram ----------------------------------------------------------------------------

TEST_CASE("metrics histogram counts each value in the first bucket whose bound is at least it") {
  Histogram h({1, 2, 5});
  for (double v : {0.5, 1.0, 1.5, 3.0, 10.0, -1.0}) h.observe(v);
  h.observe(std::numeric_limits<double>::quiet_NaN());  // not an observation
  const auto s = h.snapshot();
  CHECK(s.upper_bounds == std::vector<double>{1, 2, 5});
  CHECK(s.cumulative == std::vector<uint64_t>{3, 4, 5});  // -1, 0.5 and the bound itself are <= 1
  CHECK(s.count == 6);
  CHECK(s.sum == doctest::Approx(15.0));
}

TEST_CASE("metrics histogram quantiles interpolate inside the bucket") {
  Histogram h({1, 2, 4});
  CHECK(h.snapshot().quantile(0.5) == 0);  // empty
  for (int i = 0; i < 4; ++i) h.observe(0.5);
  for (int i = 0; i < 4; ++i) h.observe(1.5);
  for (int i = 0; i < 2; ++i) h.observe(3.0);
  auto s = h.snapshot();
  CHECK(s.quantile(0.0) == 0);            // lower edge of the first non-empty bucket
  CHECK(s.quantile(0.2) == 0.5);          // rank 2 of 4 in (0, 1]
  CHECK(s.quantile(0.5) == 1.25);         // rank 5: 1 of 4 in (1, 2]
  CHECK(s.quantile(0.9) == 3.0);          // rank 9: 1 of 2 in (2, 4]
  CHECK(s.quantile(1.0) == 4.0);
  CHECK(s.quantile(7.0) == 4.0);          // q is clamped
  h.observe(100);                         // beyond the last bound
  s = h.snapshot();
  CHECK(s.quantile(1.0) == 4.0);          // the +Inf bucket reports the last bound

  Histogram late({1, 2, 4});
  late.observe(3);
  CHECK(late.snapshot().quantile(0.0) == 2.0);  // empty leading buckets are skipped
  CHECK(late.snapshot().quantile(0.5) == 3.0);
}

TEST_CASE("metrics histogram takes observations from many threads") {
  Histogram h(den::runtime::latency_buckets_seconds());
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&h, t] {
      for (int i = 0; i < 20000; ++i) h.observe(t == 0 ? 0.0005 : 1.0);
    });
  for (auto& t : threads) t.join();
  const auto s = h.snapshot();
  CHECK(s.count == 80000);
  CHECK(s.cumulative.front() == 20000);
  CHECK(s.cumulative.back() == 80000);
  CHECK(s.sum == doctest::Approx(20000 * 0.0005 + 60000.0));
}

TEST_CASE("metrics latency buckets run from 1 ms to 60 s in increasing steps") {
  const auto b = den::runtime::latency_buckets_seconds();
  REQUIRE(b.size() >= 10);
  CHECK(b.front() == 0.001);
  CHECK(b.back() == 60);
  for (size_t i = 1; i < b.size(); ++i) CHECK(b[i] > b[i - 1]);
  for (size_t i = 1; i < b.size(); ++i) CHECK(b[i] / b[i - 1] <= 2.5);  // roughly 1-2-5
}

TEST_CASE("metrics histogram refuses bounds that are empty, unsorted or not finite") {
  CHECK_THROWS_AS(Histogram({}), std::invalid_argument);
  CHECK_THROWS_AS(Histogram({1, 1}), std::invalid_argument);
  CHECK_THROWS_AS(Histogram({2, 1}), std::invalid_argument);
  CHECK_THROWS_AS(Histogram({1, std::numeric_limits<double>::infinity()}), std::invalid_argument);
}

// ---- Prometheus text ----------------------------------------------------------------------

TEST_CASE("metrics text declares each family once and keeps its samples together") {
  PrometheusText text;
  text.add({"den_requests_total", "Requests answered.", "counter", {{"method", "generate"}}, 3});
  text.add({"den_queue_depth", "Waiting requests.", "gauge", {}, 2});
  text.add({"den_requests_total", "Requests answered.", "counter", {{"method", "chat"}}, 5});
  text.add({"den_untyped", "No type given.", "", {}, 1});
  CHECK(text.str() ==
        "# HELP den_requests_total Requests answered.\n"
        "# TYPE den_requests_total counter\n"
        "den_requests_total{method=\"generate\"} 3\n"
        "den_requests_total{method=\"chat\"} 5\n"
        "# HELP den_queue_depth Waiting requests.\n"
        "# TYPE den_queue_depth gauge\n"
        "den_queue_depth 2\n"
        "# HELP den_untyped No type given.\n"
        "# TYPE den_untyped untyped\n"
        "den_untyped 1\n");
}

TEST_CASE("metrics text escapes label values and help text") {
  PrometheusText text;
  text.add({"den_info", "Line one\nback\\slash \"quoted\"", "gauge",
            {{"path", "C:\\dir"}, {"quote", "say \"hi\""}, {"nl", "a\nb"}}, 1});
  CHECK(text.str() ==
        "# HELP den_info Line one\\nback\\\\slash \"quoted\"\n"
        "# TYPE den_info gauge\n"
        "den_info{path=\"C:\\\\dir\",quote=\"say \\\"hi\\\"\",nl=\"a\\nb\"} 1\n");
}

TEST_CASE("metrics text prints integers plainly and other numbers in round-trip form") {
  const auto rendered = [](double v) {
    PrometheusText text;
    text.add({"x", "h", "gauge", {}, v});
    const std::string s = text.str();
    return s.substr(s.rfind("x ") + 2, s.size() - s.rfind("x ") - 3);
  };
  CHECK(rendered(0) == "0");
  CHECK(rendered(-0.0) == "0");
  CHECK(rendered(42) == "42");
  CHECK(rendered(-7) == "-7");
  CHECK(rendered(1234567890123.0) == "1234567890123");
  CHECK(rendered(1e20) == "1e+20");  // beyond int64: the shortest form
  CHECK(rendered(0.25) == "0.25");
  CHECK(rendered(0.1) == "0.1");
  CHECK(rendered(1.0 / 3.0) == "0.3333333333333333");
  CHECK(std::stod(rendered(2.0 / 3.0)) == 2.0 / 3.0);
  CHECK(rendered(1e-7) == "1e-07");
  CHECK(rendered(std::numeric_limits<double>::quiet_NaN()) == "NaN");
  CHECK(rendered(std::numeric_limits<double>::infinity()) == "+Inf");
  CHECK(rendered(-std::numeric_limits<double>::infinity()) == "-Inf");
}

TEST_CASE("metrics text renders a histogram as buckets, sum and count") {
  Histogram h({0.001, 0.5, 2});
  for (double v : {0.0005, 0.25, 0.25, 1.0, 9.0}) h.observe(v);
  PrometheusText text;
  text.add_histogram("den_ttft_seconds", "Time to first token.", h.snapshot());
  text.add({"den_up", "Up.", "gauge", {}, 1});
  CHECK(text.str() ==
        "# HELP den_ttft_seconds Time to first token.\n"
        "# TYPE den_ttft_seconds histogram\n"
        "den_ttft_seconds_bucket{le=\"0.001\"} 1\n"
        "den_ttft_seconds_bucket{le=\"0.5\"} 3\n"
        "den_ttft_seconds_bucket{le=\"2\"} 4\n"
        "den_ttft_seconds_bucket{le=\"+Inf\"} 5\n"
        "den_ttft_seconds_sum 10.5005\n"
        "den_ttft_seconds_count 5\n"
        "# HELP den_up Up.\n"
        "# TYPE den_up gauge\n"
        "den_up 1\n");
}

// ---- HTTP listener ------------------------------------------------------------------------

TEST_CASE("metrics listener answers GET and HEAD /metrics with the rendered text") {
  IoThread io;
  const std::string body = "# HELP den_up Up.\n# TYPE den_up gauge\nden_up 1\n";
  MetricsListener listener(io.io, "127.0.0.1:0", [&] { return body; });
  REQUIRE(listener.port() != 0);

  const std::string get = exchange(listener.port(), "GET /metrics?ignored=1 HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(header_block(get) ==
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        "Content-Length: " + std::to_string(body.size()) + "\r\n"
        "Connection: close\r\n\r\n");
  CHECK(body_of(get) == body);

  const std::string head = exchange(listener.port(), "HEAD /metrics HTTP/1.0\r\n\r\n");
  CHECK(head == header_block(get));  // same headers, no body

  // Bare LF line ends are tolerated.
  CHECK(body_of(exchange(listener.port(), "GET /metrics HTTP/1.1\n\n")) == body);
}

TEST_CASE("metrics listener answers 404 for other paths, 405 for other methods, 400 for nonsense") {
  IoThread io;
  MetricsListener listener(io.io, "localhost:0", [] { return std::string("x 1\n"); });
  CHECK(exchange(listener.port(), "GET /other HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 Not Found\r\n"));
  CHECK(exchange(listener.port(), "GET /metricsx HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
  const std::string post =
      exchange(listener.port(), "POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
  CHECK(post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
  CHECK(post.find("Allow: GET, HEAD\r\n") != std::string::npos);
  CHECK(exchange(listener.port(), "garbage\r\n\r\n").starts_with("HTTP/1.1 400 "));
}

TEST_CASE("metrics listener reports a render failure as 500 and keeps serving") {
  IoThread io;
  std::atomic<bool> fail{true};
  MetricsListener listener(io.io, "127.0.0.1:0", [&]() -> std::string {
    if (fail.load()) throw std::runtime_error("store unavailable");
    return "ok 1\n";
  });
  const std::string failed = exchange(listener.port(), "GET /metrics HTTP/1.1\r\n\r\n");
  CHECK(failed.starts_with("HTTP/1.1 500 "));
  CHECK(failed.find("store unavailable") != std::string::npos);
  fail = false;
  CHECK(body_of(exchange(listener.port(), "GET /metrics HTTP/1.1\r\n\r\n")) == "ok 1\n");
}

TEST_CASE("metrics listener serves a client while others are idle or sending slowly") {
  IoThread io;
  MetricsListener listener(io.io, "127.0.0.1:0", [] { return std::string("x 1\n"); });
  Client idle(listener.port());
  Client slow(listener.port());
  slow.send("GET /metr");
  std::vector<std::unique_ptr<Client>> many;
  for (int i = 0; i < 32; ++i) many.push_back(std::make_unique<Client>(listener.port()));

  const auto started = std::chrono::steady_clock::now();
  CHECK(body_of(exchange(listener.port(), "GET /metrics HTTP/1.1\r\n\r\n")) == "x 1\n");
  CHECK(std::chrono::steady_clock::now() - started < 2s);

  slow.send("ics HTTP/1.1\r\n\r\n");
  CHECK(body_of(slow.read_all()) == "x 1\n");
  for (auto& c : many) c->send("GET /metrics HTTP/1.1\r\n\r\n");
  for (auto& c : many) CHECK(body_of(c->read_all()) == "x 1\n");
}

TEST_CASE("metrics listener disconnects a client that sends no request in time") {
  IoThread io;
  MetricsListener listener(io.io, "127.0.0.1:0", [] { return std::string("x 1\n"); }, 300ms);
  Client silent(listener.port());
  const auto started = std::chrono::steady_clock::now();
  bool reset = false;
  CHECK(silent.read_all(&reset).empty());
  CHECK_FALSE(reset);  // an orderly close, not the client's own 10 s timeout
  const auto waited = std::chrono::steady_clock::now() - started;
  CHECK(waited >= 250ms);
  CHECK(waited < 5s);
  CHECK(MetricsListener::kRequestTimeout == 5s);  // what the daemon uses
}

TEST_CASE("metrics listener disconnects a request head over 8 KiB") {
  IoThread io;
  MetricsListener listener(io.io, "127.0.0.1:0", [] { return std::string("x 1\n"); });
  Client c(listener.port());
  c.send("GET /metrics HTTP/1.1\r\nX-Filler: " + std::string(MetricsListener::kMaxRequestHeadBytes, 'a'));
  CHECK(c.read_all().empty());  // closed (perhaps reset) without an answer
}

TEST_CASE("metrics listener accepts loopback addresses only") {
  boost::asio::io_context io;
  const auto render = [] { return std::string(); };
  for (const char* address : {"0.0.0.0:9464", "192.168.1.10:9464", "10.0.0.1:0", "example.com:9464", "[::]:9464",
                              "[2001:db8::1]:9464", "[::ffff:127.0.0.1]:0"}) {
    CAPTURE(address);
    try {
      MetricsListener listener(io, address, render);
      FAIL("accepted a non-loopback address");
    } catch (const std::invalid_argument& e) {
      CHECK(std::string(e.what()).find("loopback only") != std::string::npos);
    }
  }
  for (const char* address : {"127.0.0.1", "127.0.0.1:", ":9464", "127.0.0.1:99999", "127.0.0.1:-1",
                              "127.0.0.1:94a4", "[::1", "[::1]9464", "::1:9464", "[not-v6]:9464"}) {
    CAPTURE(address);
    CHECK_THROWS_AS(MetricsListener(io, address, render), std::invalid_argument);
  }
  MetricsListener any_127(io, "127.0.0.2:0", render);  // all of 127.0.0.0/8 is loopback
  CHECK(any_127.port() != 0);
}

TEST_CASE("metrics listener binds IPv6 loopback and reports a taken port") {
  boost::asio::io_context io;
  const auto render = [] { return std::string(); };
  try {
    MetricsListener v6(io, "[::1]:0", render);
    CHECK(v6.port() != 0);
  } catch (const std::runtime_error& e) {
    MESSAGE("IPv6 loopback unavailable here: " << e.what());
  }
  MetricsListener first(io, "127.0.0.1:0", render);
  const std::string taken = "127.0.0.1:" + std::to_string(first.port());
  try {
    MetricsListener second(io, taken, render);
    FAIL("bound a port that is in use");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()).find(taken) != std::string::npos);
    CHECK(std::string(e.what()).find("in use") != std::string::npos);  // the OS message
  }
}

TEST_CASE("metrics listener destroyed while clients are connected closes them and the port") {
  IoThread io;
  auto listener = std::make_unique<MetricsListener>(io.io, "127.0.0.1:0", [] { return std::string("x 1\n"); });
  const uint16_t port = listener->port();
  Client idle(port);
  Client partial(port);
  partial.send("GET /metrics HTTP/1.1\r\n");
  std::this_thread::sleep_for(50ms);  // let the io thread accept both
  listener.reset();
  CHECK(idle.read_all().empty());
  CHECK(partial.read_all().empty());
  // The port is free again at once: the close happened before the destructor returned.
  MetricsListener again(io.io, "127.0.0.1:" + std::to_string(port), [] { return std::string("y 2\n"); });
  CHECK(body_of(exchange(port, "GET /metrics HTTP/1.1\r\n\r\n")) == "y 2\n");
}

TEST_CASE("metrics listener destructor waits for a render in progress and never renders after") {
  IoThread io;
  std::atomic<bool> rendering{false};
  std::atomic<int> renders{0};
  auto listener = std::make_unique<MetricsListener>(io.io, "127.0.0.1:0", [&] {
    rendering = true;
    ++renders;
    std::this_thread::sleep_for(300ms);
    rendering = false;
    return std::string("x 1\n");
  });
  Client c(listener->port());
  c.send("GET /metrics HTTP/1.1\r\n\r\n");
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (!rendering.load() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(1ms);
  REQUIRE(rendering.load());
  listener.reset();
  CHECK_FALSE(rendering.load());
  CHECK(renders.load() == 1);
  // The render finished before the close, so its answer may have gone out whole; never a part.
  const std::string response = c.read_all();
  CHECK((response.empty() || body_of(response) == "x 1\n"));
}

TEST_CASE("metrics listener can be destroyed on the io thread or after the io_context stopped") {
  IoThread io;
  auto on_io = std::make_unique<MetricsListener>(io.io, "127.0.0.1:0", [] { return std::string(); });
  Client c(on_io->port());
  std::promise<void> destroyed;
  boost::asio::post(io.io, [&] {
    on_io.reset();
    destroyed.set_value();
  });
  REQUIRE(destroyed.get_future().wait_for(5s) == std::future_status::ready);
  CHECK(c.read_all().empty());

  auto after_stop = std::make_unique<MetricsListener>(io.io, "127.0.0.1:0", [] { return std::string(); });
  Client waiting(after_stop->port());
  io.stop();
  after_stop.reset();  // must not wait for an io_context that will never run again
  CHECK(waiting.read_all().empty());
}
