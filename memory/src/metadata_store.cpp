// MetadataStore: the memory manager's SQLite database (sessions, segments, block locations).
// Private here: RAII owners for the connection and statements, a small statement helper, the
// transaction guard and the list of schema migrations.
#include "den/memory/metadata_store.h"

#include <sqlite3.h>

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>

namespace den::memory {
namespace {

// PRAGMA application_id of every Den store: 'DEN1'.
constexpr int32_t kApplicationId = 0x44454E31;
constexpr int kBusyTimeoutMs = 5000;

// Schema migrations, applied in order inside one transaction on open. Entry i takes the schema
// from version i to version i + 1; a version 2 is one more entry (and kSchemaVersion + 1).
constexpr std::array kMigrations = {
    // v0 -> v1. uint64 values (ids, hashes, fingerprints) are stored bit-cast to int64.
    R"sql(
CREATE TABLE sessions (
  id INTEGER PRIMARY KEY,
  name TEXT UNIQUE,                   -- NULL when unnamed
  model_fingerprint INTEGER NOT NULL,
  generation INTEGER NOT NULL,
  pinned INTEGER NOT NULL,
  tokens BLOB NOT NULL,               -- int32 little endian
  kv_tokens INTEGER NOT NULL,
  block_hashes BLOB NOT NULL,         -- uint64 little endian
  updated_ms INTEGER NOT NULL
);
CREATE TABLE segments (
  name TEXT PRIMARY KEY,
  file_bytes INTEGER NOT NULL,
  footer_hash INTEGER NOT NULL,
  model_fingerprint INTEGER NOT NULL,
  quarantined INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE blocks (
  content_hash INTEGER PRIMARY KEY,
  segment TEXT NOT NULL REFERENCES segments(name),
  idx INTEGER NOT NULL,
  tokens INTEGER NOT NULL,
  checksum INTEGER NOT NULL
);
-- quarantine and forget delete by segment; the foreign key check wants it too.
CREATE INDEX blocks_by_segment ON blocks(segment);
)sql",
};
static_assert(kMigrations.size() == MetadataStore::kSchemaVersion, "one migration step per schema version");

int64_t to_db(uint64_t value) { return std::bit_cast<int64_t>(value); }
uint64_t from_db(int64_t value) { return std::bit_cast<uint64_t>(value); }

// Little-endian blob codecs, written byte by byte so the file format does not depend on the host.
std::vector<uint8_t> encode_tokens(std::span<const int32_t> tokens) {
  std::vector<uint8_t> bytes(tokens.size() * 4);
  for (size_t i = 0; i < tokens.size(); ++i) {
    const auto v = static_cast<uint32_t>(tokens[i]);
    for (size_t b = 0; b < 4; ++b) bytes[i * 4 + b] = static_cast<uint8_t>(v >> (8 * b));
  }
  return bytes;
}

std::vector<uint8_t> encode_hashes(std::span<const uint64_t> hashes) {
  std::vector<uint8_t> bytes(hashes.size() * 8);
  for (size_t i = 0; i < hashes.size(); ++i) {
    for (size_t b = 0; b < 8; ++b) bytes[i * 8 + b] = static_cast<uint8_t>(hashes[i] >> (8 * b));
  }
  return bytes;
}

template <typename T>
std::vector<T> decode_le(std::span<const uint8_t> bytes) {
  std::vector<T> values(bytes.size() / sizeof(T));
  for (size_t i = 0; i < values.size(); ++i) {
    std::make_unsigned_t<T> v = 0;
    for (size_t b = 0; b < sizeof(T); ++b) v |= static_cast<std::make_unsigned_t<T>>(bytes[i * sizeof(T) + b]) << (8 * b);
    values[i] = static_cast<T>(v);
  }
  return values;
}

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The first line of a statement, shortened: enough to name it in an error message.
std::string statement_label(std::string_view sql) {
  const auto first = sql.find_first_not_of(" \n");
  sql = first == std::string_view::npos ? std::string_view{} : sql.substr(first);
  const size_t end = std::min(sql.find('\n'), sql.size());
  return end > 72 ? std::string(sql.substr(0, 72)) + "..." : std::string(sql.substr(0, end));
}

std::string hex(uint64_t value) {
  char text[19];
  std::snprintf(text, sizeof(text), "0x%016llx", static_cast<unsigned long long>(value));
  return text;
}

struct DbCloser {
  void operator()(sqlite3* db) const noexcept { sqlite3_close_v2(db); }
};
struct StmtFinalizer {
  void operator()(sqlite3_stmt* stmt) const noexcept { sqlite3_finalize(stmt); }
};

// The connection: owns the sqlite3 handle and knows how to word its errors.
class Connection {
 public:
  explicit Connection(const std::filesystem::path& path) : where_("metadata store '" + path.string() + "'") {
    sqlite3* raw = nullptr;
    const int rc = sqlite3_open_v2(path.c_str(), &raw,
                                   SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
    db_.reset(raw);  // a failed open may still hand back a handle that needs closing
    if (rc != SQLITE_OK) {
      throw StoreError(where_ + ": cannot open: " + (raw != nullptr ? sqlite3_errmsg(raw) : sqlite3_errstr(rc)));
    }
    sqlite3_extended_result_codes(raw, 1);
  }

  sqlite3* get() const { return db_.get(); }
  const std::string& where() const { return where_; }

  [[noreturn]] void fail(std::string_view what) const {
    throw StoreError(where_ + ": " + std::string(what) + ": " + sqlite3_errmsg(db_.get()));
  }
  [[noreturn]] void fail_plain(std::string_view what) const { throw StoreError(where_ + ": " + std::string(what)); }

  // Runs statements that return no rows we need.
  void exec(const std::string& sql) const {
    char* message = nullptr;
    if (sqlite3_exec(db_.get(), sql.c_str(), nullptr, nullptr, &message) != SQLITE_OK) {
      std::string text = message != nullptr ? message : sqlite3_errmsg(db_.get());
      sqlite3_free(message);
      fail_plain(statement_label(sql) + ": " + text);
    }
  }

 private:
  std::string where_;
  std::unique_ptr<sqlite3, DbCloser> db_;
};

// One prepared statement. Parameters and columns are numbered as SQLite does: binds from 1,
// columns from 0. Errors name the statement.
class Statement {
 public:
  Statement(const Connection& conn, std::string_view sql) : conn_(conn), label_(statement_label(sql)) {
    sqlite3_stmt* raw = nullptr;
    if (sqlite3_prepare_v2(conn.get(), sql.data(), static_cast<int>(sql.size()), &raw, nullptr) != SQLITE_OK) {
      conn_.fail("prepare " + label_);
    }
    stmt_.reset(raw);
  }

