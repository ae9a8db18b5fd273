// Chat template rendering. Each format is written out here from its published layout; a
// template is recognised by the markers it must contain.
#include "den/engine/chat_template.h"

#include <stdexcept>

#include "den/engine/tokenizer.h"

namespace den::engine {
namespace {

std::string_view trim(std::string_view s) {
  const auto is_space = [](char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; };
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

// A ChatML template may open with a fixed system turn when the conversation has none, written
// as a string literal: '<|im_start|>system\n...<|im_end|>\n'. Extract its text if it is plain.
std::string chatml_default_system(std::string_view t) {
  constexpr std::string_view kOpen = "<|im_start|>system\n";
  const size_t start = t.find(kOpen);
  if (start == std::string_view::npos) return {};
  const size_t text_start = start + kOpen.size();
  const size_t end = t.find("<|im_end|>", text_start);
  if (end == std::string_view::npos) return {};
  const std::string_view text = t.substr(text_start, end - text_start);
  if (text.empty() || text.find_first_of("{}'\"+") != std::string_view::npos) return {};
  return std::string(text);
}

}  // namespace

std::optional<ChatTemplate> ChatTemplate::recognise(std::string_view t) {
  if (t.find("<|im_start|>") != std::string_view::npos) {
    ChatTemplate ct(ChatFormat::chatml);
    ct.default_system_ = chatml_default_system(t);
    return ct;
  }
  if (t.find("<|start_header_id|>") != std::string_view::npos) return ChatTemplate(ChatFormat::llama3);
  if (t.find("[INST]") != std::string_view::npos) return ChatTemplate(ChatFormat::llama2);
  return std::nullopt;
}

ChatTemplate ChatTemplate::by_name(std::string_view name) {
  if (name == "chatml") return ChatTemplate(ChatFormat::chatml);
  if (name == "llama3") return ChatTemplate(ChatFormat::llama3);
  if (name == "llama2") return ChatTemplate(ChatFormat::llama2);
  throw std::invalid_argument("unknown chat template '" + std::string(name) + "' (known: chatml, llama3, llama2)");
}

ChatTemplate ChatTemplate::for_model(std::optional<std::string_view> template_text, const Tokenizer& tokenizer) {
  if (template_text) {
    if (auto ct = recognise(*template_text)) return *ct;
  }
  if (tokenizer.find("<|start_header_id|>")) return ChatTemplate(ChatFormat::llama3);
  if (tokenizer.find("<|im_start|>")) return ChatTemplate(ChatFormat::chatml);
  if (tokenizer.model() == Tokenizer::Model::spm) return ChatTemplate(ChatFormat::llama2);
  return ChatTemplate(ChatFormat::chatml);
}

std::string_view ChatTemplate::name() const {
  switch (format_) {
    case ChatFormat::chatml:
      return "chatml";
    case ChatFormat::llama3:
      return "llama3";
    case ChatFormat::llama2:
      return "llama2";
  }
  return "chatml";
}

std::string ChatTemplate::render(std::span<const ChatMessage> messages, bool add_generation_prompt) const {
  std::string out;
  switch (format_) {
    case ChatFormat::chatml: {
      if (!default_system_.empty() && (messages.empty() || messages.front().role != "system")) {
        out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
      }
      for (const ChatMessage& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      return out;
    }
    case ChatFormat::llama3: {
      out += "<|begin_of_text|>";
      for (const ChatMessage& m : messages) {
        out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + std::string(trim(m.content)) + "<|eot_id|>";
      }
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      return out;
    }
    case ChatFormat::llama2: {
      // The system prompt folds into the first user turn; each user turn opens with BOS.
      std::string system;
      size_t first = 0;
      if (!messages.empty() && messages.front().role == "system") {
        system = std::string(trim(messages.front().content));
        first = 1;
      }
      for (size_t i = first; i < messages.size(); ++i) {
        const ChatMessage& m = messages[i];
        if (m.role == "assistant") {
          out += " " + std::string(trim(m.content)) + " </s>";
          continue;
        }
        std::string content(trim(m.content));
        if (i == first && !system.empty()) content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content;
        out += "<s>[INST] " + content + " [/INST]";
      }
      (void)add_generation_prompt;  // the open [INST] turn is already the generation prompt
      return out;
    }
  }
  return out;
}

std::vector<int32_t> ChatTemplate::tokenize(const Tokenizer& tokenizer, std::span<const ChatMessage> messages,
                                            bool add_generation_prompt) const {
  return tokenizer.encode(render(messages, add_generation_prompt), /*add_bos=*/false, /*parse_special=*/true);
}

}  // namespace den::engine
