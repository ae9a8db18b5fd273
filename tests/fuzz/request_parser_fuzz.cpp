// libFuzzer target for the daemon's wire layer (runtime/src/json_rpc.cpp): arbitrary bytes go
// through LineFramer in two reads, every line through parse_request and the Params accessors,
// and every outcome is serialised. Beyond "no crash, no leak" it checks that each reply is one
// line of valid JSON and that the framer's memory stays bounded. Run by scripts/fuzz.
#include "den/runtime/json_rpc.h"

#include <cstdio>
#include <cstdlib>
#include <limits>

namespace rpc = den::runtime::rpc;
namespace json = boost::json;

namespace {

// Small limits so that short inputs reach the limit paths too.
constexpr size_t kMaxLineBytes = 4096;
constexpr int32_t kMaxDepth = 8;

void require(bool condition, const char* what) {
  if (condition) return;
  std::fprintf(stderr, "request_parser_fuzz: %s\n", what);
  std::abort();
}

// A reply must be exactly one line that a strict parser reads back as a JSON object.
void check_reply(const std::string& reply) {
  require(!reply.empty() && reply.back() == '\n', "a reply does not end in a newline");
  require(reply.find('\n') == reply.size() - 1, "a reply spans several lines");
  json::parse_options options;
  options.max_depth = 4 * kMaxDepth;  // replies wrap params or data in a few more levels
  json::error_code ec;
  const json::value parsed = json::parse(json::string_view(reply.data(), reply.size() - 1), ec, {}, options);
  require(!ec, "a reply is not valid JSON");
  require(parsed.is_object(), "a reply is not a JSON object");
}

// Every accessor on every key: each either returns or throws rpc::Error.
void exercise_params(const json::object& raw) {
  const rpc::Params params(raw);
  const auto attempt = [](auto&& f) {
    try {
      f();
    } catch (const rpc::Error& e) {
      require(e.code() == rpc::invalid_params, "a Params accessor threw another code");
      check_reply(rpc::error_response(nullptr, e));
    }
  };
  constexpr int64_t lowest = std::numeric_limits<int64_t>::min();
  constexpr int64_t highest = std::numeric_limits<int64_t>::max();
  for (const auto& member : raw) {
    const std::string_view key = member.key();
    attempt([&] { params.has(key); });
    attempt([&] { params.string(key); });
    attempt([&] { params.optional_string(key); });
    attempt([&] { params.integer(key, 0, 0, 1 << 20); });
    attempt([&] { params.optional_integer(key, lowest, highest); });
    attempt([&] { params.number(key, 0.8, 0.0, 2.0); });
    attempt([&] { params.number(key, 0.0, -std::numeric_limits<double>::max(), std::numeric_limits<double>::max()); });
    attempt([&] { params.boolean(key, false); });
    attempt([&] { params.strings(key); });
    attempt([&] { params.int32s(key, 0, 49151); });
    attempt([&] { params.optional_array(key); });
  }
  attempt([&] { params.check_known({"session", "max_tokens", "stop"}); });
  attempt([&] { params.check_known({}); });
}

void handle_line(const rpc::LineFramer::Line& line) {
  require(line.text.size() <= kMaxLineBytes, "the framer returned a line over the limit");
  if (line.oversized) {
    check_reply(rpc::error_response(nullptr, rpc::limit_exceeded, "line too long", json::object{{"limit", kMaxLineBytes}}));
    return;
  }
  rpc::Limits limits;
  limits.max_line_bytes = kMaxLineBytes;
  limits.max_depth = kMaxDepth;
  json::value id;
  try {
    const rpc::Request request = rpc::parse_request(line.text, limits, &id);
    require(request.notification == request.id.is_null(), "a call without an id");
    exercise_params(request.params);
    check_reply(rpc::response(request.id, request.params));
    check_reply(rpc::notification(request.method, request.params));
  } catch (const rpc::Error& e) {
    require(id.is_null() || id.is_string() || id.is_int64() || id.is_uint64(), "error_id is not a valid id");
    check_reply(rpc::error_response(id, e));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  // The first byte chooses where the stream is cut into two reads, so lines split across
  // reads (and a '\r' apart from its '\n') are covered.
  const size_t cut = size == 0 ? 0 : (static_cast<uint8_t>(input[0]) * size) / 256;
  rpc::LineFramer framer(kMaxLineBytes);
  for (std::string_view piece : {input.substr(0, cut), input.substr(cut)}) {
    for (const auto& line : framer.push(piece)) handle_line(line);
    require(framer.buffer_capacity_bytes() <= 2 * (kMaxLineBytes + 1), "the framer holds too much memory");
  }
  // The stream ends: a last line without its newline still gets parsed.
  for (const auto& line : framer.push("\n")) handle_line(line);
  require(framer.pending_bytes() == 0, "bytes are left after a newline");
  return 0;
}
