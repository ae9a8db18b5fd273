// The JSON-RPC wire layer (runtime/src/json_rpc.cpp): every error code a request line can earn,
// the length and depth limits on hostile input, line framing across reads, typed params and
// the serialised replies.
#include "den/runtime/json_rpc.h"

#include "test_support.h"

#include <chrono>

namespace rpc = den::runtime::rpc;
namespace json = boost::json;

namespace {

// The Error that `f` throws; fails the test case when it throws none.
template <typename F>
rpc::Error error_of(F&& f) {
  try {
    f();
  } catch (const rpc::Error& e) {
    return e;
  }
  FAIL("expected an rpc::Error");
  return rpc::Error(0, "");
}

rpc::Error parse_failure(std::string_view line, const rpc::Limits& limits = {}, json::value* id = nullptr) {
  return error_of([&] { rpc::parse_request(line, limits, id); });
}

bool contains(std::string_view text, std::string_view part) { return text.find(part) != std::string_view::npos; }

// A request whose params hold `levels` nested arrays: the whole text is levels + 2 deep.
std::string nested_request(size_t levels) {
  return R"({"jsonrpc":"2.0","id":1,"method":"m","params":{"a":)" + std::string(levels, '[') +
         std::string(levels, ']') + "}}";
}

}  // namespace

TEST_CASE("rpc parse_request reads calls and notifications") {
  const auto call = rpc::parse_request(
      R"({"jsonrpc":"2.0","id":7,"method":"sessions/get","params":{"session":"alice"}})", {});
  CHECK(call.id == json::value(7));
  CHECK_FALSE(call.notification);
  CHECK(call.method == "sessions/get");
  CHECK(call.params == json::object{{"session", "alice"}});

  const auto named = rpc::parse_request(R"({"method":"x","id":"req-1","jsonrpc":"2.0"})", {});
  CHECK(named.id == json::value("req-1"));
  CHECK(named.params.empty());

  const auto big = rpc::parse_request(R"({"jsonrpc":"2.0","id":18446744073709551615,"method":"x"})", {});
  CHECK(big.id == json::value(uint64_t{18446744073709551615u}));

  const auto note = rpc::parse_request(" {\"jsonrpc\":\"2.0\",\t\"method\":\"sessions/cancel\"} ", {});
  CHECK(note.notification);
  CHECK(note.id.is_null());

  // Escaped control characters and valid multi-byte UTF-8 are fine.
  const auto text = rpc::parse_request(
      "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"m\",\"params\":{\"t\":\"a\\u0000\\n\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80\"}}", {});
  CHECK(text.params.at("t").get_string() == std::string_view("a\0\n\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80", 12));
}

TEST_CASE("rpc parse_request answers invalid JSON with parse_error") {
  for (std::string_view line : {"", "   ", "{", "{\"jsonrpc\":\"2.0\",}", "[1,]", "{} {}", "nul",
                                "// comment\n{}", "{'a':1}", "\"\\ud800\"", "\"\\udc00\"", "1e"}) {
    CAPTURE(line);
    const auto e = parse_failure(line);
    CHECK(e.code() == rpc::parse_error);
    CHECK(contains(e.what(), "parse error"));
  }
}

TEST_CASE("rpc parse_request refuses invalid UTF-8 and bare control characters") {
  const std::string head = R"({"jsonrpc":"2.0","id":1,"method":")";
  for (std::string bad : {"\xFF", "\xC0\x80", "\xC1\xBF", "\xE0\x80\xAF", "\xED\xA0\x80", "\xF4\x90\x80\x80",
                          "\xF8\x88\x80\x80\x80", "\xE2\x82", "\x80", "\xC3"}) {
    CAPTURE(bad);
    const auto e = parse_failure(head + bad + "\"}");
    CHECK(e.code() == rpc::parse_error);
    CHECK(std::string(e.what()) == "parse error: invalid UTF-8 at byte " + std::to_string(head.size()));
  }
  // Also outside strings, where JSON allows no raw non-ASCII at all.
  CHECK(parse_failure("{\xC3\xA9}").code() == rpc::parse_error);

  const auto in_string = parse_failure(head + "a\x01\"}");
  CHECK(in_string.code() == rpc::parse_error);
  CHECK(std::string(in_string.what()) ==
        "parse error: control character 0x01 at byte " + std::to_string(head.size() + 1) +
            " (escape it inside strings)");
  CHECK(parse_failure(head + "a\tb\"}").code() == rpc::parse_error);  // a raw tab inside a string
  const char with_nul[] = "{\"jsonrpc\":\"2.0\",\0\"method\":\"m\"}";
  CHECK(parse_failure(std::string_view(with_nul, sizeof with_nul - 1)).code() == rpc::parse_error);
  CHECK(parse_failure(head + "m\"}\x1B").code() == rpc::parse_error);
}

