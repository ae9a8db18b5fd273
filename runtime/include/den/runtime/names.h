// The names people give sessions and agents: 1-64 characters of A-Z a-z 0-9 . _ - (safe in
// file names, log lines and shell arguments without quoting).
#pragma once

#include <string_view>

namespace den::runtime {

inline bool valid_name(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

}  // namespace den::runtime
