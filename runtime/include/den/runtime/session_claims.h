// Which activity holds a session: at most one of generating, appending, moving its KV,
// deleting — whether a client of the socket or an agent asked for it. Thread-safe.
#pragma once

#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "den/memory/session_manager.h"

namespace den::runtime {

class SessionClaims {
 public:
  // True when the session was free and is now held by `activity`; false (and the holder's
  // activity in `holder`) otherwise.
  bool try_claim(memory::SessionId id, std::string_view activity, std::string* holder = nullptr) {
    std::lock_guard lock(mutex_);
    auto [it, inserted] = held_.emplace(id, std::string(activity));
    if (!inserted && holder != nullptr) *holder = it->second;
    return inserted;
  }
  void release(memory::SessionId id) {
    std::lock_guard lock(mutex_);
    held_.erase(id);
  }
  std::optional<std::string> activity(memory::SessionId id) const {
    std::lock_guard lock(mutex_);
    auto it = held_.find(id);
    if (it == held_.end()) return std::nullopt;
    return it->second;
  }

 private:
  mutable std::mutex mutex_;
  std::map<memory::SessionId, std::string> held_;
};

}  // namespace den::runtime
