// Connections on the io threads: read, frame, parse, dispatch. Each connection lives on its own
// strand (its socket's executor), so its handlers never run at once while different
// connections run side by side: a client flooding the daemon with garbage keeps one thread
// busy, not the one a well-behaved client is served on. Answers come back through
// ConnectionReplier, which posts to the connection's strand. The connection table and the
// limits are shared: State::mu.
#include "den/runtime/server.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio.hpp>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "den/runtime/json_rpc.h"
#include "den/runtime/log.h"
#include "unix_listener.h"

namespace den::runtime {
namespace asio = boost::asio;
namespace json = boost::json;
using local_socket = asio::local::stream_protocol;

namespace {

constexpr size_t kReadChunk = 64 * 1024;
// Lines one connection handles before its strand lets others run: a chunk of 64 KiB can hold
// thousands of short (malformed) lines, and handling them all in one go would hold an io
// thread for milliseconds while a well-behaved client's request waits behind it.
constexpr size_t kLinesPerTurn = 32;
// Answers gathered into one write: a flood of short error answers costs one syscall per batch.
constexpr size_t kMessagesPerWrite = 64;

std::string errno_text(int err) { return std::strerror(err); }

// Creates the socket's directory 0700 when missing; refuses one that belongs to someone else.
void prepare_directory(const std::filesystem::path& dir) {
  if (dir.empty()) return;
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno != ENOENT) throw std::runtime_error("cannot use socket directory " + dir.string() + ": " + errno_text(errno));
    prepare_directory(dir.parent_path() == dir ? std::filesystem::path() : dir.parent_path());
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
      throw std::runtime_error("cannot create socket directory " + dir.string() + ": " + errno_text(errno));
    }
    return;
  }
  if (!S_ISDIR(st.st_mode)) throw std::runtime_error("socket directory " + dir.string() + " is not a directory");
}

}  // namespace

unsigned io_thread_count() { return std::clamp((std::thread::hardware_concurrency() + 2) / 3, 2u, 6u); }

struct Connection;

struct Server::State : std::enable_shared_from_this<Server::State> {
  asio::io_context& io;
  Service& service;
  local_socket::acceptor acceptor;
  std::string path;
  ino_t socket_inode = 0;
  std::mutex mu;  // guards limits, connections and next_id
  LimitsConfig limits;
  std::map<ConnectionId, std::shared_ptr<Connection>> connections;
  ConnectionId next_id = 1;

  std::atomic<int64_t> open{0}, accepted{0}, refused_uid{0}, refused_limit{0}, dropped_slow{0}, dropped_unread{0},
      oversized_lines{0}, malformed{0}, throttled{0};

  // Turns of connections with a backlog of lines (a pipelined burst, or a flood) run on at most
  // burst_slots io threads at once; the others wait here in order, and each finished turn hands
  // its slot to the next. The remaining io threads stay free for connections that send a request
  // and wait for its answer: without this, as many flooding connections as io threads held them
  // all (a well-behaved client's p99 grew 4x with 4 io threads and 4 flooders).
  std::mutex burst_mu;
  int burst_slots = std::max(1, static_cast<int>(io_thread_count()) / 2);
  int bursts_running = 0;
  std::deque<std::weak_ptr<Connection>> bursts_waiting;

  // The acceptor on a strand of its own: its handlers and stop_accepting's close never overlap.
  State(asio::io_context& io_, Service& service_) : io(io_), service(service_), acceptor(asio::make_strand(io_)) {}
  void accept();
  // True: the caller holds a slot. False: it waits and is resumed, holding one, on its strand.
  bool acquire_burst(const std::shared_ptr<Connection>& c);
  // Hands the caller's slot to the next waiting connection, or frees it.
  void release_burst();
  // The caller, whose turn ended with lines left, queues behind the others and hands its slot on
  // (to itself if nobody else waits).
  void requeue_burst(const std::shared_ptr<Connection>& c);
};

