// The shared SQLite wrappers (see sqlite_db.h): the only place besides the stores' own queries
// that talks to sqlite3 directly.
#include "den/memory/sqlite_db.h"

#include <sqlite3.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <utility>

#include "den/memory/failpoints.h"

namespace den::memory::sqlite {

std::string statement_label(std::string_view sql) {
  const auto first = sql.find_first_not_of(" \n");
  sql = first == std::string_view::npos ? std::string_view{} : sql.substr(first);
  const size_t end = std::min(sql.find('\n'), sql.size());
  return end > 72 ? std::string(sql.substr(0, 72)) + "..." : std::string(sql.substr(0, end));
}

// ---- Connection ----

void Connection::Closer::operator()(sqlite3* db) const noexcept { sqlite3_close_v2(db); }

Connection::Connection(const std::filesystem::path& path, std::string where, ErrorThrower thrower, Threading threading)
    : where_(std::move(where)), thrower_(thrower) {
  sqlite3* raw = nullptr;
  const int mutex_flag = threading == Threading::serialized ? SQLITE_OPEN_FULLMUTEX : SQLITE_OPEN_NOMUTEX;
  const int rc = sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | mutex_flag, nullptr);
  db_.reset(raw);  // a failed open may still hand back a handle that needs closing
  if (rc != SQLITE_OK) {
    raise(where_ + ": cannot open: " + (raw != nullptr ? sqlite3_errmsg(raw) : sqlite3_errstr(rc)));
  }
  sqlite3_extended_result_codes(raw, 1);
}

Connection::~Connection() = default;
Connection::Connection(Connection&&) noexcept = default;
Connection& Connection::operator=(Connection&&) noexcept = default;

void Connection::raise(const std::string& message) const {
  thrower_(message);
  std::abort();  // a thrower that returns is a bug in the store that supplied it
}

void Connection::fail(std::string_view what) const {
  raise(where_ + ": " + std::string(what) + ": " + sqlite3_errmsg(db_.get()));
}

void Connection::fail_plain(std::string_view what) const { raise(where_ + ": " + std::string(what)); }

void Connection::exec(const std::string& sql) const {
  char* message = nullptr;
  if (sqlite3_exec(db_.get(), sql.c_str(), nullptr, nullptr, &message) != SQLITE_OK) {
    std::string text = message != nullptr ? message : sqlite3_errmsg(db_.get());
    sqlite3_free(message);
    fail_plain(statement_label(sql) + ": " + text);
  }
}

int64_t Connection::last_insert_id() const { return sqlite3_last_insert_rowid(db_.get()); }

// ---- Statement ----

void Statement::Finalizer::operator()(sqlite3_stmt* stmt) const noexcept { sqlite3_finalize(stmt); }

Statement::Statement(const Connection& conn, std::string_view sql) : conn_(conn), label_(statement_label(sql)) {
  sqlite3_stmt* raw = nullptr;
  if (sqlite3_prepare_v2(conn.get(), sql.data(), static_cast<int>(sql.size()), &raw, nullptr) != SQLITE_OK) {
    conn_.fail("prepare " + label_);
  }
  stmt_.reset(raw);
}

Statement::~Statement() = default;

Statement& Statement::bind_int(int index, int64_t value) {
  return check_bind(sqlite3_bind_int64(stmt_.get(), index, value));
}
Statement& Statement::bind_u64(int index, uint64_t value) { return bind_int(index, std::bit_cast<int64_t>(value)); }
Statement& Statement::bind_null(int index) { return check_bind(sqlite3_bind_null(stmt_.get(), index)); }
Statement& Statement::bind_double(int index, double value) {
  return check_bind(sqlite3_bind_double(stmt_.get(), index, value));
}
Statement& Statement::bind_text(int index, std::string_view text) {
  return check_bind(sqlite3_bind_text64(stmt_.get(), index, text.data(), text.size(), SQLITE_TRANSIENT, SQLITE_UTF8));
}
Statement& Statement::bind_blob(int index, std::span<const uint8_t> bytes) {
  // A null pointer would bind SQL NULL; an empty history is an empty blob.
  if (bytes.empty()) return check_bind(sqlite3_bind_zeroblob(stmt_.get(), index, 0));
  return check_bind(sqlite3_bind_blob64(stmt_.get(), index, bytes.data(), bytes.size(), SQLITE_TRANSIENT));
}

bool Statement::step() {
  const int rc = sqlite3_step(stmt_.get());
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  conn_.fail(label_);
}

int Statement::run() {
  while (step()) {
  }
  return sqlite3_changes(conn_.get());
}

void Statement::reset() {
  sqlite3_reset(stmt_.get());
  sqlite3_clear_bindings(stmt_.get());
}

