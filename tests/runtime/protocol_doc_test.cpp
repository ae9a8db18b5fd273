// docs/PROTOCOL.md's examples kept true: every `→` line of the document is sent, in document
// order and over one connection, to a real `den serve` on stories260K, and every `←` line is
// matched with what the daemon answered (a response by its id, a notification by its method and
// request) and must have the same shape: the same keys, recursively, and the same error code.
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <boost/json.hpp>

#include "daemon_process.h"
#include "den/runtime/client.h"
#include "test_support.h"

namespace den::test {
namespace {

namespace json = boost::json;
using Clock = std::chrono::steady_clock;

constexpr std::string_view kSent = "→ ";      // a client line
constexpr std::string_view kReceived = "← ";  // a daemon line
// How long one documented answer may take: the longest example generates 1500 tokens of
// stories260K (about a second on one thread) when its cancellation comes too late.
constexpr std::chrono::seconds kAnswerTimeout{60};

// The session, model and daemon methods of service.cpp's routes (agents/* aside): each needs an example.
const std::vector<std::string> kMethods = {
    "initialize",         "sessions/create",    "sessions/list",   "sessions/get",    "sessions/append",
    "sessions/generate",  "sessions/cancel",    "sessions/pin",    "sessions/unpin",  "sessions/checkpoint",
    "sessions/hibernate", "sessions/wake",      "sessions/fork",   "sessions/delete", "models/list",
    "daemon/stats",       "daemon/shutdown"};
const std::vector<int64_t> kErrorCodes = {-32700, -32601, -32602, -32000, -32002, -32007};

struct DocLine {
  int number = 0;  // 1-based line in PROTOCOL.md
  bool sent = false;
  std::string text;  // without the arrow
};

std::string protocol_doc_path() {
  // fixture_path("") is <repo>/tests/fixtures/.
  const std::filesystem::path root = (std::filesystem::path(fixture_path("")) / ".." / "..").lexically_normal();
  return (root / "docs" / "PROTOCOL.md").string();
}

// The `→` and `←` lines of the document's code blocks, in order.
std::vector<DocLine> exchange_lines(const std::string& markdown) {
  std::vector<DocLine> lines;
  std::istringstream in(markdown);
  std::string line;
  bool in_code = false;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.starts_with("```")) {
      in_code = !in_code;
      continue;
    }
    if (!in_code) continue;
    if (line.starts_with(kSent)) lines.push_back({number, true, line.substr(kSent.size())});
    if (line.starts_with(kReceived)) lines.push_back({number, false, line.substr(kReceived.size())});
  }
  return lines;
}

std::string value_kind(const json::value& v) {
  if (v.is_object()) return "an object";
  if (v.is_array()) return "an array";
  return "a scalar";
}

// Empty when `actual` has the shape of `documented`: objects with the same keys (compared
// recursively), arrays both empty or both not (each element compared with the documented one at
// its index, the last documented one standing for any beyond), scalars of any kind (a name may
// be null, a number may be written as an integer or a double). Otherwise, the first difference.
std::string shape_difference(const json::value& documented, const json::value& actual, const std::string& where) {
  if (documented.is_object() != actual.is_object() || documented.is_array() != actual.is_array()) {
    return where + " is " + value_kind(actual) + ", documented as " + value_kind(documented);
  }
  if (documented.is_object()) {
    const json::object& doc = documented.get_object();
    const json::object& got = actual.get_object();
    for (const auto& member : doc) {
      if (!got.contains(member.key())) return where + "." + std::string(member.key()) + " is missing";
    }
    for (const auto& member : got) {
      if (!doc.contains(member.key())) return where + "." + std::string(member.key()) + " is not documented";
    }
    for (const auto& member : doc) {
      const std::string key(member.key());
      std::string difference = shape_difference(member.value(), got.at(key), where + "." + key);
      if (!difference.empty()) return difference;
    }
    return {};
  }
  if (documented.is_array()) {
    const json::array& doc = documented.get_array();
    const json::array& got = actual.get_array();
    if (doc.empty() != got.empty()) {
      return where + " has " + std::to_string(got.size()) + " elements, documented with " + std::to_string(doc.size());
    }
    for (size_t i = 0; i < got.size(); ++i) {
      std::string difference =
          shape_difference(doc[std::min(i, doc.size() - 1)], got[i], where + "[" + std::to_string(i) + "]");
      if (!difference.empty()) return difference;
    }
  }
  return {};
}