TEST_CASE("rpc parse_request answers malformed requests with invalid_request") {
  struct Case {
    std::string_view line;
    std::string_view message_part;
  };
  for (const Case& c : std::initializer_list<Case>{
           {R"([{"jsonrpc":"2.0","id":1,"method":"m"}])", "batches (JSON arrays) are not supported"},
           {R"([])", "batches"},
           {R"("hello")", "must be a JSON object"},
           {R"(42)", "must be a JSON object"},
           {R"(null)", "must be a JSON object"},
           {R"({"id":1,"method":"m"})", "'jsonrpc' must be \"2.0\", got nothing"},
           {R"({"jsonrpc":"1.0","id":1,"method":"m"})", "'jsonrpc' must be \"2.0\", got \"1.0\""},
           {R"({"jsonrpc":2.0,"id":1,"method":"m"})", "'jsonrpc' must be \"2.0\", got 2"},
           {R"({"jsonrpc":"2.0","id":1})", "'method' is missing"},
           {R"({"jsonrpc":"2.0","id":1,"method":7})", "'method' must be a string, got 7"},
           {R"({"jsonrpc":"2.0","id":1,"method":null})", "'method' must be a string, got null"},
           {R"({"jsonrpc":"2.0","id":null,"method":"m"})", "'id' must be a string or an integer, got null"},
           {R"({"jsonrpc":"2.0","id":1.5,"method":"m"})", "'id' must be a string or an integer, got 1.5"},
           {R"({"jsonrpc":"2.0","id":1.0,"method":"m"})", "'id' must be a string or an integer, got 1"},
           {R"({"jsonrpc":"2.0","id":true,"method":"m"})", "got true"},
           {R"({"jsonrpc":"2.0","id":{},"method":"m"})", "got an object"},
           {R"({"jsonrpc":"2.0","id":[1],"method":"m"})", "got an array"},
           {R"({"jsonrpc":"2.0","id":1,"method":"m","params":"x"})", "'params' must be an object, got \"x\""},
           {R"({"jsonrpc":"2.0","id":1,"method":"m","params":null})", "'params' must be an object, got null"},
           {R"({"jsonrpc":"2.0","id":1,"method":"m","params":3})", "'params' must be an object, got 3"},
       }) {
    CAPTURE(c.line);
    const auto e = parse_failure(c.line);
    CHECK(e.code() == rpc::invalid_request);
    CHECK(contains(e.what(), c.message_part));
  }
}

TEST_CASE("rpc parse_request refuses positional params with invalid_params") {
  const auto e = parse_failure(R"({"jsonrpc":"2.0","id":3,"method":"m","params":[1,2]})");
  CHECK(e.code() == rpc::invalid_params);
  CHECK(contains(e.what(), "positional params are not supported"));
}

TEST_CASE("rpc parse_request hands back the id whenever it could be read") {
  json::value id;
  CHECK(parse_failure(R"({"id":7,"method":"m"})", {}, &id).code() == rpc::invalid_request);
  CHECK(id == json::value(7));

  id = nullptr;
  CHECK(parse_failure(R"({"jsonrpc":"2.0","id":"abc","method":"m","params":[]})", {}, &id).code() ==
        rpc::invalid_params);
  CHECK(id == json::value("abc"));

  id = nullptr;
  CHECK(parse_failure(R"({"jsonrpc":"2.0","id":"x","method":5})", {}, &id).code() == rpc::invalid_request);
  CHECK(id == json::value("x"));

  // Unreadable ids stay null: the error goes back with "id":null, as JSON-RPC says.
  for (std::string_view line : {R"({"jsonrpc":"2.0","id":1.5,"method":"m"})", R"({"id":1,)", "[{\"id\":1}]"}) {
    id = nullptr;
    parse_failure(line, {}, &id);
    CHECK(id.is_null());
  }
}

