// Chat turns as tokens, for a session that grows turn by turn: the model's chat template
// rendered for the first messages of a conversation (with its start: BOS, default system
// prompt) or for messages that continue one, plus the tokens that open an assistant turn (the
// generation prompt) and close it. Shared by the socket API and the agents.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "den/engine/chat_template.h"
#include "den/engine/model.h"

namespace den::runtime {

class ChatTurns {
 public:
  explicit ChatTurns(const engine::Model& model);

  // The tokens of `messages` appended to a history (empty or not); with generation_prompt,
  // followed by the assistant prompt. Throws std::invalid_argument when the template cannot
  // continue a conversation message by message.
  std::vector<int32_t> tokens(std::span<const engine::ChatMessage> messages, bool empty_history,
                              bool generation_prompt) const;
  // What opens an assistant turn after the last message (ChatML: "<|im_start|>assistant\n").
  const std::vector<int32_t>& assistant_prompt() const { return assistant_prompt_; }
  // What closes an assistant turn (ChatML: "<|im_end|>\n"); empty when it cannot be found.
  const std::vector<int32_t>& assistant_closing() const { return assistant_closing_; }
  std::string_view template_name() const { return chat_->name(); }

 private:
  const engine::Model& model_;
  std::optional<engine::ChatTemplate> chat_;
  std::vector<int32_t> assistant_prompt_, assistant_closing_;
};

}  // namespace den::runtime
