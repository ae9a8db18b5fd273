// Tokenizers built from GGUF metadata: SentencePiece-BPE ("llama": byte fallback, dummy-prefix
// space) and byte-level BPE ("gpt2", with the pre-tokenizer the file names), special tokens,
// and a streaming decoder that never splits a UTF-8 character.
// Used by the CLI (tokenize, generate, chat), chat templates and, later, the daemon.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace den::engine {

class GgufFile;
class PreTokenizer;

// GGUF tokenizer.ggml.token_type values.
enum class TokenKind : uint8_t {
  undefined = 0,
  normal = 1,
  unknown = 2,
  control = 3,
  user_defined = 4,
  unused = 5,
  byte = 6,
};

class Tokenizer {
 public:
  enum class Model { spm, bpe };

  // Throws GgufError / std::runtime_error naming the file and the key when the vocabulary is
  // missing, inconsistent, or of an unsupported kind.
  explicit Tokenizer(const GgufFile& file);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Text to ids. add_bos prepends BOS; parse_special matches control-token text (e.g.
  // "<|im_start|>") as those tokens, otherwise it is ordinary text. User-defined tokens are
  // always matched, as the reference tokenizers do.
  std::vector<int32_t> encode(std::string_view text, bool add_bos, bool parse_special) const;

  // The bytes a token decodes to (control tokens decode to nothing unless render_control).
  std::string token_bytes(int32_t id, bool render_control = false) const;
  // Whole-sequence decode, with the leading-space rule of SentencePiece models.
  std::string decode(std::span<const int32_t> ids, bool render_control = false) const;

  Model model() const { return model_; }
  std::string_view pre_tokenizer_name() const { return pre_name_; }
  int32_t n_vocab() const { return static_cast<int32_t>(pieces_.size()); }
  std::string_view piece(int32_t id) const { return pieces_[static_cast<size_t>(id)]; }
  TokenKind kind(int32_t id) const { return kinds_[static_cast<size_t>(id)]; }
  bool valid(int32_t id) const { return id >= 0 && id < n_vocab(); }
  std::optional<int32_t> find(std::string_view piece) const;

  std::optional<int32_t> bos() const { return bos_; }
  std::optional<int32_t> eos() const { return eos_; }
  bool add_bos_by_default() const { return add_bos_; }
  bool add_space_prefix() const { return add_space_prefix_; }
  // EOS, EOT, EOM and the end-of-turn tokens of well-known chat formats present in the vocabulary.
  bool is_end_of_generation(int32_t id) const;
  std::span<const int32_t> end_of_generation_ids() const { return eog_; }

 private:
  friend class TokenStreamDecoder;
  struct Fragment {
    std::string_view text;  // raw text when token < 0
    int32_t token = -1;
  };
  std::vector<Fragment> split_special(std::string_view text, bool parse_special) const;
  void encode_spm(std::string_view text, bool after_special, std::vector<int32_t>& out) const;
  void encode_bpe(std::string_view text, std::vector<int32_t>& out) const;
  void bpe_word(std::string_view word, std::vector<int32_t>& out) const;
  void add_byte_fallback(unsigned char byte, std::vector<int32_t>& out) const;

  Model model_ = Model::spm;
  std::string pre_name_;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::vector<TokenKind> kinds_;
  std::unordered_map<std::string_view, int32_t> piece_to_id_;
  std::unordered_map<std::string, int32_t> merge_rank_;  // "left right" -> rank (BPE)
  std::vector<int32_t> byte_tokens_;                     // byte -> id of "<0xXX>" (SPM), or -1
  std::vector<int32_t> specials_;  // control + user-defined ids, longest text first
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  std::optional<int32_t> bos_, eos_, unk_;
  std::vector<int32_t> eog_;
  bool add_bos_ = false;
  bool add_space_prefix_ = true;
  bool ignore_merges_ = false;
};

// Incremental decoding for streaming: feed ids, get text that always ends on a whole UTF-8
// character (an incomplete character waits for the next token; flush() releases what is left).
class TokenStreamDecoder {
 public:
  // previous_token: the token before the first one fed (for the leading-space rule), or -1.
  TokenStreamDecoder(const Tokenizer& tokenizer, int32_t previous_token, bool render_control = false);
  std::string push(int32_t id);
  std::string flush();

 private:
  const Tokenizer& tokenizer_;
  int32_t previous_;
  bool render_control_;
  std::string pending_;
};

}  // namespace den::engine