  Statement& bind_int(int index, int64_t value) { return check_bind(sqlite3_bind_int64(stmt_.get(), index, value)); }
  Statement& bind_u64(int index, uint64_t value) { return bind_int(index, to_db(value)); }
  Statement& bind_null(int index) { return check_bind(sqlite3_bind_null(stmt_.get(), index)); }
  Statement& bind_text(int index, std::string_view text) {
    return check_bind(sqlite3_bind_text64(stmt_.get(), index, text.data(), text.size(), SQLITE_TRANSIENT, SQLITE_UTF8));
  }
  Statement& bind_blob(int index, std::span<const uint8_t> bytes) {
    // A null pointer would bind SQL NULL; an empty history is an empty blob.
    if (bytes.empty()) return check_bind(sqlite3_bind_zeroblob(stmt_.get(), index, 0));
    return check_bind(sqlite3_bind_blob64(stmt_.get(), index, bytes.data(), bytes.size(), SQLITE_TRANSIENT));
  }

  // True while a row is ready, false when the statement is done.
  bool step() {
    const int rc = sqlite3_step(stmt_.get());
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    conn_.fail(label_);
  }
  // For statements that return no rows; the number of rows changed.
  int run() {
    while (step()) {
    }
    return sqlite3_changes(conn_.get());
  }
  // Ready to bind and run again.
  void reset() {
    sqlite3_reset(stmt_.get());
    sqlite3_clear_bindings(stmt_.get());
  }

