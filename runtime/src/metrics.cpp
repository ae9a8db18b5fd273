// Daemon metrics: the Histogram, the Prometheus text exposition (format 0.0.4) and the
// loopback HTTP listener that serves it. Used by the daemon for `metrics.listen` and `den stats`.
// The listener's contract: one request per connection, answered and closed; nothing it does
// blocks the io_context, and its destructor is safe from any thread.
#include "den/runtime/metrics.h"

#include <boost/asio.hpp>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <unordered_set>

namespace den::runtime {

namespace asio = boost::asio;
using boost::asio::ip::tcp;
using boost::system::error_code;

// ---- Histogram ----------------------------------------------------------------------------

Histogram::Histogram(std::vector<double> upper_bounds) : upper_bounds_(std::move(upper_bounds)) {
  if (upper_bounds_.empty()) throw std::invalid_argument("histogram needs at least one upper bound");
  for (size_t i = 0; i < upper_bounds_.size(); ++i) {
    if (!std::isfinite(upper_bounds_[i]) || (i > 0 && upper_bounds_[i] <= upper_bounds_[i - 1]))
      throw std::invalid_argument("histogram upper bounds must be finite and strictly increasing");
  }
  counts_.assign(upper_bounds_.size() + 1, 0);
}

void Histogram::observe(double value) {
  // A NaN would poison the sum forever and belongs to no bucket: it is not an observation.
  if (std::isnan(value)) return;
  // The first bound >= value: Prometheus buckets are "less than or equal".
  const size_t bucket = std::lower_bound(upper_bounds_.begin(), upper_bounds_.end(), value) - upper_bounds_.begin();
  const std::lock_guard<std::mutex> lock(mutex_);
  ++counts_[bucket];
  ++count_;
  sum_ += value;
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot s;
  s.upper_bounds = upper_bounds_;
  s.cumulative.resize(upper_bounds_.size());
  const std::lock_guard<std::mutex> lock(mutex_);
  uint64_t running = 0;
  for (size_t i = 0; i < upper_bounds_.size(); ++i) s.cumulative[i] = running += counts_[i];
  s.count = count_;
  s.sum = sum_;
  return s;
}

// Prometheus' histogram_quantile: find the bucket holding rank q * count and interpolate
// linearly between its edges; the first bucket starts at 0, and a rank that falls in the +Inf
// bucket reports the last finite bound (nothing better is known about those observations).
double Histogram::Snapshot::quantile(double q) const {
  if (count == 0) return 0;
  const size_t n = std::min(upper_bounds.size(), cumulative.size());
  if (n == 0) return std::numeric_limits<double>::quiet_NaN();
  const double rank = std::clamp(q, 0.0, 1.0) * static_cast<double>(count);
  for (size_t i = 0; i < n; ++i) {
    // Skipping empty leading buckets keeps q = 0 from dividing by an empty bucket.
    if (cumulative[i] == 0 || static_cast<double>(cumulative[i]) < rank) continue;
    const double upper = upper_bounds[i];
    if (i == 0 && upper <= 0) return upper;
    const double lower = i == 0 ? 0.0 : upper_bounds[i - 1];
    const uint64_t below = i == 0 ? 0 : cumulative[i - 1];
    const double in_bucket = static_cast<double>(cumulative[i] - below);
    return lower + (upper - lower) * (rank - static_cast<double>(below)) / in_bucket;
  }
  return upper_bounds[n - 1];
}

std::vector<double> latency_buckets_seconds() {
  return {0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60};
}

// ---- Prometheus text format ---------------------------------------------------------------

namespace {

// Integers print without exponent or decimals; other values in their shortest round-trip
// form (never more than 17 significant digits); NaN and infinities as Prometheus spells them.
std::string format_number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  std::array<char, 64> buf{};
  std::to_chars_result r;
  if (v == std::trunc(v) && std::fabs(v) < 9.2e18)  // fits int64_t
    r = std::to_chars(buf.data(), buf.data() + buf.size(), static_cast<int64_t>(v));
  else
    r = std::to_chars(buf.data(), buf.data() + buf.size(), v);
  return std::string(buf.data(), r.ptr);
}

// Label values escape backslash, double quote and newline; HELP text only the first and last.
std::string escape(std::string_view text, bool quote) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else if (c == '"' && quote) out += "\\\"";
    else out += c;
  }
  return out;
}

