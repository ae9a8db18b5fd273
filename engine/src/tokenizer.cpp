// Tokenizer: vocabulary loading from GGUF, special-token partitioning, SentencePiece-BPE and
// byte-level BPE encoding, and decoding (whole and streaming).
#include "den/engine/tokenizer.h"

#include <algorithm>
#include <array>
#include <stdexcept>
#include <utility>

#include "den/engine/gguf.h"
#include "pre_tokenizer.h"
#include "symbol_merge.h"
#include "utf8.h"

namespace den::engine {
namespace {

constexpr std::string_view kSpmSpace = "\xe2\x96\x81";  // U+2581, SentencePiece's visible space

// GPT-2's reversible byte <-> printable-character map used by byte-level BPE vocabularies:
// printable Latin-1 bytes stand for themselves, the other 68 bytes map to U+0100 onwards.
struct ByteLevelMap {
  std::array<std::string, 256> byte_to_text;
  std::unordered_map<uint32_t, uint8_t> codepoint_to_byte;

  ByteLevelMap() {
    uint32_t next_extra = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      const uint32_t cp = printable ? b : next_extra++;
      utf8::append_codepoint(byte_to_text[b], cp);
      codepoint_to_byte[cp] = static_cast<uint8_t>(b);
    }
  }
};

const ByteLevelMap& byte_level_map() {
  static const ByteLevelMap map;
  return map;
}

std::optional<int32_t> optional_id(const GgufFile& file, std::string_view key, int32_t n_vocab) {
  const auto v = file.get_int_opt(key);
  if (!v) return std::nullopt;
  if (*v < 0 || *v >= n_vocab) {
    // Some converters write -1 or an out-of-range id for "none"; treat it as absent.
    return std::nullopt;
  }
  return static_cast<int32_t>(*v);
}

}  // namespace