  bool is_null(int column) const { return sqlite3_column_type(stmt_.get(), column) == SQLITE_NULL; }
  int64_t column_int(int column) const { return sqlite3_column_int64(stmt_.get(), column); }
  uint64_t column_u64(int column) const { return from_db(column_int(column)); }
  std::string column_text(int column) const {
    const auto* text = sqlite3_column_text(stmt_.get(), column);
    return text == nullptr ? std::string{}
                           : std::string(reinterpret_cast<const char*>(text),
                                         static_cast<size_t>(sqlite3_column_bytes(stmt_.get(), column)));
  }
  std::span<const uint8_t> column_blob(int column) const {
    const auto* data = static_cast<const uint8_t*>(sqlite3_column_blob(stmt_.get(), column));
    const auto size = static_cast<size_t>(sqlite3_column_bytes(stmt_.get(), column));
    return data == nullptr ? std::span<const uint8_t>{} : std::span<const uint8_t>(data, size);
  }

 private:
  Statement& check_bind(int rc) {
    if (rc != SQLITE_OK) conn_.fail("bind " + label_);
    return *this;
  }

  const Connection& conn_;
  std::string label_;
  std::unique_ptr<sqlite3_stmt, StmtFinalizer> stmt_;
};

// BEGIN on construction, ROLLBACK on destruction unless committed: a throw anywhere leaves
// nothing changed. Writers begin IMMEDIATE (the write lock up front, so a commit never fails on
// a lock upgrade); readers that need one consistent snapshot begin DEFERRED.
enum class TxMode { write, read };

class Transaction {
 public:
  explicit Transaction(const Connection& conn, TxMode mode = TxMode::write) : conn_(conn) {
    conn_.exec(mode == TxMode::write ? "BEGIN IMMEDIATE" : "BEGIN DEFERRED");
  }
  ~Transaction() {
    // SQLite rolls back by itself after some errors (I/O, full disk); then there is nothing to undo.
    if (!committed_ && sqlite3_get_autocommit(conn_.get()) == 0) {
      sqlite3_exec(conn_.get(), "ROLLBACK", nullptr, nullptr, nullptr);
    }
  }
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;

  void commit() {
    conn_.exec("COMMIT");
    committed_ = true;
  }

