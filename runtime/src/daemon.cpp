// The daemon's life: start, serve, reload, shut down.
#include "den/runtime/daemon.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/file.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <boost/asio.hpp>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <functional>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "den/engine/backend.h"
#include "den/engine/cuda_device.h"
#include "den/engine/model.h"
#include "den/memory/failpoints.h"
#include "den/memory/session_manager.h"
#include "den/runtime/log.h"
#include "den/runtime/metrics.h"
#include "den/runtime/paths.h"
#include "den/runtime/server.h"
#include "den/runtime/service.h"

namespace den::runtime {
namespace {

constexpr int64_t kGiB = int64_t{1} << 30;
constexpr double kCancelGraceSeconds = 10.0;

int64_t physical_memory_bytes() {
  return static_cast<int64_t>(::sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(::sysconf(_SC_PAGESIZE));
}

// One daemon per state directory: a second one would corrupt nothing (SQLite locks) but would
// fight over segment files and sessions. The lock dies with the process.
class StateDirectoryLock {
 public:
  explicit StateDirectoryLock(const std::filesystem::path& dir) {
    const std::string path = (dir / "daemon.lock").string();
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd_ < 0) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      ::close(fd_);
      throw std::runtime_error("another den daemon uses the state directory " + dir.string() +
                               " (stop it, or give this one --state-dir)");
    }
  }
  ~StateDirectoryLock() { ::close(fd_); }
  StateDirectoryLock(const StateDirectoryLock&) = delete;
  StateDirectoryLock& operator=(const StateDirectoryLock&) = delete;

 private:
  int fd_ = -1;
};

std::unique_ptr<engine::Backend> open_backend(const DaemonConfig& config, const engine::Model& model,
                                              std::string& name) {
  if (config.backend == "auto") {
    try {
      name = "cuda";
      return engine::make_backend("cuda", model, config.threads, config.device);
    } catch (const std::exception& e) {
      log_info("no usable CUDA device; using the CPU backend", {{"reason", e.what()}});
      name = "cpu";
      return engine::make_backend("cpu", model, config.threads, config.device);
    }
  }
  name = config.backend;
  return engine::make_backend(config.backend, model, config.threads, config.device);
}

struct PoolSizes {
  int64_t fast = 0, dram = 0, ssd = 0;
};

PoolSizes choose_pool_sizes(const DaemonConfig& config, const std::string& backend, const std::filesystem::path& state_dir) {
  PoolSizes sizes;
  const int64_t ram = physical_memory_bytes();
  sizes.fast = config.kv.hbm_bytes;
  if (sizes.fast == 0) {
    sizes.fast = backend == "cuda" ? static_cast<int64_t>(0.8 * static_cast<double>(engine::cuda_device_info(config.device).free_bytes))
                                   : std::min(ram / 4, 4 * kGiB);
  }
  if (config.kv.policy == KvPolicy::tiered) {
    sizes.dram = config.kv.dram_bytes;
    if (sizes.dram == 0 && backend == "cuda") sizes.dram = std::min(ram / 4, 64 * kGiB);
  }
  sizes.ssd = config.kv.ssd_bytes;
  if (sizes.ssd == 0) sizes.ssd = static_cast<int64_t>(std::filesystem::space(state_dir).available / 2);
  return sizes;
}

void notify_systemd(const std::string& state) { sd_notify(0, state.c_str()); }

// The daemon's SIGTERM, SIGINT and SIGHUP: blocked from the start of run_daemon in the calling
// thread and so in every thread it starts (they inherit the mask), and taken by one thread with
// sigwait(), so no signal can reach a thread that has no use for it and end the process by its
// default action. Until hold() (just before the socket listens), SIGTERM and SIGINT end the
// process at once, as their default action would: nothing is acknowledged yet, and stopping
// mid-start is what a crash at any instant already is. From hold() signals wait in order for
// set_handler(), which takes them and every later one.
class SignalThread {
 public:
  SignalThread() {
    sigemptyset(&set_);
    for (const int s : {SIGTERM, SIGINT, SIGHUP, kWake}) sigaddset(&set_, s);
    pthread_sigmask(SIG_BLOCK, &set_, nullptr);
    thread_ = std::thread([this] { take(); });
  }
  // The signals stay blocked: one arriving now would otherwise end the process by its default
  // action on the way out, instead of the exit code run_daemon returns.
  ~SignalThread() {
    stopping_ = true;
    pthread_kill(thread_.native_handle(), kWake);
    thread_.join();
  }
  SignalThread(const SignalThread&) = delete;
  SignalThread& operator=(const SignalThread&) = delete;

  void hold() {
    std::lock_guard lock(mutex_);
    holding_ = true;
  }
  // The held signals, then every later one, go to `handler`, called on the signal thread.
  void set_handler(std::function<void(int)> handler) {
    std::lock_guard lock(mutex_);
    handler_ = std::move(handler);
    for (const int sig : held_) handler_(sig);
    held_.clear();
  }