bool is_response(const json::object& message) { return message.contains("id"); }

// What the daemon sent on the connection, kept until a documented line claims it.
class Inbox {
 public:
  explicit Inbox(runtime::DaemonClient& client) : client_(client) {}

  // The unclaimed response with this id, or null when none came within kAnswerTimeout.
  const json::object* response(const json::value& id) {
    const auto deadline = Clock::now() + kAnswerTimeout;
    for (;;) {
      for (Received& r : received_) {
        if (!r.claimed && is_response(r.message) && r.message.at("id") == id) {
          r.claimed = true;
          return &r.message;
        }
      }
      if (!receive(deadline)) return nullptr;
    }
  }

  // The next unclaimed notification of this method for this request, or null when the
  // request's response came first (its notifications are over: they precede the response) or
  // nothing came within kAnswerTimeout.
  const json::object* notification(std::string_view method, const json::value& request) {
    const auto deadline = Clock::now() + kAnswerTimeout;
    for (;;) {
      bool answered = false;
      for (Received& r : received_) {
        if (is_response(r.message)) {
          answered = answered || r.message.at("id") == request;
          continue;
        }
        const json::value* notified_method = r.message.if_contains("method");
        const json::value* params = r.message.if_contains("params");
        const json::value* notified =
            params != nullptr && params->is_object() ? params->get_object().if_contains("request") : nullptr;
        if (!r.claimed && notified_method != nullptr && notified_method->is_string() &&
            notified_method->get_string() == method && notified != nullptr && *notified == request) {
          r.claimed = true;
          return &r.message;
        }
      }
      if (answered || !receive(deadline)) return nullptr;
    }
  }

  std::string last_error() const { return error_; }

 private:
  struct Received {
    json::object message;
    bool claimed = false;
  };

  bool receive(Clock::time_point deadline) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      error_ = "nothing more came within " + std::to_string(kAnswerTimeout.count()) + " s";
      return false;
    }
    const std::optional<std::string> line = client_.read_line(left);
    if (!line) {
      error_ = "the connection closed or nothing more came within " + std::to_string(kAnswerTimeout.count()) + " s";
      return false;
    }
    json::error_code ec;
    json::value message = json::parse(*line, ec);
    if (ec || !message.is_object()) {
      error_ = "the daemon sent a line that is not a JSON object: " + line->substr(0, 200);
      return false;
    }
    received_.push_back({std::move(message.get_object()), false});
    return true;
  }

  runtime::DaemonClient& client_;
  std::vector<Received> received_;
  std::string error_;
};

std::string read_protocol_doc() {
  const std::string path = protocol_doc_path();
  REQUIRE_MESSAGE(file_exists(path), path << " is missing");
  return read_file(path);
}