struct Connection : std::enable_shared_from_this<Connection> {
  std::shared_ptr<Server::State> server;
  ConnectionId id;
  local_socket::socket socket;  // on the connection's strand: every handler below runs there
  asio::steady_timer line_deadline;
  asio::steady_timer read_resume;  // a connection over limits.errors_per_second reads again at this
  std::chrono::steady_clock::time_point error_window{};  // the second its errors are counted in
  int64_t errors_in_window = 0;
  bool throttled = false;
  LimitsConfig limits;  // this connection's copy (set_limits posts new ones)
  rpc::LineFramer framer;
  std::array<char, kReadChunk> buffer{};
  std::deque<rpc::LineFramer::Line> lines;  // received, not yet handled (at most one chunk's worth)
  std::deque<std::string> outbox;
  size_t queued_bytes = 0;
  size_t in_flight = 0;  // messages at the front of outbox that the current write carries
  bool writing = false, reading = false, handling = false, closed = false, close_when_written = false;
  bool holds_burst = false;  // during a turn that took one of the server's burst slots

  Connection(std::shared_ptr<Server::State> s, ConnectionId i, local_socket::socket sock, const LimitsConfig& l)
      : server(std::move(s)),
        id(i),
        socket(std::move(sock)),
        line_deadline(socket.get_executor()),
        read_resume(socket.get_executor()),
        limits(l),
        framer(static_cast<size_t>(l.line_bytes)) {}

  void start() { read(); }

  void read() {
    if (closed || reading || handling || close_when_written || throttled) return;
    // Backpressure: a client that does not read its answers stops being read.
    if (queued_bytes > static_cast<size_t>(limits.client_buffer_bytes) / 2) return;
    // A client that caused limits.errors_per_second error answers this second is read again
    // when the second is over: its lines wait in its own socket buffer, not on our threads.
    if (limits.errors_per_second > 0 && errors_in_window >= limits.errors_per_second) {
      const auto until = error_window + std::chrono::seconds(1);
      if (std::chrono::steady_clock::now() < until) {
        throttled = true;
        ++server->throttled;
        read_resume.expires_at(until);
        read_resume.async_wait([self = shared_from_this()](boost::system::error_code ec) {
          self->throttled = false;
          if (!ec) self->read();
        });
        return;
      }
    }
    reading = true;
    socket.async_read_some(asio::buffer(buffer), [self = shared_from_this()](boost::system::error_code ec, size_t n) {
      self->reading = false;
      if (ec) {
        self->close();
        return;
      }
      self->received(n);
    });
  }

