// Turn-by-turn chat rendering: the template is rendered around stand-in messages and only the
// part that belongs to the new messages is kept.
#include "den/runtime/chat_turns.h"

#include <stdexcept>
#include <string>

#include "den/engine/tokenizer.h"

namespace den::runtime {

ChatTurns::ChatTurns(const engine::Model& model) : model_(model) {
  const engine::Tokenizer& tok = model.tokenizer();
  chat_ = engine::ChatTemplate::for_model(model.file().get_string_opt("tokenizer.chat_template"), tok);
  // The text around an assistant message, found by rendering one around a marker.
  const std::string marker = "@@den-turn-marker@@";
  const std::vector<engine::ChatMessage> asked = {{"system", "s"}, {"user", "u"}};
  const std::vector<engine::ChatMessage> answered = {{"system", "s"}, {"user", "u"}, {"assistant", marker}};
  const std::string without_prompt = chat_->render(asked, false);
  const std::string with_prompt = chat_->render(asked, true);
  const std::string full = chat_->render(answered, false);
  const size_t at = full.find(marker);
  if (with_prompt.starts_with(without_prompt)) {
    assistant_prompt_ = tok.encode(with_prompt.substr(without_prompt.size()), false, true);
  }
  if (full.starts_with(with_prompt) && at != std::string::npos) {
    assistant_closing_ = tok.encode(full.substr(at + marker.size()), false, true);
  }
}

std::vector<int32_t> ChatTurns::tokens(std::span<const engine::ChatMessage> messages, bool empty_history,
                                       bool generation_prompt) const {
  const engine::Tokenizer& tok = model_.tokenizer();
  if (empty_history) return chat_->tokenize(tok, messages, generation_prompt);
  // A continuation: render after a stand-in conversation that ends with an assistant turn and
  // keep what follows it, so the template's conversation start (BOS, default system prompt) is
  // not repeated and formats that fold the system prompt into the first turn (Llama 2) work.
  std::vector<engine::ChatMessage> with_stand_in = {{"system", "s"}, {"user", "u"}, {"assistant", "a"}};
  with_stand_in.insert(with_stand_in.end(), messages.begin(), messages.end());
  const std::string before = chat_->render(std::span(with_stand_in).first(3), false);
  const std::string after = chat_->render(with_stand_in, generation_prompt);
  if (!after.starts_with(before)) {
    throw std::invalid_argument("the " + std::string(chat_->name()) +
                                " chat template cannot continue a conversation message by message: send text");
  }
  return tok.encode(after.substr(before.size()), false, true);
}

}  // namespace den::runtime
