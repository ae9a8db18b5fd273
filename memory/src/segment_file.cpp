// KV segment files: write_segment (tmp -> fsync -> rename -> fsync dir; the payload in large
// aligned pieces on a few threads)
// and SegmentReader (verified open, coalesced O_DIRECT block reads with per-block checksums).
// The session manager's checkpoint and restore paths use them; the layout is in segment_file.h.
#include "den/memory/segment_file.h"

#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

namespace den::memory {
namespace {

constexpr int64_t kPage = kDirectIoAlignment;
constexpr uint32_t kVersion = 1;
constexpr std::string_view kMagic = "DENKVSEG";
constexpr std::string_view kFooterMagic = "DENKVEND";
// Payload writes are pieces of at most this size: large enough to run at disk speed, small
// enough to report progress often.
constexpr int64_t kChunkBytes = int64_t{8} << 20;
// Reads of adjacent blocks merge into requests of up to this size: a wake reads 32 MiB pieces on
// a few threads, each piece one request (VM and NVMe disks reach their rate with few, large
// requests in flight).
constexpr int64_t kReadRequestBytes = int64_t{32} << 20;

// Header field offsets. Every field is written explicitly, little endian, so the format does
// not depend on struct padding or the host's byte order.
constexpr int64_t kOffMagic = 0;            // 8 bytes "DENKVSEG"
constexpr int64_t kOffVersion = 8;          // u32
constexpr int64_t kOffFingerprint = 16;     // u64 (12..16 reserved, zero)
constexpr int64_t kOffSessionId = 24;       // u64
constexpr int64_t kOffGeneration = 32;      // u64
constexpr int64_t kOffLayers = 40;          // i32
constexpr int64_t kOffKvHeads = 44;         // i32
constexpr int64_t kOffHeadDim = 48;         // i32
constexpr int64_t kOffBlockTokens = 52;     // i32
constexpr int64_t kOffDtype = 56;           // u32 (60..64 reserved, zero)
constexpr int64_t kOffBlockCount = 64;      // i64
constexpr int64_t kOffBlockStride = 72;     // i64
constexpr int64_t kOffPayloadOffset = 80;   // i64
constexpr int64_t kOffBlockBytes = 88;      // i64
constexpr int64_t kHeaderBytes = 96;
// Table entry: u64 content hash, i32 tokens, u32 reserved (zero), u64 checksum.
constexpr int64_t kEntryBytes = 24;
// Footer page: 8 bytes "DENKVEND", u64 XXH3-64 of [0, payload_offset), i64 file size.
constexpr int64_t kOffFooterHash = 8;
constexpr int64_t kOffFooterFileBytes = 16;

int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

void put_u64(unsigned char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
void put_u32(unsigned char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
uint64_t get_u64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t{p[i]} << (8 * i);
  return v;
}
uint32_t get_u32(const unsigned char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t{p[i]} << (8 * i);
  return v;
}
void put_i64(unsigned char* p, int64_t v) { put_u64(p, static_cast<uint64_t>(v)); }
void put_i32(unsigned char* p, int32_t v) { put_u32(p, static_cast<uint32_t>(v)); }
int64_t get_i64(const unsigned char* p) { return static_cast<int64_t>(get_u64(p)); }
int32_t get_i32(const unsigned char* p) { return static_cast<int32_t>(get_u32(p)); }

// Where everything lies in a segment of `n_blocks` blocks of `block_bytes`.
struct Geometry {
  int64_t block_bytes = 0;
  int64_t stride = 0;
  int64_t payload_offset = 0;
  int64_t footer_offset = 0;
  int64_t file_bytes = 0;
};

Geometry geometry_of(int64_t block_bytes, int64_t n_blocks) {
  Geometry g;
  g.block_bytes = block_bytes;
  g.stride = round_up(block_bytes, kPage);
  g.payload_offset = round_up(kHeaderBytes + n_blocks * kEntryBytes, kPage);
  g.footer_offset = g.payload_offset + n_blocks * g.stride;
  g.file_bytes = g.footer_offset + kPage;
  return g;
}

std::string hex(uint64_t v) {
  char text[24];
  std::snprintf(text, sizeof text, "0x%016llx", static_cast<unsigned long long>(v));
  return text;
}

std::string describe(const kernels::KvLayout& l) {
  return std::to_string(l.n_layers) + " layers x " + std::to_string(l.n_kv_heads) + " kv heads x head_dim " +
         std::to_string(l.head_dim) + ", " + std::to_string(l.block_tokens) + " tokens/block, " +
         std::string(kernels::dtype_name(l.dtype));
}

// Also bounds the block size (computed in double, which cannot overflow) so that a damaged
// header cannot make block_bytes() overflow int64.
bool layout_is_valid(const kernels::KvLayout& l, uint32_t dtype) {
  if (l.n_layers <= 0 || l.n_kv_heads <= 0 || l.head_dim <= 0 || l.block_tokens <= 0 ||
      dtype > static_cast<uint32_t>(kernels::DType::bf16)) {
    return false;
  }
  const double block_bytes = 2.0 * 4.0 * l.n_layers * l.n_kv_heads * l.head_dim * l.block_tokens;
  return block_bytes <= static_cast<double>(int64_t{1} << 40);
}

// Header, table and their zero padding: the first payload_offset bytes of the file.
void encode_prefix(unsigned char* p, const SegmentHeader& header, const std::vector<SegmentEntry>& entries,
                   const Geometry& g) {
  std::memcpy(p + kOffMagic, kMagic.data(), kMagic.size());
  put_u32(p + kOffVersion, kVersion);
  put_u64(p + kOffFingerprint, header.model_fingerprint);
  put_u64(p + kOffSessionId, header.session_id);
  put_u64(p + kOffGeneration, header.generation);
  put_i32(p + kOffLayers, header.layout.n_layers);
  put_i32(p + kOffKvHeads, header.layout.n_kv_heads);
  put_i32(p + kOffHeadDim, header.layout.head_dim);
  put_i32(p + kOffBlockTokens, header.layout.block_tokens);
  put_u32(p + kOffDtype, static_cast<uint32_t>(header.layout.dtype));
  put_i64(p + kOffBlockCount, static_cast<int64_t>(entries.size()));
  put_i64(p + kOffBlockStride, g.stride);
  put_i64(p + kOffPayloadOffset, g.payload_offset);
  put_i64(p + kOffBlockBytes, g.block_bytes);
  unsigned char* e = p + kHeaderBytes;
  for (const SegmentEntry& entry : entries) {
    put_u64(e, entry.content_hash);
    put_i32(e + 8, entry.tokens);
    put_u64(e + 16, entry.checksum);
    e += kEntryBytes;
  }
}

// Serializes a test's fault injector for the payload writers, which call it from several
// threads (injectors count calls and record writes; none is meant to be thread-safe).
class LockedInjector : public IoFaultInjector {
 public:
  explicit LockedInjector(IoFaultInjector* inner) : inner_(inner) {}
  IoFault before(IoOp op, const std::filesystem::path& path) override {
    std::lock_guard lock(mutex_);
    return inner_->before(op, path);
  }
  void after_create(const std::filesystem::path& file) override {
    std::lock_guard lock(mutex_);
    inner_->after_create(file);
  }
  void after_write(const std::filesystem::path& file, int64_t offset, const void* bytes, int64_t size) override {
    std::lock_guard lock(mutex_);
    inner_->after_write(file, offset, bytes, size);
  }
  void after_fsync(const std::filesystem::path& file) override {
    std::lock_guard lock(mutex_);
    inner_->after_fsync(file);
  }
  void after_rename(const std::filesystem::path& from, const std::filesystem::path& to) override {
    std::lock_guard lock(mutex_);
    inner_->after_rename(from, to);
  }
  void after_fsync_dir(const std::filesystem::path& dir) override {
    std::lock_guard lock(mutex_);
    inner_->after_fsync_dir(dir);
  }
  void after_unlink(const std::filesystem::path& path) override {
    std::lock_guard lock(mutex_);
    inner_->after_unlink(path);
  }

 private:
  IoFaultInjector* inner_;
  std::mutex mutex_;
};

// Writes the payload of a segment in pieces of consecutive blocks (at most kChunkBytes, or one
// block) on up to kWriteThreads threads at once, each thread checksumming the blocks it writes:
// a VM or NVMe disk reaches its write rate only with several requests in flight. A piece whose
// blocks lie back to back in aligned memory (the checkpoint's snapshot) is written from there;
// others go through a zero-padded bounce buffer. The first error stops the other threads and is
// rethrown.
void write_payload(File& file, const Geometry& g, std::span<const SegmentBlockSource> blocks,
                   std::vector<SegmentEntry>& entries, const IoProgress& progress) {
  constexpr size_t kWriteThreads = 4;
  const auto n = static_cast<int64_t>(blocks.size());
  const int64_t per_piece = std::max<int64_t>(1, kChunkBytes / g.stride);
  const int64_t pieces = (n + per_piece - 1) / per_piece;
  std::atomic<int64_t> next_piece{0};
  std::atomic<bool> failed{false};
  std::exception_ptr first_error;
  std::mutex mutex;  // first_error, done and the progress callback
  int64_t done = 0;
  auto write_pieces = [&] {
    try {
      AlignedBuffer bounce;
      for (int64_t p = next_piece++; p < pieces && !failed; p = next_piece++) {
        const int64_t first = p * per_piece, count = std::min(per_piece, n - first);
        bool straight = g.stride == g.block_bytes &&
                        (!file.is_direct() || reinterpret_cast<uintptr_t>(blocks[first].data) % kPage == 0);
        for (int64_t i = first; i < first + count; ++i) {
          entries[i].checksum = block_checksum(blocks[i].data, g.block_bytes);
          straight = straight && (i == first || static_cast<const char*>(blocks[i].data) ==
                                                    static_cast<const char*>(blocks[i - 1].data) + g.block_bytes);
        }
        const void* from = blocks[first].data;
        if (!straight) {
          if (bounce.size() < count * g.stride) bounce = AlignedBuffer(per_piece * g.stride);
          auto* to = static_cast<unsigned char*>(bounce.data());
          for (int64_t i = 0; i < count; ++i, to += g.stride) {
            std::memcpy(to, blocks[first + i].data, static_cast<size_t>(g.block_bytes));
            std::memset(to + g.block_bytes, 0, static_cast<size_t>(g.stride - g.block_bytes));  // padding
          }
          from = bounce.data();
        }
        file.write_at(from, count * g.stride, g.payload_offset + first * g.stride);
        std::lock_guard lock(mutex);
        done += count * g.stride;
        if (progress) progress(done, g.file_bytes);
      }
    } catch (...) {
      std::lock_guard lock(mutex);
      if (!first_error) first_error = std::current_exception();
      failed = true;
    }
  };
  std::vector<std::thread> helpers;
  for (size_t t = 1; t < std::min<size_t>(kWriteThreads, static_cast<size_t>(pieces)); ++t) {
    try {
      helpers.emplace_back(write_pieces);
    } catch (const std::system_error&) {
      break;  // no more threads: fewer writers
    }
  }
  write_pieces();
  for (auto& t : helpers) t.join();
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace

uint64_t block_checksum(const void* data, int64_t bytes) { return XXH3_64bits(data, static_cast<size_t>(bytes)); }

SegmentInfo write_segment(const std::filesystem::path& path, const SegmentHeader& header,
                          std::span<const SegmentBlockSource> blocks, IoFaultInjector* faults,
                          const IoProgress& progress, const std::function<void(const char* step)>& on_step) {
  const kernels::KvLayout& layout = header.layout;
  if (!layout_is_valid(layout, static_cast<uint32_t>(layout.dtype))) {
    throw std::invalid_argument("KV segment '" + path.string() + "': invalid KV layout " + describe(layout));
  }
  if (blocks.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    throw std::invalid_argument("KV segment '" + path.string() + "': " + std::to_string(blocks.size()) +
                                " blocks, at most 2^31-1 fit in one segment");
  }
  const Geometry g = geometry_of(layout.block_bytes(), static_cast<int64_t>(blocks.size()));

  std::vector<SegmentEntry> entries;
  entries.reserve(blocks.size());
  for (size_t i = 0; i < blocks.size(); ++i) {
    const SegmentBlockSource& b = blocks[i];
    if (b.data == nullptr || b.tokens < 0 || b.tokens > layout.block_tokens) {
      throw std::invalid_argument("KV segment '" + path.string() + "': block " + std::to_string(i) + " has " +
                                  (b.data == nullptr ? "no data" : std::to_string(b.tokens) + " tokens") +
                                  ", expected data and 0.." + std::to_string(layout.block_tokens) + " tokens");
    }
    entries.push_back({b.content_hash, b.tokens, 0});  // checksums come with the payload's write
  }

  // Checked here so that the cleanup below, which removes `path` after a failed rename or
  // directory fsync, can never delete a file that was there before.
  std::error_code ec;
  if (std::filesystem::exists(path, ec)) {
    throw IoError("write KV segment '" + path.string() + "': the file already exists; segments are never overwritten",
                  EEXIST);
  }
  std::filesystem::path tmp = path;
  tmp += ".tmp";
  remove_file(tmp, faults);  // a stale temp file of a crashed checkpoint
  const std::filesystem::path dir = path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path();
  auto step = [&](const char* name) {
    if (on_step) on_step(name);
  };

  std::optional<LockedInjector> locked_faults;
  if (faults != nullptr) locked_faults.emplace(faults);
  std::optional<File> file;
  bool renamed = false;
  uint64_t footer_hash = 0;
  try {
    file.emplace(tmp, File::Mode::create_exclusive, true, locked_faults ? &*locked_faults : nullptr);
    // The payload first (it fills in the checksums), then the header and table, then the
    // footer: nothing is read before the fsync, so the order within the file is free.
    file->reserve(g.file_bytes);  // the payload's pieces land in parallel: keep the file in one piece
    write_payload(*file, g, blocks, entries, progress);
    AlignedBuffer prefix(g.payload_offset);
    encode_prefix(static_cast<unsigned char*>(prefix.data()), header, entries, g);
    footer_hash = XXH3_64bits(prefix.data(), static_cast<size_t>(g.payload_offset));
    AlignedBuffer footer(kPage);
    auto* f = static_cast<unsigned char*>(footer.data());
    std::memcpy(f, kFooterMagic.data(), kFooterMagic.size());
    put_u64(f + kOffFooterHash, footer_hash);
    put_i64(f + kOffFooterFileBytes, g.file_bytes);
    file->write_at(prefix.data(), g.payload_offset, 0);
    file->write_at(footer.data(), kPage, g.footer_offset);
    if (progress) progress(g.file_bytes, g.file_bytes);
    step("write");
    file->sync();  // NOTE: never retried; a failed fsync aborts the segment
    step("fsync");
    file.reset();
    rename_file(tmp, path, faults);
    renamed = true;
    step("rename");
    sync_directory(dir, faults);
    step("fsync_dir");
  } catch (...) {
    // Best effort: the original error is what the caller needs. After a rename the segment is
    // removed again (the caller will not commit a segment whose write threw), so a failure
    // never leaves a file at `path`.
    file.reset();
    try {
      remove_file(tmp, faults);
    } catch (...) {
    }
    if (renamed) {
      try {
        remove_file(path, faults);
        sync_directory(dir, faults);
      } catch (...) {
      }
    }
    throw;
  }
  return SegmentInfo{path, g.file_bytes, footer_hash, std::move(entries)};
}

SegmentReader::SegmentReader(const std::filesystem::path& path, const SegmentHeader& expected,
                             uint64_t expected_footer_hash, IoFaultInjector* faults)
    : file_(path, File::Mode::read, true, faults) {
  auto corrupt = [&](const std::string& what) {
    return CorruptSegment("KV segment '" + path.string() + "' does not verify: " + what +
                          "; the segment cannot be used (delete it and recompute the KV)");
  };
  const int64_t file_bytes = file_.size();
  if (file_bytes < 2 * kPage || file_bytes % kPage != 0) {
    throw corrupt("it is " + std::to_string(file_bytes) + " bytes, not a whole number of " + std::to_string(kPage) +
                  "-byte pages of at least two (truncated?)");
  }
  AlignedBuffer first(kPage);
  file_.read_at(first.data(), kPage, 0);
  const auto* h = static_cast<const unsigned char*>(first.data());
  if (std::memcmp(h + kOffMagic, kMagic.data(), kMagic.size()) != 0) throw corrupt("bad magic, not a KV segment");
  const uint32_t version = get_u32(h + kOffVersion);
  if (version != kVersion) {
    throw corrupt("format version " + std::to_string(version) + ", this build reads version " +
                  std::to_string(kVersion));
  }
  header_.model_fingerprint = get_u64(h + kOffFingerprint);
  header_.session_id = get_u64(h + kOffSessionId);
  header_.generation = get_u64(h + kOffGeneration);
  header_.layout.n_layers = get_i32(h + kOffLayers);
  header_.layout.n_kv_heads = get_i32(h + kOffKvHeads);
  header_.layout.head_dim = get_i32(h + kOffHeadDim);
  header_.layout.block_tokens = get_i32(h + kOffBlockTokens);
  const uint32_t dtype = get_u32(h + kOffDtype);
  const int64_t n_blocks = get_i64(h + kOffBlockCount);
  stride_ = get_i64(h + kOffBlockStride);
  payload_offset_ = get_i64(h + kOffPayloadOffset);
  const int64_t block_bytes = get_i64(h + kOffBlockBytes);
  if (!layout_is_valid(header_.layout, dtype)) throw corrupt("the header holds an impossible KV layout");
  header_.layout.dtype = static_cast<kernels::DType>(dtype);
  // Each block takes at least a page, so this bound also keeps the arithmetic below in range.
  if (n_blocks < 0 || n_blocks > file_bytes / kPage) {
    throw corrupt("the header claims " + std::to_string(n_blocks) + " blocks");
  }
  const Geometry g = geometry_of(header_.layout.block_bytes(), n_blocks);
  if (block_bytes != g.block_bytes || stride_ != g.stride || payload_offset_ != g.payload_offset) {
    throw corrupt("the header's block size, stride or payload offset disagree with its layout");
  }
  if (file_bytes != g.file_bytes) {
    throw corrupt("it is " + std::to_string(file_bytes) + " bytes but its header describes " +
                  std::to_string(g.file_bytes) + " (truncated or overwritten?)");
  }

  AlignedBuffer prefix(g.payload_offset);
  file_.read_at(prefix.data(), g.payload_offset, 0);
  AlignedBuffer footer(kPage);
  file_.read_at(footer.data(), kPage, g.footer_offset);
  const auto* f = static_cast<const unsigned char*>(footer.data());
  if (std::memcmp(f, kFooterMagic.data(), kFooterMagic.size()) != 0) throw corrupt("bad footer magic");
  if (get_i64(f + kOffFooterFileBytes) != file_bytes) {
    throw corrupt("the footer records " + std::to_string(get_i64(f + kOffFooterFileBytes)) + " bytes, the file has " +
                  std::to_string(file_bytes));
  }
  const uint64_t stored_hash = get_u64(f + kOffFooterHash);
  const uint64_t computed_hash = XXH3_64bits(prefix.data(), static_cast<size_t>(g.payload_offset));
  if (stored_hash != computed_hash) {
    throw corrupt("header/table checksum " + hex(computed_hash) + " differs from the footer's " + hex(stored_hash));
  }
  if (expected_footer_hash != 0 && stored_hash != expected_footer_hash) {
    throw corrupt("footer hash " + hex(stored_hash) + " differs from the expected " + hex(expected_footer_hash) +
                  " (a different segment under this name?)");
  }
  // Integrity first, expectations second: a mismatch below is a real file of another model.
  if (header_.model_fingerprint != expected.model_fingerprint) {
    throw corrupt("written for model fingerprint " + hex(header_.model_fingerprint) + ", expected " +
                  hex(expected.model_fingerprint));
  }
  if (header_.layout != expected.layout) {
    throw corrupt("KV layout " + describe(header_.layout) + ", expected " + describe(expected.layout));
  }

  entries_.reserve(static_cast<size_t>(n_blocks));
  const auto* e = static_cast<const unsigned char*>(prefix.data()) + kHeaderBytes;
  for (int64_t i = 0; i < n_blocks; ++i, e += kEntryBytes) {
    SegmentEntry entry{get_u64(e), get_i32(e + 8), get_u64(e + 16)};
    if (entry.tokens < 0 || entry.tokens > header_.layout.block_tokens) {
      throw corrupt("block " + std::to_string(i) + " claims " + std::to_string(entry.tokens) + " tokens");
    }
    entries_.push_back(entry);
  }
}

void SegmentReader::read_blocks(std::span<const int32_t> indices, std::span<void* const> destinations,
                                const IoProgress& progress) const {
  if (indices.size() != destinations.size()) {
    throw std::invalid_argument("KV segment '" + file_.path().string() + "': " + std::to_string(indices.size()) +
                                " block indices but " + std::to_string(destinations.size()) + " destinations");
  }
  const auto n_blocks = static_cast<int64_t>(entries_.size());
  for (size_t i = 0; i < indices.size(); ++i) {
    if (indices[i] < 0 || indices[i] >= n_blocks) {
      throw std::out_of_range("KV segment '" + file_.path().string() + "': block " + std::to_string(indices[i]) +
                              " requested, it holds " + std::to_string(n_blocks));
    }
    if (destinations[i] == nullptr) {
      throw std::invalid_argument("KV segment '" + file_.path().string() + "': null destination for block " +
                                  std::to_string(indices[i]));
    }
  }
  const int64_t block_bytes = header_.layout.block_bytes();
  const int64_t total_bytes = static_cast<int64_t>(indices.size()) * block_bytes;

  // Ascending block order turns adjacent requests into single reads, whatever order they came in.
  std::vector<size_t> order(indices.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return indices[a] < indices[b]; });

  const int64_t max_run_blocks = std::max<int64_t>(1, kReadRequestBytes / stride_);
  // Reading straight into the destination needs no padding between blocks (stride equals
  // block_bytes) and, under O_DIRECT, an aligned address.
  auto straight = [&](size_t pos) {
    return stride_ == block_bytes &&
           (!file_.is_direct() || reinterpret_cast<uintptr_t>(destinations[pos]) % kDirectIoAlignment == 0);
  };
  AlignedBuffer bounce;
  int64_t done_bytes = 0;
  size_t k = 0;
  while (k < order.size()) {
    const bool into_destination = straight(order[k]);
    size_t end = k + 1;
    while (end < order.size() && static_cast<int64_t>(end - k) < max_run_blocks &&
           indices[order[end]] == indices[order[end - 1]] + 1 &&
           (!into_destination || static_cast<char*>(destinations[order[end]]) ==
                                     static_cast<char*>(destinations[order[end - 1]]) + stride_)) {
      ++end;
    }
    const auto run_blocks = static_cast<int64_t>(end - k);
    const int64_t offset = payload_offset_ + indices[order[k]] * stride_;
    unsigned char* landing;
    if (into_destination) {
      landing = static_cast<unsigned char*>(destinations[order[k]]);
    } else {
      if (bounce.size() < run_blocks * stride_) {
        bounce = AlignedBuffer(std::min(max_run_blocks, static_cast<int64_t>(order.size())) * stride_);
      }
      landing = static_cast<unsigned char*>(bounce.data());
    }
    file_.read_at(landing, run_blocks * stride_, offset);
    for (size_t j = k; j < end; ++j) {
      const int32_t index = indices[order[j]];
      const unsigned char* block = landing + static_cast<int64_t>(j - k) * stride_;
      const uint64_t sum = block_checksum(block, block_bytes);
      if (sum != entries_[static_cast<size_t>(index)].checksum) {
        throw CorruptSegment("KV segment '" + file_.path().string() + "': block " + std::to_string(index) +
                             " fails its checksum (stored " + hex(entries_[static_cast<size_t>(index)].checksum) +
                             ", read " + hex(sum) + "); recompute its KV");
      }
      if (!into_destination) std::memcpy(destinations[order[j]], block, static_cast<size_t>(block_bytes));
    }
    done_bytes += run_blocks * block_bytes;
    if (progress) progress(done_bytes, total_bytes);
    k = end;
  }
}

}  // namespace den::memory