  void received(size_t n) {
    const bool was_idle = framer.pending_bytes() == 0;
    std::vector<rpc::LineFramer::Line> completed = framer.push({buffer.data(), n});
    if (framer.pending_bytes() == 0) {
      line_deadline.cancel();
    } else if (was_idle || !completed.empty()) {
      // A new line started: it has limits.request_seconds to be completed.
      const auto seconds = limits.request_seconds;
      line_deadline.expires_after(std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
      line_deadline.async_wait([self = shared_from_this(), seconds](boost::system::error_code ec) {
        if (ec || self->closed || self->framer.pending_bytes() == 0) return;
        ++self->server->dropped_slow;
        log_info("dropping a client that did not complete a request line in time", {{"connection", std::to_string(self->id)}});
        self->send(rpc::error_response(nullptr, rpc::request_timeout,
                                       "request line not completed within " + std::to_string(seconds) + " s",
                                       json::object{{"seconds", seconds}}));
        self->close_when_written = true;
        if (!self->writing) self->close();
      });
    }
    for (rpc::LineFramer::Line& line : completed) lines.push_back(std::move(line));
    handle_some();
  }

  // Handles up to kLinesPerTurn received lines, then yields the thread (a post goes behind the
  // handlers of every other connection that is ready) until all are done; reads again after.
  void handle_some() {
    handling = false;
    if (lines.size() > 1 && !holds_burst) {
      if (!server->acquire_burst(shared_from_this())) {
        handling = true;  // resumed by whoever frees a slot
        return;
      }
      holds_burst = true;
    }
    for (size_t handled = 0; !lines.empty() && handled < kLinesPerTurn; ++handled) {
      const rpc::LineFramer::Line line = std::move(lines.front());
      lines.pop_front();
      if (line.oversized) {
        ++server->oversized_lines;
        count_error();
        send(rpc::error_response(nullptr, rpc::limit_exceeded,
                                 "request line of " + std::to_string(line.bytes) + " bytes is longer than limits.line_bytes (" +
                                     std::to_string(limits.line_bytes) + ")",
                                 json::object{{"limit", limits.line_bytes}}));
        continue;
      }
      if (line.text.find_first_not_of(" \t\r") == std::string::npos) continue;  // blank line
      handle(line.text);
      if (closed) break;
    }
    if (closed) {
      end_burst();
      return;
    }
    if (!lines.empty()) {
      handling = true;
      if (holds_burst) {
        holds_burst = false;
        server->requeue_burst(shared_from_this());
      } else {
        asio::post(socket.get_executor(), [self = shared_from_this()] {
          if (!self->closed) self->handle_some();
        });
      }
      return;
    }
    end_burst();
    read();
  }

  void end_burst() {
    if (!holds_burst) return;
    holds_burst = false;
    server->release_burst();
  }

  // On this connection's strand, holding a burst slot handed to it.
  void resume_burst() {
    if (closed) {
      server->release_burst();
      return;
    }
    holds_burst = true;
    handle_some();
  }

  void handle(const std::string& line);

  // An error answer this connection caused (counted against limits.errors_per_second).
  void count_error() {
    const auto now = std::chrono::steady_clock::now();
    if (now - error_window >= std::chrono::seconds(1)) {
      error_window = now;
      errors_in_window = 0;
    }
    ++errors_in_window;
  }

  void send(std::string message) {
    if (closed) return;
    queued_bytes += message.size();
    if (queued_bytes > static_cast<size_t>(limits.client_buffer_bytes)) {
      ++server->dropped_unread;
      log_warn("dropping a client that does not read its answers",
               {{"connection", std::to_string(id)}, {"unread_bytes", std::to_string(queued_bytes)}});
      close();
      return;
    }
    outbox.push_back(std::move(message));
    write();
  }

  void write() {
    if (writing || outbox.empty() || closed) return;
    writing = true;
    // The messages stay in the deque (whose elements never move) until the write completes.
    in_flight = std::min(outbox.size(), kMessagesPerWrite);
    std::vector<asio::const_buffer> buffers;
    buffers.reserve(in_flight);
    for (size_t i = 0; i < in_flight; ++i) buffers.push_back(asio::buffer(outbox[i]));
    asio::async_write(socket, buffers, [self = shared_from_this()](boost::system::error_code ec, size_t n) {
      self->writing = false;
      // Closed meanwhile (a read failed while this write was in flight): the outbox was
      // cleared, so there is nothing here to pop.
      if (ec || self->closed) {
        self->close();
        return;
      }
      self->queued_bytes -= n;
      self->outbox.erase(self->outbox.begin(), self->outbox.begin() + static_cast<std::ptrdiff_t>(self->in_flight));
      self->in_flight = 0;
      if (!self->outbox.empty()) {
        self->write();
      } else if (self->close_when_written) {
        self->close();
      } else {
        self->read();
      }
    });
  }

  void close() {
    if (closed) return;
    closed = true;
    boost::system::error_code ignored;
    line_deadline.cancel();
    read_resume.cancel();
    socket.shutdown(local_socket::socket::shutdown_both, ignored);
    socket.close(ignored);
    outbox.clear();
    lines.clear();
    queued_bytes = 0;
    in_flight = 0;
    server->service.connection_closed(id);
    --server->open;
    std::shared_ptr<Connection> last;  // the table's reference, dropped after the lock
    {
      std::lock_guard lock(server->mu);
      auto it = server->connections.find(id);
      if (it != server->connections.end()) {
        last = std::move(it->second);
        server->connections.erase(it);
      }
    }
    // `last` may be the last owner: it goes when this returns, and nothing follows.
  }
};

// Answers of one request, posted to the connection's strand; dropped once the connection is gone.
class ConnectionReplier final : public Replier {
 public:
  ConnectionReplier(asio::any_io_executor strand, std::weak_ptr<Connection> connection, json::value id)
      : strand_(std::move(strand)), connection_(std::move(connection)), id_(std::move(id)) {}
  void notify(std::string_view method, json::object params) override { post(rpc::notification(method, params)); }
  void result(json::value result) override { post(rpc::response(id_, result)); }
  void error(const rpc::Error& error) override { post(rpc::error_response(id_, error), true); }

