// MetadataStore: the memory manager's SQLite database (sessions, segments, block locations).
// Private here: the list of schema migrations and the row codecs; the connection, statements,
// transaction guard and open sequence are the shared ones in sqlite_db.h.
#include "den/memory/metadata_store.h"

#include "den/memory/sqlite_db.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
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

using sqlite::Connection;
using sqlite::pragma_int;
using sqlite::Statement;
using sqlite::Transaction;
using sqlite::TxMode;

[[noreturn]] void throw_store_error(const std::string& message) { throw StoreError(message); }

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

std::string hex(uint64_t value) {
  char text[19];
  std::snprintf(text, sizeof(text), "0x%016llx", static_cast<unsigned long long>(value));
  return text;
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
  explicit Impl(const std::filesystem::path& path)
      : conn(sqlite::open_versioned(path, {.name = "metadata store",
                                           .thrower = throw_store_error,
                                           .application_id = kApplicationId,
                                           .schema_version = kSchemaVersion,
                                           .migrations = kMigrations,
                                           .not_sqlite_refusal = " is not a Den store: the file is not an SQLite database",
                                           .foreign_refusal = " is not a Den store"})) {}
  Connection conn;
  std::mutex mutex;
};

MetadataStore::MetadataStore(const std::filesystem::path& db_path)
    : impl_(std::make_unique<Impl>(db_path)) {}

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
