// JSON-RPC 2.0 wire layer: line framing, request parsing with bounded length and depth,
// typed params, and the serialisers. Used by the daemon's socket handler (server.cpp) and
// fuzzed by tests/fuzz/request_parser_fuzz.cpp; it must hold up against any byte sequence.
#include "den/runtime/json_rpc.h"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cmath>
#include <limits>

namespace den::runtime::rpc {

namespace {

// What an error message may quote of received text: enough to recognise it, never a megabyte.
constexpr size_t kQuoteBytes = 64;
constexpr size_t kMaxUnknownKeysNamed = 8;

// Length of the well-formed UTF-8 sequence at s[i] (Unicode table 3-7: no overlong forms, no
// surrogates, nothing above U+10FFFF), or 0 when the bytes there are not one.
size_t utf8_sequence_bytes(std::string_view s, size_t i) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const unsigned char lead = byte(0);
  if (lead < 0x80) return 1;
  size_t length = 0;
  unsigned char low = 0x80, high = 0xBF;  // range of the second byte
  if (lead >= 0xC2 && lead <= 0xDF) {
    length = 2;
  } else if (lead >= 0xE0 && lead <= 0xEF) {
    length = 3;
    if (lead == 0xE0) low = 0xA0;   // overlong
    if (lead == 0xED) high = 0x9F;  // surrogates
  } else if (lead >= 0xF0 && lead <= 0xF4) {
    length = 4;
    if (lead == 0xF0) low = 0x90;   // overlong
    if (lead == 0xF4) high = 0x8F;  // above U+10FFFF
  } else {
    return 0;
  }
  if (s.size() - i < length) return 0;
  if (byte(1) < low || byte(1) > high) return 0;
  for (size_t k = 2; k < length; ++k)
    if ((byte(k) & 0xC0) != 0x80) return 0;
  return length;
}

// The longest prefix of valid UTF-8 text `s` of at most `max_bytes`, cut between characters.
std::string_view utf8_prefix(std::string_view s, size_t max_bytes) {
  if (s.size() <= max_bytes) return s;
  size_t end = max_bytes;
  while (end > 0 && (static_cast<unsigned char>(s[end]) & 0xC0) == 0x80) --end;
  return s.substr(0, end);
}

// Received text (a key, a string value) quoted for a message, shortened when long.
std::string quote(std::string_view text, char quote_char) {
  const std::string_view shown = utf8_prefix(text, kQuoteBytes);
  std::string out(1, quote_char);
  out += shown;
  if (shown.size() < text.size()) out += "...";
  out += quote_char;
  return out;
}

std::string format_double(double d) {
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, d);
  return std::string(buffer, result.ptr);
}

// A short rendering of a received value for "got ..." in messages.
std::string describe(const json::value& v) {
  switch (v.kind()) {
    case json::kind::null: return "null";
    case json::kind::bool_: return v.get_bool() ? "true" : "false";
    case json::kind::int64: return std::to_string(v.get_int64());
    case json::kind::uint64: return std::to_string(v.get_uint64());
    case json::kind::double_: return format_double(v.get_double());
    case json::kind::string: return quote(v.get_string(), '"');
    case json::kind::array: return "an array";
    case json::kind::object: return "an object";
  }
  return "?";
}

std::string integer_range(int64_t min, int64_t max) {
  constexpr int64_t lowest = std::numeric_limits<int64_t>::min();
  constexpr int64_t highest = std::numeric_limits<int64_t>::max();
  if (min == lowest && max == highest) return "an integer";
  if (max == highest) return "an integer >= " + std::to_string(min);
  if (min == lowest) return "an integer <= " + std::to_string(max);
  return "an integer in [" + std::to_string(min) + ", " + std::to_string(max) + "]";
}

