// The reader of tool calls in model output (parse_tool_calls, declared in tools.h): Hermes/ChatML
// `<tool_call>{…}</tool_call>` blocks, and Llama 3's bare JSON call.
#include <algorithm>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "den/runtime/tools.h"

namespace den::runtime {
namespace {

namespace json = boost::json;

std::string_view trim(std::string_view s) {
  const auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  while (!s.empty() && space(s.front())) s.remove_prefix(1);
  while (!s.empty() && space(s.back())) s.remove_suffix(1);
  return s;
}

json::value parse_json(std::string_view text, json::error_code& ec) {
  json::parse_options options;
  options.max_depth = 256;  // arguments may nest deeper than Boost's default 32
  return json::parse(text, ec, {}, options);
}

// {"name": …, "arguments"|"parameters": {…} or a string holding an object}. Without
// `require_arguments` the arguments may be missing (a tool that takes none).
std::optional<ParsedToolCall> tool_call_from_json(std::string_view text, bool require_arguments) {
  json::error_code ec;
  json::value value = parse_json(text, ec);
  if (ec || !value.is_object()) return std::nullopt;
  const json::object& object = value.get_object();
  const json::value* name = object.if_contains("name");
  if (!name || !name->is_string() || name->get_string().empty()) return std::nullopt;
  ParsedToolCall call{std::string(name->get_string()), {}};
  const json::value* arguments = object.if_contains("arguments");
  if (!arguments) arguments = object.if_contains("parameters");
  if (!arguments) return require_arguments ? std::nullopt : std::optional(std::move(call));
  if (arguments->is_null()) return call;
  if (arguments->is_object()) {
    call.arguments = arguments->get_object();
    return call;
  }
  if (arguments->is_string()) {
    const std::string_view inner = trim(arguments->get_string());
    if (inner.empty()) return call;
    json::value parsed = parse_json(inner, ec);
    if (!ec && parsed.is_object()) {
      call.arguments = std::move(parsed.get_object());
      return call;
    }
  }
  return std::nullopt;
}

}  // namespace

std::vector<ParsedToolCall> parse_tool_calls(std::string_view output) {
  constexpr std::string_view kOpen = "<tool_call>", kClose = "</tool_call>";
  std::vector<ParsedToolCall> calls;
  size_t at = output.find(kOpen);
  if (at != std::string_view::npos) {
    // Hermes/ChatML. A call without its closing tag (a stop string may have eaten it) runs to
    // the next opening tag or the end.
    while (at != std::string_view::npos) {
      const size_t body = at + kOpen.size();
      const size_t close = output.find(kClose, body);
      const size_t next = output.find(kOpen, body);
      const size_t end = std::min({close, next, output.size()});
      if (auto call = tool_call_from_json(trim(output.substr(body, end - body)), false))
        calls.push_back(std::move(*call));
      at = next;
    }
    return calls;
  }
  // Llama 3: the whole output is the call. Arguments are required here so that a plain JSON
  // answer that happens to have a "name" is not taken for a call.
  std::string_view text = trim(output);
  constexpr std::string_view kPythonTag = "<|python_tag|>";
  if (text.starts_with(kPythonTag)) text.remove_prefix(kPythonTag.size());
  for (std::string_view end : {"<|eom_id|>", "<|eot_id|>"})
    if (text.ends_with(end)) text.remove_suffix(end.size());
  if (auto call = tool_call_from_json(trim(text), true)) calls.push_back(std::move(*call));
  return calls;
}

}  // namespace den::runtime
