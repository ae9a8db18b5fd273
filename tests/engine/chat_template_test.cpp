// Chat templates: rendering of each format, recognition from template text, and SmolLM2's
// prompt ids against Hugging Face's apply_chat_template (fixture from scripts/make-smollm2-fixture).
#include <boost/json.hpp>

#include "den/engine/chat_template.h"
#include "den/engine/model.h"
#include "test_support.h"

using namespace den;
using engine::ChatMessage;
using engine::ChatTemplate;

TEST_CASE("ChatML rendering, with and without a default system prompt") {
  const std::string smollm_template =
      "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
      "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
      "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt "
      "%}{{ '<|im_start|>assistant\n' }}{% endif %}";
  const auto ct = ChatTemplate::recognise(smollm_template);
  REQUIRE(ct.has_value());
  CHECK(ct->format() == engine::ChatFormat::chatml);
  CHECK(ct->default_system_prompt() == "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  const std::vector<ChatMessage> user_only = {{"user", "Hi"}};
  CHECK(ct->render(user_only, true) ==
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  const std::vector<ChatMessage> with_system = {{"system", "S"}, {"user", "U"}, {"assistant", "A"}};
  CHECK(ct->render(with_system, false) ==
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n");
  // A template whose system turn is computed is not mistaken for a literal default.
  const auto qwen_like = ChatTemplate::recognise("{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>' }}");
  REQUIRE(qwen_like.has_value());
  CHECK(qwen_like->default_system_prompt().empty());
}

TEST_CASE("Llama 3 and Llama 2 rendering") {
  const std::vector<ChatMessage> m = {{"system", "Be kind. "}, {"user", " Hello "}, {"assistant", "Hi!"}, {"user", "Bye"}};
  CHECK(ChatTemplate::by_name("llama3").render(m, true) ==
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe kind.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n");
  CHECK(ChatTemplate::by_name("llama2").render(m, true) ==
        "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHello [/INST] Hi! </s><s>[INST] Bye [/INST]");
  CHECK(ChatTemplate::recognise("... <|start_header_id|> ...")->format() == engine::ChatFormat::llama3);
  CHECK(ChatTemplate::recognise("... [INST] ...")->format() == engine::ChatFormat::llama2);
  CHECK_FALSE(ChatTemplate::recognise("{{ messages }}").has_value());
  CHECK_THROWS_WITH(ChatTemplate::by_name("vicuna"), doctest::Contains("known: chatml, llama3, llama2"));
}

namespace {

std::vector<ChatMessage> messages_of(const boost::json::value& v) {
  std::vector<ChatMessage> out;
  for (const auto& m : v.as_array()) {
    out.push_back({std::string(m.at("role").as_string()), std::string(m.at("content").as_string())});
  }
  return out;
}

std::vector<int32_t> ids_of(const boost::json::value& v) {
  std::vector<int32_t> out;
  for (const auto& id : v.as_array()) out.push_back(static_cast<int32_t>(id.as_int64()));
  return out;
}

}  // namespace

TEST_CASE("SmolLM2 chat prompts tokenize exactly as transformers' apply_chat_template") {
  const auto model_path = test::default_model();
  DEN_SKIP_UNLESS(model_path, "the default model (SmolLM2) is not fetched: run scripts/fetch-model");
  const auto model = engine::Model::load(*model_path);
  const auto ct = ChatTemplate::for_model(model->file().get_string_opt("tokenizer.chat_template"), model->tokenizer());
  const auto cases = boost::json::parse(test::read_file(test::fixture_path("smollm2/cases.json")));
  int checked = 0;
  for (const char* group : {"prompt_cases", "logit_cases"}) {
    for (const auto& c : cases.at(group).as_array()) {
      const auto messages = messages_of(c.at("messages"));
      CAPTURE(messages.back().content);
      CHECK(ct.tokenize(model->tokenizer(), messages, true) == ids_of(c.at("ids")));
      ++checked;
    }
  }
  CHECK(checked >= 7);
}