// The value as an integer if it is one: an int64, a uint64 that fits, or a double with an
// integral value (some clients send 5.0). Never a bool.
std::optional<int64_t> as_integer(const json::value& v) {
  if (v.is_int64()) return v.get_int64();
  if (v.is_uint64()) {
    if (v.get_uint64() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(v.get_uint64());
  }
  if (v.is_double()) {
    const double d = v.get_double();
    // [-2^63, 2^63) is exactly the doubles that convert to int64 without overflow.
    if (!std::isfinite(d) || d != std::trunc(d) || d < -0x1p63 || d >= 0x1p63) return std::nullopt;
    return static_cast<int64_t>(d);
  }
  return std::nullopt;
}

Error bad_param(std::string_view key, const std::string& expected, const json::value& got) {
  return Error(invalid_params,
               "invalid params: " + quote(key, '\'') + " must be " + expected + ", got " + describe(got),
               json::object{{"param", key}});
}

int64_t checked_integer(std::string_view key, const json::value& v, int64_t min, int64_t max) {
  const auto i = as_integer(v);
  if (!i || *i < min || *i > max) throw bad_param(key, integer_range(min, max), v);
  return *i;
}

// JSON has no infinities or NaN, and Boost.JSON would write them as bare words: the
// serialisers send null instead (a -inf logprob, say, must not break the client's parser).
bool has_non_finite(const json::value& root) {
  std::vector<const json::value*> stack{&root};
  while (!stack.empty()) {
    const json::value* v = stack.back();
    stack.pop_back();
    if (v->is_double() && !std::isfinite(v->get_double())) return true;
    if (v->is_array())
      for (const auto& element : v->get_array()) stack.push_back(&element);
    if (v->is_object())
      for (const auto& member : v->get_object()) stack.push_back(&member.value());
  }
  return false;
}

void replace_non_finite(json::value& root) {
  std::vector<json::value*> stack{&root};
  while (!stack.empty()) {
    json::value* v = stack.back();
    stack.pop_back();
    if (v->is_double() && !std::isfinite(v->get_double())) *v = nullptr;
    if (v->is_array())
      for (auto& element : v->get_array()) stack.push_back(&element);
    if (v->is_object())
      for (auto& member : v->get_object()) stack.push_back(&member.value());
  }
}

std::string serialize_finite(const json::value& v) {
  if (!has_non_finite(v)) return json::serialize(v);
  json::value copy = v;
  replace_non_finite(copy);
  return json::serialize(copy);
}

// Ends a serialised message: Boost.JSON copies string bytes as they are, so a string holding
// invalid UTF-8 (half of a multi-byte token, say) would make the line unreadable to a strict
// client; each invalid byte becomes U+FFFD. Outside strings the serialiser writes only ASCII
// and it escapes control characters, so the repair cannot change the JSON structure.
std::string finish_line(std::string text) {
  size_t i = 0;
  while (i < text.size() && static_cast<unsigned char>(text[i]) < 0x80) ++i;
  if (i < text.size()) {
    std::string repaired(text, 0, i);
    while (i < text.size()) {
      const size_t n = utf8_sequence_bytes(text, i);
      if (n == 0) {
        repaired += "\xEF\xBF\xBD";
        ++i;
      } else {
        repaired.append(text, i, n);
        i += n;
      }
    }
    text = std::move(repaired);
  }
  text += '\n';
  return text;
}

// RFC 8259 texts are UTF-8, and JSON allows no raw control characters (inside strings they
// must be escaped; outside, only space, tab, CR and LF). Boost.JSON refuses both as a bare
// "syntax error"; this scan says which byte and why.
void check_bytes(std::string_view line) {
  size_t i = 0;
  while (i < line.size()) {
    const auto c = static_cast<unsigned char>(line[i]);
    if (c < 0x20 && c != '\t' && c != '\n' && c != '\r') {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02X", c);
      throw Error(parse_error, "parse error: control character " + std::string(hex) + " at byte " +
                                   std::to_string(i) + " (escape it inside strings)");
    }
    if (c < 0x80) {
      ++i;
      continue;
    }
    const size_t n = utf8_sequence_bytes(line, i);
    if (n == 0) throw Error(parse_error, "parse error: invalid UTF-8 at byte " + std::to_string(i));
    i += n;
  }
}

}  // namespace