TEST_CASE("rpc parse_request refuses a line over the length limit") {
  rpc::Limits limits;
  limits.max_line_bytes = 64;
  const std::string ok = R"({"jsonrpc":"2.0","id":1,"method":")" + std::string(64 - 36, 'm') + "\"}";
  REQUIRE(ok.size() == 64);
  CHECK(rpc::parse_request(ok, limits).method.size() == 28);

  const std::string too_long = R"({"jsonrpc":"2.0","id":1,"method":")" + std::string(29, 'm') + "\"}";
  const auto e = parse_failure(too_long, limits);
  CHECK(e.code() == rpc::limit_exceeded);
  CHECK(std::string(e.what()) == "request line of 65 bytes exceeds the limit of 64 bytes (limits.line_bytes)");
  CHECK(e.data() == json::value(json::object{{"limit", 64}}));
}

TEST_CASE("rpc parse_request refuses deep nesting at the depth limit") {
  // The request object is level 1 and its params level 2: 62 more levels reach the limit of 64.
  CHECK(rpc::parse_request(nested_request(62), {}).params.at("a").is_array());
  const auto e = parse_failure(nested_request(63));
  CHECK(e.code() == rpc::limit_exceeded);
  CHECK(std::string(e.what()) == "request nested deeper than the limit of 64 levels (limits.json_depth)");
  CHECK(e.data() == json::value(json::object{{"limit", 64}}));

  rpc::Limits shallow;
  shallow.max_depth = 3;
  CHECK_NOTHROW(rpc::parse_request(nested_request(1), shallow));
  CHECK(parse_failure(nested_request(2), shallow).data() == json::value(json::object{{"limit", 3}}));
}

TEST_CASE("rpc parse_request fails fast on nesting of depth 100000") {
  for (const char* open : {"[", "{\"a\":"}) {
    std::string line = R"({"jsonrpc":"2.0","id":1,"method":"m","params":{"a":)";
    for (int i = 0; i < 100000; ++i) line += open;
    const auto start = std::chrono::steady_clock::now();
    const auto e = parse_failure(line);
    const auto elapsed = std::chrono::steady_clock::now() - start;
    CHECK(e.code() == rpc::limit_exceeded);
    CHECK(e.data() == json::value(json::object{{"limit", 64}}));
    // It stops at level 65, so the time does not depend on the depth sent; generous for
    // sanitizer builds on a loaded machine.
    CHECK(elapsed < std::chrono::milliseconds(500));
  }
}

TEST_CASE("rpc LineFramer splits, joins and strips CR") {
  rpc::LineFramer framer(1024);
  auto lines = framer.push("one\ntwo\r\nthree");
  REQUIRE(lines.size() == 2);
  CHECK(lines[0].text == "one");
  CHECK(lines[0].bytes == 3);
  CHECK(lines[1].text == "two");
  CHECK(lines[1].bytes == 4);  // as received, '\r' included
  CHECK_FALSE(lines[1].oversized);
  CHECK(framer.pending_bytes() == 5);

  CHECK(framer.push("-and-").empty());
  CHECK(framer.pending_bytes() == 10);
  lines = framer.push("a-half\r");
  CHECK(lines.empty());
  lines = framer.push("\n\n\r\nlast\n");
  REQUIRE(lines.size() == 4);
  CHECK(lines[0].text == "three-and-a-half");  // "\r" and "\n" came in separate reads
  CHECK(lines[0].bytes == 17);
  CHECK(lines[1].text.empty());  // empty lines are reported; the caller decides
  CHECK(lines[2].text.empty());
  CHECK(lines[3].text == "last");
  CHECK(framer.pending_bytes() == 0);
  CHECK(framer.push("").empty());

  // Only a '\r' right before the newline is framing; one inside the line is data.
  lines = framer.push("a\rb\r\r\n");
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].text == "a\rb\r");

  rpc::LineFramer unlimited(SIZE_MAX);
  lines = unlimited.push("x\r\n");
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].text == "x");
}

