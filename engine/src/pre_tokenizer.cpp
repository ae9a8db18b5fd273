// Pre-tokenizer regexes. Each stage splits every current piece into matches and the gaps
// between them ("isolated" splitting, as the Hugging Face tokenizers library does).
// Invalid UTF-8 never reaches PCRE2: such bytes become one-byte words of their own.
#include "pre_tokenizer.h"

#include <pcre2.h>

#include <array>
#include <memory>
#include <new>
#include <stdexcept>

#include "utf8.h"

namespace den::engine {
namespace {

// GPT-2's word pattern (contractions, letters, numbers, other symbols, whitespace).
constexpr const char* kGpt2 =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
// Llama 3's pattern: case-insensitive contractions, numbers in groups of up to three.
constexpr const char* kLlama3 =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// Qwen2: as Llama 3 but single digits.
constexpr const char* kQwen2 =
    R"((?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// Digits split one by one (StarCoder, SmolLM).
constexpr const char* kSingleDigits = R"(\p{N})";

struct Definition {
  std::string_view name;
  std::vector<const char*> stages;
};

const std::vector<Definition>& definitions() {
  static const std::vector<Definition> defs = {
      {"default", {kGpt2}},
      {"gpt-2", {kGpt2}},
      {"gpt2", {kGpt2}},
      {"starcoder", {kSingleDigits, kGpt2}},
      {"smollm", {kSingleDigits, kGpt2}},
      {"refact", {kSingleDigits, kGpt2}},
      {"llama3", {kLlama3}},
      {"llama-bpe", {kLlama3}},
      {"qwen2", {kQwen2}},
      // DeepSeek Coder: the splits of its tokenizer.json, code points written as escapes
      // (several are singletons that Unicode normalisation would silently change).
      {"deepseek-coder",
       {"[\\r\\n]",
        "\\s?[A-Za-z\\x{B5}\\x{C0}-\\x{D6}\\x{D8}-\\x{F6}\\x{F8}-\\x{1BA}\\x{1BC}-\\x{1BF}\\x{1C4}-\\x{293}\\x{295}-\\x{2AF}\\x{370}-\\x{373}\\x{376}\\x{377}\\x{37B}-\\x{37D}\\x{37F}\\x{386}\\x{388}-\\x{38A}\\x{38C}\\x{38E}-\\x{3A1}\\x{3A3}-\\x{3F5}\\x{3F7}-\\x{481}\\x{48A}-\\x{52F}\\x{531}-\\x{556}\\x{10A0}-\\x{10C5}\\x{13A0}-\\x{13F5}\\x{13F8}-\\x{13FD}\\x{1C90}-\\x{1CBA}\\x{1CBD}-\\x{1CBF}\\x{1D00}-\\x{1D2B}\\x{1D6B}-\\x{1D77}\\x{1D79}-\\x{1D9A}\\x{1E00}-\\x{1F15}\\x{1F18}-\\x{1F1D}\\x{1F20}-\\x{1F45}\\x{1F48}-\\x{1F4D}\\x{1F50}-\\x{1F57}\\x{1F59}\\x{1F5B}\\x{1F5D}\\x{1F5F}-\\x{1F7D}\\x{1F80}-\\x{1FB4}\\x{1FB6}-\\x{1FBC}\\x{1FBE}\\x{1FC2}-\\x{1FC4}\\x{1FC6}-\\x{1FCC}\\x{1FD0}-\\x{1FD3}\\x{1FD6}-\\x{1FDB}\\x{1FE0}-\\x{1FEC}\\x{1FF2}-\\x{1FF4}\\x{1FF6}-\\x{1FFC}\\x{2102}\\x{2107}\\x{210A}-\\x{2113}\\x{2115}\\x{2119}-\\x{211D}\\x{2124}\\x{2126}\\x{2128}\\x{212A}-\\x{212D}\\x{212F}-\\x{2134}\\x{2139}\\x{213C}-\\x{213F}\\x{2145}-\\x{2149}\\x{214E}\\x{2183}\\x{2184}\\x{2C00}-\\x{2C7B}\\x{2C7E}-\\x{2CE4}\\x{2CEB}-\\x{2CEE}\\x{2CF2}\\x{2CF3}\\x{A640}-\\x{A66D}\\x{A680}-\\x{A69B}\\x{A722}-\\x{A76F}\\x{A771}-\\x{A787}\\x{A78B}-\\x{A78E}\\x{AB70}-\\x{ABBF}\\x{FB00}-\\x{FB06}\\x{FB13}-\\x{FB17}\\x{FF21}-\\x{FF3A}\\x{FF41}-\\x{FF5A}\\x{10400}-\\x{1044F}\\x{104B0}-\\x{104D3}\\x{104D8}-\\x{104FB}\\x{10C80}-\\x{10CB2}\\x{10CC0}-\\x{10CF2}\\x{118A0}-\\x{118DF}\\x{1E900}-\\x{1E943}]+",
        "\\s?[!-/:-~\\x{FF01}-\\x{FF0F}\\x{FF1A}-\\x{FF5E}\\x{2018}-\\x{201F}\\x{3000}-\\x{3002}]+",
        "\\s+$",
        "[\\x{4E00}-\\x{9FA5}\\x{800}-\\x{4E00}\\x{AC00}-\\x{D7FF}]+",
        "\\p{N}+"}},
  };
  return defs;
}

}  // namespace

struct PreTokenizer::Regex {
  pcre2_code* code = nullptr;

