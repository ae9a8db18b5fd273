// Structured logs on stderr, one logfmt line per event:
//   ts=2026-11-27T22:40:00.123Z level=info msg="listening" socket=/run/user/1000/den/den.sock
// journald and `grep` read them as they are; values with spaces or quotes are quoted.
#pragma once

#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

#include "den/runtime/config.h"

namespace den::runtime {

using LogField = std::pair<std::string_view, std::string>;

void set_log_level(LogLevel level);
LogLevel log_level();
void log(LogLevel level, std::string_view message, std::initializer_list<LogField> fields = {});

inline void log_debug(std::string_view m, std::initializer_list<LogField> f = {}) { log(LogLevel::debug, m, f); }
inline void log_info(std::string_view m, std::initializer_list<LogField> f = {}) { log(LogLevel::info, m, f); }
inline void log_warn(std::string_view m, std::initializer_list<LogField> f = {}) { log(LogLevel::warn, m, f); }
inline void log_error(std::string_view m, std::initializer_list<LogField> f = {}) { log(LogLevel::error, m, f); }

}  // namespace den::runtime