TEST_CASE("rpc LineFramer applies the limit to the line without its CRLF") {
  rpc::LineFramer framer(8);
  auto lines = framer.push("12345678\r\n123456789\r\n12345678\n123456789\n");
  REQUIRE(lines.size() == 4);
  CHECK(lines[0].text == "12345678");
  CHECK_FALSE(lines[0].oversized);
  CHECK(lines[1].oversized);
  CHECK(lines[1].text.empty());
  CHECK(lines[1].bytes == 10);
  CHECK(lines[2].text == "12345678");
  CHECK(lines[3].oversized);
  CHECK(lines[3].bytes == 9);

  // After an oversized line the framer is back to normal.
  lines = framer.push("ok\n");
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].text == "ok");
  CHECK_FALSE(lines[0].oversized);
}

TEST_CASE("rpc LineFramer discards a 100 MB line without buffering it") {
  const size_t max_line_bytes = 4 << 20;
  const size_t line_bytes = 100 << 20;
  const size_t piece_bytes = 64 << 10;
  rpc::LineFramer framer(max_line_bytes);
  const std::string piece(piece_bytes, 'x');
  size_t max_capacity = 0;
  for (size_t sent = 0; sent < line_bytes; sent += piece_bytes) {
    if (!framer.push(piece).empty()) FAIL("a line came out before its newline");
    max_capacity = std::max(max_capacity, framer.buffer_capacity_bytes());
  }
  CHECK(framer.pending_bytes() == line_bytes);
  // std::string may double its capacity once past the limit, never more.
  CHECK(max_capacity <= 2 * (max_line_bytes + 1));
  CHECK(framer.buffer_capacity_bytes() < 64);  // released once the line was known to be too long

  const auto lines = framer.push("\n{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"m\"}\n");
  REQUIRE(lines.size() == 2);
  CHECK(lines[0].oversized);
  CHECK(lines[0].bytes == line_bytes);
  CHECK(lines[0].text.empty());
  CHECK_FALSE(lines[1].oversized);
  CHECK(rpc::parse_request(lines[1].text, {}).id == json::value(2));
  CHECK(framer.pending_bytes() == 0);
}

TEST_CASE("rpc replies are compact lines") {
  CHECK(rpc::response(7, json::object{{"ok", true}}) == "{\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"ok\":true}}\n");
  CHECK(rpc::response("a", nullptr) == "{\"jsonrpc\":\"2.0\",\"id\":\"a\",\"result\":null}\n");
  CHECK(rpc::error_response(nullptr, rpc::parse_error, "parse error: syntax error at byte 1") ==
        "{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32700,\"message\":\"parse error: syntax error at byte 1\"}}\n");
  CHECK(rpc::error_response(3, rpc::Error(rpc::limit_exceeded, "too \"long\"", json::object{{"limit", 8}})) ==
        "{\"jsonrpc\":\"2.0\",\"id\":3,\"error\":{\"code\":-32007,\"message\":\"too \\\"long\\\"\",\"data\":{\"limit\":8}}}\n");
  CHECK(rpc::notification("sessions/token", json::object{{"text", "hi\n"}}) ==
        "{\"jsonrpc\":\"2.0\",\"method\":\"sessions/token\",\"params\":{\"text\":\"hi\\n\"}}\n");
}

TEST_CASE("rpc replies stay valid JSON and UTF-8 whatever they carry") {
  // JSON has no infinities or NaN; Boost.JSON alone would write bare words.
  const json::value odd = json::array{-std::numeric_limits<double>::infinity(), std::nan(""), 0.5};
  CHECK(rpc::response(1, json::object{{"logprobs", odd}}) ==
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"logprobs\":[null,null,5E-1]}}\n");
  CHECK(rpc::error_response(1, 1, "m", odd) ==
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"error\":{\"code\":1,\"message\":\"m\",\"data\":[null,null,5E-1]}}\n");

  // Half of a multi-byte character (a token boundary inside "é") and stray bytes become U+FFFD.
  const std::string reply = rpc::notification("t", json::object{{"text", "caf\xC3"}, {"x\xFF", "\xE2\x82\xAC"}});
  CHECK(reply == "{\"jsonrpc\":\"2.0\",\"method\":\"t\",\"params\":{\"text\":\"caf\xEF\xBF\xBD\",\"x\xEF\xBF\xBD\":\"\xE2\x82\xAC\"}}\n");
  CHECK(rpc::parse_request(reply.substr(0, reply.size() - 1), {}).params.at("text").as_string() == "caf\xEF\xBF\xBD");
  CHECK(rpc::error_response(nullptr, 1, "bad \x80 byte") ==
        "{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":1,\"message\":\"bad \xEF\xBF\xBD byte\"}}\n");
}