Tokenizer::Tokenizer(const GgufFile& file) {
  const std::string_view model = file.get_string("tokenizer.ggml.model");
  if (model == "llama") {
    model_ = Model::spm;
  } else if (model == "gpt2") {
    model_ = Model::bpe;
  } else {
    throw std::runtime_error("cannot load the tokenizer of '" + file.path() + "': tokenizer.ggml.model '" +
                             std::string(model) + "' is not supported (supported: llama, gpt2)");
  }

  const auto tokens = file.get_string_array("tokenizer.ggml.tokens");
  if (tokens.empty() || tokens.size() > (1u << 24)) {
    throw std::runtime_error("cannot load the tokenizer of '" + file.path() + "': tokenizer.ggml.tokens has " +
                             std::to_string(tokens.size()) + " entries");
  }
  const auto n_vocab = static_cast<int32_t>(tokens.size());
  pieces_.assign(tokens.begin(), tokens.end());

  if (file.find("tokenizer.ggml.scores") != nullptr) {
    scores_ = file.get_float_array("tokenizer.ggml.scores");
    if (scores_.size() != pieces_.size()) {
      throw std::runtime_error("cannot load the tokenizer of '" + file.path() + "': " +
                               std::to_string(scores_.size()) + " scores for " + std::to_string(pieces_.size()) +
                               " tokens");
    }
  } else {
    scores_.assign(pieces_.size(), 0.0f);
  }
  kinds_.assign(pieces_.size(), TokenKind::normal);
  if (file.find("tokenizer.ggml.token_type") != nullptr) {
    const auto types = file.get_int_array("tokenizer.ggml.token_type");
    if (types.size() != pieces_.size()) {
      throw std::runtime_error("cannot load the tokenizer of '" + file.path() + "': " +
                               std::to_string(types.size()) + " token types for " + std::to_string(pieces_.size()) +
                               " tokens");
    }
    for (size_t i = 0; i < types.size(); ++i) {
      kinds_[i] = (types[i] >= 0 && types[i] <= 6) ? static_cast<TokenKind>(types[i]) : TokenKind::normal;
    }
  }

  piece_to_id_.reserve(pieces_.size());
  for (int32_t id = 0; id < n_vocab; ++id) piece_to_id_.emplace(pieces_[static_cast<size_t>(id)], id);

  bos_ = optional_id(file, "tokenizer.ggml.bos_token_id", n_vocab);
  eos_ = optional_id(file, "tokenizer.ggml.eos_token_id", n_vocab);
  unk_ = optional_id(file, "tokenizer.ggml.unknown_token_id", n_vocab);
  add_bos_ = file.get_bool_or("tokenizer.ggml.add_bos_token", model_ == Model::spm);
  add_space_prefix_ = file.get_bool_or("tokenizer.ggml.add_space_prefix", model_ == Model::spm);

  if (model_ == Model::spm) {
    byte_tokens_.assign(256, -1);
    for (int b = 0; b < 256; ++b) {
      static constexpr char kHex[] = "0123456789ABCDEF";
      const std::string name = std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">";
      if (auto id = find(name)) byte_tokens_[static_cast<size_t>(b)] = *id;
    }
  } else {
    pre_name_ = std::string(file.get_string_opt("tokenizer.ggml.pre").value_or("default"));
    try {
      pre_tokenizer_ = std::make_unique<PreTokenizer>(pre_name_);
    } catch (const std::runtime_error& e) {
      throw std::runtime_error("cannot load the tokenizer of '" + file.path() + "': " + e.what());
    }
    ignore_merges_ = pre_name_ == "llama3" || pre_name_ == "llama-bpe";
    const auto merges = file.get_string_array("tokenizer.ggml.merges");
    merge_rank_.reserve(merges.size());
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const std::string_view m = merges[rank];
      // "left right": the separator is the first space after the first character (a piece
      // never contains a raw space in byte-level vocabularies).
      const size_t split = m.find(' ', 1);
      if (split == std::string_view::npos) {
        throw std::runtime_error("cannot load the tokenizer of '" + file.path() + "': merge " +
                                 std::to_string(rank) + " ('" + std::string(m) + "') has no separating space");
      }
      merge_rank_.emplace(std::string(m), static_cast<int32_t>(rank));
    }
  }

  for (int32_t id = 0; id < n_vocab; ++id) {
    const TokenKind k = kinds_[static_cast<size_t>(id)];
    if ((k == TokenKind::control || k == TokenKind::user_defined) && !pieces_[static_cast<size_t>(id)].empty()) {
      specials_.push_back(id);
    }
  }
  std::stable_sort(specials_.begin(), specials_.end(), [&](int32_t a, int32_t b) {
    return pieces_[static_cast<size_t>(a)].size() > pieces_[static_cast<size_t>(b)].size();
  });

  // End of generation: the declared ids plus end-of-turn markers of well-known chat formats.
  auto add_eog = [&](std::optional<int32_t> id) {
    if (id && std::find(eog_.begin(), eog_.end(), *id) == eog_.end()) eog_.push_back(*id);
  };
  add_eog(eos_);
  add_eog(optional_id(file, "tokenizer.ggml.eot_token_id", n_vocab));
  add_eog(optional_id(file, "tokenizer.ggml.eom_token_id", n_vocab));
  for (std::string_view marker : {"<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                                  "<|endoftext|>", "<｜end▁of▁sentence｜>"}) {
    if (auto id = find(marker); id && kind(*id) == TokenKind::control) add_eog(id);
  }
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::optional<int32_t> Tokenizer::find(std::string_view piece) const {
  auto it = piece_to_id_.find(piece);
  if (it == piece_to_id_.end()) return std::nullopt;
  return it->second;
}

bool Tokenizer::is_end_of_generation(int32_t id) const {
  return std::find(eog_.begin(), eog_.end(), id) != eog_.end();
}

std::vector<Tokenizer::Fragment> Tokenizer::split_special(std::string_view text, bool parse_special) const {
  std::vector<Fragment> fragments;
  size_t raw_start = 0;
  size_t i = 0;
  while (i < text.size()) {
    int32_t matched = -1;
    for (int32_t id : specials_) {  // longest first
      if (!parse_special && kind(id) == TokenKind::control) continue;
      const std::string& p = pieces_[static_cast<size_t>(id)];
      if (text.compare(i, p.size(), p) == 0) {
        matched = id;
        break;
      }
    }
    if (matched < 0) {
      ++i;
      continue;
    }
    if (i > raw_start) fragments.push_back({text.substr(raw_start, i - raw_start), -1});
    fragments.push_back({{}, matched});
    i += pieces_[static_cast<size_t>(matched)].size();
    raw_start = i;
  }
  if (raw_start < text.size()) fragments.push_back({text.substr(raw_start), -1});
  return fragments;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos, bool parse_special) const {
  std::vector<int32_t> out;
  if (add_bos && bos_) out.push_back(*bos_);
  bool after_special = true;  // the start of the text counts as "after a special token"
  for (const Fragment& f : split_special(text, parse_special)) {
    if (f.token >= 0) {
      out.push_back(f.token);
      after_special = true;
      continue;
    }
    if (model_ == Model::spm) {
      encode_spm(f.text, after_special, out);
    } else {
      encode_bpe(f.text, out);
    }
    after_special = false;
  }
  return out;
}

void Tokenizer::add_byte_fallback(unsigned char byte, std::vector<int32_t>& out) const {
  const int32_t id = byte_tokens_.empty() ? -1 : byte_tokens_[byte];
  if (id >= 0) {
    out.push_back(id);
  } else if (unk_) {
    out.push_back(*unk_);
  }
}

void Tokenizer::encode_spm(std::string_view text, bool after_special, std::vector<int32_t>& out) const {
  // SentencePiece sees spaces as U+2581 and, with the dummy prefix, a space before the text.
  std::string escaped;
  escaped.reserve(text.size() + 8);
  if (add_space_prefix_ && after_special) escaped += kSpmSpace;
  for (char c : text) {
    if (c == ' ') {
      escaped += kSpmSpace;
    } else {
      escaped += c;
    }
  }
  std::vector<MergeSymbol> symbols = split_into_symbols(escaped, utf8::char_length);
  merge_symbols(escaped, symbols, [&](std::string_view l, std::string_view r) -> std::optional<double> {
    std::string joined;
    joined.reserve(l.size() + r.size());
    joined.append(l).append(r);
    auto id = find(joined);
    if (!id) return std::nullopt;
    return scores_[static_cast<size_t>(*id)];
  });
  for (const MergeSymbol& s : symbols) {
    if (s.length == 0) continue;
    const std::string_view piece = std::string_view(escaped).substr(s.begin, s.length);
    if (auto id = find(piece)) {
      out.push_back(*id);
    } else {
      for (char c : piece) add_byte_fallback(static_cast<unsigned char>(c), out);
    }
  }
}

void Tokenizer::encode_bpe(std::string_view text, std::vector<int32_t>& out) const {
  std::vector<std::string_view> words;
  pre_tokenizer_->split(text, words);
  for (std::string_view word : words) bpe_word(word, out);
}

void Tokenizer::bpe_word(std::string_view word, std::vector<int32_t>& out) const {
  const ByteLevelMap& map = byte_level_map();
  std::string mapped;
  mapped.reserve(word.size() * 2);
  for (char c : word) mapped += map.byte_to_text[static_cast<unsigned char>(c)];
  if (ignore_merges_) {
    if (auto id = find(mapped)) {
      out.push_back(*id);
      return;
    }
  }
  std::vector<MergeSymbol> symbols = split_into_symbols(mapped, utf8::char_length);
  std::string key;
  merge_symbols(mapped, symbols, [&](std::string_view l, std::string_view r) -> std::optional<double> {
    key.assign(l).append(" ").append(r);
    auto it = merge_rank_.find(key);
    if (it == merge_rank_.end()) return std::nullopt;
    return -static_cast<double>(it->second);
  });
  for (const MergeSymbol& s : symbols) {
    if (s.length == 0) continue;
    const std::string_view piece = std::string_view(mapped).substr(s.begin, s.length);
    if (auto id = find(piece)) {
      out.push_back(*id);
      continue;
    }
    // A piece missing from the vocabulary (a broken merge list): fall back to its characters.
    for (size_t i = 0; i < piece.size();) {
      const size_t n = utf8::char_length(piece, i);
      if (auto id = find(piece.substr(i, n))) {
        out.push_back(*id);
      } else if (unk_) {
        out.push_back(*unk_);
      }
      i += n;
    }
  }
}

std::string Tokenizer::token_bytes(int32_t id, bool render_control) const {
  if (!valid(id)) return {};
  const std::string& p = pieces_[static_cast<size_t>(id)];
  switch (kind(id)) {
    case TokenKind::control:
      return render_control ? p : std::string();
    case TokenKind::unused:
      return {};
    case TokenKind::user_defined:
      return p;
    case TokenKind::byte:
      if (model_ == Model::spm && p.size() == 6 && p.starts_with("<0x")) {
        return std::string(1, static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16)));
      }
      break;
    default:
      break;
  }
  std::string out;
  if (model_ == Model::spm) {
    for (size_t i = 0; i < p.size();) {
      if (p.compare(i, kSpmSpace.size(), kSpmSpace) == 0) {
        out += ' ';
        i += kSpmSpace.size();
      } else {
        out += p[i++];
      }
    }
    return out;
  }
  const ByteLevelMap& map = byte_level_map();
  for (size_t i = 0; i < p.size();) {
    const size_t n = utf8::valid_char_length(p, i);
    if (n == 0) {
      out += p[i++];
      continue;
    }
    const uint32_t cp = utf8::decode_at(p, i, n);
    auto it = map.codepoint_to_byte.find(cp);
    if (it != map.codepoint_to_byte.end()) {
      out += static_cast<char>(it->second);
    } else {
      out.append(p, i, n);  // not a byte-level character: keep the text as it is
    }
    i += n;
  }
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool render_control) const {
  TokenStreamDecoder decoder(*this, -1, render_control);
  std::string out;
  for (int32_t id : ids) out += decoder.push(id);
  return out + decoder.flush();
}

