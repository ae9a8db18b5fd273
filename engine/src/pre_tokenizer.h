// Pre-tokenizers of byte-level BPE vocabularies: the regex splits that cut text into words
// before BPE, selected by GGUF's tokenizer.ggml.pre. Regexes run on PCRE2 in Unicode mode.
// Private to engine; used by Tokenizer.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace den::engine {

class PreTokenizer {
 public:
  // Throws std::runtime_error for an unknown name, listing the supported ones.
  explicit PreTokenizer(std::string_view name);
  ~PreTokenizer();
  PreTokenizer(const PreTokenizer&) = delete;
  PreTokenizer& operator=(const PreTokenizer&) = delete;

  // Appends the words of `text` (views into it) in order; their concatenation is `text`.
  void split(std::string_view text, std::vector<std::string_view>& words) const;

  static std::string_view supported_names();

 private:
  struct Regex;
  std::vector<std::unique_ptr<Regex>> stages_;  // applied in order, each to every piece
};

}  // namespace den::engine
