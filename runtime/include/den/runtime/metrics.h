// Daemon metrics: histograms the daemon fills (TTFT, time per output token, queue wait), the
// Prometheus text exposition of a snapshot, and a tiny HTTP listener for `metrics.listen`
// (loopback only; GET /metrics, everything else 404).
#pragma once

#include <boost/asio/io_context.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace den::runtime {

// A cumulative histogram with fixed upper bounds (seconds, bytes, ...). Thread-safe.
class Histogram {
 public:
  explicit Histogram(std::vector<double> upper_bounds);
  void observe(double value);
  struct Snapshot {
    std::vector<double> upper_bounds;
    std::vector<uint64_t> cumulative;  // per bound: observations <= bound
    uint64_t count = 0;
    double sum = 0;
    // Linear interpolation inside the bucket that holds quantile q (0..1); 0 when empty.
    double quantile(double q) const;
  };
  Snapshot snapshot() const;

 private:
  mutable std::mutex mutex_;
  std::vector<double> upper_bounds_;
  std::vector<uint64_t> counts_;  // per bucket, plus +Inf at the end
  uint64_t count_ = 0;
  double sum_ = 0;
};

// Latency buckets from 1 ms to 60 s.
std::vector<double> latency_buckets_seconds();

// One sample of the Prometheus text format.
struct MetricSample {
  std::string name;       // e.g. den_tokens_generated_total
  std::string help;
  std::string type;       // counter | gauge
  std::vector<std::pair<std::string, std::string>> labels;
  double value = 0;
};

// Renders samples (grouped by name, HELP/TYPE once per name) and histograms as
// text/plain; version=0.0.4.
class PrometheusText {
 public:
  void add(const MetricSample& sample);
  void add_histogram(std::string_view name, std::string_view help, const Histogram::Snapshot& h);
  std::string str() const { return out_; }

 private:
  std::string out_;
  std::vector<std::string> declared_;
};

// Listens on a loopback TCP address ("127.0.0.1:9464", "[::1]:9464", "localhost:9464") and
// answers GET /metrics with render(). Throws std::invalid_argument for a malformed or
// non-loopback address and std::runtime_error when the port cannot be bound. render() runs
// on an io_context thread with the listener's lock held: it must not destroy the listener.
class MetricsListener {
 public:
  MetricsListener(boost::asio::io_context& io, std::string_view address, std::function<std::string()> render);
  // request_timeout: how long a client may take to send its request head, and again to take
  // the answer, before it is disconnected (tests shorten it).
  MetricsListener(boost::asio::io_context& io, std::string_view address, std::function<std::string()> render,
                  std::chrono::milliseconds request_timeout);
  // Closes the port and every open connection before returning, from any thread, whether or
  // not the io_context is running; render() is not called once the destructor has returned.
  ~MetricsListener();
  MetricsListener(const MetricsListener&) = delete;
  MetricsListener& operator=(const MetricsListener&) = delete;

  static constexpr std::chrono::milliseconds kRequestTimeout{5000};
  static constexpr size_t kMaxRequestHeadBytes = 8 * 1024;

  uint16_t port() const;  // the bound port (useful with port 0)

 private:
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace den::runtime
