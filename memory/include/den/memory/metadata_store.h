// The memory manager's SQLite store: sessions (durable token history, pin, generation), the
// block table of each session's last checkpoint, the KV segment files and where each
// checkpointed block lives in them. WAL journal, synchronous=FULL, one writer, every change in
// one BEGIN IMMEDIATE transaction: a commit that returned is durable, one that threw changed
// nothing. Schema migrations run on open (PRAGMA user_version). Only memory/ uses it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace den::memory {

// SQLite said no (busy, I/O error, constraint). The message names the statement and the error.
class StoreError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct SessionRecord {
  uint64_t id = 0;
  std::string name;                // "" when unnamed; unique otherwise
  uint64_t model_fingerprint = 0;
  uint64_t generation = 0;         // checkpoints committed so far
  bool pinned = false;
  std::vector<int32_t> tokens;     // the durable token history
  int32_t kv_tokens = 0;           // tokens covered by the checkpointed KV (<= tokens.size())
  std::vector<uint64_t> block_hashes;  // checkpointed KV blocks, in order, covering kv_tokens
};

// Where a checkpointed block's bytes are.
struct BlockLocation {
  uint64_t content_hash = 0;
  std::string segment;   // segment file name (relative to the store's segment directory)
  int32_t index = 0;     // block index within the segment
  int32_t tokens = 0;
  uint64_t checksum = 0; // XXH3-64 of the block bytes
};

struct SegmentRecord {
  std::string name;      // file name, unique
  int64_t file_bytes = 0;
  uint64_t footer_hash = 0;
  uint64_t model_fingerprint = 0;
  bool quarantined = false;
};

class MetadataStore {
 public:
  // Opens or creates the database file (its directory must exist), sets WAL and
  // synchronous=FULL, migrates to the current schema. Throws StoreError, e.g. for a file that
  // is not a Den store or a schema newer than this build knows.
  explicit MetadataStore(const std::filesystem::path& db_path);
  ~MetadataStore();
  MetadataStore(const MetadataStore&) = delete;
  MetadataStore& operator=(const MetadataStore&) = delete;

  static constexpr int kSchemaVersion = 1;
  int schema_version() const;

  // Inserts a new session (its tokens, kv_tokens and block_hashes as given, usually empty).
  // Throws StoreError when the id or the name is taken.
  void create_session(const SessionRecord& session);
  // Replaces the durable token history only (the KV checkpoint is unchanged). Throws when the
  // history is shorter than the checkpointed KV: invalidate_kv first.
  void save_tokens(uint64_t session_id, std::span<const int32_t> tokens);
  void set_pinned(uint64_t session_id, bool pinned);
  // Drops the session's checkpointed KV (block table empty, kv_tokens 0), tokens kept.
  void invalidate_kv(uint64_t session_id);
  // Removes the session row. Its blocks' locations stay until forget_segments.
  void delete_session(uint64_t session_id);

  // The commit point of a checkpoint, one transaction: insert `new_segments` and the locations
  // of `new_blocks` (blocks already located keep their first location), then replace the
  // session's tokens, kv_tokens, block_hashes, generation, pin flag and model fingerprint with
  // `session`'s (a checkpoint under a new model replaces the old model's KV).
  // Every hash in session.block_hashes must be located (before or by this call), else
  // StoreError and nothing changes.
  void commit_checkpoint(const SessionRecord& session, std::span<const SegmentRecord> new_segments,
                         std::span<const BlockLocation> new_blocks);

  std::vector<SessionRecord> load_sessions() const;
  std::optional<SessionRecord> load_session(uint64_t session_id) const;
  std::optional<BlockLocation> locate_block(uint64_t content_hash) const;
  // The same for many blocks in one read transaction (a wake, a checkpoint, a collection).
  std::vector<std::optional<BlockLocation>> locate_blocks(std::span<const uint64_t> hashes) const;
  std::vector<SegmentRecord> segments() const;

  // Marks a segment quarantined and removes its block locations, in one transaction; returns
  // the ids of the sessions whose block table referenced one of its blocks (the caller
  // invalidates their KV). A quarantined segment is never read again.
  std::vector<uint64_t> quarantine_segment(const std::string& segment);
  // Segments that no session's block table references any more (quarantined ones included).
  std::vector<std::string> unreferenced_segments() const;
  // Removes segment rows and their block locations (after or before deleting the files: a file
  // without a row is removed at the next start).
  void forget_segments(std::span<const std::string> segments);
  // The largest session id in use (0 when none): new ids are allocated above it.
  uint64_t max_session_id() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace den::memory
