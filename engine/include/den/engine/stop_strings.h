// Stop strings over streamed text: text is released as soon as it can no longer be the start
// of a stop string; when one appears, everything before it is released and generation ends.
// Used by every generation loop (CLI and daemon).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace den::engine {

class StopStringFilter {
 public:
  explicit StopStringFilter(std::vector<std::string> stops);

  // Feeds newly decoded text; returns the text now safe to emit.
  std::string push(std::string_view text);
  // True once a stop string was seen (the text after it is dropped).
  bool stopped() const { return stopped_; }
  // Text held back at the end of generation (no stop string completed).
  std::string flush();

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace den::engine