 private:
  const Connection& conn_;
  bool committed_ = false;
};

int64_t pragma_int(const Connection& conn, const std::string& pragma) {
  Statement st(conn, "PRAGMA " + pragma);
  if (!st.step()) conn.fail_plain("PRAGMA " + pragma + " returned no row");
  return st.column_int(0);
}

// A non-empty file that does not start with SQLite's magic is refused before SQLite touches it.
void check_sqlite_header(const std::filesystem::path& path, const std::string& where) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return;  // a new file
  static constexpr char kMagic[] = "SQLite format 3";  // 16 bytes with the terminating NUL
  std::array<char, sizeof(kMagic)> header{};
  in.read(header.data(), header.size());
  if (in.gcount() == 0) return;  // an empty file is an empty database
  if (in.gcount() != static_cast<std::streamsize>(header.size()) || std::memcmp(header.data(), kMagic, sizeof(kMagic)) != 0) {
    throw StoreError(where + " is not a Den store: the file is not an SQLite database");
  }
}

const char* const kSessionColumns =
    "id, name, model_fingerprint, generation, pinned, tokens, kv_tokens, block_hashes FROM sessions";

SessionRecord read_session(const Connection& conn, const Statement& st) {
  SessionRecord s;
  s.id = st.column_u64(0);
  s.name = st.is_null(1) ? std::string{} : st.column_text(1);
  s.model_fingerprint = st.column_u64(2);
  s.generation = st.column_u64(3);
  s.pinned = st.column_int(4) != 0;
  const auto tokens = st.column_blob(5);
  const auto hashes = st.column_blob(7);
  if (tokens.size() % 4 != 0 || hashes.size() % 8 != 0) {
    conn.fail_plain("session " + std::to_string(s.id) + " has a corrupt token or block-hash blob");
  }
  s.tokens = decode_le<int32_t>(tokens);
  s.kv_tokens = static_cast<int32_t>(st.column_int(6));
  s.block_hashes = decode_le<uint64_t>(hashes);
  return s;
}

void check_kv_tokens(const Connection& conn, const SessionRecord& s, std::string_view operation) {
  if (s.kv_tokens < 0 || static_cast<size_t>(s.kv_tokens) > s.tokens.size()) {
    conn.fail_plain(std::string(operation) + " of session " + std::to_string(s.id) + ": kv_tokens " +
                    std::to_string(s.kv_tokens) + " is outside the token history of " + std::to_string(s.tokens.size()));
  }
}

void require_session(const Connection& conn, uint64_t id, std::string_view operation) {
  Statement st(conn, "SELECT 1 FROM sessions WHERE id = ?1");
  st.bind_u64(1, id);
  if (!st.step()) conn.fail_plain(std::string(operation) + ": no session " + std::to_string(id));
}

// Every block hash referenced by some session's block table.
std::unordered_set<uint64_t> referenced_hashes(const Connection& conn) {
  std::unordered_set<uint64_t> hashes;
  Statement st(conn, "SELECT block_hashes FROM sessions");
  while (st.step()) {
    for (uint64_t h : decode_le<uint64_t>(st.column_blob(0))) hashes.insert(h);
  }
  return hashes;
}

}  // namespace

// Connection is FULLMUTEX, but a transaction spans several calls on it: the mutex keeps one
// method's transaction from interleaving with another thread's (the session manager calls
// from its worker thread and its owner thread).
struct MetadataStore::Impl {
  explicit Impl(const std::filesystem::path& path) : conn(path) {}
  Connection conn;
  std::mutex mutex;
};

MetadataStore::MetadataStore(const std::filesystem::path& db_path) {
  check_sqlite_header(db_path, "metadata store '" + db_path.string() + "'");
  impl_ = std::make_unique<Impl>(db_path);
  const Connection& c = impl_->conn;
  if (sqlite3_busy_timeout(c.get(), kBusyTimeoutMs) != SQLITE_OK) c.fail("busy_timeout");

  // Identity and version first: nothing is written to a file that is not ours or is too new.
  const auto application_id = static_cast<int32_t>(pragma_int(c, "application_id"));
  if (application_id != kApplicationId) {
    const bool empty = application_id == 0 && [&] {
                         Statement st(c, "SELECT count(*) FROM sqlite_schema");
                         return st.step() && st.column_int(0) == 0;
                       }();
    if (!empty) {
      throw StoreError(c.where() + " is not a Den store (its application_id is " + std::to_string(application_id) +
                       "); it was left untouched");
    }
  }
  const auto too_new = [&](int64_t version) {
    c.fail_plain("schema version " + std::to_string(version) + " was written by a newer Den (this build knows up to " +
                 std::to_string(kSchemaVersion) + ")");
  };
  if (const int64_t version = pragma_int(c, "user_version"); version > kSchemaVersion) too_new(version);

  {
    Statement st(c, "PRAGMA journal_mode = WAL");
    if (!st.step() || st.column_text(0) != "wal") c.fail_plain("cannot switch the journal to WAL");
  }
  c.exec("PRAGMA synchronous = FULL");
  c.exec("PRAGMA foreign_keys = ON");
  if (pragma_int(c, "foreign_keys") != 1) c.fail_plain("this SQLite does not enforce foreign keys");

  if (pragma_int(c, "user_version") < kSchemaVersion) {
    Transaction tx(c);
    // Read again under the write lock: another process may have migrated meanwhile.
    const int64_t version = pragma_int(c, "user_version");
    if (version > kSchemaVersion) too_new(version);
    for (int64_t v = version; v < kSchemaVersion; ++v) c.exec(kMigrations[static_cast<size_t>(v)]);
    if (version == 0) c.exec("PRAGMA application_id = " + std::to_string(kApplicationId));
    c.exec("PRAGMA user_version = " + std::to_string(kSchemaVersion));
    tx.commit();
  }
}

MetadataStore::~MetadataStore() = default;

int MetadataStore::schema_version() const {
  std::lock_guard lock(impl_->mutex);
  return static_cast<int>(pragma_int(impl_->conn, "user_version"));
}

void MetadataStore::create_session(const SessionRecord& session) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  check_kv_tokens(c, session, "create_session");
  Transaction tx(c);
  {
    Statement st(c, "SELECT 1 FROM sessions WHERE id = ?1");
    st.bind_u64(1, session.id);
    if (st.step()) c.fail_plain("create_session: session " + std::to_string(session.id) + " already exists");
  }
  if (!session.name.empty()) {
    Statement st(c, "SELECT id FROM sessions WHERE name = ?1");
    st.bind_text(1, session.name);
    if (st.step()) {
      c.fail_plain("create_session: the name '" + session.name + "' is taken by session " +
                   std::to_string(st.column_u64(0)));
    }
  }
  Statement st(c,
               "INSERT INTO sessions (id, name, model_fingerprint, generation, pinned, tokens, kv_tokens, "
               "block_hashes, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)");
  st.bind_u64(1, session.id);
  if (session.name.empty()) {
    st.bind_null(2);  // NULLs are exempt from UNIQUE: any number of unnamed sessions
  } else {
    st.bind_text(2, session.name);
  }
  st.bind_u64(3, session.model_fingerprint)
      .bind_u64(4, session.generation)
      .bind_int(5, session.pinned ? 1 : 0)
      .bind_blob(6, encode_tokens(session.tokens))
      .bind_int(7, session.kv_tokens)
      .bind_blob(8, encode_hashes(session.block_hashes))
      .bind_int(9, now_ms());
  st.run();
  tx.commit();
}

