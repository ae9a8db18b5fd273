// The daemon's Unix-socket listener (Boost.Asio). The io threads serve the connections, each
// on a strand of its own (so one never runs on two threads at once, and a flooding client
// holds up only the thread it runs on): it reads newline-delimited JSON-RPC (bounded lines, bounded depth, a deadline per line), checks
// each peer's uid with SO_PEERCRED, hands requests to the Service and writes answers in the
// order they are posted. A client that stops reading is dropped once its unread output passes
// limits.client_buffer_bytes; one that is too slow to finish a line gets -32009 and is dropped.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/json.hpp>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "den/runtime/config.h"
#include "den/runtime/service.h"

namespace den::runtime {

// How many threads the daemon runs its io_context on: a third of the cores, rounded up, 2 to 6.
// They parse and answer; generation and storage work runs on pools of its own. More threads
// than that slowed everyone on a 16-core host flooded by bad clients (8 threads: a good client's
// p99 1.25-1.48x its quiet value, 5-6 threads: 1.04-1.25x), as threads and clients fought for
// cores; each connection's backlog is bounded by the burst slots (half of these threads).
unsigned io_thread_count();

class Server {
 public:
  // Prepares the socket: creates its directory (0700) when missing, refuses a path where a
  // daemon already answers, removes a stale socket file, binds (0600) and listens. Throws
  // std::runtime_error saying what is wrong.
  Server(boost::asio::io_context& io, Service& service, std::string socket_path, const LimitsConfig& limits);
  ~Server();  // removes the socket file if it is still ours
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  void start();           // begins accepting (on the io threads)
  void stop_accepting();  // closes the listener and removes the socket file (shutdown)
  void close_all();       // closes every connection once what is queued for it is written
  void set_limits(const LimitsConfig& limits);  // SIGHUP
  boost::json::object stats() const;            // any thread
  const std::string& socket_path() const { return path_; }

  struct State;

 private:
  std::shared_ptr<State> state_;
  std::string path_;
};

}  // namespace den::runtime
