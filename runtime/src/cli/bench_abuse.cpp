// `den bench abuse`: what bad clients cost a good one. Against a running daemon, a
// well-behaved client times `sessions/get` round trips alone (the floor, before and after), and while
// abusers run: connections that pour malformed lines (not JSON, not requests, unknown
// methods, bad params) and read the errors back, connections that send frames over
// limits.line_bytes, slow clients that dribble a line a byte at a time, and idle connections
// that do nothing. Prints both latency distributions, their p99 ratio, the abusers' rates and
// what daemon/stats counted.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "commands.h"
#include "den/runtime/client.h"
#include "den/runtime/paths.h"

namespace den::runtime::cli {
namespace {

namespace json = boost::json;
using Clock = std::chrono::steady_clock;

struct AbuseOptions {
  std::string socket;
  // Good-client round trips per quiet phase (and at least as many under abuse). The p99 of
  // 3,000 rests on its 30 slowest and moved by a third between runs of the same build; and the
  // quiet phases should last about as long as the flood (25 s at the default error limit), so
  // that both sides sample the host's own stalls alike: 300,000 is about 10 s each.
  int64_t requests = 300000;
  int64_t malformed = 1000000;    // malformed lines in all
  int malformed_connections = 4;
  int oversized = 20;             // frames over the line limit
  int slow = 50;                  // slowloris connections
  int idle = 150;                 // idle connections
};

// A connected, blocking Unix socket; -1 when the connect fails.
int connect_to(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return fd;
  if (fd >= 0) ::close(fd);
  return -1;
}

struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(Fd&& o) noexcept : fd(std::exchange(o.fd, -1)) {}
  Fd(const Fd&) = delete;
};

struct Latencies {
  std::vector<double> ms;
  double at(double q) const {
    if (ms.empty()) return 0;
    std::vector<double> sorted = ms;
    std::sort(sorted.begin(), sorted.end());
    return sorted[std::min(sorted.size() - 1, static_cast<size_t>(q * static_cast<double>(sorted.size())))];
  }
};

Latencies time_good_client(DaemonClient& client, int64_t n, const std::atomic<bool>* keep_going = nullptr) {
  Latencies l;
  for (int64_t i = 0; i < n || (keep_going && keep_going->load()); ++i) {
    const auto t0 = Clock::now();
    client.call("sessions/get", {{"session", "bench-abuse"}});
    l.ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    if (keep_going && !keep_going->load() && i >= n) break;
  }
  return l;
}

// Writes `lines` (a buffer of whole lines, repeated) until `total` lines went out, reading and
// discarding the answers as they come so that the daemon never sees a client that does not read.
int64_t pour_malformed(const std::string& path, const std::string& lines, int64_t lines_per_buffer, int64_t total,
                       std::atomic<int64_t>& answered) {
  Fd c(connect_to(path));
  if (c.fd < 0) return 0;
  int64_t sent = 0;
  size_t offset = 0;
  char sink[1 << 16];
  while (sent < total) {
    pollfd p{c.fd, POLLIN | POLLOUT, 0};
    if (::poll(&p, 1, 1000) <= 0) continue;
    if (p.revents & (POLLERR | POLLHUP)) break;
    if (p.revents & POLLIN) {
      const ssize_t n = ::recv(c.fd, sink, sizeof sink, MSG_DONTWAIT);
      if (n == 0) break;
      if (n > 0) answered += std::count(sink, sink + n, '\n');
    }
    if (p.revents & POLLOUT) {
      const ssize_t n = ::send(c.fd, lines.data() + offset, lines.size() - offset, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n < 0 && errno != EAGAIN) break;
      if (n > 0) {
        offset += static_cast<size_t>(n);
        if (offset == lines.size()) {
          offset = 0;
          sent += lines_per_buffer;
        }
      }
    }
  }
  // The last answers.
  for (auto deadline = Clock::now() + std::chrono::seconds(2); Clock::now() < deadline;) {
    pollfd p{c.fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    const ssize_t n = ::recv(c.fd, sink, sizeof sink, MSG_DONTWAIT);
    if (n <= 0) break;
    answered += std::count(sink, sink + n, '\n');
  }
  return sent;
}

// One block of malformed lines of every kind the parser refuses (and some the service does).
std::string malformed_block(int64_t& lines) {
  const std::vector<std::string> kinds = {
      "this is not json",
      "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":",
      "[1,2,3]",
      "{\"jsonrpc\":\"1.0\",\"id\":2,\"method\":\"daemon/stats\"}",
      "{\"jsonrpc\":\"2.0\",\"id\":3}",
      "{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"no/such/method\"}",
      "{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"sessions/get\",\"params\":[1]}",
      "{\"jsonrpc\":\"2.0\",\"id\":6,\"method\":\"sessions/get\",\"params\":{\"session\":42}}",
      std::string(70, '[') + std::string(70, ']'),
      "\xff\xfe\x00garbage",
  };
  std::string block;
  lines = 0;
  for (int r = 0; r < 100; ++r) {
    for (const auto& k : kinds) {
      block += k;
      block += '\n';
      ++lines;
    }
  }
  return block;
}

void run_abuse(const AbuseOptions& o) {
  const std::string path = socket_path(o.socket);
  DaemonClient good(path);
  try {
    good.call("sessions/create", {{"name", "bench-abuse"}});
  } catch (const RpcCallError&) {
    // Left by an earlier run: reuse it.
  }
  const json::value before = good.call("daemon/stats");
  std::printf("bench abuse: daemon at %s; good client: %lld sessions/get round trips per phase\n", path.c_str(),
              static_cast<long long>(o.requests));
  time_good_client(good, o.requests / 10);  // warm up
  const Latencies alone = time_good_client(good, o.requests);
  std::printf("  alone:        p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  max %.3f ms\n", alone.at(0.5), alone.at(0.9),
              alone.at(0.99), alone.at(1.0 - 1e-9));

  std::vector<Fd> idle, slow;
  for (int i = 0; i < o.idle; ++i) idle.emplace_back(connect_to(path));
  for (int i = 0; i < o.slow; ++i) slow.emplace_back(connect_to(path));
  std::atomic<bool> abusing{true};
  std::atomic<int64_t> answered{0}, malformed_sent{0}, oversized_sent{0};
  std::vector<std::thread> abusers;
  int64_t lines_per_block = 0;
  const std::string block = malformed_block(lines_per_block);
  const auto t_abuse = Clock::now();
  for (int i = 0; i < o.malformed_connections; ++i) {
    abusers.emplace_back([&, share = o.malformed / std::max(1, o.malformed_connections)] {
      malformed_sent += pour_malformed(path, block, lines_per_block, share, answered);
    });
  }
  abusers.emplace_back([&] {
    const std::string frame(5 << 20, 'x');  // over the 4 MiB default limits.line_bytes
    for (int i = 0; i < o.oversized && abusing; ++i) {
      Fd c(connect_to(path));
      if (c.fd < 0) continue;
      size_t off = 0;
      while (off < frame.size()) {
        const ssize_t n = ::send(c.fd, frame.data() + off, frame.size() - off, MSG_NOSIGNAL);
        if (n <= 0) break;
        off += static_cast<size_t>(n);
      }
      (void)!::send(c.fd, "\n", 1, MSG_NOSIGNAL);
      ++oversized_sent;
    }
  });
  abusers.emplace_back([&] {
    const std::string line = "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"daemon/stats\"}";
    for (size_t i = 0; abusing; i = (i + 1) % line.size()) {
      for (auto& s : slow)
        if (s.fd >= 0) (void)!::send(s.fd, &line[i], 1, MSG_NOSIGNAL | MSG_DONTWAIT);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  });

  // The good client runs through the whole malformed flood, and at least its round trips.
  std::atomic<bool> flood{true};
  std::thread flood_watch([&] {
    for (int i = 0; i < o.malformed_connections; ++i) abusers[static_cast<size_t>(i)].join();
    flood = false;
  });
  const Latencies loaded = time_good_client(good, o.requests, &flood);
  flood_watch.join();
  const double abuse_s = std::chrono::duration<double>(Clock::now() - t_abuse).count();
  abusing = false;
  for (size_t i = static_cast<size_t>(o.malformed_connections); i < abusers.size(); ++i) abusers[i].join();

  std::printf("  under abuse:  p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  max %.3f ms  (%zu round trips)\n", loaded.at(0.5),
              loaded.at(0.9), loaded.at(0.99), loaded.at(1.0 - 1e-9), loaded.ms.size());
  std::printf("  abusers: %lld malformed lines in %.1f s (%.0f/s, %lld answered), %lld frames of 5 MiB, %d slow and "
              "%d idle connections\n",
              static_cast<long long>(malformed_sent.load()), abuse_s, static_cast<double>(malformed_sent.load()) / abuse_s,
              static_cast<long long>(answered.load()), static_cast<long long>(oversized_sent.load()), o.slow, o.idle);
  const json::value after = good.call("daemon/stats");
  const auto delta = [&](const char* key) {
    return after.at("connections").at(key).to_number<int64_t>() - before.at("connections").at(key).to_number<int64_t>();
  };
  std::printf("  daemon counted: %lld malformed requests, %lld oversized lines, %lld dropped slow, %lld refused over the "
              "limit, %lld throttled reads\n",
              static_cast<long long>(delta("malformed_requests")), static_cast<long long>(delta("oversized_lines")),
              static_cast<long long>(delta("dropped_slow")), static_cast<long long>(delta("refused_over_limit")),
              static_cast<long long>(delta("throttled")));
  // The floor again after the flood: a machine's latency drifts by as much as the effect
  // measured, so the baseline is both quiet phases together, one before and one after.
  idle.clear();
  slow.clear();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the daemon closes them
  const Latencies alone_after = time_good_client(good, o.requests);
  std::printf("  alone again:  p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  max %.3f ms\n", alone_after.at(0.5),
              alone_after.at(0.9), alone_after.at(0.99), alone_after.at(1.0 - 1e-9));
  Latencies quiet = alone;
  quiet.ms.insert(quiet.ms.end(), alone_after.ms.begin(), alone_after.ms.end());
  const double ratio = quiet.at(0.99) > 0 ? loaded.at(0.99) / quiet.at(0.99) : 0;
  std::printf("  p99 alone (both quiet phases): %.3f ms\n", quiet.at(0.99));
  std::printf("  p99 under abuse / alone: %.2fx (the bar: at most 1.10x)\n", ratio);
  good.call("sessions/delete", {{"session", "bench-abuse"}});
}

}  // namespace

void add_bench_abuse_command(CLI::App& bench) {
  auto o = std::make_shared<AbuseOptions>();
  CLI::App* cmd = bench.add_subcommand("abuse", "A good client's latency while bad clients flood a running daemon");
  cmd->add_option("--socket", o->socket, "The daemon's socket (default: as den serve finds it)");
  cmd->add_option("--requests", o->requests, "Good-client round trips per phase")->check(CLI::Range(10, 10000000))
      ->capture_default_str();
  cmd->add_option("--malformed", o->malformed, "Malformed lines in all")->check(CLI::Range(0, 1000000000))
      ->capture_default_str();
  cmd->add_option("--malformed-connections", o->malformed_connections, "Connections pouring them")
      ->check(CLI::Range(1, 64))->capture_default_str();
  cmd->add_option("--oversized", o->oversized, "Frames of 5 MiB (over limits.line_bytes)")->capture_default_str();
  cmd->add_option("--slow", o->slow, "Connections sending one byte every 100 ms")->capture_default_str();
  cmd->add_option("--idle", o->idle, "Connections that send nothing")->capture_default_str();
  cmd->callback([o] { run_abuse(*o); });
}

}  // namespace den::runtime::cli
