// Chat templates for the well-known formats: ChatML, Llama 3 and Llama 2. The format is
// recognised from the GGUF's tokenizer.chat_template (or chosen by name); a default system
// prompt written into the template as a literal (SmolLM2, Qwen) is honoured.
// Rendered text is tokenized with special-token parsing and without an extra BOS, as
// Hugging Face's apply_chat_template(tokenize=True) does. Used by `den chat` and the runtime.
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace den::engine {

class Tokenizer;

struct ChatMessage {
  std::string role;  // system, user, assistant (others are passed through)
  std::string content;
};

enum class ChatFormat { chatml, llama3, llama2 };

class ChatTemplate {
 public:
  // Recognises the template text; nullopt when it matches no known format.
  static std::optional<ChatTemplate> recognise(std::string_view template_text);
  // "chatml", "llama3", "llama2"; throws std::invalid_argument listing the names otherwise.
  static ChatTemplate by_name(std::string_view name);
  // The model's template (from GGUF metadata), else a guess from its special tokens, else ChatML.
  static ChatTemplate for_model(std::optional<std::string_view> template_text, const Tokenizer& tokenizer);

  ChatFormat format() const { return format_; }
  std::string_view name() const;
  const std::string& default_system_prompt() const { return default_system_; }

  std::string render(std::span<const ChatMessage> messages, bool add_generation_prompt) const;
  std::vector<int32_t> tokenize(const Tokenizer& tokenizer, std::span<const ChatMessage> messages,
                                bool add_generation_prompt) const;

 private:
  explicit ChatTemplate(ChatFormat format) : format_(format) {}
  ChatFormat format_;
  std::string default_system_;
};

}  // namespace den::engine