std::string format_labels(const std::vector<std::pair<std::string, std::string>>& labels) {
  if (labels.empty()) return {};
  std::string out = "{";
  for (const auto& [name, value] : labels) {
    if (out.size() > 1) out += ',';
    out += name + "=\"" + escape(value, true) + "\"";
  }
  return out + "}";
}

// Appends `lines` to the family `name`, declaring it (HELP, TYPE) the first time. The format
// wants a family's lines together, so lines of a family declared earlier are inserted before
// the next family's HELP line (help text is escaped, so every "\n# HELP " starts a family).
void append_to_family(std::string& out, std::vector<std::string>& declared, std::string_view name,
                      std::string_view help, std::string_view type, const std::string& lines) {
  if (std::find(declared.begin(), declared.end(), name) == declared.end()) {
    declared.emplace_back(name);
    out += "# HELP " + std::string(name) + " " + escape(help, false) + "\n";
    out += "# TYPE " + std::string(name) + " " + std::string(type) + "\n";
    out += lines;
    return;
  }
  const std::string help_line = "# HELP " + std::string(name) + " ";
  const size_t family = out.starts_with(help_line) ? 0 : out.find("\n" + help_line) + 1;
  const size_t next_family = out.find("\n# HELP ", family);
  out.insert(next_family == std::string::npos ? out.size() : next_family + 1, lines);
}

}  // namespace

void PrometheusText::add(const MetricSample& sample) {
  const std::string line = sample.name + format_labels(sample.labels) + " " + format_number(sample.value) + "\n";
  append_to_family(out_, declared_, sample.name, sample.help, sample.type.empty() ? "untyped" : sample.type, line);
}

void PrometheusText::add_histogram(std::string_view name, std::string_view help, const Histogram::Snapshot& h) {
  const std::string base(name);
  std::string lines;
  const size_t n = std::min(h.upper_bounds.size(), h.cumulative.size());
  for (size_t i = 0; i < n; ++i)
    lines += base + "_bucket{le=\"" + format_number(h.upper_bounds[i]) + "\"} " +
             format_number(static_cast<double>(h.cumulative[i])) + "\n";
  lines += base + "_bucket{le=\"+Inf\"} " + format_number(static_cast<double>(h.count)) + "\n";
  lines += base + "_sum " + format_number(h.sum) + "\n";
  lines += base + "_count " + format_number(static_cast<double>(h.count)) + "\n";
  append_to_family(out_, declared_, name, help, "histogram", lines);
}

// ---- HTTP listener ------------------------------------------------------------------------

namespace {

// "127.0.0.1:9464", "[::1]:9464" or "localhost:9464" -> endpoint; anything that is not a
// loopback address is refused, since the metrics carry no authentication.
tcp::endpoint parse_loopback_endpoint(std::string_view address) {
  const std::string text(address);
  const auto malformed = [&](const std::string& why) {
    return std::invalid_argument("metrics.listen '" + text + "': " + why +
                                 "; expected 127.0.0.1:PORT, [::1]:PORT or localhost:PORT");
  };
  std::string_view host, port_text;
  if (address.starts_with('[')) {
    const size_t close = address.find(']');
    if (close == std::string_view::npos || address.substr(close + 1, 1) != ":")
      throw malformed("an IPv6 address in brackets must be followed by :PORT");
    host = address.substr(1, close - 1);
    port_text = address.substr(close + 2);
  } else {
    const size_t colon = address.rfind(':');
    if (colon == std::string_view::npos) throw malformed("missing :PORT");
    host = address.substr(0, colon);
    port_text = address.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) throw malformed("an IPv6 address needs brackets");
  }
  if (host.empty()) throw malformed("missing host");
  unsigned port = 0;
  const auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (port_text.empty() || ec != std::errc() || end != port_text.data() + port_text.size() || port > 65535)
    throw malformed("the port must be a number from 0 to 65535");

  error_code parse_error;
  asio::ip::address ip;
  if (address.starts_with('[')) {
    ip = asio::ip::make_address_v6(std::string(host).c_str(), parse_error);
    if (parse_error) throw malformed("'" + std::string(host) + "' is not an IPv6 address");
  } else if (host == "localhost") {
    ip = asio::ip::address_v4::loopback();
  } else {
    ip = asio::ip::make_address_v4(std::string(host).c_str(), parse_error);
  }
  if (parse_error || !ip.is_loopback())
    throw std::invalid_argument("metrics.listen '" + text +
                                "': metrics are served on loopback only; use 127.0.0.1:PORT, [::1]:PORT or "
                                "localhost:PORT (and a reverse proxy or SSH tunnel to reach them from elsewhere)");
  return {ip, static_cast<uint16_t>(port)};
}