void MetadataStore::save_tokens(uint64_t session_id, std::span<const int32_t> tokens) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  {
    Statement st(c, "SELECT kv_tokens FROM sessions WHERE id = ?1");
    st.bind_u64(1, session_id);
    if (!st.step()) c.fail_plain("save_tokens: no session " + std::to_string(session_id));
    if (st.column_int(0) > static_cast<int64_t>(tokens.size())) {
      c.fail_plain("save_tokens: session " + std::to_string(session_id) + " has " + std::to_string(st.column_int(0)) +
                   " checkpointed KV tokens, more than the " + std::to_string(tokens.size()) +
                   " tokens saved; truncate its block table first");
    }
  }
  Statement st(c, "UPDATE sessions SET tokens = ?2, updated_ms = ?3 WHERE id = ?1");
  st.bind_u64(1, session_id).bind_blob(2, encode_tokens(tokens)).bind_int(3, now_ms());
  st.run();
  tx.commit();
}

void MetadataStore::set_pinned(uint64_t session_id, bool pinned) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  Statement st(c, "UPDATE sessions SET pinned = ?2, updated_ms = ?3 WHERE id = ?1");
  st.bind_u64(1, session_id).bind_int(2, pinned ? 1 : 0).bind_int(3, now_ms());
  if (st.run() == 0) c.fail_plain("set_pinned: no session " + std::to_string(session_id));
  tx.commit();
}

void MetadataStore::invalidate_kv(uint64_t session_id) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  Statement st(c, "UPDATE sessions SET kv_tokens = 0, block_hashes = ?2, updated_ms = ?3 WHERE id = ?1");
  st.bind_u64(1, session_id).bind_blob(2, {}).bind_int(3, now_ms());
  if (st.run() == 0) c.fail_plain("invalidate_kv: no session " + std::to_string(session_id));
  tx.commit();
}

void MetadataStore::delete_session(uint64_t session_id) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  Statement st(c, "DELETE FROM sessions WHERE id = ?1");
  st.bind_u64(1, session_id);
  if (st.run() == 0) c.fail_plain("delete_session: no session " + std::to_string(session_id));
  tx.commit();
}