bool Statement::is_null(int column) const { return sqlite3_column_type(stmt_.get(), column) == SQLITE_NULL; }
int64_t Statement::column_int(int column) const { return sqlite3_column_int64(stmt_.get(), column); }
uint64_t Statement::column_u64(int column) const { return std::bit_cast<uint64_t>(column_int(column)); }
double Statement::column_double(int column) const { return sqlite3_column_double(stmt_.get(), column); }
std::string Statement::column_text(int column) const {
  const auto* text = sqlite3_column_text(stmt_.get(), column);
  return text == nullptr ? std::string{}
                         : std::string(reinterpret_cast<const char*>(text),
                                       static_cast<size_t>(sqlite3_column_bytes(stmt_.get(), column)));
}
std::span<const uint8_t> Statement::column_blob(int column) const {
  const auto* data = static_cast<const uint8_t*>(sqlite3_column_blob(stmt_.get(), column));
  const auto size = static_cast<size_t>(sqlite3_column_bytes(stmt_.get(), column));
  return data == nullptr ? std::span<const uint8_t>{} : std::span<const uint8_t>(data, size);
}

Statement& Statement::check_bind(int rc) {
  if (rc != SQLITE_OK) conn_.fail("bind " + label_);
  return *this;
}

// ---- Transaction ----

Transaction::Transaction(const Connection& conn, TxMode mode) : conn_(conn) {
  conn_.exec(mode == TxMode::write ? "BEGIN IMMEDIATE" : "BEGIN DEFERRED");
}

Transaction::~Transaction() {
  // SQLite rolls back by itself after some errors (I/O, full disk); then there is nothing to undo.
  if (!committed_ && sqlite3_get_autocommit(conn_.get()) == 0) {
    sqlite3_exec(conn_.get(), "ROLLBACK", nullptr, nullptr, nullptr);
  }
}

void Transaction::commit() {
  failpoint("sqlite.before_commit");  // an error here rolls back in the destructor
  conn_.exec("COMMIT");
  committed_ = true;
  failpoint("sqlite.after_commit");
}

// ---- helpers and the open sequence ----

int64_t pragma_int(const Connection& conn, const std::string& pragma) {
  Statement st(conn, "PRAGMA " + pragma);
  if (!st.step()) conn.fail_plain("PRAGMA " + pragma + " returned no row");
  return st.column_int(0);
}

void check_sqlite_header(const std::filesystem::path& path, const std::string& where, std::string_view refusal,
                         ErrorThrower thrower) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return;  // a new file
  static constexpr char kMagic[] = "SQLite format 3";  // 16 bytes with the terminating NUL
  std::array<char, sizeof(kMagic)> header{};
  in.read(header.data(), header.size());
  if (in.gcount() == 0) return;  // an empty file is an empty database
  if (in.gcount() != static_cast<std::streamsize>(header.size()) || std::memcmp(header.data(), kMagic, sizeof(kMagic)) != 0) {
    thrower(where + std::string(refusal));
    std::abort();  // a thrower that returns is a bug in the store that supplied it
  }
}

Connection open_versioned(const std::filesystem::path& path, const StoreSpec& spec) {
  const std::string where = std::string(spec.name) + " '" + path.string() + "'";
  check_sqlite_header(path, where, spec.not_sqlite_refusal, spec.thrower);
  Connection c(path, where, spec.thrower, spec.threading);
  if (sqlite3_busy_timeout(c.get(), spec.busy_timeout_ms) != SQLITE_OK) c.fail("busy_timeout");

  // Identity and version first: nothing is written to a file that is not ours or is too new.
  const auto application_id = static_cast<int32_t>(pragma_int(c, "application_id"));
  if (application_id != spec.application_id) {
    const bool empty = application_id == 0 && [&] {
                         Statement st(c, "SELECT count(*) FROM sqlite_schema");
                         return st.step() && st.column_int(0) == 0;
                       }();
    if (!empty) {
      c.raise(c.where() + std::string(spec.foreign_refusal) + " (its application_id is " +
              std::to_string(application_id) + "); it was left untouched");
    }
  }
  const auto too_new = [&](int64_t version) {
    c.fail_plain("schema version " + std::to_string(version) + " was written by a newer Den (this build knows up to " +
                 std::to_string(spec.schema_version) + ")");
  };
  if (const int64_t version = pragma_int(c, "user_version"); version > spec.schema_version) too_new(version);

  {
    Statement st(c, "PRAGMA journal_mode = WAL");
    if (!st.step() || st.column_text(0) != "wal") c.fail_plain("cannot switch the journal to WAL");
  }
  // FULL: a commit is on disk when COMMIT returns, which is what both stores promise.
  c.exec("PRAGMA synchronous = FULL");
  c.exec("PRAGMA foreign_keys = ON");
  if (pragma_int(c, "foreign_keys") != 1) c.fail_plain("this SQLite does not enforce foreign keys");

  if (pragma_int(c, "user_version") < spec.schema_version) {
    Transaction tx(c);
    // Read again under the write lock: another process may have migrated meanwhile.
    const int64_t version = pragma_int(c, "user_version");
    if (version > spec.schema_version) too_new(version);
    for (int64_t v = version; v < spec.schema_version; ++v) c.exec(spec.migrations[static_cast<size_t>(v)]);
    if (version == 0) c.exec("PRAGMA application_id = " + std::to_string(spec.application_id));
    c.exec("PRAGMA user_version = " + std::to_string(spec.schema_version));
    tx.commit();
  }
  return c;
}

}  // namespace den::memory::sqlite