 private:
  void post(std::string line, bool is_error = false) {
    asio::post(strand_, [weak = connection_, line = std::move(line), is_error]() mutable {
      if (auto c = weak.lock()) {
        if (is_error) c->count_error();
        c->send(std::move(line));
      }
    });
  }
  asio::any_io_executor strand_;
  std::weak_ptr<Connection> connection_;
  json::value id_;
};

void Connection::handle(const std::string& line) {
  json::value request_id;
  rpc::Request request;
  try {
    request = rpc::parse_request(line, {static_cast<size_t>(limits.line_bytes), limits.json_depth},
                                 &request_id);
  } catch (const rpc::Error& e) {
    ++server->malformed;
    count_error();
    send(rpc::error_response(request_id, e));
    return;
  }
  if (request.notification) return;  // e.g. notifications/initialized: nothing to answer
  auto replier = std::make_shared<ConnectionReplier>(socket.get_executor(), weak_from_this(), request.id);
  server->service.dispatch(id, std::move(request), std::move(replier));
}

bool Server::State::acquire_burst(const std::shared_ptr<Connection>& c) {
  std::lock_guard lock(burst_mu);
  if (bursts_running < burst_slots) {
    ++bursts_running;
    return true;
  }
  bursts_waiting.push_back(c);
  return false;
}

void Server::State::release_burst() {
  std::shared_ptr<Connection> next;
  {
    std::lock_guard lock(burst_mu);
    while (!next && !bursts_waiting.empty()) {
      next = bursts_waiting.front().lock();  // gone meanwhile: the next one
      bursts_waiting.pop_front();
    }
    if (!next) --bursts_running;
  }
  if (next) asio::post(next->socket.get_executor(), [next] { next->resume_burst(); });
}

void Server::State::requeue_burst(const std::shared_ptr<Connection>& c) {
  {
    std::lock_guard lock(burst_mu);
    bursts_waiting.push_back(c);
  }
  release_burst();
}

void Server::State::accept() {
  // Each accepted socket gets a strand of its own.
  acceptor.async_accept(asio::make_strand(io), [self = shared_from_this()](boost::system::error_code ec,
                                                                            local_socket::socket socket) {
    if (ec) {
      if (ec != asio::error::operation_aborted && self->acceptor.is_open()) {
        log_warn("accept failed", {{"error", ec.message()}});
        self->accept();
      }
      return;
    }
    ucred peer{};
    socklen_t len = sizeof peer;
    boost::system::error_code ignored;
    if (::getsockopt(socket.native_handle(), SOL_SOCKET, SO_PEERCRED, &peer, &len) != 0 || peer.uid != ::geteuid()) {
      ++self->refused_uid;
      log_warn("refused a connection from another user", {{"uid", std::to_string(peer.uid)}, {"pid", std::to_string(peer.pid)}});
      socket.close(ignored);
    } else {
      std::unique_lock lock(self->mu);
      const LimitsConfig limits = self->limits;
      if (self->open.load() >= limits.connections) {
        lock.unlock();
        ++self->refused_limit;
        const std::string refusal =
            rpc::error_response(nullptr, rpc::limit_exceeded,
                                "too many connections (limits.connections = " + std::to_string(limits.connections) + ")",
                                json::object{{"limit", limits.connections}});
        ::send(socket.native_handle(), refusal.data(), refusal.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        socket.close(ignored);
      } else {
        ++self->accepted;
        ++self->open;
        const ConnectionId id = self->next_id++;
        auto connection = std::make_shared<Connection>(self, id, std::move(socket), limits);
        self->connections[id] = connection;
        lock.unlock();
        asio::post(connection->socket.get_executor(), [connection] { connection->start(); });
      }
    }
    if (self->acceptor.is_open()) self->accept();
  });
}

Server::Server(asio::io_context& io, Service& service, std::string socket_path, const LimitsConfig& limits)
    : state_(std::make_shared<State>(io, service)), path_(std::move(socket_path)) {
  state_->path = path_;
  state_->limits = limits;
  if (path_.size() >= sizeof(sockaddr_un::sun_path)) {
    throw std::runtime_error("socket path " + path_ + " is longer than the " +
                             std::to_string(sizeof(sockaddr_un::sun_path) - 1) + " bytes a Unix socket allows");
  }
  prepare_directory(std::filesystem::path(path_).parent_path());
  const UnixListener listener = listen_unix(path_, "a daemon already listens at " + path_ + " (den stats talks to it)",
                                            "remove it or choose another --socket");
  boost::system::error_code ec;
  state_->acceptor.assign(local_socket(), listener.fd, ec);
  if (ec) {
    ::close(listener.fd);
    unlink_if_ours(path_, listener.inode);
    throw std::runtime_error("cannot listen at " + path_ + ": " + ec.message());
  }
  state_->socket_inode = listener.inode;
}

Server::~Server() {
  stop_accepting();
}

void Server::start() {
  asio::post(state_->acceptor.get_executor(), [s = state_] { s->accept(); });
}

void Server::stop_accepting() {
  // Runs on whatever thread; the acceptor's close is posted to its strand.
  auto s = state_;
  unlink_if_ours(path_, s->socket_inode);
  s->socket_inode = 0;
  if (s->io.stopped()) {
    boost::system::error_code ignored;
    s->acceptor.close(ignored);
    return;
  }
  asio::post(s->acceptor.get_executor(), [s] {
    boost::system::error_code ignored;
    s->acceptor.close(ignored);
  });
}

void Server::close_all() {
  std::vector<std::shared_ptr<Connection>> all;
  {
    std::lock_guard lock(state_->mu);
    for (auto& [id, c] : state_->connections) all.push_back(c);
  }
  for (auto& c : all) {
    asio::post(c->socket.get_executor(), [c] {
      c->close_when_written = true;
      if (!c->writing) c->close();
    });
  }
}

void Server::set_limits(const LimitsConfig& limits) {
  std::vector<std::shared_ptr<Connection>> all;
  {
    std::lock_guard lock(state_->mu);
    state_->limits = limits;
    for (auto& [id, c] : state_->connections) all.push_back(c);
  }
  for (auto& c : all) asio::post(c->socket.get_executor(), [c, limits] { c->limits = limits; });
}

json::object Server::stats() const {
  const State& s = *state_;
  return {{"open", s.open.load()},
          {"accepted", s.accepted.load()},
          {"refused_other_uid", s.refused_uid.load()},
          {"refused_over_limit", s.refused_limit.load()},
          {"dropped_slow", s.dropped_slow.load()},
          {"dropped_not_reading", s.dropped_unread.load()},
          {"oversized_lines", s.oversized_lines.load()},
          {"malformed_requests", s.malformed.load()},
          {"throttled", s.throttled.load()}};
}

}  // namespace den::runtime
