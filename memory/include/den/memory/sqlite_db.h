// SQLite RAII wrappers shared by Den's stores: the connection, prepared statements, the
// transaction guard and the common open sequence (identity check, WAL, synchronous=FULL, foreign
// keys, schema migrations). Used by memory's MetadataStore and runtime's AgentStore; sqlite3.h
// stays private to memory/src (the handles are only forward-declared here).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>

struct sqlite3;
struct sqlite3_stmt;

namespace den::memory::sqlite {

// Throws the owning store's exception type with the given, complete message. Must not return.
using ErrorThrower = void (*)(const std::string& message);

// The first line of a statement, shortened: enough to name it in an error message.
std::string statement_label(std::string_view sql);

// How SQLite itself serializes calls on the connection.
enum class Threading {
  serialized,     // SQLITE_OPEN_FULLMUTEX: SQLite locks every call
  caller_locked,  // SQLITE_OPEN_NOMUTEX: every use is under the owner's mutex already
};

// The connection: owns the sqlite3 handle and knows how to word its errors. Every message starts
// with `where` ("metadata store '/path'") and is thrown through `thrower`.
class Connection {
 public:
  Connection(const std::filesystem::path& path, std::string where, ErrorThrower thrower, Threading threading);
  ~Connection();
  Connection(Connection&&) noexcept;
  Connection& operator=(Connection&&) noexcept;
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  sqlite3* get() const { return db_.get(); }
  const std::string& where() const { return where_; }

  // "<where>: <what>: <sqlite's last error>".
  [[noreturn]] void fail(std::string_view what) const;
  // "<where>: <what>".
  [[noreturn]] void fail_plain(std::string_view what) const;
  // Throws `message` as it is, in the owner's exception type.
  [[noreturn]] void raise(const std::string& message) const;

  // Runs statements that return no rows we need.
  void exec(const std::string& sql) const;

  int64_t last_insert_id() const;

 private:
  struct Closer {
    void operator()(sqlite3* db) const noexcept;
  };
  std::string where_;
  ErrorThrower thrower_;
  std::unique_ptr<sqlite3, Closer> db_;
};

// One prepared statement. Parameters and columns are numbered as SQLite does: binds from 1,
// columns from 0. Errors name the statement. uint64 values are stored bit-cast to int64.
class Statement {
 public:
  Statement(const Connection& conn, std::string_view sql);
  ~Statement();
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;

  Statement& bind_int(int index, int64_t value);
  Statement& bind_u64(int index, uint64_t value);
  Statement& bind_null(int index);
  // 0 is "none" in the API and NULL in the schema.
  Statement& bind_id_or_null(int index, int64_t id) { return id == 0 ? bind_null(index) : bind_int(index, id); }
  Statement& bind_double(int index, double value);
  Statement& bind_text(int index, std::string_view text);
  // An empty span binds an empty blob, not NULL.
  Statement& bind_blob(int index, std::span<const uint8_t> bytes);

  // True while a row is ready, false when the statement is done.
  bool step();
  // For statements that return no rows; the number of rows changed.
  int run();
  // Ready to bind and run again.
  void reset();

  bool is_null(int column) const;
  int64_t column_int(int column) const;
  uint64_t column_u64(int column) const;
  double column_double(int column) const;
  std::string column_text(int column) const;
  // Valid until the next step, reset or destruction.
  std::span<const uint8_t> column_blob(int column) const;

 private:
  struct Finalizer {
    void operator()(sqlite3_stmt* stmt) const noexcept;
  };
  Statement& check_bind(int rc);

  const Connection& conn_;
  std::string label_;
  std::unique_ptr<sqlite3_stmt, Finalizer> stmt_;
};

// BEGIN on construction, ROLLBACK on destruction unless committed: a throw anywhere leaves
// nothing changed. Writers begin IMMEDIATE (the write lock up front, so a commit never fails on
// a lock upgrade); readers that need one consistent snapshot begin DEFERRED.
enum class TxMode { write, read };

class Transaction {
 public:
  explicit Transaction(const Connection& conn, TxMode mode = TxMode::write);
  ~Transaction();
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;

  void commit();

 private:
  const Connection& conn_;
  bool committed_ = false;
};

int64_t pragma_int(const Connection& conn, const std::string& pragma);

// A non-empty file that does not start with SQLite's magic is refused before SQLite touches it:
// throws `where + refusal` through `thrower`.
void check_sqlite_header(const std::filesystem::path& path, const std::string& where, std::string_view refusal,
                         ErrorThrower thrower);

// What open_versioned needs to know about one kind of store.
struct StoreSpec {
  std::string_view name;  // "metadata store": messages start with "metadata store '<path>'"
  ErrorThrower thrower;
  Threading threading = Threading::serialized;
  int32_t application_id = 0;                // PRAGMA application_id of this kind of file
  int64_t schema_version = 0;                // == migrations.size()
  std::span<const char* const> migrations;  // entry i takes the schema from version i to i + 1
  int busy_timeout_ms = 5000;               // how long a statement waits for another writer
  // Appended to the `where` text when the file is not an SQLite database at all.
  std::string_view not_sqlite_refusal;  // " is not a Den store: the file is not an SQLite database"
  // Appended to `where` before " (its application_id is N); it was left untouched".
  std::string_view foreign_refusal;  // " is not a Den store"
};

// Opens (creating if needed) the store at `path`: refuses a file that is not SQLite, belongs to
// something else or was written by a newer schema, before writing anything; then WAL,
// synchronous=FULL, foreign keys on, and the missing migrations in one transaction that also sets
// user_version (and application_id on a new file).
Connection open_versioned(const std::filesystem::path& path, const StoreSpec& spec);

}  // namespace den::memory::sqlite