void MetadataStore::commit_checkpoint(const SessionRecord& session, std::span<const SegmentRecord> new_segments,
                                      std::span<const BlockLocation> new_blocks) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  check_kv_tokens(c, session, "commit_checkpoint");
  Transaction tx(c);
  require_session(c, session.id, "commit_checkpoint");

  if (!new_segments.empty()) {
    Statement st(c,
                 "INSERT INTO segments (name, file_bytes, footer_hash, model_fingerprint, quarantined) "
                 "VALUES (?1, ?2, ?3, ?4, ?5)");
    for (const auto& seg : new_segments) {
      st.bind_text(1, seg.name)
          .bind_int(2, seg.file_bytes)
          .bind_u64(3, seg.footer_hash)
          .bind_u64(4, seg.model_fingerprint)
          .bind_int(5, seg.quarantined ? 1 : 0);
      st.run();
      st.reset();
    }
  }
  if (!new_blocks.empty()) {
    // OR IGNORE: a block already located keeps its first location. It does not excuse a
    // missing segment: foreign keys are not conflicts.
    Statement st(c,
                 "INSERT OR IGNORE INTO blocks (content_hash, segment, idx, tokens, checksum) "
                 "VALUES (?1, ?2, ?3, ?4, ?5)");
    for (const auto& block : new_blocks) {
      st.bind_u64(1, block.content_hash)
          .bind_text(2, block.segment)
          .bind_int(3, block.index)
          .bind_int(4, block.tokens)
          .bind_u64(5, block.checksum);
      st.run();
      st.reset();
    }
  }
  {
    Statement st(c, "SELECT 1 FROM blocks WHERE content_hash = ?1");
    for (size_t i = 0; i < session.block_hashes.size(); ++i) {
      st.bind_u64(1, session.block_hashes[i]);
      if (!st.step()) {
        c.fail_plain("commit_checkpoint of session " + std::to_string(session.id) + ": block " + std::to_string(i) +
                     " (hash " + hex(session.block_hashes[i]) + ") is not located in any segment");
      }
      st.reset();
    }
  }
  Statement st(c,
               "UPDATE sessions SET tokens = ?2, kv_tokens = ?3, block_hashes = ?4, generation = ?5, pinned = ?6, "
               "updated_ms = ?7, model_fingerprint = ?8 WHERE id = ?1");
  st.bind_u64(1, session.id)
      .bind_blob(2, encode_tokens(session.tokens))
      .bind_int(3, session.kv_tokens)
      .bind_blob(4, encode_hashes(session.block_hashes))
      .bind_u64(5, session.generation)
      .bind_int(6, session.pinned ? 1 : 0)
      .bind_int(7, now_ms())
      .bind_u64(8, session.model_fingerprint);
  st.run();
  tx.commit();
}

std::vector<SessionRecord> MetadataStore::load_sessions() const {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  std::vector<SessionRecord> sessions;
  Statement st(c, std::string("SELECT ") + kSessionColumns);
  while (st.step()) sessions.push_back(read_session(c, st));
  // Sorted here: SQL would order ids >= 2^63 (negative as int64) first.
  std::sort(sessions.begin(), sessions.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
  return sessions;
}

std::optional<SessionRecord> MetadataStore::load_session(uint64_t session_id) const {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Statement st(c, std::string("SELECT ") + kSessionColumns + " WHERE id = ?1");
  st.bind_u64(1, session_id);
  if (!st.step()) return std::nullopt;
  return read_session(c, st);
}

std::optional<BlockLocation> MetadataStore::locate_block(uint64_t content_hash) const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn, "SELECT segment, idx, tokens, checksum FROM blocks WHERE content_hash = ?1");
  st.bind_u64(1, content_hash);
  if (!st.step()) return std::nullopt;
  BlockLocation loc;
  loc.content_hash = content_hash;
  loc.segment = st.column_text(0);
  loc.index = static_cast<int32_t>(st.column_int(1));
  loc.tokens = static_cast<int32_t>(st.column_int(2));
  loc.checksum = st.column_u64(3);
  return loc;
}

std::vector<std::optional<BlockLocation>> MetadataStore::locate_blocks(std::span<const uint64_t> hashes) const {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c, TxMode::read);  // one snapshot, one prepared statement for all of them
  Statement st(c, "SELECT segment, idx, tokens, checksum FROM blocks WHERE content_hash = ?1");
  std::vector<std::optional<BlockLocation>> out;
  out.reserve(hashes.size());
  for (uint64_t hash : hashes) {
    st.bind_u64(1, hash);
    if (st.step()) {
      BlockLocation loc;
      loc.content_hash = hash;
      loc.segment = st.column_text(0);
      loc.index = static_cast<int32_t>(st.column_int(1));
      loc.tokens = static_cast<int32_t>(st.column_int(2));
      loc.checksum = st.column_u64(3);
      out.push_back(std::move(loc));
    } else {
      out.push_back(std::nullopt);
    }
    st.reset();
  }
  tx.commit();
  return out;
}