TEST_CASE("rpc Params reads strings and reports missing or mistyped ones") {
  const json::object raw{{"session", "alice"}, {"n", 3}, {"nothing", nullptr}};
  const rpc::Params p(raw);
  CHECK(p.has("session"));
  CHECK_FALSE(p.has("name"));
  CHECK_FALSE(p.has("nothing"));  // null counts as absent
  CHECK(p.string("session") == "alice");
  CHECK(p.optional_string("name") == std::nullopt);
  CHECK(p.optional_string("nothing") == std::nullopt);

  const auto missing = error_of([&] { p.string("name"); });
  CHECK(missing.code() == rpc::invalid_params);
  CHECK(std::string(missing.what()) == "missing required parameter 'name'");
  CHECK(missing.data() == json::value(json::object{{"param", "name"}}));
  CHECK(std::string(error_of([&] { p.string("nothing"); }).what()) == "missing required parameter 'nothing'");
  CHECK(std::string(error_of([&] { p.string("n"); }).what()) == "invalid params: 'n' must be a string, got 3");
}

TEST_CASE("rpc Params integers accept integral doubles and refuse booleans") {
  const json::object raw{{"max_tokens", "abc"}, {"five", 5.0}, {"half", 2.5}, {"yes", true},
                         {"neg", -4}, {"huge", uint64_t{18446744073709551615u}}, {"big", 1e300},
                         {"ok", 128}, {"top", int64_t{9223372036854775807}}};
  const rpc::Params p(raw);
  const auto abc = error_of([&] { p.integer("max_tokens", 128, 0, 1048576); });
  CHECK(abc.code() == rpc::invalid_params);
  CHECK(std::string(abc.what()) == "invalid params: 'max_tokens' must be an integer in [0, 1048576], got \"abc\"");
  CHECK(abc.data() == json::value(json::object{{"param", "max_tokens"}}));

  CHECK(p.integer("ok", 1, 0, 1000) == 128);
  CHECK(p.integer("absent", 42, 0, 10) == 42);  // the fallback is the caller's business
  CHECK(p.integer("five", 0, 0, 10) == 5);
  CHECK(p.optional_integer("five", 0, 10) == 5);
  CHECK(p.optional_integer("absent", 0, 10) == std::nullopt);
  CHECK(p.integer("neg", 0, -10, 10) == -4);
  CHECK(p.integer("top", 0, 0, std::numeric_limits<int64_t>::max()) == std::numeric_limits<int64_t>::max());

  CHECK(std::string(error_of([&] { p.integer("half", 0, 0, 10); }).what()) ==
        "invalid params: 'half' must be an integer in [0, 10], got 2.5");
  CHECK(std::string(error_of([&] { p.integer("yes", 0, 0, 10); }).what()) ==
        "invalid params: 'yes' must be an integer in [0, 10], got true");
  CHECK(std::string(error_of([&] { p.optional_integer("neg", 0, 10); }).what()) ==
        "invalid params: 'neg' must be an integer in [0, 10], got -4");
  CHECK(std::string(error_of([&] { p.integer("huge", 0, 0, std::numeric_limits<int64_t>::max()); }).what()) ==
        "invalid params: 'huge' must be an integer >= 0, got 18446744073709551615");
  CHECK(std::string(error_of([&] {
          p.integer("big", 0, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max());
        }).what()) == "invalid params: 'big' must be an integer, got 1e+300");
}

