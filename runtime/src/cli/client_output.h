// What the daemon's CLI clients share: --socket/--json, calls whose refusals become one line
// that says what to do, and the plain rendering of JSON values for people. Private to the CLI.
#pragma once

#include <CLI/CLI.hpp>
#include <boost/json.hpp>

#include <string>
#include <string_view>
#include <vector>

#include "den/runtime/client.h"

namespace den::runtime::cli {

struct ClientOptions {
  std::string socket;
  bool json = false;
};
void add_client_options(CLI::App& cmd, ClientOptions& o);

// The daemon's refusals become one line that says what to do; DaemonUnavailable already does.
boost::json::value call_daemon(DaemonClient& client, std::string_view method, const boost::json::object& params = {},
                               const DaemonClient::NotificationHandler& on_notification = {});
void print_json(const boost::json::value& v);  // one line, flushed
double number_of(const boost::json::value* v);  // 0 when absent or not a number
// Bytes in binary units for people: "512 B", "1.5 GiB" (`decimals` past the point above bytes).
std::string human_bytes(double bytes, int decimals = 1);
// A scalar as a person reads it: strings bare, booleans yes/no, null "-".
std::string plain(const boost::json::value* v);
std::string field(const boost::json::object& o, std::string_view key);
// Rows as aligned columns (two spaces apart); the first row is the header.
void print_table(const std::vector<std::vector<std::string>>& rows);

}  // namespace den::runtime::cli