// Where the request head ends (just past its blank line), or npos. Bare LF is accepted too.
size_t find_head_end(std::string_view data) {
  for (size_t i = data.find('\n'); i != std::string_view::npos; i = data.find('\n', i + 1)) {
    if (data.substr(i + 1, 1) == "\n") return i + 2;
    if (data.substr(i + 1, 2) == "\r\n") return i + 3;
  }
  return std::string_view::npos;
}

std::string http_response(std::string_view status, std::string_view content_type, const std::string& body,
                          bool head_only, std::string_view extra_headers = {}) {
  std::string out = "HTTP/1.1 " + std::string(status) + "\r\n";
  out += "Content-Type: " + std::string(content_type) + "\r\n";
  out += "Content-Length: " + std::to_string(body.size()) + "\r\n";
  out += "Connection: close\r\n";
  out += extra_headers;
  out += "\r\n";
  if (!head_only) out += body;
  return out;
}

// The whole response to one request head.
std::string answer(std::string_view head, const std::function<std::string()>& render) {
  constexpr std::string_view kPlain = "text/plain; charset=utf-8";
  const std::string_view request_line = head.substr(0, head.find_first_of("\r\n"));
  const size_t sp1 = request_line.find(' ');
  const size_t sp2 = sp1 == std::string_view::npos ? sp1 : request_line.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos || request_line.find(' ', sp2 + 1) != std::string_view::npos ||
      !request_line.substr(sp2 + 1).starts_with("HTTP/"))
    return http_response("400 Bad Request", kPlain, "bad request\n", false);
  const std::string_view method = request_line.substr(0, sp1);
  const std::string_view target = request_line.substr(sp1 + 1, sp2 - sp1 - 1);
  const bool head_only = method == "HEAD";
  if (target.substr(0, target.find('?')) != "/metrics")
    return http_response("404 Not Found", kPlain, "not found; metrics are at /metrics\n", head_only);
  if (method != "GET" && !head_only)
    return http_response("405 Method Not Allowed", kPlain, "method not allowed\n", false, "Allow: GET, HEAD\r\n");
  try {
    return http_response("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(), head_only);
  } catch (const std::exception& e) {
    return http_response("500 Internal Server Error", kPlain, std::string("cannot render metrics: ") + e.what() + "\n",
                         head_only);
  }
}

}  // namespace

// Shared with every pending handler, so it outlives the MetricsListener until they drain.
// One mutex serialises all use of the acceptor, the sockets and render(): handlers may run on
// any io thread and the destructor on yet another, and a plain lock lets the destructor close
// everything synchronously without waiting for the io_context (which may be stopped, or be
// the very thread running the destructor). Methods taking a Lock run with the mutex held.
struct MetricsListener::State : std::enable_shared_from_this<State> {
  using Lock = std::lock_guard<std::mutex>;

  struct Connection {
    explicit Connection(tcp::socket s) : socket(std::move(s)), deadline(socket.get_executor()) {}
    tcp::socket socket;
    asio::steady_timer deadline;
    std::string request_head;
    std::string response;
    std::array<char, 1024> read_buffer{};
  };
  using ConnectionPtr = std::shared_ptr<Connection>;