TokenStreamDecoder::TokenStreamDecoder(const Tokenizer& tokenizer, int32_t previous_token, bool render_control)
    : tokenizer_(tokenizer), previous_(previous_token), render_control_(render_control) {}

std::string TokenStreamDecoder::push(int32_t id) {
  std::string bytes = tokenizer_.token_bytes(id, render_control_);
  // SentencePiece's dummy prefix: the first word after the sequence start or BOS carries a
  // space the text never had.
  const bool at_start = previous_ < 0 || (tokenizer_.bos() && previous_ == *tokenizer_.bos());
  if (tokenizer_.model() == Tokenizer::Model::spm && tokenizer_.add_space_prefix() && at_start &&
      !bytes.empty() && bytes[0] == ' ' && tokenizer_.kind(id) != TokenKind::byte) {
    bytes.erase(0, 1);
  }
  if (!tokenizer_.valid(id) || tokenizer_.kind(id) != TokenKind::control || render_control_) previous_ = id;
  pending_ += bytes;
  const size_t keep = utf8::incomplete_tail_length(pending_);
  std::string ready = pending_.substr(0, pending_.size() - keep);
  pending_.erase(0, pending_.size() - keep);
  return ready;
}

std::string TokenStreamDecoder::flush() { return std::exchange(pending_, {}); }

}  // namespace den::engine
