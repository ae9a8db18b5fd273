// KV segment files: the SSD tier's on-disk format. One segment holds whole KV blocks written by
// one checkpoint (only blocks not already on SSD), each with its content hash, token count and
// an XXH3-64 checksum of its bytes. Written to `<name>.tmp`, fsynced, renamed and the directory
// fsynced; the SQLite row that references it is the commit point (the session manager's job).
//
// Layout (little endian, every section starts at a multiple of 4096 so blocks can be read with
// O_DIRECT):
//   header   magic "DENKVSEG", version, model fingerprint, session id, generation, KvLayout,
//            block count, block stride (block_bytes rounded up to 4096), payload offset
//   table    per block: content hash, tokens, XXH3-64 of its block_bytes
//   payload  block i at payload_offset + i * stride
//   footer   magic "DENKVEND", XXH3-64 of header and table (every byte before the payload,
//            zero padding included), total file size; alone in the last 4096-byte page
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "den/kernels/paged_kv.h"
#include "den/memory/file_io.h"

namespace den::memory {

// A segment whose bytes do not verify (magic, version, footer, checksum, layout, fingerprint).
class CorruptSegment : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct SegmentHeader {
  uint64_t model_fingerprint = 0;
  uint64_t session_id = 0;
  uint64_t generation = 0;
  kernels::KvLayout layout;
};

struct SegmentEntry {
  uint64_t content_hash = 0;
  int32_t tokens = 0;     // tokens held (block_tokens, or fewer for a session's last block)
  uint64_t checksum = 0;  // XXH3-64 of the block's block_bytes bytes
};

// A block to write: its identity and a host pointer to its layout.block_bytes() bytes.
struct SegmentBlockSource {
  uint64_t content_hash = 0;
  int32_t tokens = 0;
  const void* data = nullptr;
};

struct SegmentInfo {
  std::filesystem::path path;  // the final name
  int64_t file_bytes = 0;
  uint64_t footer_hash = 0;    // XXH3-64 of header and table, as stored in the footer
  std::vector<SegmentEntry> entries;
};

// Progress of a long write or read: bytes done so far of the total.
using IoProgress = std::function<void(int64_t done_bytes, int64_t total_bytes)>;

// Writes a new segment at `path` (which must not exist) through `path` + ".tmp":
// write -> fsync -> rename -> fsync directory. `on_step` (may be empty) is called after each of
// those four steps with its name ("write", "fsync", "rename", "fsync_dir") so crash tests can
// stop the process there. On failure throws IoError, removes the temp file where it can, and
// never leaves a file at `path`: when the directory fsync fails after the rename (or `on_step`
// throws after it), the renamed segment is removed again, since the caller will not commit it.
// `path` must not exist beforehand (IoError EEXIST). A failed fsync is never retried. Uses
// O_DIRECT where the filesystem allows it.
SegmentInfo write_segment(const std::filesystem::path& path, const SegmentHeader& header,
                          std::span<const SegmentBlockSource> blocks, IoFaultInjector* faults = nullptr,
                          const IoProgress& progress = {},
                          const std::function<void(const char* step)>& on_step = {});

// An open segment, verified on open: magic, version, size, footer and the header/table hash.
// A mismatch with `expected` (fingerprint, layout; session id and generation are not checked) or
// with `expected_footer_hash` (when nonzero) throws CorruptSegment.
class SegmentReader {
 public:
  SegmentReader(const std::filesystem::path& path, const SegmentHeader& expected, uint64_t expected_footer_hash,
                IoFaultInjector* faults = nullptr);
  const SegmentHeader& header() const { return header_; }
  const std::vector<SegmentEntry>& entries() const { return entries_; }
  // Reads blocks `indices[i]` into `destinations[i]` (host memory, block_bytes each), verifying
  // each checksum: CorruptSegment names the block that fails. Reads adjacent blocks in one call
  // and with O_DIRECT where it can (through an aligned bounce buffer when a destination is not
  // aligned). Throws IoError on read errors.
  void read_blocks(std::span<const int32_t> indices, std::span<void* const> destinations,
                   const IoProgress& progress = {}) const;

 private:
  File file_;
  SegmentHeader header_;
  std::vector<SegmentEntry> entries_;
  int64_t payload_offset_ = 0;
  int64_t stride_ = 0;
};

// XXH3-64 of a block's bytes (what SegmentEntry::checksum holds).
uint64_t block_checksum(const void* data, int64_t bytes);

}  // namespace den::memory
