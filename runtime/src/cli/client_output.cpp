// Shared pieces of the daemon's CLI clients (client_output.h).
#include "client_output.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>

namespace den::runtime::cli {
namespace json = boost::json;

void add_client_options(CLI::App& cmd, ClientOptions& o) {
  cmd.add_option("--socket", o.socket,
                 "The daemon's socket (default: $DEN_SOCKET, else $XDG_RUNTIME_DIR/den/den.sock, else "
                 "/tmp/den-$UID/den.sock)");
  cmd.add_flag("--json", o.json, "Print the daemon's JSON result (one object per line), for scripts");
}

json::value call_daemon(DaemonClient& client, std::string_view method, const json::object& params,
                        const DaemonClient::NotificationHandler& on_notification) {
  try {
    return client.call(method, params, on_notification);
  } catch (const RpcCallError& e) {
    throw std::runtime_error(describe_for_user(e));
  }
}

void print_json(const json::value& v) {
  std::printf("%s\n", json::serialize(v).c_str());
  std::fflush(stdout);
}

double number_of(const json::value* v) {
  if (v == nullptr) return 0.0;
  json::error_code ec;
  const double d = v->to_number<double>(ec);
  return ec ? 0.0 : d;
}

std::string human_bytes(double bytes, int decimals) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (std::abs(bytes) >= 1024.0 && u < 4) {
    bytes /= 1024.0;
    ++u;
  }
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f %s", u == 0 ? 0 : decimals, bytes, units[u]);
  return buf;
}

std::string plain(const json::value* v) {
  if (v == nullptr || v->is_null()) return "-";
  if (const json::string* s = v->if_string()) return std::string(*s);
  if (v->is_bool()) return v->as_bool() ? "yes" : "no";
  if (v->is_double()) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.4g", v->as_double());
    return buf;
  }
  return json::serialize(*v);
}

std::string field(const json::object& o, std::string_view key) { return plain(o.if_contains(key)); }

void print_table(const std::vector<std::vector<std::string>>& rows) {
  if (rows.empty()) return;
  std::vector<size_t> widths(rows[0].size(), 0);
  for (const auto& row : rows) {
    for (size_t c = 0; c < row.size() && c < widths.size(); ++c) widths[c] = std::max(widths[c], row[c].size());
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      line += row[c];
      if (c + 1 < row.size()) line += std::string(widths[c] - row[c].size() + 2, ' ');
    }
    std::printf("%s\n", line.c_str());
  }
}

}  // namespace den::runtime::cli