  explicit Regex(const char* pattern) {
    int error = 0;
    PCRE2_SIZE error_offset = 0;
    code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &error,
                         &error_offset, nullptr);
    if (code == nullptr) {
      std::array<PCRE2_UCHAR, 256> message{};
      pcre2_get_error_message(error, message.data(), message.size());
      throw std::logic_error(std::string("pre-tokenizer regex does not compile: ") +
                             reinterpret_cast<const char*>(message.data()));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // optional speed-up; the interpreter is the fallback
  }
  ~Regex() { pcre2_code_free(code); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Splits valid UTF-8 `piece` into matches and gaps. Match data is per call so that one
  // tokenizer can serve several threads.
  void split(std::string_view piece, std::vector<std::string_view>& out) const {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> owner(
        pcre2_match_data_create_from_pattern(code, nullptr), &pcre2_match_data_free);
    if (!owner) throw std::bad_alloc();
    pcre2_match_data* match = owner.get();
    size_t start = 0;  // start of the current gap
    size_t offset = 0;
    while (offset < piece.size()) {
      const int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(piece.data()), piece.size(), offset,
                                 PCRE2_NO_UTF_CHECK, match, nullptr);
      if (rc < 0) break;  // no further match (PCRE2_ERROR_NOMATCH) or a resource limit: rest is a gap
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(match);
      const size_t m_begin = ov[0], m_end = ov[1];
      if (m_end == m_begin) {  // empty match: step over one character
        offset = m_begin + utf8::char_length(piece, m_begin);
        continue;
      }
      if (m_begin > start) out.push_back(piece.substr(start, m_begin - start));
      out.push_back(piece.substr(m_begin, m_end - m_begin));
      start = offset = m_end;
    }
    if (start < piece.size()) out.push_back(piece.substr(start));
  }
};

PreTokenizer::PreTokenizer(std::string_view name) {
  for (const Definition& def : definitions()) {
    if (def.name != name) continue;
    for (const char* pattern : def.stages) stages_.push_back(std::make_unique<Regex>(pattern));
    return;
  }
  throw std::runtime_error("pre-tokenizer '" + std::string(name) + "' is not supported (supported: " +
                           std::string(supported_names()) + ")");
}

PreTokenizer::~PreTokenizer() = default;

std::string_view PreTokenizer::supported_names() {
  return "default gpt-2 starcoder smollm refact llama3 llama-bpe qwen2 deepseek-coder";
}

void PreTokenizer::split(std::string_view text, std::vector<std::string_view>& words) const {
  // Valid UTF-8 runs go through the regex stages; each invalid byte is a word by itself.
  std::vector<std::string_view> pieces, next;
  size_t i = 0;
  while (i < text.size()) {
    size_t run_end = i;
    while (run_end < text.size()) {
      const size_t n = utf8::valid_char_length(text, run_end);
      if (n == 0) break;
      run_end += n;
    }
    if (run_end > i) {
      pieces.assign(1, text.substr(i, run_end - i));
      for (const auto& stage : stages_) {
        next.clear();
        for (std::string_view piece : pieces) stage->split(piece, next);
        pieces.swap(next);
      }
      words.insert(words.end(), pieces.begin(), pieces.end());
    }
    if (run_end < text.size()) {
      words.push_back(text.substr(run_end, 1));
      ++run_end;
    }
    i = run_end;
  }
}

}  // namespace den::engine
