#include "den/memory/failpoints.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>

namespace den::memory {
namespace {

struct Armed {
  FailAction action;
  int64_t on_hit;
  int64_t hits = 0;
};

std::atomic<bool> any_armed{false};
std::mutex armed_mutex;
std::map<std::string, Armed, std::less<>> armed;

const FailpointInfo* find_point(std::string_view name) {
  const auto& all = known_failpoints();
  const auto it = std::find_if(all.begin(), all.end(), [&](const FailpointInfo& f) { return f.name == name; });
  return it == all.end() ? nullptr : &*it;
}

}  // namespace

FailpointError::FailpointError(std::string_view name)
    : IoError("failpoint '" + std::string(name) + "' fired (an injected I/O error)", EIO) {}

const std::vector<FailpointInfo>& known_failpoints() {
  static const std::vector<FailpointInfo> all = {
      {"checkpoint.after_write", "a checkpoint's segment: its blocks written, not yet fsynced"},
      {"checkpoint.after_fsync", "the segment fsynced under its temporary name"},
      {"checkpoint.after_rename", "the segment renamed to its final name, directory not yet fsynced"},
      {"checkpoint.after_fsync_dir", "the segment durable, its SQLite rows not yet committed"},
      {"checkpoint.after_commit", "the checkpoint committed in SQLite, not yet answered", false},
      {"sqlite.before_commit", "any SQLite write transaction (session and agent stores), before COMMIT"},
      {"sqlite.after_commit", "any SQLite write transaction, after COMMIT", false},
      {"cleanup.remove_segment", "removing a segment no session needs any more (its row already gone)"},
      {"agents.begin_run", "an agent's next run (a timer, a message, a full context) being begun in the store"},
      {"agents.end_run", "an agent run's end (completed or failed, its ctx.state) being committed in the store"},
      {"agents.start_run", "an agent run being set up: its journal read, its handler and arguments pushed"},
      {"agents.serialize_state", "an agent handler's ctx.state being converted for its commit", false},
      {"agents.after_compact", "an agent's history compacted and saved, the effect that needed the room not yet journaled", false},
      {"agents.before_ack", "a message stored for an agent, before agents/send answers"},
      {"sessions.before_ack", "a session change stored, before the client's answer is sent"},
  };
  return all;
}

void failpoint(std::string_view name) {
  if (!any_armed.load(std::memory_order_relaxed)) return;
  FailAction action;
  {
    std::lock_guard lock(armed_mutex);
    const auto it = armed.find(name);
    if (it == armed.end() || ++it->second.hits != it->second.on_hit) return;
    action = it->second.action;
  }
  if (action == FailAction::crash) {
    ::kill(::getpid(), SIGKILL);
    ::_exit(137);  // SIGKILL cannot be blocked; this is never reached
  }
  throw FailpointError(name);
}

void arm_failpoint(std::string_view name, FailAction action, int64_t on_hit) {
  const FailpointInfo* point = find_point(name);
  if (point == nullptr) throw std::invalid_argument("unknown failpoint '" + std::string(name) + "'");
  if (on_hit < 1) throw std::invalid_argument("failpoint '" + std::string(name) + "': the hit to fire on counts from 1");
  if (action == FailAction::error && !point->errors)
    throw std::invalid_argument("failpoint '" + std::string(name) +
                                "' only crashes: nothing real can fail there (" + std::string(point->where) + ")");
  std::lock_guard lock(armed_mutex);
  armed[std::string(name)] = Armed{action, on_hit};
  any_armed.store(true);
}

void disarm_failpoints() {
  std::lock_guard lock(armed_mutex);
  armed.clear();
  any_armed.store(false);
}

int64_t failpoint_hits(std::string_view name) {
  std::lock_guard lock(armed_mutex);
  const auto it = armed.find(name);
  return it == armed.end() ? 0 : it->second.hits;
}

std::vector<std::string> arm_failpoints_from_env() {
  const char* spec = std::getenv("DEN_FAILPOINTS");
  std::vector<std::string> names;
  if (spec == nullptr) return names;
  std::string_view rest(spec);
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    const std::string_view entry = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    if (entry.empty()) continue;
    const auto bad = [&](const std::string& why) {
      return std::invalid_argument("DEN_FAILPOINTS: '" + std::string(entry) + "': " + why +
                                   " (expected name=crash|error[@N], comma-separated)");
    };
    const size_t eq = entry.find('=');
    if (eq == std::string_view::npos) throw bad("no '='");
    const std::string_view name = entry.substr(0, eq);
    std::string_view action = entry.substr(eq + 1);
    int64_t on_hit = 1;
    if (const size_t at = action.find('@'); at != std::string_view::npos) {
      const std::string count(action.substr(at + 1));
      char* end = nullptr;
      on_hit = std::strtoll(count.c_str(), &end, 10);
      if (count.empty() || *end != '\0' || on_hit < 1) throw bad("the hit count after '@' must be a whole number >= 1");
      action = action.substr(0, at);
    }
    if (action != "crash" && action != "error") throw bad("the action must be crash or error");
    const FailpointInfo* point = find_point(name);
    if (point == nullptr) throw bad("no failpoint is called '" + std::string(name) + "'");
    if (action == "error" && !point->errors) throw bad("this point only crashes: nothing real can fail there");
    arm_failpoint(name, action == "crash" ? FailAction::crash : FailAction::error, on_hit);
    names.emplace_back(name);
  }
  return names;
}

}  // namespace den::memory