 private:
  static constexpr int kWake = SIGUSR2;  // ends take() from the destructor

  void take() {
    for (;;) {
      int sig = 0;
      if (sigwait(&set_, &sig) != 0) continue;
      if (stopping_) return;
      if (sig == kWake) continue;
      std::lock_guard lock(mutex_);
      if (handler_) {
        handler_(sig);
      } else if (holding_) {
        held_.push_back(sig);
      } else if (sig == SIGHUP) {
        log_info("SIGHUP during start-up: nothing to reload yet");
      } else {
        log_info(sig == SIGTERM ? "SIGTERM during start-up: exiting" : "SIGINT during start-up: exiting");
        std::_Exit(128 + sig);
      }
    }
  }

  sigset_t set_{};
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::mutex mutex_;
  std::function<void(int)> handler_;
  bool holding_ = false;
  std::vector<int> held_;
};

}  // namespace

int run_daemon(const DaemonConfig& config, const std::function<DaemonConfig()>& reload) {
  set_log_level(config.log_level);
  std::signal(SIGPIPE, SIG_IGN);
  SignalThread signal_thread;  // first: before any other thread starts
  // Tests of crash safety arm failpoints through the environment (memory/failpoints.h).
  const std::vector<std::string> failpoints = memory::arm_failpoints_from_env();
  if (!failpoints.empty()) {
    std::string names;
    for (const std::string& name : failpoints) names += (names.empty() ? "" : ",") + name;
    log_warn("failpoints armed from DEN_FAILPOINTS: this daemon will crash or fail on purpose", {{"failpoints", names}});
  }
  const std::filesystem::path state_dir = state_directory(config.state_dir);
  std::filesystem::create_directories(state_dir);
  std::filesystem::permissions(state_dir, std::filesystem::perms::owner_all, std::filesystem::perm_options::replace);
  StateDirectoryLock lock(state_dir);

  const std::string model_path = resolve_model_path(config.model);
  log_info("loading model", {{"path", model_path}});
  const auto t_load = std::chrono::steady_clock::now();
  std::unique_ptr<engine::Model> model = engine::Model::load(model_path);
  std::string backend_name;
  std::unique_ptr<engine::Backend> backend = open_backend(config, *model, backend_name);
  log_info("model loaded", {{"model", model->config().name}, {"backend", backend_name},
                            {"seconds", std::to_string(std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count())}});

  const int32_t context = config.context > 0 ? config.context : model->config().n_ctx_train;
  const kernels::KvLayout layout = model->kv_layout(config.kv.block_tokens, backend->kv_dtype());
  const PoolSizes sizes = choose_pool_sizes(config, backend_name, state_dir);
  memory::MemoryConfig mc;
  mc.layout = layout;
  mc.model_fingerprint = model->fingerprint();
  mc.fast_blocks = sizes.fast / layout.block_bytes();
  mc.fast_placement = backend->kv_on_device() ? memory::Placement::device : memory::Placement::host;
  mc.dram_blocks = sizes.dram / layout.block_bytes();
  mc.state_dir = state_dir;
  mc.ssd_quota_bytes = sizes.ssd;
  mc.cost_model = config.kv.cost_model;
  const int64_t context_blocks = (context + layout.block_tokens - 1) / layout.block_tokens;
  if (mc.fast_blocks < context_blocks) {
    throw std::runtime_error("kv.hbm (" + format_size(sizes.fast) + ") holds fewer than one context of " +
                             std::to_string(context) + " tokens (" + format_size(context_blocks * layout.block_bytes()) +
                             "): raise kv.hbm or lower context");
  }
  memory::SessionManager sessions(mc);
  if (backend_name == "cuda") {
    const memory::LinkBandwidths links = sessions.measure_links(64 << 20);
    sessions.set_link_bandwidths(links.dram_to_fast, mc.costs.ssd_read_bytes_per_s);
  }
  log_info("session store open", {{"state_dir", state_dir.string()},
                                   {"sessions", std::to_string(sessions.stats().sessions)},
                                   {"kv_fast", format_size(mc.fast_blocks * layout.block_bytes())},
                                   {"kv_dram", format_size(mc.dram_blocks * layout.block_bytes())},
                                   {"kv_ssd_quota", format_size(sizes.ssd)},
                                   {"policy", std::string(kv_policy_name(config.kv.policy))},
                                   {"context", std::to_string(context)}});

  boost::asio::io_context io;
  Service service(config, *model, *backend, sessions, backend_name);
  const std::string socket = socket_path(config.socket);
  signal_thread.hold();  // a client that sees the socket may signal at once
  Server server(io, service, socket, config.limits);
  service.server_stats = [&server] { return server.stats(); };
  const std::string tools_socket = tools_socket_path(config, socket);
  if (!tools_socket.empty()) service.accept_tool_servers(tools_socket);
  std::unique_ptr<MetricsListener> metrics;
  if (config.metrics_listen) {
    metrics = std::make_unique<MetricsListener>(io, *config.metrics_listen, [&service] { return service.prometheus_text(); });
    log_info("metrics listening", {{"address", *config.metrics_listen}, {"port", std::to_string(metrics->port())}});
  }

  std::promise<void> stop_promise;
  std::once_flag stop_once;
  auto request_stop = [&] { std::call_once(stop_once, [&] { stop_promise.set_value(); }); };
  service.on_shutdown_request = [&] { request_stop(); };

  DaemonConfig running = config;
  auto on_signal = [&](int sig) {
    if (sig == SIGHUP) {
      if (!reload) {
        log_info("SIGHUP: no configuration file to reload (started without --config)");
      } else {
        try {
          const DaemonConfig reloaded = reload();
          for (const std::string& key : restart_required_changes(running, reloaded)) {
            log_warn("SIGHUP: this change takes effect after a restart", {{"key", key}});
          }
          set_log_level(reloaded.log_level);
          server.set_limits(reloaded.limits);
          service.reload(reloaded);
          running.log_level = reloaded.log_level;
          running.limits = reloaded.limits;
          running.scheduler = reloaded.scheduler;
          log_info("SIGHUP: configuration reloaded", {{"file", reloaded.source}});
        } catch (const std::exception& e) {
          log_error("SIGHUP: configuration not reloaded", {{"error", e.what()}});
        }
      }
    } else {
      log_info(sig == SIGTERM ? "SIGTERM: shutting down" : "SIGINT: shutting down");
      request_stop();
    }
  };
  // Handled on an io thread: the reload changes the server and the service.
  signal_thread.set_handler([&](int sig) { boost::asio::post(io, [&on_signal, sig] { on_signal(sig); }); });

  server.start();
  // Several io threads, each connection on a strand: a client that floods the socket keeps at
  // most one of them busy, and floods together at most half (the server's burst slots).
  const unsigned io_threads = io_thread_count();
  std::vector<std::thread> io_pool;
  for (unsigned i = 0; i < io_threads; ++i) {
    io_pool.emplace_back([&io] {
      for (;;) {
        try {
          io.run();
          return;
        } catch (const std::exception& e) {
          log_error("io thread", {{"error", e.what()}});
        }
      }
    });
  }
  log_info("listening", {{"socket", socket}, {"pid", std::to_string(::getpid())}});
  notify_systemd("READY=1\nSTATUS=listening on " + socket);

  stop_promise.get_future().wait();
  // Signals from here on find the shutdown under way; the handler above points at objects that
  // end before the signal thread does.
  signal_thread.set_handler([](int sig) {
    log_info(std::string(strsignal(sig)) + ": already shutting down");
  });

  // Shutdown: no new connections or requests, generations cancelled and answered, then every
  // session's KV and history written.
  notify_systemd("STOPPING=1\nSTATUS=shutting down");
  const auto t_stop = std::chrono::steady_clock::now();
  server.stop_accepting();
  service.begin_shutdown();
  auto quiet = std::async(std::launch::async, [&] { service.wait_quiet(); });
  if (quiet.wait_for(std::chrono::duration<double>(kCancelGraceSeconds)) != std::future_status::ready) {
    log_warn("requests still running after the grace period; waiting for them", {{"seconds", std::to_string(kCancelGraceSeconds)}});
  }
  quiet.wait();
  auto last_report = std::chrono::steady_clock::now();
  const Service::CheckpointSummary summary = service.checkpoint_all([&](int64_t done, int64_t total, int32_t s_done, int32_t s_total) {
    const auto now = std::chrono::steady_clock::now();
    if (now - last_report < std::chrono::seconds(1)) return;
    last_report = now;
    const std::string status = "checkpointing: " + format_size(done) + " of " + format_size(total) + ", session " +
                               std::to_string(s_done + 1) + " of " + std::to_string(s_total);
    log_info("checkpointing sessions", {{"done", format_size(done)}, {"total", format_size(total)},
                                        {"sessions_done", std::to_string(s_done)}, {"sessions", std::to_string(s_total)}});
    notify_systemd("STATUS=" + status + "\nEXTEND_TIMEOUT_USEC=5000000");
  });
  log_info("sessions checkpointed", {{"sessions", std::to_string(summary.sessions)}, {"failed", std::to_string(summary.failed)},
                                     {"bytes", format_size(summary.bytes)}, {"seconds", std::to_string(summary.seconds)}});
  server.close_all();
  // Let the io threads write the last answers (each connection closes once written).
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  io.stop();
  for (std::thread& t : io_pool) t.join();
  log_info("stopped", {{"seconds", std::to_string(std::chrono::duration<double>(std::chrono::steady_clock::now() - t_stop).count())}});
  return summary.failed == 0 ? 0 : 1;
}

}  // namespace den::runtime
