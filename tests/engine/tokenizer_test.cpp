// Tokenizers against the reference tokenizations in ../shared/tokenizers (produced by the
// Hugging Face tokenizers library), plus decoding properties.
#include <algorithm>
#include <string_view>

#include "den/engine/gguf.h"
#include "den/engine/tokenizer.h"
#include "test_support.h"

using namespace den;

namespace {

std::vector<std::string> split_inputs(const std::string& data) {
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t at; (at = data.find(sep, start)) != std::string::npos; start = at + sep.size()) {
    parts.push_back(data.substr(start, at - start));
  }
  if (start < data.size()) parts.push_back(data.substr(start));
  return parts;
}

// One line per input; each line starts with a space before the first id.
std::vector<std::string> split_lines(const std::string& data) {
  std::vector<std::string> lines;
  size_t start = 0;
  for (size_t at; (at = data.find('\n', start)) != std::string::npos; start = at + 1) {
    std::string line = data.substr(start, at - start);
    if (!line.empty() && line[0] == ' ') line.erase(0, 1);
    lines.push_back(line);
  }
  return lines;
}

std::string join(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) s += (s.empty() ? "" : " ") + std::to_string(id);
  return s;
}

bool valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    const size_t n = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xc0) != 0x80) return false;
    }
    i += n;
  }
  return true;
}

}  // namespace

TEST_CASE("every reference tokenization in ../shared/tokenizers is reproduced") {
  DEN_SKIP_UNLESS(test::file_exists(test::shared_path("tokenizers")), "../shared/tokenizers is absent");
  int vocabularies = 0;
  for (const char* name : {"llama-spm", "phi-3", "gpt-2", "starcoder", "deepseek-coder"}) {
    CAPTURE(name);
    const std::string base = test::shared_path(std::string("tokenizers/ggml-vocab-") + name + ".gguf");
    const engine::GgufFile file(base);
    const engine::Tokenizer tok(file);
    const auto inputs = split_inputs(test::read_file(base + ".inp"));
    const auto expected = split_lines(test::read_file(base + ".out"));
    REQUIRE(inputs.size() == expected.size());
    for (size_t i = 0; i < inputs.size(); ++i) {
      CAPTURE(inputs[i]);
      const std::vector<int32_t> ids = tok.encode(inputs[i], false, false);
      CHECK(join(ids) == expected[i]);
      // Decoding gives the text back (SentencePiece: minus the dummy-prefix space it added).
      CHECK(tok.decode(ids) == inputs[i]);
    }
    ++vocabularies;
  }
  CHECK(vocabularies == 5);
}

TEST_CASE("streaming decode never splits a UTF-8 character") {
  DEN_SKIP_UNLESS(test::file_exists(test::shared_path("tokenizers")), "../shared/tokenizers is absent");
  for (const char* name : {"llama-spm", "gpt-2"}) {
    const engine::GgufFile file(test::shared_path(std::string("tokenizers/ggml-vocab-") + name + ".gguf"));
    const engine::Tokenizer tok(file);
    const std::string text = "naïve café, 日本語のテキスト, emoji 🦙🌧️ and Ελληνικά";
    const auto ids = tok.encode(text, false, false);
    engine::TokenStreamDecoder decoder(tok, -1);
    std::string joined;
    int pieces_held_back = 0;
    for (int32_t id : ids) {
      const std::string piece = decoder.push(id);
      CHECK(valid_utf8(piece));
      if (piece.empty()) ++pieces_held_back;
      joined += piece;
    }
    joined += decoder.flush();
    CHECK(joined == text);
    if (std::string_view(name) == "llama-spm") CHECK(pieces_held_back > 0);  // byte-fallback tokens were held
  }
}

TEST_CASE("special tokens are text unless parse_special") {
  DEN_SKIP_UNLESS(test::file_exists(test::shared_path("tokenizers")), "../shared/tokenizers is absent");
  const engine::GgufFile file(test::shared_path("tokenizers/ggml-vocab-gpt-2.gguf"));
  const engine::Tokenizer tok(file);
  const auto plain = tok.encode("a<|endoftext|>b", false, false);
  const auto special = tok.encode("a<|endoftext|>b", false, true);
  CHECK(special.size() == 3);
  CHECK(special[1] == 50256);
  CHECK(plain.size() > 3);
  CHECK(std::find(plain.begin(), plain.end(), 50256) == plain.end());
  CHECK(tok.is_end_of_generation(50256));
  CHECK(tok.decode(special) == "ab");               // control tokens decode to nothing...
  CHECK(tok.decode(special, true) == "a<|endoftext|>b");  // ...unless asked for
}

TEST_CASE("SentencePiece: BOS, dummy prefix and byte fallback") {
  DEN_SKIP_UNLESS(test::file_exists(test::stories_model()), "../shared/models/stories260K is absent");
  const engine::GgufFile file(test::stories_model());
  const engine::Tokenizer tok(file);
  CHECK(tok.model() == engine::Tokenizer::Model::spm);
  CHECK(tok.add_bos_by_default());
  CHECK(tok.encode("", true, false) == std::vector<int32_t>{1});
  CHECK(tok.encode("", false, false).empty());
  // " Once" is one token with the dummy prefix (the oracle's first token is 403 " Once").
  CHECK(tok.encode("Once", true, false) == std::vector<int32_t>{1, 403});
  // A character outside the 512-token vocabulary falls back to its UTF-8 bytes (<0xXX> = byte + 3).
  const auto ids = tok.encode("\xf0\x9d\x84\x9e", false, false);  // U+1D11E, musical G clef
  CHECK(ids == std::vector<int32_t>{410, 0xf0 + 3, 0x9d + 3, 0x84 + 3, 0x9e + 3});
  CHECK(tok.decode(ids) == "\xf0\x9d\x84\x9e");
}