Request parse_request(std::string_view line, const Limits& limits, json::value* error_id) {
  if (line.size() > limits.max_line_bytes)
    throw Error(limit_exceeded,
                "request line of " + std::to_string(line.size()) + " bytes exceeds the limit of " +
                    std::to_string(limits.max_line_bytes) + " bytes (limits.line_bytes)",
                json::object{{"limit", limits.max_line_bytes}});
  check_bytes(line);

  json::parse_options options;
  // The parser refuses to open a container beyond this depth, so deep input fails at once
  // instead of growing a stack first.
  options.max_depth = static_cast<size_t>(std::max<int32_t>(limits.max_depth, 0));
  json::parser parser(json::storage_ptr(), options);
  json::error_code ec;
  const size_t consumed = parser.write(line.data(), line.size(), ec);
  if (ec == json::error::too_deep)
    throw Error(limit_exceeded,
                "request nested deeper than the limit of " + std::to_string(limits.max_depth) +
                    " levels (limits.json_depth)",
                json::object{{"limit", limits.max_depth}});
  if (ec)
    throw Error(parse_error, "parse error: " + ec.message() + " at byte " + std::to_string(consumed));
  json::value message = parser.release();

  if (message.is_array())
    throw Error(invalid_request, "invalid request: batches (JSON arrays) are not supported; send one request per line");
  if (!message.is_object()) throw Error(invalid_request, "invalid request: a request must be a JSON object");
  json::object& object = message.get_object();

  Request request;
  // The id first, so that every later error can still be correlated with the call.
  if (const json::value* id = object.if_contains("id")) {
    if (!id->is_string() && !id->is_int64() && !id->is_uint64())
      throw Error(invalid_request, "invalid request: 'id' must be a string or an integer, got " + describe(*id));
    request.id = *id;
    if (error_id) *error_id = *id;
  } else {
    request.notification = true;
  }

  const json::value* version = object.if_contains("jsonrpc");
  if (!version || !version->is_string() || version->get_string() != "2.0")
    throw Error(invalid_request, "invalid request: 'jsonrpc' must be \"2.0\", got " +
                                     (version ? describe(*version) : std::string("nothing")));

  const json::value* method = object.if_contains("method");
  if (!method) throw Error(invalid_request, "invalid request: 'method' is missing");
  if (!method->is_string())
    throw Error(invalid_request, "invalid request: 'method' must be a string, got " + describe(*method));
  request.method = method->get_string();

  if (json::value* params = object.if_contains("params")) {
    if (params->is_array())
      throw Error(invalid_params, "invalid params: positional params are not supported; pass an object of named params");
    if (!params->is_object())
      throw Error(invalid_request, "invalid request: 'params' must be an object, got " + describe(*params));
    request.params = std::move(params->get_object());
  }
  return request;
}

std::vector<LineFramer::Line> LineFramer::push(std::string_view bytes) {
  std::vector<Line> lines;
  // One byte more than the limit is kept so that a line of exactly max_line_bytes may still
  // end in "\r\n"; beyond that the line is too long whatever follows.
  const size_t keep_bytes = max_line_bytes_ + (max_line_bytes_ < SIZE_MAX ? 1 : 0);
  size_t pos = 0;
  while (pos < bytes.size()) {
    const size_t newline = bytes.find('\n', pos);
    const size_t end = newline == std::string_view::npos ? bytes.size() : newline;
    const std::string_view piece = bytes.substr(pos, end - pos);
    partial_bytes_ += piece.size();
    if (!discarding_) {
      if (partial_bytes_ > keep_bytes) {
        discarding_ = true;
        std::string().swap(partial_);  // release the memory, not only the contents
      } else {
        partial_ += piece;
      }
    }
    if (newline == std::string_view::npos) break;

    Line line;
    line.bytes = partial_bytes_;
    if (!discarding_ && !partial_.empty() && partial_.back() == '\r') partial_.pop_back();
    if (discarding_ || partial_.size() > max_line_bytes_) {
      line.oversized = true;
      std::string().swap(partial_);
    } else {
      line.text = std::move(partial_);
      partial_.clear();  // a moved-from string is valid but unspecified
    }
    lines.push_back(std::move(line));
    partial_bytes_ = 0;
    discarding_ = false;
    pos = newline + 1;
  }
  return lines;
}

// The envelopes are written by hand so that a large result is serialised in place, not
// copied into a json::object first.
std::string response(const json::value& id, const json::value& result) {
  return finish_line(R"({"jsonrpc":"2.0","id":)" + serialize_finite(id) + R"(,"result":)" +
                     serialize_finite(result) + "}");
}

std::string error_response(const json::value& id, int code, std::string_view message, const json::value& data) {
  std::string text = R"({"jsonrpc":"2.0","id":)" + serialize_finite(id) + R"(,"error":{"code":)" +
                     std::to_string(code) + R"(,"message":)" + json::serialize(json::string_view(message));
  if (!data.is_null()) text += R"(,"data":)" + serialize_finite(data);
  return finish_line(std::move(text) + "}}");
}

std::string error_response(const json::value& id, const Error& error) {
  return error_response(id, error.code(), error.what(), error.data());
}

std::string notification(std::string_view method, const json::value& params) {
  return finish_line(R"({"jsonrpc":"2.0","method":)" + json::serialize(json::string_view(method)) +
                     R"(,"params":)" + serialize_finite(params) + "}");
}

// Params. A member that is null counts as absent: optional accessors give their fallback and
// required ones report the parameter as missing.
namespace {

const json::value* find(const json::object& params, std::string_view key) {
  const json::value* v = params.if_contains(key);
  return v && !v->is_null() ? v : nullptr;
}

}  // namespace