  State(asio::io_context& io, const tcp::endpoint& endpoint, std::string_view address,
        std::function<std::string()> render_metrics, std::chrono::milliseconds timeout)
      : acceptor(io), accept_retry(io), render(std::move(render_metrics)), request_timeout(timeout) {
    error_code ec;
    acceptor.open(endpoint.protocol(), ec);
    if (!ec) acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) acceptor.bind(endpoint, ec);
    if (!ec) acceptor.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) throw std::runtime_error("cannot listen for metrics on " + std::string(address) + ": " + ec.message());
    port = acceptor.local_endpoint().port();
  }

  void accept(const Lock&) {
    acceptor.async_accept([self = shared_from_this()](const error_code& ec, tcp::socket socket) {
      const Lock lock(self->mutex);
      if (self->closed) return;
      if (!ec) {
        self->start(lock, std::move(socket));
        self->accept(lock);
        return;
      }
      // Out of descriptors, or a client that reset before we took it: not the end of the
      // listener, but retrying at once would spin while the condition lasts.
      self->accept_retry.expires_after(std::chrono::milliseconds(100));
      self->accept_retry.async_wait([self](const error_code& wait_error) {
        const Lock retry_lock(self->mutex);
        if (!wait_error && !self->closed) self->accept(retry_lock);
      });
    });
  }

  void start(const Lock& lock, tcp::socket socket) {
    auto c = std::make_shared<Connection>(std::move(socket));
    connections.insert(c);
    arm_deadline(lock, c);
    read_head(lock, c);
  }

  // Handlers of a connection that was dropped (or of a closed listener) only unwind.
  bool live(const Lock&, const ConnectionPtr& c) const { return !closed && c->socket.is_open(); }

  void arm_deadline(const Lock&, const ConnectionPtr& c) {
    c->deadline.expires_after(request_timeout);
    c->deadline.async_wait([self = shared_from_this(), c](const error_code& ec) {
      const Lock lock(self->mutex);
      // A wait that completed just before the deadline was moved on is not a timeout.
      if (ec || !self->live(lock, c) || c->deadline.expiry() > asio::steady_timer::clock_type::now()) return;
      self->drop(lock, c);
    });
  }

  void read_head(const Lock&, const ConnectionPtr& c) {
    c->socket.async_read_some(asio::buffer(c->read_buffer), [self = shared_from_this(), c](const error_code& ec,
                                                                                          size_t n) {
      const Lock lock(self->mutex);
      if (!self->live(lock, c)) return;
      if (ec) {
        self->drop(lock, c);
        return;
      }
      c->request_head.append(c->read_buffer.data(), n);
      const size_t head_end = find_head_end(c->request_head);
      if (head_end != std::string::npos && head_end <= kMaxRequestHeadBytes)
        self->respond(lock, c);
      else if (c->request_head.size() >= kMaxRequestHeadBytes)
        self->drop(lock, c);
      else
        self->read_head(lock, c);
    });
  }

  // render() runs under the mutex: that is what lets the destructor promise it is not running.
  void respond(const Lock& lock, const ConnectionPtr& c) {
    c->response = answer(c->request_head, render);
    arm_deadline(lock, c);
    asio::async_write(c->socket, asio::buffer(c->response), [self = shared_from_this(), c](const error_code& ec,
                                                                                          size_t) {
      const Lock write_lock(self->mutex);
      if (!self->live(write_lock, c)) return;
      if (ec) {
        self->drop(write_lock, c);
        return;
      }
      // Half-close and wait for the client to close: closing with request bytes still unread
      // (a POST body) would reset the connection and could destroy the answer in flight.
      error_code ignored;
      c->socket.shutdown(tcp::socket::shutdown_send, ignored);
      self->drain(write_lock, c);
    });
  }

  void drain(const Lock&, const ConnectionPtr& c) {
    c->socket.async_read_some(asio::buffer(c->read_buffer), [self = shared_from_this(), c](const error_code& ec,
                                                                                          size_t) {
      const Lock lock(self->mutex);
      if (!self->live(lock, c)) return;
      if (ec)
        self->drop(lock, c);
      else
        self->drain(lock, c);
    });
  }

  void drop(const Lock&, const ConnectionPtr& c) {
    error_code ignored;
    c->socket.close(ignored);
    c->deadline.cancel();
    connections.erase(c);
  }

  // Pending operations complete with operation_aborted and find `closed` set.
  void close() {
    const Lock lock(mutex);
    closed = true;
    error_code ignored;
    acceptor.close(ignored);
    accept_retry.cancel();
    for (const auto& c : connections) {
      c->socket.close(ignored);
      c->deadline.cancel();
    }
    connections.clear();
    render = nullptr;
  }

  std::mutex mutex;
  tcp::acceptor acceptor;
  asio::steady_timer accept_retry;
  std::function<std::string()> render;  // NOTE: must not destroy the listener (it holds the mutex)
  std::unordered_set<ConnectionPtr> connections;
  bool closed = false;
  const std::chrono::milliseconds request_timeout;
  uint16_t port = 0;  // set once by the constructor
};

MetricsListener::MetricsListener(asio::io_context& io, std::string_view address, std::function<std::string()> render)
    : MetricsListener(io, address, std::move(render), kRequestTimeout) {}

MetricsListener::MetricsListener(asio::io_context& io, std::string_view address, std::function<std::string()> render,
                                 std::chrono::milliseconds request_timeout)
    : state_(std::make_shared<State>(io, parse_loopback_endpoint(address), address, std::move(render),
                                     request_timeout)) {
  const State::Lock lock(state_->mutex);
  state_->accept(lock);
}

MetricsListener::~MetricsListener() { state_->close(); }

uint16_t MetricsListener::port() const { return state_->port; }

}  // namespace den::runtime
