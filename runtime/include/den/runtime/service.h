// The daemon's methods (docs/PROTOCOL.md), independent of the transport: a request comes in
// with a Replier, the answer goes out through it — at once, from a worker thread, or after a
// generation finished on the engine thread. Quick methods run on a small control pool, the
// ones that wait for I/O (checkpoint, hibernate, wake, pin) on an operations pool, so that
// `daemon/stats` answers while disks and the engine are busy.
#pragma once

#include <boost/json.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "den/engine/backend.h"
#include "den/engine/chat_template.h"
#include "den/engine/model.h"
#include "den/memory/session_manager.h"
#include "den/runtime/agent_runtime.h"
#include "den/runtime/chat_turns.h"
#include "den/runtime/config.h"
#include "den/runtime/json_rpc.h"
#include "den/runtime/scheduler.h"
#include "den/runtime/session_claims.h"
#include "den/runtime/tools.h"

namespace boost::asio {
class thread_pool;
}

namespace den::runtime {

// How a handler answers. Thread-safe; calls after the client left are dropped. Exactly one of
// result/error is called per request (the service guarantees it).
class Replier {
 public:
  virtual ~Replier() = default;
  virtual void notify(std::string_view method, boost::json::object params) = 0;
  virtual void result(boost::json::value result) = 0;
  virtual void error(const rpc::Error& error) = 0;
};

using ConnectionId = uint64_t;

class Service {
 public:
  Service(const DaemonConfig& config, const engine::Model& model, engine::Backend& backend,
          memory::SessionManager& sessions, std::string backend_name);
  ~Service();  // waits for every request in flight
  Service(const Service&) = delete;
  Service& operator=(const Service&) = delete;

  void dispatch(ConnectionId connection, rpc::Request request, std::shared_ptr<Replier> replier);
  // The client left: its generations are cancelled (their results go nowhere).
  void connection_closed(ConnectionId connection);

  // Shutdown, in order: refuse new requests (-32006), cancel generations, wait until every
  // request in flight has answered, then checkpoint every session whose checkpoint is not
  // current. progress(done_bytes, total_bytes, sessions_done, sessions_total) is called as it writes.
  void begin_shutdown();
  void wait_quiet();
  struct CheckpointSummary {
    int32_t sessions = 0, failed = 0;
    int64_t bytes = 0;
    double seconds = 0;
  };
  CheckpointSummary checkpoint_all(const std::function<void(int64_t, int64_t, int32_t, int32_t)>& progress);

  void reload(const DaemonConfig& config);  // SIGHUP: limits and scheduler settings
  // MCP servers may dial in at `socket_path` from now on (ToolRegistry::listen; throws).
  void accept_tool_servers(const std::string& socket_path) { tools_->listen(socket_path); }
  boost::json::object stats() const;
  std::string prometheus_text() const;

  // Set by the daemon: called (once) when a client asks daemon/shutdown; the connection
  // statistics the server keeps, merged into daemon/stats.
  std::function<void()> on_shutdown_request;
  std::function<boost::json::object()> server_stats;

 private:
  struct Call;
  class BusyGuard;
  using Handler = void (Service::*)(const std::shared_ptr<Call>&);

  void request_done(bool failed);
  void run_on(boost::asio::thread_pool& pool, const std::shared_ptr<Call>& call, Handler handler);
  void run_here(const std::shared_ptr<Call>& call, Handler handler);  // errors become the call's answer
  memory::SessionId resolve(const rpc::Params& params, std::string_view key = "session") const;
  std::string session_ref(memory::SessionId id) const;
  boost::json::object session_object(memory::SessionId id) const;
  std::vector<int32_t> tokens_to_append(memory::SessionId id, const rpc::Params& params, bool generation_prompt,
                                        bool& chat_turn) const;
  void check_context(memory::SessionId id, size_t adding) const;
  // Marks the session busy with `activity` until the call answers; -32002 when it is busy already.
  void claim(const std::shared_ptr<Call>& call, memory::SessionId id, std::string_view activity);
  void wait_operation(const std::shared_ptr<Call>& call, memory::SessionId id,
                      const std::shared_ptr<memory::Operation>& op, std::string_view verb);

  void initialize(const std::shared_ptr<Call>& call);
  void sessions_create(const std::shared_ptr<Call>& call);
  void sessions_list(const std::shared_ptr<Call>& call);
  void sessions_get(const std::shared_ptr<Call>& call);
  void sessions_append(const std::shared_ptr<Call>& call);
  void sessions_generate(const std::shared_ptr<Call>& call);
  void sessions_cancel(const std::shared_ptr<Call>& call);
  void sessions_pin(const std::shared_ptr<Call>& call);
  void sessions_unpin(const std::shared_ptr<Call>& call);
  void sessions_checkpoint(const std::shared_ptr<Call>& call);
  void sessions_hibernate(const std::shared_ptr<Call>& call);
  void sessions_wake(const std::shared_ptr<Call>& call);
  void sessions_fork(const std::shared_ptr<Call>& call);
  void sessions_delete(const std::shared_ptr<Call>& call);
  void models_list(const std::shared_ptr<Call>& call);
  void daemon_stats(const std::shared_ptr<Call>& call);
  void daemon_shutdown(const std::shared_ptr<Call>& call);
  void agents_spawn(const std::shared_ptr<Call>& call);
  void agents_list(const std::shared_ptr<Call>& call);
  void agents_get(const std::shared_ptr<Call>& call);
  void agents_send(const std::shared_ptr<Call>& call);
  void agents_subscribe(const std::shared_ptr<Call>& call);
  void agents_unsubscribe(const std::shared_ptr<Call>& call);
  void agents_logs(const std::shared_ptr<Call>& call);
  void agents_stop(const std::shared_ptr<Call>& call);
  void agents_delete(const std::shared_ptr<Call>& call);

  DaemonConfig config_;  // limits/scheduler parts change on reload (config_mutex_)
  mutable std::mutex config_mutex_;
  const engine::Model& model_;
  memory::SessionManager& sessions_;
  std::string backend_name_;
  int32_t max_context_;
  ChatTurns chat_turns_;
  SessionClaims claims_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<AgentRuntime> agents_;  // before tools_: the tools go first, failing calls in flight
  std::unique_ptr<ToolRegistry> tools_;
  std::unique_ptr<boost::asio::thread_pool> control_pool_, operations_pool_;

  mutable std::mutex mutex_;
  std::condition_variable quiet_;
  struct RunningGenerate {
    memory::SessionId session;
    std::shared_ptr<GenerateHandle> handle;
  };
  std::map<std::pair<ConnectionId, std::string>, RunningGenerate> generates_;  // (connection, request id)
  std::multimap<ConnectionId, uint64_t> subscriptions_;  // agent subscriptions per connection
  int64_t in_flight_ = 0;
  bool shutting_down_ = false;
  bool shutdown_requested_ = false;

  std::atomic<int64_t> requests_{0}, errors_{0};
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
};

}  // namespace den::runtime