std::vector<SegmentRecord> MetadataStore::segments() const {
  std::lock_guard lock(impl_->mutex);
  Statement st(impl_->conn,
               "SELECT name, file_bytes, footer_hash, model_fingerprint, quarantined FROM segments ORDER BY name");
  std::vector<SegmentRecord> out;
  while (st.step()) {
    SegmentRecord seg;
    seg.name = st.column_text(0);
    seg.file_bytes = st.column_int(1);
    seg.footer_hash = st.column_u64(2);
    seg.model_fingerprint = st.column_u64(3);
    seg.quarantined = st.column_int(4) != 0;
    out.push_back(std::move(seg));
  }
  return out;
}

std::vector<uint64_t> MetadataStore::quarantine_segment(const std::string& segment) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  {
    Statement st(c, "UPDATE segments SET quarantined = 1 WHERE name = ?1");
    st.bind_text(1, segment);
    if (st.run() == 0) c.fail_plain("quarantine_segment: no segment '" + segment + "'");
  }
  std::unordered_set<uint64_t> removed;
  {
    Statement st(c, "SELECT content_hash FROM blocks WHERE segment = ?1");
    st.bind_text(1, segment);
    while (st.step()) removed.insert(st.column_u64(0));
  }
  {
    Statement st(c, "DELETE FROM blocks WHERE segment = ?1");
    st.bind_text(1, segment);
    st.run();
  }
  std::vector<uint64_t> affected;
  if (!removed.empty()) {
    Statement st(c, "SELECT id, block_hashes FROM sessions");
    while (st.step()) {
      const auto hashes = decode_le<uint64_t>(st.column_blob(1));
      if (std::any_of(hashes.begin(), hashes.end(), [&](uint64_t h) { return removed.contains(h); })) {
        affected.push_back(st.column_u64(0));
      }
    }
  }
  tx.commit();
  std::sort(affected.begin(), affected.end());
  return affected;
}

std::vector<std::string> MetadataStore::unreferenced_segments() const {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  // One read transaction, so sessions and blocks are seen at the same instant.
  Transaction tx(c, TxMode::read);
  const auto referenced = referenced_hashes(c);
  std::unordered_map<std::string, bool> in_use;  // segment -> referenced and not quarantined
  {
    Statement st(c, "SELECT name FROM segments");
    while (st.step()) in_use.emplace(st.column_text(0), false);
  }
  {
    Statement st(c, "SELECT b.segment, b.content_hash FROM blocks b JOIN segments s ON s.name = b.segment "
                    "WHERE s.quarantined = 0");
    while (st.step()) {
      if (referenced.contains(st.column_u64(1))) in_use[st.column_text(0)] = true;
    }
  }
  tx.commit();
  std::vector<std::string> out;
  for (const auto& [name, used] : in_use) {
    if (!used) out.push_back(name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

void MetadataStore::forget_segments(std::span<const std::string> segments) {
  std::lock_guard lock(impl_->mutex);
  const Connection& c = impl_->conn;
  Transaction tx(c);
  Statement blocks(c, "DELETE FROM blocks WHERE segment = ?1");
  Statement rows(c, "DELETE FROM segments WHERE name = ?1");
  for (const auto& name : segments) {
    // Blocks first: the foreign key forbids a location in a segment that has no row.
    blocks.bind_text(1, name);
    blocks.run();
    blocks.reset();
    rows.bind_text(1, name);
    rows.run();
    rows.reset();
  }
  tx.commit();
}

uint64_t MetadataStore::max_session_id() const {
  std::lock_guard lock(impl_->mutex);
  // Compared as uint64 here: SQL's MAX would rank ids >= 2^63 (negative as int64) lowest.
  Statement st(impl_->conn, "SELECT id FROM sessions");
  uint64_t max_id = 0;
  while (st.step()) max_id = std::max(max_id, st.column_u64(0));
  return max_id;
}

}  // namespace den::memory