bool Params::has(std::string_view key) const { return find(params_, key) != nullptr; }

std::string Params::string(std::string_view key) const {
  if (auto s = optional_string(key)) return *std::move(s);
  throw Error(invalid_params, "missing required parameter " + quote(key, '\''), json::object{{"param", key}});
}

std::optional<std::string> Params::optional_string(std::string_view key) const {
  const json::value* v = find(params_, key);
  if (!v) return std::nullopt;
  if (!v->is_string()) throw bad_param(key, "a string", *v);
  return std::string(v->get_string());
}

int64_t Params::integer(std::string_view key, int64_t fallback, int64_t min, int64_t max) const {
  return optional_integer(key, min, max).value_or(fallback);
}

std::optional<int64_t> Params::optional_integer(std::string_view key, int64_t min, int64_t max) const {
  const json::value* v = find(params_, key);
  if (!v) return std::nullopt;
  return checked_integer(key, *v, min, max);
}

double Params::number(std::string_view key, double fallback, double min, double max) const {
  const json::value* v = find(params_, key);
  if (!v) return fallback;
  double d = 0.0;
  if (v->is_int64()) d = static_cast<double>(v->get_int64());
  else if (v->is_uint64()) d = static_cast<double>(v->get_uint64());
  else if (v->is_double()) d = v->get_double();
  // The negated test also refuses NaN (which Boost.JSON does not produce, but a caller might).
  if (!v->is_number() || !(d >= min && d <= max))
    throw bad_param(key, "a number in [" + format_double(min) + ", " + format_double(max) + "]", *v);
  return d;
}

bool Params::boolean(std::string_view key, bool fallback) const {
  const json::value* v = find(params_, key);
  if (!v) return fallback;
  if (!v->is_bool()) throw bad_param(key, "a boolean (true or false)", *v);
  return v->get_bool();
}

std::vector<std::string> Params::strings(std::string_view key) const {
  const json::array* array = optional_array(key);
  if (!array) return {};
  std::vector<std::string> out;
  out.reserve(array->size());
  for (size_t i = 0; i < array->size(); ++i) {
    const json::value& element = (*array)[i];
    if (!element.is_string())
      throw bad_param(std::string(key) + "[" + std::to_string(i) + "]", "a string", element);
    out.emplace_back(element.get_string());
  }
  return out;
}

std::vector<int32_t> Params::int32s(std::string_view key, int32_t min, int32_t max) const {
  const json::array* array = optional_array(key);
  if (!array) return {};
  std::vector<int32_t> out;
  out.reserve(array->size());
  for (size_t i = 0; i < array->size(); ++i)
    out.push_back(static_cast<int32_t>(
        checked_integer(std::string(key) + "[" + std::to_string(i) + "]", (*array)[i], min, max)));
  return out;
}

const json::array* Params::optional_array(std::string_view key) const {
  const json::value* v = find(params_, key);
  if (!v) return nullptr;
  if (!v->is_array()) throw bad_param(key, "an array", *v);
  return &v->get_array();
}

void Params::check_known(std::initializer_list<std::string_view> keys) const {
  // Only the first few unknown keys are named, so a request made of a million of them still
  // gets a small reply.
  json::array unknown;
  std::string named;
  size_t unknown_count = 0;
  for (const auto& member : params_) {
    bool known = false;
    for (std::string_view k : keys) known = known || member.key() == k;
    if (known) continue;
    if (++unknown_count > kMaxUnknownKeysNamed) continue;
    named += (named.empty() ? "" : ", ") + quote(member.key(), '\'');
    unknown.emplace_back(utf8_prefix(member.key(), kQuoteBytes));
  }
  if (unknown_count == 0) return;
  if (unknown_count > kMaxUnknownKeysNamed)
    named += " and " + std::to_string(unknown_count - kMaxUnknownKeysNamed) + " more";
  std::string known_list;
  json::array known;
  for (std::string_view k : keys) {
    known_list += (known_list.empty() ? "" : ", ") + std::string(k);
    known.emplace_back(k);
  }
  throw Error(invalid_params,
              std::string("invalid params: unknown parameter") + (unknown_count > 1 ? "s " : " ") + named +
                  (keys.size() == 0 ? " (this method takes none)" : " (known: " + known_list + ")"),
              json::object{{"unknown", std::move(unknown)}, {"known", std::move(known)}});
}

}  // namespace den::runtime::rpc