TEST_CASE("rpc Params numbers, booleans and arrays") {
  const json::object raw{{"temperature", 0.7}, {"top_k", 40}, {"hot", 3.5}, {"flag", true}, {"one", 1},
                         {"stop", json::array{"\n", "END"}}, {"bad_stop", json::array{"a", 3}},
                         {"tokens", json::array{1, 2.0, 3}}, {"bad_tokens", json::array{1, 70000}},
                         {"word", "x"}, {"messages", json::array{json::object{{"role", "user"}}}}};
  const rpc::Params p(raw);
  CHECK(p.number("temperature", 0.8, 0, 2) == 0.7);
  CHECK(p.number("top_k", 0, 0, 100) == 40.0);
  CHECK(p.number("absent", 0.8, 0, 2) == 0.8);
  CHECK(std::string(error_of([&] { p.number("hot", 0.8, 0, 2); }).what()) ==
        "invalid params: 'hot' must be a number in [0, 2], got 3.5");
  CHECK(std::string(error_of([&] { p.number("flag", 0.8, 0, 2); }).what()) ==
        "invalid params: 'flag' must be a number in [0, 2], got true");
  CHECK(std::string(error_of([&] { p.number("word", 0.8, 0, 2); }).what()) ==
        "invalid params: 'word' must be a number in [0, 2], got \"x\"");

  CHECK(p.boolean("flag", false));
  CHECK_FALSE(p.boolean("absent", false));
  CHECK(std::string(error_of([&] { p.boolean("one", false); }).what()) ==
        "invalid params: 'one' must be a boolean (true or false), got 1");

  CHECK(p.strings("stop") == std::vector<std::string>{"\n", "END"});
  CHECK(p.strings("absent").empty());
  CHECK(std::string(error_of([&] { p.strings("bad_stop"); }).what()) ==
        "invalid params: 'bad_stop[1]' must be a string, got 3");
  CHECK(std::string(error_of([&] { p.strings("word"); }).what()) ==
        "invalid params: 'word' must be an array, got \"x\"");

  CHECK(p.int32s("tokens", 0, 49151) == std::vector<int32_t>{1, 2, 3});
  CHECK(p.int32s("absent", 0, 10).empty());
  CHECK(std::string(error_of([&] { p.int32s("bad_tokens", 0, 49151); }).what()) ==
        "invalid params: 'bad_tokens[1]' must be an integer in [0, 49151], got 70000");

  REQUIRE(p.optional_array("messages") != nullptr);
  CHECK(p.optional_array("messages")->size() == 1);
  CHECK(p.optional_array("absent") == nullptr);
  CHECK(error_of([&] { p.optional_array("flag"); }).code() == rpc::invalid_params);
}

TEST_CASE("rpc Params check_known names unknown and known keys") {
  const json::object raw{{"session", "a"}, {"max_token", 5}};
  const rpc::Params p(raw);
  CHECK_NOTHROW(p.check_known({"session", "max_token"}));
  const auto e = error_of([&] { p.check_known({"session", "max_tokens", "stream"}); });
  CHECK(e.code() == rpc::invalid_params);
  CHECK(std::string(e.what()) == "invalid params: unknown parameter 'max_token' (known: session, max_tokens, stream)");
  CHECK(e.data().as_object().at("unknown") == json::value(json::array{"max_token"}));
  CHECK(e.data().as_object().at("known") == json::value(json::array{"session", "max_tokens", "stream"}));

  CHECK(std::string(error_of([&] { p.check_known({}); }).what()) ==
        "invalid params: unknown parameters 'session', 'max_token' (this method takes none)");

  // Many unknown keys: the reply names a few and counts the rest.
  json::object many;
  for (int i = 0; i < 1000; ++i) many["k" + std::to_string(i)] = i;
  const auto flood = error_of([&] { rpc::Params(many).check_known({"session"}); });
  CHECK(contains(flood.what(), "and 992 more (known: session)"));
  CHECK(flood.data().as_object().at("unknown").as_array().size() == 8);
  CHECK(std::string(flood.what()).size() < 200);

  // A long key is shortened in the message, between UTF-8 characters.
  json::object long_key{{std::string(63, 'k') + "\xC3\xA9" + std::string(10, 'k'), 1}};
  const auto cut = error_of([&] { rpc::Params(long_key).check_known({"a"}); });
  CHECK(contains(cut.what(), "'" + std::string(63, 'k') + "...' (known: a)"));
}