TEST_CASE("PROTOCOL.md examples cover every method and the main errors, each request answered once") {
  const std::vector<DocLine> lines = exchange_lines(read_protocol_doc());
  std::set<std::string> methods;
  std::set<int64_t> codes;
  std::map<std::string, int> requests;   // serialized id -> doc line
  std::map<std::string, int> responses;  // serialized id -> doc line
  for (const DocLine& line : lines) {
    CAPTURE(line.number);
    json::error_code ec;
    const json::value message = json::parse(line.text, ec);
    if (line.sent) {
      if (ec || !message.is_object()) continue;  // a malformed request on purpose (-32700)
      const json::object& request = message.get_object();
      if (const json::value* method = request.if_contains("method"); method != nullptr && method->is_string()) {
        methods.insert(std::string(method->get_string()));
      }
      if (const json::value* id = request.if_contains("id"); id != nullptr && !id->is_null()) {
        CHECK_MESSAGE(requests.emplace(json::serialize(*id), line.number).second, "request id " << *id << " is used twice");
      }
      continue;
    }
    REQUIRE_MESSAGE((!ec && message.is_object()), "a ← line must be one JSON object: " << line.text);
    const json::object& received = message.get_object();
    if (!is_response(received)) {
      CHECK_MESSAGE(received.contains("method"), "a ← notification without a method: " << line.text);
      continue;
    }
    const json::value& id = received.at("id");
    if (!id.is_null()) {
      CHECK_MESSAGE(requests.contains(json::serialize(id)), "a response to an id no earlier → line sent: " << line.text);
      CHECK_MESSAGE(responses.emplace(json::serialize(id), line.number).second, "two responses to id " << id);
    }
    if (const json::value* error = received.if_contains("error"); error != nullptr && error->is_object()) {
      codes.insert(error->get_object().at("code").to_number<int64_t>());
    }
  }
  for (const auto& [id, number] : requests) {
    CHECK_MESSAGE(responses.contains(id), "the request of line " << number << " (id " << id << ") has no documented response");
  }
  for (const std::string& method : kMethods) CHECK_MESSAGE(methods.contains(method), "no example calls " << method);
  for (int64_t code : kErrorCodes) CHECK_MESSAGE(codes.contains(code), "no example shows error " << code);
}

TEST_CASE("PROTOCOL.md examples replayed in order on a real daemon get answers of the documented shapes") {
  DEN_SKIP_UNLESS(file_exists(stories_model()), "../shared/models/stories260K is absent");
  const std::vector<DocLine> lines = exchange_lines(read_protocol_doc());
  REQUIRE_FALSE(lines.empty());

  DaemonProcess daemon({"-m", stories_model(), "--backend", "cpu", "--threads", "1"});
  runtime::DaemonClient client(daemon.socket_path());
  Inbox inbox(client);
  using NotificationKey = std::pair<std::string, std::string>;  // (method, serialized request id)
  std::set<NotificationKey> notifications_documented, notifications_seen;
  bool shut_down = false;

  for (const DocLine& line : lines) {
    INFO("PROTOCOL.md:" << line.number << ": " << line.text.substr(0, 300));
    if (line.sent) {
      client.send_raw(line.text + "\n");
      shut_down = shut_down || line.text.find(R"("method":"daemon/shutdown")") != std::string::npos;
      continue;
    }
    const json::object documented = json::parse(line.text).as_object();
    const json::object* actual = nullptr;
    if (is_response(documented)) {
      actual = inbox.response(documented.at("id"));
      REQUIRE_MESSAGE(actual != nullptr, "no response with id " << documented.at("id") << ": " << inbox.last_error());
      if (documented.contains("error") && actual->contains("error")) {
        CHECK(actual->at("error").at("code") == documented.at("error").at("code"));
      }
    } else {
      const std::string method(documented.at("method").as_string());
      const json::value& request = documented.at("params").at("request");
      const NotificationKey key(method, json::serialize(request));
      notifications_documented.insert(key);
      // How many notifications a request sends may differ from the capture (a cancellation
      // lands a token earlier or later; a copy finishes before its first progress report);
      // that at least one came is checked below.
      actual = inbox.notification(method, request);
      if (actual == nullptr) continue;
      notifications_seen.insert(key);
    }
    const std::string difference = shape_difference(documented, *actual, "message");
    CHECK_MESSAGE(difference.empty(), difference << "\n  daemon sent: " << json::serialize(*actual).substr(0, 600));
  }
  for (const NotificationKey& key : notifications_documented) {
    CHECK_MESSAGE(notifications_seen.contains(key), "no " << key.first << " notification for request " << key.second);
  }
  if (shut_down) CHECK(daemon.wait_exit() == 0);
}

}  // namespace
}  // namespace den::test
